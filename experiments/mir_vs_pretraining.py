"""MIR of every shipped projector checkpoint vs its downstream score, and MIR's robustness to N and text type.

    OMP_NUM_THREADS=1 python experiments/mir_vs_pretraining.py --threads 1        # both parts, resumable
    python experiments/mir_vs_pretraining.py --skip-robustness                     # only the checkpoint table

Part 1 (the paper's headline claim in miniature: lower MIR after pre-training, better downstream score). Evaluation set, fixed for every checkpoint:
`mirlab.sample_pairs(N_PAIRS=64, seed=0, text="captions")` = all 15 bundled photos (photo_share 0.5 asks for 32,
capped at the 15 shipped) + 49 held-out test-split synthetic scenes, each image with one of its own captions.
For each checkpoint: `mirlab.tiny.embedded_model(checkpoint)` -> `mirlab.extract_hidden_states` (layers 1..30, default
"after_image" text rows, batch 8) -> `mirlab.compute_mir` with method="exact" and "official-fast" on the same
hidden states. Checkpoints with identical projector tensors (each recipe's step-0000, whose files differ only in
their metadata; final == lr2e-3/step-0250) are computed once. Outputs: data/projector/mir.csv (one row per
shipped checkpoint, rewritten after every distinct projector, so an interrupted run resumes where it stopped),
joined with retrieval_accuracy and heldout_caption_loss from data/projector/evaluation.csv;
data/projector/mir_summary.json (evaluation set, wall times, Spearman rho and p of MIR vs accuracy and vs held-out
loss: over the distinct projectors, over all rows and per recipe; see `mirlab.study.dynamics.checkpoint_correlations`).

Part 2 (the paper's T6). MIR (exact) of the final checkpoint for N in {5, 10, 20, 50, 100} pairs and seeds
0..4, with captions or prose passages as the text side. One pool per text type is extracted once:
`sample_pairs(POOL=120, seed=0, text=...)` (120 = the number of bundled prose passages; both pools hold the same
120 images: all 15 photos + 105 test scenes; captions: each image's own caption; prose: an unrelated passage).
A seed only chooses WHICH N pairs of the pool are used (`mirlab.study.dynamics.pair_subset`: N of 120 without
replacement, numpy default_rng(seed)); the pool, the model and the method are fixed. So at N = 100 two seeds
share at least 80 pairs and the spread there understates what a fresh draw from a larger population would give.
Output: data/projector/robustness.csv (tidy: text, n_pairs, seed, mir), rewritten after every row.
"""
import argparse
import json
import sys
import time
from pathlib import Path

import pandas as pd
import torch

import mirlab
from mirlab import paths
from mirlab.study import dynamics
from mirlab.tiny.build import projector_dir

sys.path.insert(0, str(Path(__file__).resolve().parent))
from evaluate_embedded import describe_checkpoint, order_checkpoints  # noqa: E402  (recipe/step/ordering as there)

N_PAIRS = 64
EVAL_SEED = 0
EVAL_TEXT = "captions"
BATCH_SIZE = 8
POOL = 120
ROBUST_N = (5, 10, 20, 50, 100)
ROBUST_SEEDS = (0, 1, 2, 3, 4)
ROBUST_CHECKPOINT = "final"
TEXTS = ("captions", "prose")


def write_csv(table: pd.DataFrame, path: Path) -> None:
    """Write atomically (temporary sibling, then rename): a reader never sees half a table."""
    paths.atomic_write(path, lambda tmp: table.to_csv(tmp, index=False, float_format="%.8g"))


def join_evaluation(table: pd.DataFrame, out: Path) -> pd.DataFrame:
    evaluation = dynamics.load_table("evaluation", out)[["checkpoint", "retrieval_accuracy", "heldout_caption_loss"]]
    table = table.drop(columns=[c for c in ("retrieval_accuracy", "heldout_caption_loss") if c in table.columns])
    return order_checkpoints(table.merge(evaluation, on="checkpoint", how="left"))[dynamics.MIR_COLUMNS]


def previous_rows(path: Path, n_pairs: int) -> pd.DataFrame:
    """Rows of an earlier run with the same evaluation set size (resume); other sizes are discarded."""
    if not path.is_file():
        return pd.DataFrame(columns=dynamics.MIR_COLUMNS)
    table = pd.read_csv(path)
    kept = table[table["n_pairs"] == n_pairs]
    if len(kept) < len(table):
        print(f"discarding {len(table) - len(kept)} rows of {path.name} computed with another n_pairs", flush=True)
    return kept


def evaluation_pairs(n_pairs: int):
    pairs = mirlab.sample_pairs(n_pairs, seed=EVAL_SEED, text=EVAL_TEXT)
    return [image for image, _ in pairs], [text for _, text in pairs]


def checkpoint_table(names, n_pairs: int, out: Path, timings: dict) -> pd.DataFrame:
    """Part 1: MIR exact and official-fast of every checkpoint in `names` on the fixed evaluation set."""
    path = out / "mir.csv"
    table = previous_rows(path, n_pairs)
    images, texts = evaluation_pairs(n_pairs)
    groups = dynamics.distinct_checkpoints(names)  # identical projector tensors: computed once
    for first, same in groups.items():
        if set(same) <= set(table["checkpoint"]):
            print(f"{first:20s} done already ({', '.join(same)})", flush=True)
            continue
        start = time.perf_counter()
        model, processor = mirlab.tiny.embedded_model(first)
        states = mirlab.extract_hidden_states(model, processor, images, texts, batch_size=BATCH_SIZE,
                                              progress=False)
        extracted = time.perf_counter()
        exact = mirlab.compute_mir(states, method="exact")
        fast = mirlab.compute_mir(states, method="official-fast")
        seconds = time.perf_counter() - start
        timings[first] = {"extract_s": round(extracted - start, 1), "total_s": round(seconds, 1),
                          "rows": same}
        del states, model
        rows = pd.DataFrame([{**describe_checkpoint(name, out), "n_pairs": n_pairs, "mir_exact": exact.mir,
                              "mir_official_fast": fast.mir} for name in same])
        table = table[~table["checkpoint"].isin(same)]
        table = join_evaluation(pd.concat([table, rows], ignore_index=True) if len(table) else rows, out)
        write_csv(table, path)
        print(f"{first:20s} MIR exact {exact.mir:.4f}  official-fast {fast.mir:.4f}  "
              f"(extract {extracted - start:.0f} s, total {seconds:.0f} s; rows: {', '.join(same)})", flush=True)
    return join_evaluation(table, out)


def robustness(out: Path, timings: dict, cache_dir=None) -> pd.DataFrame:
    """Part 2: MIR (exact) of the final checkpoint per (text, N, seed), N pairs drawn from a fixed pool."""
    path = out / "robustness.csv"
    table = pd.read_csv(path) if path.is_file() else pd.DataFrame(columns=dynamics.ROBUSTNESS_COLUMNS)
    done = set(zip(table["text"], table["n_pairs"].astype(int), table["seed"].astype(int)))
    model = processor = None
    for text in TEXTS:
        todo = [(n, s) for n in ROBUST_N for s in ROBUST_SEEDS if (text, n, s) not in done]
        if not todo:
            print(f"robustness {text}: done already", flush=True)
            continue
        if model is None:
            model, processor = mirlab.tiny.embedded_model(ROBUST_CHECKPOINT)
        start = time.perf_counter()
        pool = mirlab.sample_pairs(POOL, seed=EVAL_SEED, text=text)
        states = mirlab.extract_hidden_states(model, processor, [i for i, _ in pool], [t for _, t in pool],
                                              batch_size=BATCH_SIZE, cache_dir=cache_dir, progress=False)
        timings[f"robustness_{text}_extract_s"] = round(time.perf_counter() - start, 1)
        print(f"robustness {text}: pool of {states.n_pairs} pairs extracted in {time.perf_counter() - start:.0f} s",
              flush=True)
        start = time.perf_counter()
        for n, seed in todo:
            result = mirlab.compute_mir(dynamics.subset_layers(states, dynamics.pair_subset(states.n_pairs, n, seed)))
            row = pd.DataFrame([{"text": text, "n_pairs": n, "seed": seed, "mir": result.mir}])
            table = pd.concat([table, row], ignore_index=True) if len(table) else row
            table = table.sort_values(["text", "n_pairs", "seed"], ignore_index=True)
            write_csv(table, path)
            print(f"robustness {text} N={n:3d} seed={seed}: MIR {result.mir:.4f}", flush=True)
        timings[f"robustness_{text}_mir_s"] = round(time.perf_counter() - start, 1)
        del states
    return table


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch threads (also set OMP_NUM_THREADS)")
    parser.add_argument("--n-pairs", type=int, default=N_PAIRS, help=f"evaluation set size (default {N_PAIRS})")
    parser.add_argument("--checkpoints", nargs="*", default=None,
                        help="only these checkpoints or recipes (name prefixes); default: every shipped one")
    parser.add_argument("--skip-table", action="store_true", help="skip part 1 (the checkpoint table)")
    parser.add_argument("--skip-robustness", action="store_true", help="skip part 2 (N and text type)")
    parser.add_argument("--cache-dir", default=None, help="keep the robustness pools' hidden states here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    out = projector_dir()
    names = [n for n in mirlab.tiny.embedded_checkpoints()
             if args.checkpoints is None or any(n == c or n.startswith(c.rstrip("/") + "/") for c in args.checkpoints)]
    if not names:
        print(f"no matching checkpoints in {out}", file=sys.stderr)
        return 1
    summary_path = out / "mir_summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    timings = summary.get("wall_seconds", {})
    pd.set_option("display.width", 200)
    start = time.perf_counter()

    if not args.skip_table:
        computed = len(timings)
        table = checkpoint_table(names, args.n_pairs, out, timings)
        if len(timings) > computed:  # something was computed in this run (a no-op re-run keeps the old time)
            timings["table_run_s"] = round(time.perf_counter() - start, 1)
        print("\n" + table.to_string(index=False, float_format=lambda v: f"{v:.4f}"), flush=True)
        rho = dynamics.checkpoint_correlations(table)
        print("\nSpearman rank correlations\n" + rho.to_string(index=False, float_format=lambda v: f"{v:.4g}"),
              flush=True)
        summary.update({
            "evaluation_set": {"function": "mirlab.sample_pairs", "n": args.n_pairs, "seed": EVAL_SEED,
                               "text": EVAL_TEXT, "batch_size": BATCH_SIZE, "layers": "1..30",
                               "text_span": "after_image"},
            "checkpoints": len(table), "distinct_projectors": len(dynamics.distinct_checkpoints(table["checkpoint"])),
            "spearman": rho.to_dict(orient="records"),
            "threads": args.threads,
        })
    if not args.skip_robustness:
        start_r, computed = time.perf_counter(), len(timings)
        rob = robustness(out, timings, args.cache_dir)
        if len(timings) > computed:
            timings["robustness_run_s"] = round(time.perf_counter() - start_r, 1)
        summary_table = dynamics.robustness_summary(rob)
        print("\nRobustness (final checkpoint, MIR exact, mean ± std over seeds)\n"
              + summary_table.to_string(index=False, float_format=lambda v: f"{v:.4f}"), flush=True)
        summary["robustness"] = {"checkpoint": ROBUST_CHECKPOINT, "pool": POOL, "pool_seed": EVAL_SEED,
                                 "n_pairs": list(ROBUST_N), "seeds": list(ROBUST_SEEDS), "method": "exact",
                                 "summary": summary_table.drop(columns="mean ± std").to_dict(orient="records")}
    summary["wall_seconds"] = timings
    paths.atomic_write(summary_path, lambda tmp: tmp.write_text(json.dumps(summary, indent=1, default=float) + "\n"))
    print(f"\nwrote {summary_path} ({time.perf_counter() - start:.0f} s this run)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
