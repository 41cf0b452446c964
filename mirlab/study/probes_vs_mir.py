"""Probes beside MIR across checkpoints: per-checkpoint summaries, exact rank correlations, the post-SFT relation.

Notebook 08 measures, for a handful of projector checkpoints of the embedded model, MIR's per-layer term FD_k
and the row probes of ``mirlab.metrics.probes`` from one extraction per checkpoint, in one per-layer table
(columns: checkpoint, layer, fd, the probe columns). The helpers here turn that table into answers:

    summarize(per_layer)              one row per checkpoint: MIR = log10 sum_k FD_k, layer means of the probes
                                      (``<probe>_mean``) and the layer-1 norm ratio
    complete_points(x, y)             the paired values without missing ones (at least 3: a rank correlation's input)
    spearman_permutation(x, y)        Spearman rho with a two-sided permutation p-value, exact (all n! re-pairings)
                                      for small n: with 5 checkpoints the smallest possible p is 2/120
    correlation_table(summary, cols)  rho and p of every pair of columns across checkpoints
    layer_agreement(per_layer, cols)  per layer k: rho across checkpoints of FD_k with each probe at layer k
    study_start(checkpoint)           the study start (docs/study-plan.md) that begins SFT from a shipped checkpoint
    post_sft_table(...)               per study start: the post-SFT average and every pre-SFT measure available
    post_sft_correlations(table)      rho (permutation p) of each measure with the post-SFT average

The summary columns use the names ``mirlab.study.mir_vs_sft.measure_probes`` writes to data/study/probes.csv.
"""
from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

# per-layer probe columns summarised by their mean over layers (``<column>_mean``)
SUMMARY_PROBES = ("norm_ratio", "modality_gap", "mean_cosine", "image_effective_rank", "text_effective_rank",
                  "cka", "cka_shuffled", "mutual_knn", "mutual_knn_shuffled")
EXACT_UP_TO = 8  # 8! = 40320 re-pairings: exact permutation p-values up to here, sampled ones above
SCORE = "sft_average"


def summarize(per_layer: pd.DataFrame, by: str = "checkpoint", first_layer: int = 1) -> pd.DataFrame:
    """One row per value of ``by`` (in order of appearance) from a per-layer table with columns by, layer, fd and
    probe columns:

        mir                 = log10( sum_k fd_k )                  (MIR from its per-layer terms)
        <probe>_mean        = mean over the table's layers of each SUMMARY_PROBES column present
        norm_ratio_layer1   = norm_ratio at layer ``first_layer``   (if norm_ratio is present)
        mutual_knn_chance   = k / (n - 1), as the table gives it     (if present; equal on every layer)
    """
    missing = [c for c in (by, "layer", "fd") if c not in per_layer.columns]
    if missing:
        raise ValueError(f"the per-layer table lacks columns {missing} (columns: {list(per_layer.columns)})")
    rows = []
    for name, frame in per_layer.groupby(by, sort=False):
        if frame["layer"].duplicated().any():
            raise ValueError(f"{by} {name!r}: a layer appears twice")
        row = {by: name, "n_layers": len(frame), "mir": float(np.log10(frame["fd"].sum()))}
        for column in SUMMARY_PROBES:
            if column in frame.columns:
                row[f"{column}_mean"] = float(frame[column].mean())
        if "norm_ratio" in frame.columns:
            first = frame.loc[frame["layer"] == first_layer, "norm_ratio"]
            if len(first) != 1:
                raise ValueError(f"{by} {name!r}: no layer {first_layer} for the first-layer norm ratio")
            row[f"norm_ratio_layer{first_layer}"] = float(first.iloc[0])
        if "mutual_knn_chance" in frame.columns:
            row["mutual_knn_chance"] = float(frame["mutual_knn_chance"].iloc[0])
        rows.append(row)
    return pd.DataFrame(rows)


def _rank_rows(ranks: np.ndarray) -> np.ndarray:
    """Rows of ranks centred and scaled to unit norm: their dot products are Pearson correlations of ranks."""
    centred = ranks - ranks.mean(axis=-1, keepdims=True)
    return centred / np.linalg.norm(centred, axis=-1, keepdims=True)


def complete_points(x, y) -> tuple[np.ndarray, np.ndarray]:
    """x and y as float64 without the points where either is NaN; at least 3 must remain for a rank correlation."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"x and y must be 1-D of equal length, got shapes {x.shape} and {y.shape}")
    keep = ~(np.isnan(x) | np.isnan(y))
    if keep.sum() < 3:
        raise ValueError(f"a rank correlation needs at least 3 complete points, got {keep.sum()}")
    return x[keep], y[keep]


def spearman_permutation(x, y, exact_up_to: int = EXACT_UP_TO, n_permutations: int = 20_000,
                         seed: int = 0) -> dict:
    """Spearman rho of paired values and its two-sided permutation p-value.

        rho = Pearson correlation of the ranks (ties: average ranks), as scipy.stats.spearmanr
        p   = share of re-pairings pi of y with |rho(x, y_pi)| >= |rho(x, y)|   (1e-12 slack for rounding)

    For n <= ``exact_up_to`` every one of the n! re-pairings is counted (the identity included), so p is exact
    and at least 2/n! when rho != 0 (n = 5: 2/120 = 0.017; n = 4: 2/24 = 0.083): with few points even a perfect
    rank agreement is weak evidence. Above, ``n_permutations`` random re-pairings (``default_rng(seed)``) give
    p = (1 + count) / (1 + n_permutations). Pairs with a missing value are left out; at least 3 must remain.
    Returns {rho, p, n, exact}; rho and p are NaN when x or y is constant.
    """
    x, y = complete_points(x, y)
    n = len(x)
    exact = n <= exact_up_to
    if np.ptp(x) == 0 or np.ptp(y) == 0:
        return {"rho": float("nan"), "p": float("nan"), "n": n, "exact": exact}
    rx, ry = _rank_rows(stats.rankdata(x)), _rank_rows(stats.rankdata(y))
    rho = float(rx @ ry)
    if exact:
        orders = np.array(list(itertools.permutations(range(n))))
    else:
        rng = np.random.default_rng(seed)
        orders = np.array([rng.permutation(n) for _ in range(n_permutations)])
    extreme = int((np.abs(ry[orders] @ rx) >= abs(rho) - 1e-12).sum())
    p = extreme / len(orders) if exact else (1 + extreme) / (1 + n_permutations)
    return {"rho": rho, "p": float(p), "n": n, "exact": exact}


def correlation_table(summary: pd.DataFrame, columns, **options) -> pd.DataFrame:
    """Spearman rho and permutation p (``spearman_permutation``, its options) of every pair of ``columns`` over
    the rows of ``summary`` (one row per checkpoint). Long form: x, y, n, rho, p, exact; each unordered pair
    once, in the order of ``columns``."""
    columns = list(columns)
    missing = [c for c in columns if c not in summary.columns]
    if missing:
        raise ValueError(f"summary lacks columns {missing}")
    rows = [{"x": a, "y": b, **spearman_permutation(summary[a], summary[b], **options)}
            for a, b in itertools.combinations(columns, 2)]
    return pd.DataFrame(rows, columns=["x", "y", "rho", "p", "n", "exact"])[["x", "y", "n", "rho", "p", "exact"]]


def layer_agreement(per_layer: pd.DataFrame, columns, reference: str = "fd", by: str = "checkpoint") -> pd.DataFrame:
    """Per layer k and probe column c: Spearman rho over the values of ``by`` (checkpoints) between
    ``reference`` at layer k (MIR's term FD_k by default) and c at layer k. Long form: layer, probe, rho, n
    (rho NaN where either side is constant over the checkpoints at that layer)."""
    columns = list(columns)
    missing = [c for c in (by, "layer", reference, *columns) if c not in per_layer.columns]
    if missing:
        raise ValueError(f"the per-layer table lacks columns {missing}")
    rows = []
    for layer, frame in per_layer.groupby("layer", sort=True):
        for column in columns:
            pair = frame[[reference, column]].dropna()
            rho = (float(stats.spearmanr(pair[reference], pair[column]).statistic)
                   if len(pair) >= 3 and np.ptp(pair[reference]) > 0 and np.ptp(pair[column]) > 0 else float("nan"))
            rows.append({"layer": layer, "probe": column, "rho": rho, "n": len(pair)})
    return pd.DataFrame(rows, columns=["layer", "probe", "rho", "n"])


def study_start(checkpoint: str) -> str | None:
    """The study start that begins SFT from shipped projector ``checkpoint`` (``mir_vs_sft.CONFIGS``' shipped
    last steps map to their configuration's name, ``TRAJECTORY`` checkpoints to themselves), else None."""
    from mirlab.study.mir_vs_sft import CONFIGS, TRAJECTORY

    for config in CONFIGS:
        if config.shipped == checkpoint:
            return config.name
    return checkpoint if checkpoint in TRAJECTORY else None


def _read(path: Path) -> pd.DataFrame | None:
    return pd.read_csv(path) if path.is_file() else None


def _numeric(table: pd.DataFrame, key: str = "start") -> pd.DataFrame:
    """The key column and every numeric column (one row per key)."""
    if table[key].duplicated().any():
        raise ValueError(f"{key} values repeat: {sorted(table[key][table[key].duplicated()].unique())}")
    values = [c for c in table.columns if c != key and pd.api.types.is_numeric_dtype(table[c])]
    return table[[key, *values]]


def post_sft_table(study_dir: str | Path | None = None, live: pd.DataFrame | None = None) -> pd.DataFrame:
    """One row per study start with any pre-SFT measure, with the post-SFT score where it exists.

    Reads the study's tables (experiments/mir_study.py; default folder data/study/), each only if present:
        benchmark.csv       the row kind == "average" of each start -> ``sft_average`` (its accuracy)
        pretrained.csv      every numeric column (MIR exact/fast on prose and captions, retrieval, losses)
        probes.csv          every numeric column (layer means of the row probes, visual dependence)
        mir_per_layer.csv   per text side: ``norm_ratio_mean_<text>`` and ``norm_ratio_layer1_<text>``
    live: a ``summarize`` table of checkpoints measured elsewhere (column "checkpoint"); the rows whose
    checkpoint is a study start (``study_start``) join as ``live_<column>``.
    Columns: start, sft_average (NaN where not benchmarked yet), then the measures.
    """
    from mirlab import paths

    folder = Path(study_dir) if study_dir is not None else paths.data_dir() / "study"
    parts = []
    for name in ("pretrained.csv", "probes.csv"):
        table = _read(folder / name)
        if table is not None and len(table):
            parts.append(_numeric(table))
    layers = _read(folder / "mir_per_layer.csv")
    if layers is not None and len(layers):
        for text, frame in layers.groupby("text", sort=True):
            parts.append(pd.DataFrame(
                [{"start": start, f"norm_ratio_mean_{text}": float(part["norm_ratio"].mean()),
                  f"norm_ratio_layer1_{text}": float(part.loc[part["layer"] == 1, "norm_ratio"].iloc[0])}
                 for start, part in frame.groupby("start", sort=False)]))
    if live is not None and len(live):
        starts = live["checkpoint"].map(study_start)
        chosen = live[starts.notna()].drop(columns="checkpoint")
        chosen = chosen[[c for c in chosen.columns if pd.api.types.is_numeric_dtype(chosen[c])]]
        parts.append(chosen.add_prefix("live_").assign(start=starts[starts.notna()].to_numpy()))
    table = pd.DataFrame({"start": pd.Series(dtype="object")})
    for part in parts:
        table = table.merge(part, on="start", how="outer")
    benchmark = _read(folder / "benchmark.csv")
    scores = pd.DataFrame({"start": pd.Series(dtype="object"), SCORE: pd.Series(dtype="float64")})
    if benchmark is not None and len(benchmark):
        average = benchmark[benchmark["kind"] == "average"]
        scores = _numeric(average[["start", "accuracy"]].rename(columns={"accuracy": SCORE}))
    table = scores.merge(table, on="start", how="outer")
    return table[["start", SCORE, *[c for c in table.columns if c not in ("start", SCORE)]]]


def post_sft_correlations(table: pd.DataFrame, score: str = SCORE, min_starts: int = 4, **options) -> pd.DataFrame:
    """Spearman rho and permutation p (``spearman_permutation``) of every measure column of ``post_sft_table``
    with ``score``, over the starts that have both. Only measures with at least ``min_starts`` such starts get a
    row (fewer: no estimate at all, rather than a rho from 2 or 3 points). Standard errors of a measure (columns
    ending in ``_se`` or ``_sem``) are not measures and get no row. Columns: measure, n, rho, p, exact."""
    if min_starts < 3:
        raise ValueError(f"min_starts must be >= 3 (a rank correlation of fewer points is meaningless), got {min_starts}")
    rows = []
    for column in table.columns:
        is_error_bar = column.endswith(("_se", "_sem"))
        if column in ("start", score) or is_error_bar or not pd.api.types.is_numeric_dtype(table[column]):
            continue
        pair = table[[column, score]].dropna()
        if len(pair) >= min_starts:
            rows.append({"measure": column, **spearman_permutation(pair[column], pair[score], **options)})
    return pd.DataFrame(rows, columns=["measure", "rho", "p", "n", "exact"])[["measure", "n", "rho", "p", "exact"]]


def smallest_p(n: int) -> float:
    """The smallest two-sided exact permutation p-value of a Spearman rho over n untied points: 2 / n!."""
    return 2 / math.factorial(n)
