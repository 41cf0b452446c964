"""MIR along projector pre-training: the shipped tables, pair subsets and rank correlations.

The claim of the MIR paper in miniature: as the projector of an LVLM is pre-trained, MIR (lower = modalities
better integrated) should fall while a downstream score rises, so MIR ranks checkpoints without a benchmark.
`experiments/mir_vs_pretraining.py` measures it on every shipped projector checkpoint of the embedded model and
writes three files next to the checkpoints (data/projector/):

    mir.csv           one row per checkpoint: checkpoint, recipe, step, n_pairs, mir_exact, mir_official_fast,
                      retrieval_accuracy, heldout_caption_loss (the last two joined from evaluation.csv)
    mir_summary.json  the evaluation set, wall times and Spearman correlations (see `spearman_table`)
    robustness.csv    MIR of the final checkpoint for N pairs drawn by a seed from a fixed pool (tidy: text,
                      n_pairs, seed, mir; see `pair_subset` and `robustness_summary`)

Helpers here: `checkpoint_digest` / `distinct_checkpoints` (which checkpoints hold identical projector tensors),
`subset_layers` (MIR of a subset of the pairs of one extraction, without extracting again),
`spearman_table` / `checkpoint_correlations`, `robustness_summary`, and `load_table` to read the shipped files.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pandas as pd
import torch

TABLES = {"mir": "mir.csv", "robustness": "robustness.csv", "evaluation": "evaluation.csv",
          "summary": "mir_summary.json"}
MIR_COLUMNS = ["checkpoint", "recipe", "step", "n_pairs", "mir_exact", "mir_official_fast",
               "retrieval_accuracy", "heldout_caption_loss"]
ROBUSTNESS_COLUMNS = ["text", "n_pairs", "seed", "mir"]


def _projector_dir() -> Path:
    from mirlab.tiny.build import projector_dir

    return projector_dir()


def load_table(name: str, folder: str | Path | None = None):
    """A shipped table of data/projector/: "mir", "robustness", "evaluation" (DataFrames) or "summary" (dict).

    folder: where to look (default: the projector folder, `$MIRLAB_DATA_DIR/projector` or the repository's).
    A missing file is an error that names the script producing it.
    """
    if name not in TABLES:
        raise ValueError(f"name must be one of {tuple(TABLES)}, got {name!r}")
    path = Path(folder) if folder is not None else _projector_dir()
    path = path / TABLES[name]
    if not path.is_file():
        producer = ("experiments/evaluate_embedded.py" if name == "evaluation"
                    else "experiments/mir_vs_pretraining.py")
        raise FileNotFoundError(f"{path} does not exist: run `python {producer}` to produce it")
    if name == "summary":
        return json.loads(path.read_text())
    return pd.read_csv(path)


def checkpoint_digest(checkpoint: str) -> str:
    """sha256 of the tensors of a shipped projector checkpoint (equal digests = the same projector).

    Only names, dtypes, shapes and values count, not the file's metadata: each recipe's step-0000 file holds
    the same random init but records its own recipe name, so the files' bytes differ.
    """
    from safetensors.torch import load_file

    from mirlab.tiny.build import checkpoint_path

    path = checkpoint_path(checkpoint)
    if path is None:
        raise ValueError("'random' is not a file; it has no digest")
    digest = hashlib.sha256()
    for name, tensor in sorted(load_file(str(path)).items()):
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def distinct_checkpoints(checkpoints) -> dict[str, list[str]]:
    """{first name: [every name with the same tensors]} in the given order: compute once, report for all."""
    groups: dict[str, list[str]] = {}
    first_of: dict[str, str] = {}
    for name in checkpoints:
        digest = checkpoint_digest(name)
        first = first_of.setdefault(digest, name)
        groups.setdefault(first, []).append(name)
    return groups


def pair_subset(n_pool: int, n_pairs: int, seed: int) -> np.ndarray:
    """Sorted indices of `n_pairs` of `n_pool` pairs, drawn without replacement by `default_rng(seed)`.

    This is all a seed changes in the robustness table: which pairs of the fixed pool are used.
    """
    if not 1 <= n_pairs <= n_pool:
        raise ValueError(f"n_pairs must be in [1, {n_pool}], got {n_pairs}")
    return np.sort(np.random.default_rng(seed).choice(n_pool, size=n_pairs, replace=False))


def subset_layers(hidden_states, pairs):
    """Iterate (layer, image_rows, text_rows) of `hidden_states` restricted to the given pairs.

    hidden_states: a `mirlab.HiddenStates` (or anything with a `.samples` table holding n_image and n_text per
    kept pair, in row order, that iterates (layer, image_rows, text_rows)). pairs: positions in that table
    (0 .. n_pairs - 1; rows come in pair order, a position given twice counts twice). The result feeds `mirlab.compute_mir` directly: MIR of a subset equals MIR of
    extracting only those pairs (each pair's rows do not depend on the other pairs of its batch, up to
    float32 rounding of batched matrix products).
    """
    samples = hidden_states.samples
    pairs = np.asarray(pairs, dtype=np.int64)
    if pairs.ndim != 1 or len(pairs) == 0:
        raise ValueError("pairs must be a non-empty 1-d list of positions")
    if pairs.min() < 0 or pairs.max() >= len(samples):
        raise ValueError(f"pair positions must be in [0, {len(samples) - 1}], got {pairs.min()}..{pairs.max()}")
    from mirlab.metrics.bootstrap import replicate_rows

    counts = np.bincount(pairs, minlength=len(samples))  # a subset is a replicate that draws each pair once
    index = {m: replicate_rows(counts, samples[f"n_{m}"].to_numpy(dtype=np.int64)) for m in ("image", "text")}
    for item in hidden_states:
        layer, image, text = item
        del item
        yield layer, image[index["image"]], text[index["text"]]
        del image, text


def spearman_table(table: pd.DataFrame, x=("mir_exact", "mir_official_fast"),
                   y=("retrieval_accuracy", "heldout_caption_loss"), by: str | None = "recipe",
                   all_label: str = "all") -> pd.DataFrame:
    """Spearman rank correlation (scipy.stats.spearmanr) of every x column with every y column.

    One row per (scope, x, y): scope `all_label` uses every row of `table`, then one scope per value of
    column `by` (None: no per-group rows). Columns: scope, x, y, n, rho, p.
    Rows with a missing x or y are left out of that pair's computation.
    """
    from scipy.stats import spearmanr

    scopes = [(all_label, table)]
    if by is not None:
        scopes += [(str(value), group) for value, group in table.groupby(by, sort=True)]
    rows = []
    for scope, frame in scopes:
        for xc in x:
            for yc in y:
                pair = frame[[xc, yc]].dropna()
                if len(pair) >= 3:
                    result = spearmanr(pair[xc], pair[yc])
                    rho, p = float(result.statistic), float(result.pvalue)
                else:
                    rho = p = float("nan")
                rows.append({"scope": scope, "x": xc, "y": yc, "n": len(pair), "rho": rho, "p": p})
    return pd.DataFrame(rows, columns=["scope", "x", "y", "n", "rho", "p"])


def checkpoint_correlations(table: pd.DataFrame) -> pd.DataFrame:
    """Spearman rho/p of MIR (exact, official-fast) vs retrieval accuracy and held-out loss, in four scopes.

    "all": one row per distinct projector (checkpoints with identical tensors counted once, see
    `distinct_checkpoints`); "all_rows": every row of `table`; then one scope per recipe over its trajectory
    (the row "final" left out: it repeats the last step of its recipe). Columns as `spearman_table`.
    """
    groups = distinct_checkpoints(table["checkpoint"])
    distinct = table[table["checkpoint"].isin(list(groups))]
    trajectories = table[table["checkpoint"] != "final"]
    parts = [spearman_table(distinct, by=None, all_label="all"),
             spearman_table(table, by=None, all_label="all_rows"),
             spearman_table(trajectories, by="recipe").query("scope != 'all'")]
    return pd.concat(parts, ignore_index=True)


def robustness_summary(table: pd.DataFrame) -> pd.DataFrame:
    """Mean, std (ddof=1) and count of `mir` per (text, n_pairs), plus a "mean ± std" string column."""
    missing = set(ROBUSTNESS_COLUMNS) - set(table.columns)
    if missing:
        raise ValueError(f"robustness table lacks columns {sorted(missing)}")
    summary = (table.groupby(["text", "n_pairs"], sort=True)["mir"]
               .agg(mean="mean", std="std", seeds="count").reset_index())
    summary["mean ± std"] = [f"{m:.3f} ± {s:.3f}" for m, s in zip(summary["mean"], summary["std"])]
    return summary
