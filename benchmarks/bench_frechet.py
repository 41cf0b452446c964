"""Speed and accuracy of the Fréchet cross term tr (S_v S_t)^{1/2}: mirlab exact vs the official routes.

For each width d and row count n (n = d/2, d + 1, 2d; the second cloud has 3n/4 rows), two anisotropic
token clouds are drawn, their float64 statistics computed once, and then timed (median of up to
--repeats runs):

    covariances    np.cov of both clouds in float64: what the baselines below start from
    exact          mirlab's cross term after its statistics (both n <= d: eigenvalues of the Gram of the
                   row cross product; one n <= d: rows times the other's Cholesky factor, same; both n > d:
                   Cholesky + dsygst + eigvalsh; see mirlab.metrics.frechet)
    exact-e2e      mirlab.frechet_distance(x, y) end to end, statistics included
    sqrtm          tr(scipy.linalg.sqrtm(S_v S_t)).real on the float64 covariances (official accurate mode,
                   pytorch-fid route)
    official-fast  the official 5-step iteration (float32 torch, as the official script runs it)
    official-fast-f64  the same iteration in float64 (the like-for-like float64 baseline)

Relative error is that of the resulting FD against a float64 eigen reference: eigenvalues of
S_a^{1/2} S_b S_a^{1/2} (scipy eigh; a = the lower-rank cloud, restricted to its range).
Speed-ups are baseline time / method time; for exact-e2e the baseline also pays for its covariances
(covariances + baseline), since frechet_distance starts from the rows.

    python benchmarks/bench_frechet.py                 # d = 576, 2048, 4096 (minutes)
    python benchmarks/bench_frechet.py --quick         # smoke run, small d (seconds)
    python benchmarks/bench_frechet.py --out bench.csv
    python benchmarks/bench_frechet.py --threads 1     # steadier timings on a shared machine
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import numpy as np
import pandas as pd
import scipy
import scipy.linalg
import torch

from mirlab.metrics.frechet import _cloud, _cross_term, frechet_distance, official_fast_trace


def token_cloud(n: int, d: int, seed: int, decades: float) -> np.ndarray:
    """Rows with standard deviations spread over `decades` decades in a random basis (LVLM-like)."""
    rng = np.random.default_rng(seed)
    basis, _ = np.linalg.qr(rng.standard_normal((d, d)))
    stds = np.logspace(-decades, 0, d) * rng.uniform(0.5, 2.0, d)
    return (rng.standard_normal((n, d)) * stds) @ basis.T + 0.1 * rng.standard_normal(d)


def reference_cross(a_rows: np.ndarray, b_rows: np.ndarray, Sa: np.ndarray, Sb: np.ndarray) -> float:
    """sum sqrt(eig(S_a^{1/2} S_b S_a^{1/2})) on the range of S_a (a = lower rank), scipy eigh, float64."""
    d = Sa.shape[0]
    if min(len(b_rows) - 1, d) < min(len(a_rows) - 1, d):
        a_rows, b_rows, Sa, Sb = b_rows, a_rows, Sb, Sa
    r = min(len(a_rows) - 1, d)
    w, V = scipy.linalg.eigh(Sa)
    half = V[:, -r:] * np.sqrt(np.clip(w[-r:], 0, None))
    lam = scipy.linalg.eigh(half.T @ Sb @ half, eigvals_only=True)
    return float(np.sqrt(np.clip(lam, 0, None)).sum())


def median_seconds(fn, repeats: int, max_seconds: float) -> tuple[float, object]:
    """Median wall time of fn() over up to `repeats` runs (fewer once `max_seconds` are spent)."""
    times, out = [], None
    while len(times) < repeats and sum(times) < max_seconds:
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def bench_case(d: int, n: int, seed: int, repeats: int, max_seconds: float) -> list[dict]:
    n_text = max(3, (3 * n) // 4)
    x = token_cloud(n, d, seed, decades=2.0)
    y = 0.7 * token_cloud(n_text, d, seed + 1, decades=1.5)
    start = time.perf_counter()
    Sx, Sy = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    cov_seconds = time.perf_counter() - start
    base = float(np.sum((x.mean(0) - y.mean(0)) ** 2) + np.trace(Sx) + np.trace(Sy))
    ref_fd = base - 2 * reference_cross(x, y, Sx, Sy)
    cx, cy = _cloud(x), _cloud(y)
    runs = {
        "exact": lambda: _cross_term(cx, cy),
        "exact-e2e": lambda: frechet_distance(x, y),
        "sqrtm": lambda: float(np.trace(scipy.linalg.sqrtm(Sx @ Sy)).real),
        "official-fast": lambda: official_fast_trace(Sx, Sy),
        "official-fast-f64": lambda: official_fast_trace(Sx, Sy, dtype=torch.float64),
    }
    rows = [{"d": d, "n": n, "n_text": n_text, "method": "covariances", "seconds": cov_seconds,
             "rel_error": float("nan")}]
    print(f"  d={d:5d} n={n:6d} {'covariances':17s} {cov_seconds:9.3f} s", flush=True)
    for method, fn in runs.items():
        try:
            seconds, out = median_seconds(fn, repeats, max_seconds)
            fd = out if method == "exact-e2e" else base - 2 * out
            error = abs(fd - ref_fd) / abs(ref_fd)
        except (ValueError, np.linalg.LinAlgError) as err:  # official-fast: singular float32 product
            seconds, error = float("nan"), float("nan")
            print(f"  d={d} n={n} {method}: failed ({err})")
        rows.append({"d": d, "n": n, "n_text": n_text, "method": method, "seconds": seconds, "rel_error": error})
        print(f"  d={d:5d} n={n:6d} {method:17s} {seconds:9.3f} s  rel err {error:.2e}", flush=True)
    return rows


def add_ratios(table: pd.DataFrame) -> pd.DataFrame:
    """Speed-ups of every method relative to sqrtm and official-fast measured in the same case.

    The end-to-end row (exact-e2e) is compared with covariances + baseline, the others with the baseline.
    """
    table = table.copy()
    key = pd.MultiIndex.from_frame(table[["d", "n"]])
    t_cov = table[table.method == "covariances"].set_index(["d", "n"])["seconds"].reindex(key).to_numpy()
    e2e = (table.method == "exact-e2e").to_numpy()
    for baseline in ("sqrtm", "official-fast", "official-fast-f64"):
        t_base = table[table.method == baseline].set_index(["d", "n"])["seconds"].reindex(key).to_numpy()
        t_base = np.where(e2e, t_base + t_cov, t_base)
        table[f"speedup_vs_{baseline}"] = t_base / table["seconds"].to_numpy()
    table.loc[table.method == "covariances", [c for c in table if c.startswith("speedup")]] = np.nan
    return table


def main(argv=None) -> pd.DataFrame:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small d for a smoke run")
    parser.add_argument("--dims", type=int, nargs="+", default=None, help="widths d (default 576 2048 4096)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per method (median)")
    parser.add_argument("--max-seconds", type=float, default=30.0, help="stop repeating a method after this")
    parser.add_argument("--threads", type=int, default=None,
                        help="limit BLAS/LAPACK/OpenMP threads (numpy, scipy and torch alike)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="write the table as CSV")
    args = parser.parse_args(argv)
    dims = args.dims or ([32, 96] if args.quick else [576, 2048, 4096])
    if args.threads:
        from threadpoolctl import threadpool_limits
        threadpool_limits(args.threads)
        torch.set_num_threads(args.threads)

    print(f"numpy {np.__version__}, scipy {scipy.__version__}, torch {torch.__version__}, "
          f"{os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads, load average {os.getloadavg()[0]:.2f}, {platform.machine()}")
    rows = []
    for d in dims:
        for n in (d // 2, d + 1, 2 * d):  # below d, just above d (second cloud below), above d
            rows += bench_case(d, n, args.seed + d, args.repeats, args.max_seconds)
    table = add_ratios(pd.DataFrame(rows))
    with pd.option_context("display.width", 160, "display.max_columns", 20):
        print(table.to_string(index=False, float_format=lambda v: f"{v:.3g}"))
    if args.out:
        table.to_csv(args.out, index=False)
    return table


if __name__ == "__main__":
    main()
