"""The scene-QA benchmark of the embedded model before and after instruction tuning (issue 10's figures).

Three models, each scored on the test split (600 questions, 100 per kind; `mirlab.tiny.benchmark.benchmark`)
with the image, with a blank image, without the image rows, and by free generation:

    stage 1            the shipped `final` projector, no SFT
    SFT from final     the study's SFT recipe (data/study/sft_recipe.json) from `final` (= lr2e-3/step-0250)
    SFT from random    the same recipe from lr2e-3/step-0000, the random-init projector of the same run

The two SFT runs are the ones the study uses (its config 1 and trajectory start lr2e-3/step-0000), trained here
if they are not in the cache yet (resumable). Writes data/sft/benchmark.csv (tidy: model, kind, accuracy,
chance, n, blind accuracies, visual gains, generation accuracy), data/sft/timing.csv (model, part, seconds,
threads: the benchmark's parts and the SFT run's median seconds per step), data/sft/benchmark.png; a model
already in benchmark.csv is skipped. CPU time per model goes to data/study/cpu_time.csv (stage `benchmark-full`).

    python experiments/benchmark_sft.py --threads 2 [--only "SFT from random"]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import mir_study  # noqa: E402  (cpu_seconds, record_time, append_rows, load_sft_recipe)

from mirlab import paths  # noqa: E402
from mirlab.tiny import benchmark, sft  # noqa: E402
from mirlab.tiny.build import embedded_model  # noqa: E402

OUT = paths.data_dir() / "sft"
MODELS = {"stage 1": None, "SFT from final": "final", "SFT from random": "lr2e-3/step-0000"}


def run(name: str, recipe: sft.SFTRecipe, progress: bool) -> None:
    start = MODELS[name]
    cpu, wall = mir_study.cpu_seconds(), time.perf_counter()
    model, processor = embedded_model("final") if start is None else sft.fine_tuned(start, recipe, progress)
    tables = benchmark.benchmark(model, processor, progress=progress)
    summary = tables["summary"].copy()
    summary.insert(0, "model", name)
    timing = tables["timing"].copy()
    if start is not None:
        log = sft.read_log(sft.run_dir(recipe, start))
        timing = pd.concat([timing, pd.DataFrame([{"part": "SFT, median seconds per step",
                                                   "seconds": float(log["seconds"].median())}])])
    timing.insert(0, "model", name)
    timing["threads"] = torch.get_num_threads()
    OUT.mkdir(parents=True, exist_ok=True)
    mir_study.append_rows(OUT / "benchmark.csv", summary, "model", name)
    mir_study.append_rows(OUT / "timing.csv", timing, "model", name)
    mir_study.record_time("benchmark-full", name, mir_study.cpu_seconds() - cpu, time.perf_counter() - wall,
                          torch.get_num_threads())
    average = summary.set_index("kind").loc["average"]
    print(f"{name}: average {average['accuracy']:.3f} (chance {average['chance']:.3f}, blank "
          f"{average['blank_accuracy']:.3f}, no image {average['no_image_accuracy']:.3f}); generation "
          f"{average['generation_accuracy']:.3f}", flush=True)


def figure() -> Path:
    """One panel per model: accuracy per kind with chance and both blind accuracies (benchmark_figure)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = pd.read_csv(OUT / "benchmark.csv")
    names = [n for n in MODELS if n in set(table["model"])]
    fig, axes = plt.subplots(1, len(names), figsize=(6.5 * len(names), 4), layout="constrained", squeeze=False)
    for ax, name in zip(axes[0], names):
        part = table[table["model"] == name].drop(columns="model")
        average = part.set_index("kind").loc["average", "accuracy"]
        benchmark.benchmark_figure(part, title=f"{name}: average {average:.3f}", ax=ax)
        ax.tick_params(axis="x", rotation=30)
    path = OUT / "benchmark.png"
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--only", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    recipe = None
    done = set(mir_study.read_csv(OUT / "benchmark.csv").get("model", pd.Series(dtype=str)))
    for name in args.only:
        if name in done:
            print(f"{name}: benchmarked already", flush=True)
            continue
        if MODELS[name] is not None and recipe is None:
            recipe = mir_study.load_sft_recipe()  # raises, naming the file, until the recipe is fixed
        run(name, recipe, progress=not args.no_progress)
    print(f"wrote {figure()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
