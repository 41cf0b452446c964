"""Choose the study's one SFT recipe on the validation split, then freeze it in data/study/sft_recipe.json.

The first recipe (issue 10: one question per example, lr 1e-4, 150 steps of 8, 500 training scenes -- 1,200
questions seen) left colour, count and position near chance. Before any study configuration is fine-tuned, three
candidates -- decided before any of them was scored -- are trained from the shipped `final` projector and scored
on scene-QA questions of the **val** split (scenes that share no structure with train or test; 100 per kind,
likelihood ranking with the image and with a blank image):

    initial        turns single, lr 1e-4, 150 steps, 500 scenes    (the recipe of issue 10)
    scene-lr1e-4   turns scene,  lr 1e-4, 200 steps, 1600 scenes   (one epoch; ~9,500 questions seen)
    scene-lr3e-4   turns scene,  lr 3e-4, 200 steps, 1600 scenes

("scene": all questions of a scene in one conversation, so the 64 image rows run once per scene.) The rule: the
candidate with the highest val average accuracy wins; a tie within 0.005 goes to the cheaper one, in the order
listed. The test split is not looked at here. Rows land in data/study/sft_recipe_search.csv as each candidate
finishes (rerun to resume: finished candidates are read back, an interrupted SFT resumes from its state);
`--select` writes the winner to data/study/sft_recipe.json, which `experiments/mir_study.py` then uses for every
configuration. CPU seconds per candidate go to data/study/cpu_time.csv.

    python experiments/sft_recipe_search.py --threads 1 [--only scene-lr1e-4]
    python experiments/sft_recipe_search.py --select
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import mir_study  # noqa: E402  (cpu_seconds, record_time, append_rows, OUT)

from mirlab.tiny import benchmark, sft  # noqa: E402

START = "final"
CANDIDATES = {
    "initial": sft.SFTRecipe(name="sft", lr=1e-4, steps=150, batch_size=8, warmup=10, train_scenes=500),
    "scene-lr1e-4": sft.SFTRecipe(name="scene-lr1e-4", lr=1e-4, steps=200, batch_size=8, warmup=10,
                                  train_scenes=1600, turns="scene"),
    "scene-lr3e-4": sft.SFTRecipe(name="scene-lr3e-4", lr=3e-4, steps=200, batch_size=8, warmup=10,
                                  train_scenes=1600, turns="scene"),
}
TIE = 0.005
SEARCH_FILE = mir_study.OUT / "sft_recipe_search.csv"


def evaluate(name: str, progress: bool) -> pd.DataFrame:
    """Train candidate `name` and score it on the val split; one row per kind."""
    recipe = CANDIDATES[name]
    cpu, wall = mir_study.cpu_seconds(), time.perf_counter()
    model, processor = sft.fine_tuned(START, recipe, progress)
    tables = benchmark.benchmark(model, processor, split="val", blind=("blank",), generation=False,
                                 progress=progress)
    log = sft.read_log(sft.run_dir(recipe, START))
    summary = tables["summary"][["kind", "accuracy", "chance", "blank_accuracy", "visual_gain_blank"]].copy()
    summary.insert(0, "candidate", name)
    summary["seconds_per_step"] = round(float(log["seconds"].median()), 2)
    summary["final_loss"] = round(float(log["loss"].tail(10).mean()), 4)
    summary["recipe"] = json.dumps(dataclasses.asdict(recipe))
    mir_study.record_time("sft-search", name, mir_study.cpu_seconds() - cpu, time.perf_counter() - wall,
                          torch.get_num_threads())
    return summary


def select(table: pd.DataFrame) -> str:
    """The winner by the pre-registered rule: highest val average; within TIE of it, the first in CANDIDATES."""
    averages = table[table["kind"] == "average"].set_index("candidate")["accuracy"]
    missing = [name for name in CANDIDATES if name not in averages.index]
    if missing:
        raise SystemExit(f"cannot select: candidates not scored yet: {missing}")
    best = averages.max()
    return next(name for name in CANDIDATES if averages[name] >= best - TIE)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--only", nargs="+", choices=list(CANDIDATES), default=list(CANDIDATES))
    parser.add_argument("--select", action="store_true", help="write the winner to data/study/sft_recipe.json")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.select:
        table = mir_study.read_csv(SEARCH_FILE)
        winner = select(table)
        recipe = dataclasses.asdict(CANDIDATES[winner])
        mir_study.SFT_RECIPE_FILE.write_text(json.dumps(recipe, indent=2) + "\n")
        print(table[table["kind"] == "average"].to_string(index=False))
        print(f"winner: {winner} -> {mir_study.SFT_RECIPE_FILE}")
        return 0
    done = set(mir_study.read_csv(SEARCH_FILE)["candidate"]) if SEARCH_FILE.is_file() else set()
    for name in args.only:
        if name in done:
            print(f"{name}: scored already", flush=True)
            continue
        print(f"{name}: {CANDIDATES[name]}", flush=True)
        rows = evaluate(name, progress=not args.no_progress)
        mir_study.append_rows(SEARCH_FILE, rows, "candidate", name)
        average = rows.set_index("kind").loc["average"]
        print(f"{name}: val average {average['accuracy']:.3f} (blank {average['blank_accuracy']:.3f})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
