"""Evaluate every shipped projector checkpoint of the embedded model on held-out synthetic scenes.

    python experiments/evaluate_embedded.py          # -> data/projector/evaluation.csv, captioning.csv, captions.csv
    python experiments/evaluate_embedded.py --checkpoints lr2e-4 final --append --skip-captioning  # a subset

evaluation.csv has one row per checkpoint (recipe, step, train loss) and one group of columns per metric.
A metric is a function `metric(model, processor, data) -> dict of columns`, listed in METRICS; add a column
(e.g. MIR) by writing one more such function and appending it. `data` holds the evaluation set, built once:
100 test-split scenes (seed 0) with their frozen vision features and metadata.

Metrics (see mirlab.tiny.evaluate): caption retrieval among the true caption and K=3 one-word distractors
(chance 0.25), pairwise win rates per distractor kind, held-out caption loss. Greedy captioning (slower) runs
on the final checkpoint and on the random init only: captioning.csv (mention scores vs chance), captions.csv
(the generated captions). Checkpoints with identical projector tensors (each recipe's step 0; final) are
evaluated once.
"""
import argparse
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import torch

from mirlab.tiny import evaluate
from mirlab.tiny import pretrain
from mirlab.study.dynamics import checkpoint_digest
from mirlab.tiny.build import checkpoint_path, embedded_checkpoints, embedded_model, load_projector, projector_dir
from mirlab.pairs.scenes import scene_dataset

N_SCENES = 100
SEED = 0
K = 3
TRAIN_LOSS_WINDOW = 10  # train_loss = mean logged loss of the last 10 updates up to the checkpoint


def retrieval(model, processor, data) -> dict:
    table = evaluate.caption_retrieval(model, processor, data.features, data.metadata, k=K, seed=SEED)
    return evaluate.retrieval_summary(table, k=K)  # includes heldout_caption_loss


METRICS = [retrieval]


def load_data(model, processor) -> SimpleNamespace:
    scenes = scene_dataset(N_SCENES, seed=SEED, split="test")
    features, _, metadata = pretrain.scene_features(model, processor, N_SCENES, seed=SEED, split="test")
    return SimpleNamespace(scenes=scenes, features=features, metadata=metadata)


def describe_checkpoint(name: str, out: Path) -> dict:
    """recipe, step and the smoothed training loss of a checkpoint name ('final' -> its source recipe)."""
    from safetensors import safe_open

    with safe_open(str(checkpoint_path(name)), "pt") as f:
        meta = f.metadata()
    row = {"checkpoint": name, "recipe": meta.get("recipe", ""), "step": int(meta.get("step", -1)),
           "lr": float(meta.get("lr", "nan")), "train_loss": float("nan")}
    log = out / row["recipe"] / "log.csv"
    if row["step"] > 0 and log.is_file():
        losses = pd.read_csv(log).set_index("step")["loss"]
        row["train_loss"] = float(losses.loc[max(1, row["step"] - TRAIN_LOSS_WINDOW + 1):row["step"]].mean())
    return row


def order_checkpoints(table: pd.DataFrame) -> pd.DataFrame:
    """Rows sorted as in the shipped tables: "final" first, then the trajectories by name."""
    return table.sort_values("checkpoint", key=lambda c: c.map(lambda n: (n != "final", n)), ignore_index=True)


def evaluate_checkpoints(model, processor, data, names, out: Path) -> pd.DataFrame:
    rows, done = [], {}
    for name in names:
        start = time.perf_counter()
        digest = checkpoint_digest(name)  # identical projector tensors are evaluated once
        if digest not in done:
            load_projector(model, checkpoint_path(name))
            done[digest] = {k: v for metric in METRICS for k, v in metric(model, processor, data).items()}
        rows.append({**describe_checkpoint(name, out), **done[digest]})
        print(f"{name:22s} " + " ".join(f"{k}={v:.4g}" for k, v in done[digest].items() if isinstance(v, float))
              + f"  ({time.perf_counter() - start:.0f} s)", flush=True)
    return pd.DataFrame(rows)


def captioning(model, processor, data, names) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Greedy captions of the evaluation scenes for each named checkpoint: (summary table, all captions)."""
    summaries, tables = [], []
    images = [s["image"] for s in data.scenes]
    for name in names:
        start = time.perf_counter()
        load_projector(model, checkpoint_path(name))
        captions = evaluate.greedy_captions(model, processor, images)
        table = evaluate.captioning_scores(captions, data.metadata, seed=SEED)
        summaries.append({"checkpoint": name, **evaluate.captioning_summary(table)})
        tables.append(table.assign(checkpoint=name))
        print(f"captioning {name}: " + " ".join(f"{k}={v:.3f}" for k, v in summaries[-1].items()
                                               if isinstance(v, float)) + f" ({time.perf_counter() - start:.0f} s)",
              flush=True)
    return pd.DataFrame(summaries), pd.concat(tables, ignore_index=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--skip-captioning", action="store_true")
    parser.add_argument("--checkpoints", nargs="*", default=None,
                        help="only these checkpoints or recipes (name prefixes); default: every shipped one")
    parser.add_argument("--append", action="store_true",
                        help="merge into the existing evaluation.csv (rows of re-evaluated checkpoints replaced)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = projector_dir()
    names = [n for n in embedded_checkpoints()
             if args.checkpoints is None or any(n == c or n.startswith(c.rstrip("/") + "/") for c in args.checkpoints)]
    if not names:
        print(f"no matching checkpoints in {out}; run experiments/train_embedded.py first", file=sys.stderr)
        return 1

    model, processor = embedded_model("random")
    data = load_data(model, processor)
    table = evaluate_checkpoints(model, processor, data, names, out)
    if args.append and (out / "evaluation.csv").is_file():
        previous = pd.read_csv(out / "evaluation.csv")
        table = pd.concat([previous[~previous["checkpoint"].isin(names)], table], ignore_index=True)
    table = order_checkpoints(table)
    first = ["checkpoint", "recipe", "step", "lr", "train_loss"]
    table = table[first + [c for c in table.columns if c not in first]]
    table.to_csv(out / "evaluation.csv", index=False, float_format="%.5g")
    print(table.to_string(index=False), flush=True)

    if not args.skip_captioning:
        first = [n for n in names if n.endswith("/step-0000")][:1]  # the random init (same in every recipe)
        summary, captions = captioning(model, processor, data, first + (["final"] if "final" in names else []))
        summary.to_csv(out / "captioning.csv", index=False, float_format="%.4g")
        captions[["checkpoint", "scene", "true_caption", "generated"]].to_csv(out / "captions.csv", index=False)
        print(summary.to_string(index=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
