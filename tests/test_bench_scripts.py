"""The scale benchmarks at tiny shapes on the CPU (benchmarks/bench_mir.py, bench_extract.py, shapes.py): they run,
report every method, and their numbers agree with the library computed independently here."""
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mirlab import compute_mir, extract_hidden_states
from tiny_models import single_thread

ROOT = Path(__file__).resolve().parents[1]


def load(name):
    """A benchmark script as a module (benchmarks/ is not a package)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    with single_thread():
        yield


def test_shapes_have_the_published_parameter_counts():
    """Built on the meta device (no memory): LLaVA-1.5-7B has 7,063,427,072 parameters, Qwen2.5-VL-7B-Instruct
    8,292,166,656 (their Hub model cards: 7.06B, 8.29B), with 576 image tokens for LLaVA's 336 px crop."""
    shapes = load("shapes")
    llava, processor = shapes.build("llava-1.5-7b", device="meta")
    assert shapes.parameter_count(llava) == 7_063_427_072
    assert processor.image_processor.crop_size == {"height": 336, "width": 336}
    assert (336 // processor.patch_size) ** 2 == 576
    qwen, _ = shapes.build("qwen2.5-vl-7b", device="meta")
    assert shapes.parameter_count(qwen) == 8_292_166_656
    assert qwen.config.text_config.num_hidden_layers == 28 and llava.config.text_config.num_hidden_layers == 32
    with pytest.raises(ValueError, match="unknown shape 'llava-13b'"):
        shapes.build("llava-13b", device="meta")


def test_bench_mir_tiny_reports_every_method_and_the_library_mir(tmp_path, capsys):
    bench = load("bench_mir")
    table = bench.main(["--shape", "tiny", "--gpu-device", "cpu", "--methods", "exact-cpu", "official-fast",
                        "official-accurate", "exact-gpu", "official-fast-gpu", "--cpu-layers", "3",
                        "--out", str(tmp_path / "mir.csv"), "--json", str(tmp_path / "mir.json")])
    printed = capsys.readouterr().out
    shape = bench.SHAPES["tiny"]
    layers = [(k, *bench.layer_rows(shape, 10, k)) for k in range(1, shape["layers"] + 1)]
    for method, library in (("exact-gpu", "exact"), ("official-fast-gpu", "official-fast")):
        reference = compute_mir(layers, method=library)  # the library on the same synthetic rows
        fds = table[table.method == method].sort_values("layer")["fd"].to_numpy()
        np.testing.assert_allclose(fds, reference.per_layer["fd"], rtol=1e-9 if library == "exact" else 1e-4)
    assert table.groupby("method").size().to_dict() == {"exact-cpu": 3, "official-fast": 3, "official-accurate": 3,
                                                        "exact-gpu": 4, "official-fast-gpu": 4}
    summary = json.loads((tmp_path / "mir.json").read_text())
    estimated = {row["method"]: row["estimated"] for row in summary["summary"]}
    assert estimated == {"exact-cpu": True, "official-fast": True, "official-accurate": True, "exact-gpu": False,
                         "official-fast-gpu": False}
    assert "exact-gpu vs official-fast-gpu:" in printed and "exact-cpu vs official-accurate:" in printed
    worst = float(printed.split("max relative difference ")[1].split()[0])
    assert worst <= 1e-9


@pytest.mark.slow  # four subprocesses, each importing transformers and building the model (~30 s)
def test_bench_extract_random_tiny_runs_every_variant_and_its_mir_is_the_library_one(tmp_path):
    out = tmp_path / "extract.json"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_extract.py"), "--model", "random:tiny",
                           "--n", "3", "--batch-size", "2", "--threads", "1", "--with-mir", "--json", str(out)],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    data = json.loads(out.read_text())
    results = data["results"]
    assert list(results) == ["official", "mirlab", "bare", "bare-last"]
    assert len({r["tokens"] for r in results.values()}) == 1  # the same prompts for every variant
    assert all(r["tokens_per_s"] > 0 and r["peak_rss_mib"] > 0 for r in results.values())
    assert any(line.startswith("mirlab vs official:") for line in data["report"])
    bench, shapes = load("bench_extract"), load("shapes")
    model, processor = shapes.build("tiny")
    images, texts = bench.make_pairs(3, model="random:tiny")
    states = extract_hidden_states(model, processor, images, texts, batch_size=2, progress=False)
    assert results["mirlab"]["mir"] == pytest.approx(compute_mir(states).mir, rel=1e-6)
    assert torch.get_num_threads() == 1
