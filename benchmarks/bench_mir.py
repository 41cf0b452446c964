"""Benchmark: a full MIR (every layer: upcast, text-centric scale, 3-sigma rule, Fréchet distance) of LLaVA-1.5-shaped
rows, mirlab exact on the CPU and on a GPU vs the official fast and accurate arithmetic, in the same run.

    python benchmarks/bench_mir.py --shape tiny                      # seconds, CPU (the smoke run)
    python benchmarks/bench_mir.py --n 100                           # 32 layers x 4096, 576 + ~500 rows per pair
    python benchmarks/bench_mir.py --n 100 --cpu-layers 4 --accurate-layers 2 --out mir.csv   # GPU machine
    python benchmarks/bench_mir.py --shape tiny --gpu-device cpu --methods exact-cpu exact-gpu official-fast-gpu

Shapes: ``llava-1.5`` (default): 32 layers of width 4096, per pair 576 image rows and 450-549 text rows (mean ~500),
N pairs (``--n``, default 100: 57,600 image and ~50,000 text rows per layer); ``tiny``: 4 layers of width 64, 16
image and 10-14 text rows per pair. Rows are synthetic float32 (what the store holds): per layer, Gaussian rows with
per-dimension spreads over two decades, offsets, a few rows with large norms (so the 3-sigma rule acts), and a scale
that grows with depth. Each layer is generated once (seeded, on the CPU) and every method measures that same layer,
so peak memory is about one layer plus each method's work space.

Methods (per layer, wall time; the GPU ones include moving the float32 rows to the device):
    exact-cpu          mirlab.metrics.mir.layer_fd(method="exact") on CPU rows (numpy + LAPACK, float64)
    exact-gpu          the same on rows moved to --gpu-device (default cuda): prepare_layer there, then the
                       statistics in torch float64 there (mirlab.metrics.frechet_torch; what layer_fd does with
                       CUDA rows)
    official-fast      the official --mode fast arithmetic on the CPU (float32; layer_fd(method="official-fast"))
    official-fast-gpu  the same arithmetic on --gpu-device (float32 torch, where the official script ran it)
    official-accurate  the official --mode accurate: float32 covariances, scipy sqrtm (CPU)
``--gpu-device cpu`` runs the GPU code paths on CPU tensors (how the smoke test checks them without a GPU).

``--cpu-layers K`` / ``--accurate-layers K`` time the CPU methods / sqrtm on the first K layers only and report
their total as K-layer time x L / K ("est."; their MIR likewise extrapolates the FD sum). Reported: seconds per
method (whole MIR), MIR per method, speed-ups of mirlab's exact routes over each official route measured in this
run, and the largest relative difference of the per-layer FD between exact-cpu and exact-gpu (target <= 1e-9).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

SHAPES = {"llava-1.5": dict(layers=32, width=4096, image_rows=576, text_rows=(450, 550)),
          "tiny": dict(layers=4, width=64, image_rows=16, text_rows=(10, 15))}
CPU_METHODS = ("exact-cpu", "official-fast", "official-accurate")
GPU_METHODS = ("exact-gpu", "official-fast-gpu")


def layer_rows(shape: dict, n: int, layer: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(image rows, text rows) of one synthetic layer, float32 on the CPU (see the module docstring)."""
    generator = torch.Generator().manual_seed(seed * 1000 + layer)
    d = shape["width"]
    lengths = np.random.default_rng(seed).integers(*shape["text_rows"], size=n)
    depth = 1.0 + layer / shape["layers"]

    def rows(count: int, decades: float, offset: float) -> torch.Tensor:
        spread = torch.logspace(-decades, 0, d)[torch.randperm(d, generator=generator)]
        x = torch.randn(count, d, generator=generator) * (spread * depth)
        x += offset * torch.randn(d, generator=generator)
        x[:: max(1, count // 20)] *= 4.0  # ~5 % rows with large norms: outliers for the 3-sigma rule
        return x

    return rows(n * shape["image_rows"], 2.0, 0.5), rows(int(lengths.sum()), 1.5, 0.2)


def exact_gpu(image: torch.Tensor, text: torch.Tensor, device: str) -> float:
    """mirlab's exact FD of one layer on ``device``: prepare_layer there (float64), then frechet_torch."""
    from mirlab.metrics import frechet_torch
    from mirlab.metrics.normalize import prepare_layer

    prepared = prepare_layer(image.to(device), text.to(device))
    return frechet_torch.frechet_distance(prepared.image, prepared.text)


def official_fast_gpu(image: torch.Tensor, text: torch.Tensor, device: str) -> float:
    """The official fast FD on ``device``: float32 rows prepared as MIR does, covariances and the 5-step iteration
    in float32 torch there (frechet.official_fast_trace keeps torch tensors on their device)."""
    from mirlab.metrics.frechet import official_fast_trace
    from mirlab.metrics.normalize import prepare_layer

    prepared = prepare_layer(image.to(device), text.to(device), dtype=torch.float32)
    stats = []
    for x in (prepared.image, prepared.text):
        mu = x.mean(dim=0)
        xc = x - mu
        stats.append((mu, xc.T @ xc / (x.shape[0] - 1)))
    (mu1, S1), (mu2, S2) = stats
    cross = official_fast_trace(S1, S2)
    return float((mu1 - mu2) @ (mu1 - mu2)) + float(torch.trace(S1)) + float(torch.trace(S2)) - 2.0 * cross


def run_method(method: str, image: torch.Tensor, text: torch.Tensor, gpu_device: str) -> float:
    from mirlab.metrics.mir import layer_fd

    if method == "exact-gpu":
        return exact_gpu(image, text, gpu_device)
    if method == "official-fast-gpu":
        return official_fast_gpu(image, text, gpu_device)
    return layer_fd(image, text, method=method.removesuffix("-cpu"))["fd"]


def _synchronize(method: str, gpu_device: str) -> None:
    if method.endswith("gpu") and gpu_device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(method: str, image, text, gpu_device: str) -> tuple[float, float]:
    """(seconds, FD) of one method on one layer (NaN FD if the official arithmetic fails on it)."""
    _synchronize(method, gpu_device)
    start = time.perf_counter()
    try:
        fd = run_method(method, image, text, gpu_device)
    except ValueError as err:  # official-fast / accurate: singular or non-finite in float32
        print(f"  {method}: {err}", flush=True)
        fd = float("nan")
    _synchronize(method, gpu_device)
    return time.perf_counter() - start, fd


def summary(table: pd.DataFrame, n_layers: int) -> tuple[pd.DataFrame, list[str]]:
    """Per method: seconds for the whole MIR (measured, or K-layer time x L / K), MIR, and the report lines."""
    rows = []
    for method, group in table.groupby("method", sort=False):
        measured = len(group)
        seconds = group["seconds"].sum() * n_layers / measured
        fd = group["fd"].sum() * n_layers / measured
        rows.append({"method": method, "layers_timed": measured, "seconds": seconds,
                     "estimated": measured < n_layers, "mir": math.log10(fd) if fd > 0 else float("nan")})
    frame = pd.DataFrame(rows).set_index("method")
    lines = [f"{'method':19s} {'layers':>6s} {'seconds (all layers)':>21s} {'MIR':>9s}"]
    for method, r in frame.iterrows():
        note = " est." if r["estimated"] else ""
        lines.append(f"{method:19s} {r['layers_timed']:6d} {r['seconds']:16.2f}{note:5s} {r['mir']:9.4f}")
    for mine in ("exact-cpu", "exact-gpu"):
        for base in ("official-fast", "official-fast-gpu", "official-accurate"):
            if mine in frame.index and base in frame.index:
                lines.append(f"{mine} vs {base}: {frame.at[base, 'seconds'] / frame.at[mine, 'seconds']:.1f}x faster")
    if {"exact-cpu", "exact-gpu"} <= set(frame.index):
        pivot = table.pivot(index="layer", columns="method", values="fd").dropna(subset=["exact-cpu", "exact-gpu"])
        worst = float((pivot["exact-gpu"] / pivot["exact-cpu"] - 1).abs().max())
        lines.append(f"exact-gpu vs exact-cpu per-layer FD: max relative difference {worst:.2e} over "
                     f"{len(pivot)} layers (target <= 1e-9)")
    return frame, lines


def main(argv=None) -> pd.DataFrame:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llava-1.5")
    parser.add_argument("--n", type=int, default=None, help="pairs (default 100; tiny: 10)")
    parser.add_argument("--methods", nargs="+", choices=CPU_METHODS + GPU_METHODS, default=None,
                        help="default: the CPU methods, plus the GPU ones when CUDA is available")
    parser.add_argument("--cpu-layers", type=int, default=None, help="time the CPU methods on this many layers")
    parser.add_argument("--accurate-layers", type=int, default=None, help="time official-accurate on this many")
    parser.add_argument("--gpu-device", default="cuda", help="device of the GPU methods (cpu: check them here)")
    parser.add_argument("--threads", type=int, default=None, help="torch / BLAS threads")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="per-layer CSV (layer, method, seconds, fd)")
    parser.add_argument("--json", default=None, help="summary JSON")
    args = parser.parse_args(argv)
    shape = SHAPES[args.shape]
    n = args.n or (10 if args.shape == "tiny" else 100)
    methods = args.methods or list(CPU_METHODS) + (list(GPU_METHODS) if torch.cuda.is_available() else [])
    if any(m.endswith("gpu") for m in methods) and args.gpu_device.startswith("cuda") and not torch.cuda.is_available():
        parser.error("GPU methods on cuda asked for, but torch sees no CUDA device (--gpu-device cpu runs them here)")
    if args.threads:
        from threadpoolctl import threadpool_limits
        threadpool_limits(args.threads)
        torch.set_num_threads(args.threads)
    limit = {m: args.cpu_layers for m in ("exact-cpu", "official-fast")}
    limit["official-accurate"] = args.accurate_layers or args.cpu_layers
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    device += f", GPU methods on {args.gpu_device}" if any(m.endswith("gpu") for m in methods) else ""
    header = (f"{args.shape}: {shape['layers']} layers x {shape['width']}, N={n} pairs, {shape['image_rows']} image + "
              f"{shape['text_rows'][0]}-{shape['text_rows'][1] - 1} text rows per pair; torch {torch.__version__}, "
              f"{os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads, {device}, {platform.machine()}")
    print(header, flush=True)
    warm = layer_rows(shape, max(2, 2 * shape["width"] // 500 + 1), 0, args.seed)  # > d rows: the covariance route
    for method in methods:  # untimed: library loading, kernels, GPU context and solver work spaces (sqrtm has none)
        if method != "official-accurate":
            timed(method, *warm, args.gpu_device)
    del warm
    records = []
    for layer in range(1, shape["layers"] + 1):
        image, text = layer_rows(shape, n, layer, args.seed)
        for method in methods:
            if limit.get(method) is not None and layer > limit[method]:
                continue
            seconds, fd = timed(method, image, text, args.gpu_device)
            records.append({"layer": layer, "method": method, "seconds": seconds, "fd": fd})
            print(f"  layer {layer:2d} {method:19s} {seconds:8.3f} s  FD {fd:.6g}", flush=True)
        del image, text
    table = pd.DataFrame(records)
    frame, lines = summary(table, shape["layers"])
    print(header)
    print("\n".join(lines))
    if args.out:
        table.to_csv(args.out, index=False)
    if args.json:
        Path(args.json).write_text(json.dumps({"header": header, "summary": frame.reset_index().to_dict("records"),
                                               "report": lines}, indent=1, default=float))
    return table


if __name__ == "__main__":
    main()
