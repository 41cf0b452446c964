"""Pre-train the embedded model's projector: every recipe end to end, resumable, idempotent.

    python experiments/train_embedded.py            # train what is missing, resume what was interrupted
    python experiments/train_embedded.py --plan     # print the recipes and what is done, train nothing

The recipes echo the paper's T2 (learning rate during pre-training): same data, same steps, same init (the
embedded model's seeded random projector), two peak learning rates. Each ships a trajectory of fp16 projector
checkpoints (step 0 included) and its training log under data/projector/<recipe>/; the resumable state lives in
the scratch folder (`mirlab.tiny.pretrain.scratch_dir()`), outside git.

Re-running skips finished recipes (their last checkpoint and a complete log exist) and resumes unfinished ones
from their last saved state. When every recipe is finished, `data/projector/final.safetensors` becomes the last
checkpoint of the recipe with the lower caption loss on held-out *validation* scenes (the test split is kept for
evaluate_embedded.py), and `data/projector/recipes.json` records the recipes and that choice.

Budget: about an hour of CPU for everything. One torch thread by default: on this shared 2-core machine an update
of 8 captions took ~2.7 s with 2 threads when idle, but 18-30 s when other processes were busy (the two threads
wait for each other), against ~5-8 s with one thread.
"""
import argparse
import dataclasses
import json
import shutil
import sys
import time
from pathlib import Path

import pandas as pd
import torch

from mirlab.tiny import evaluate
from mirlab.tiny import pretrain
from mirlab.tiny.build import embedded_model, init_projector, load_projector, projector_dir
from mirlab.tiny.pretrain import Recipe, trajectory_steps

STEPS = 250
TRAIN_SCENES = 2000  # one epoch: 250 updates x 8 captions, every training scene seen once
VAL_SCENES = 64
COMMON = dict(steps=STEPS, batch_size=8, warmup=15, train_scenes=TRAIN_SCENES, seed=0, checkpoint_every=10,
              trajectory=trajectory_steps(STEPS, 8))
RECIPES = [
    Recipe(name="lr2e-3", lr=2e-3, **COMMON),
    Recipe(name="lr2e-4", lr=2e-4, **COMMON),
]


def last_checkpoint(recipe: Recipe, out: Path) -> Path:
    return out / recipe.name / f"step-{recipe.steps:04d}.safetensors"


def is_finished(recipe: Recipe, out: Path) -> bool:
    """Finished = the last checkpoint exists and the log has one row per update."""
    log = out / recipe.name / "log.csv"
    if not (last_checkpoint(recipe, out).is_file() and log.is_file()):
        return False
    return pd.read_csv(log)["step"].tolist() == list(range(1, recipe.steps + 1))


def choose_final(model, processor, out: Path) -> dict:
    """Copy the last checkpoint of the recipe with the lowest validation caption loss to final.safetensors."""
    features, captions, _ = pretrain.scene_features(model, processor, VAL_SCENES, seed=0, split="val")
    losses = {}
    for recipe in RECIPES:
        load_projector(model, last_checkpoint(recipe, out))
        losses[recipe.name] = evaluate.heldout_caption_loss(model, processor, features, captions)
    best = min(losses, key=losses.get)
    shutil.copyfile(last_checkpoint(next(r for r in RECIPES if r.name == best), out), out / "final.safetensors")
    return {"final": f"{best}/step-{STEPS:04d}", "val_caption_loss": losses, "val_scenes": VAL_SCENES}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="checkpoint folder (default: data/projector)")
    parser.add_argument("--plan", action="store_true", help="print the plan and exit")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: on a shared 2-core machine two threads stall each other)")
    args = parser.parse_args(argv)
    out = args.out or projector_dir()
    torch.set_num_threads(args.threads)

    for recipe in RECIPES:
        print(f"{recipe.name:8s} lr={recipe.lr:g} steps={recipe.steps} batch={recipe.batch_size} "
              f"trajectory={list(recipe.trajectory)} finished={is_finished(recipe, out)}", flush=True)
    if args.plan:
        return 0

    model, processor = embedded_model("random")
    start = time.perf_counter()
    features, captions, _ = pretrain.scene_features(model, processor, TRAIN_SCENES, seed=0, split="train",
                                                    progress=not args.no_progress)
    print(f"training features: {tuple(features.shape)} in {time.perf_counter() - start:.0f} s", flush=True)
    for recipe in RECIPES:
        if is_finished(recipe, out):
            print(f"{recipe.name}: finished, skipped", flush=True)
            continue
        start = time.perf_counter()
        init_projector(model)  # every recipe starts from the same seeded init (a saved state overrides it)
        step = pretrain.train(model, recipe, features, captions, processor, out_dir=out,
                              progress=not args.no_progress)
        print(f"{recipe.name}: step {step}/{recipe.steps} ({time.perf_counter() - start:.0f} s)", flush=True)
        if not is_finished(recipe, out):
            print(f"{recipe.name}: its saved state is complete but {out / recipe.name} is not; delete "
                  f"{pretrain.scratch_dir() / recipe.name} and re-run to retrain it", file=sys.stderr)
            return 1

    choice = choose_final(model, processor, out)
    info = {"recipes": [dataclasses.asdict(r) for r in RECIPES], **choice}
    (out / "recipes.json").write_text(json.dumps(info, indent=2) + "\n")
    print(json.dumps(choice, indent=2), flush=True)
    return 0


if __name__ == "__main__":
    torch.manual_seed(0)
    sys.exit(main())
