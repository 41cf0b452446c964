"""A bootstrap confidence interval for MIR: resample the (image, text) PAIRS with replacement.

MIR is measured on N pairs; another draw of N pairs would give another MIR. The bootstrap estimates that
spread from the pairs we have. Replicate b draws N pair indices with replacement; pair p then appears
c_bp times (sum_p c_bp = N), so every row of pair p (its image rows and its text rows) gets the weight c_bp.
The whole per-layer pipeline of MIR is recomputed on the replicate:

    s_k   = 1 / (sum_j w_j ||t_j|| / sum_j w_j)          text-centric scale of the replicate's text rows
    3σ    : weighted lower median and unbiased std of the row norms (a row of weight w counts w times);
            flagged rows become the weighted per-dimension lower median ("replace") or leave ("drop")
    FD_k  = ||mu_v - mu_t||^2 + tr S_v + tr S_t - 2 ||R_v R_t^T||_*     with weighted means and
            R = sqrt(w) (x - mu) / sqrt(N_rows - 1), so S = R^T R (duplicated rows are never copied);
            when both R have more rows than columns, the cross term goes through S = R^T R (trace_sqrt_of_factors)
    MIR_b = log10( sum_k FD_k )

This equals MIR of the replicate's rows laid out one copy per draw (the tests check it against
`mirlab.metrics.mir.layer_fd` on materialized replicates). The parity methods ("official-fast",
"official-accurate") have no weighted form: their replicates are materialized and sent through
`layer_fd` (slow: one full FD per layer and replicate).

Intervals, from the quantiles q_lo, q_hi of MIR_b at (1 -/+ confidence) / 2:
    "percentile" (default)  [q_lo, q_hi]
    "basic"                 [2 MIR - q_hi, 2 MIR - q_lo]   (reflected around the point estimate)
The FD of a finite sample is biased upwards, and a replicate, holding only ~63% distinct pairs, more so:
`bias` = mean(MIR_b) - MIR estimates it. When the bias is large compared with the spread (few rows per
dimension), the percentile interval sits above MIR; the basic interval, which assumes
MIR_b - MIR ~ MIR - MIR_population, then targets the MIR of infinitely many pairs.

The point estimate `mir` is the MIR of the pairs themselves (equal to `mirlab.compute_mir`). Memory: the
layers are read one at a time; each layer's FD is computed for every replicate before the next is read.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from mirlab.metrics.frechet import METHODS, trace_sqrt_of_factors
from mirlab.metrics.mir import OUTLIER_MODES, layer_fd
from mirlab.metrics.normalize import check_rows


INTERVALS = ("percentile", "basic")


@dataclass
class BootstrapResult:
    """MIR with a bootstrap interval [low, high] over resampled pairs (see the module docstring)."""
    mir: float                  # point estimate: MIR of the pairs themselves
    low: float                  # interval at `confidence`
    high: float
    confidence: float
    interval: str               # "percentile" or "basic"
    replicates: np.ndarray      # (n_boot,) MIR of every replicate
    replicate_fd: np.ndarray    # (n_boot, n_layers) per-layer FD of every replicate
    per_layer: pd.DataFrame     # layer, fd (point estimate), fd_low, fd_high (same interval, per layer)
    method: str = "exact"
    outliers: str = "replace"
    seed: int = 0

    @property
    def n_boot(self) -> int:
        return len(self.replicates)

    @property
    def bias(self) -> float:
        """Bootstrap estimate of the bias of MIR: mean of the replicates minus the point estimate."""
        return float(self.replicates.mean() - self.mir)

    def to_dict(self) -> dict:
        """JSON-ready summary (without the replicate arrays)."""
        return {"mir": float(self.mir), "low": float(self.low), "high": float(self.high),
                "confidence": float(self.confidence), "interval": self.interval, "n_boot": self.n_boot,
                "bias": self.bias, "replicate_std": float(self.replicates.std()), "method": self.method,
                "outliers": self.outliers, "seed": int(self.seed)}

    def __repr__(self) -> str:
        return (f"BootstrapResult(mir={self.mir:.4f}, {100 * self.confidence:g}% {self.interval} interval "
                f"[{self.low:.4f}, {self.high:.4f}], bias={self.bias:+.4f}, n_boot={self.n_boot}, "
                f"method={self.method!r})")


def bootstrap_interval(point, replicates: np.ndarray, confidence: float, interval: str):
    """(low, high) from replicates along axis 0: percentile [q_lo, q_hi] or basic [2 point - q_hi, 2 point - q_lo]."""
    q_lo, q_hi = np.quantile(replicates, [(1 - confidence) / 2, (1 + confidence) / 2], axis=0)
    if interval == "percentile":
        return q_lo, q_hi
    return 2 * np.asarray(point) - q_hi, 2 * np.asarray(point) - q_lo


# --- weighted statistics ----------------------------------------------------------------------------------------

def weighted_lower_median(values: np.ndarray, weights: np.ndarray):
    """torch.median semantics (the lower middle value) of the multiset where row i appears weights[i] times.

    values (n,) -> a float; values (n, d) -> the (d,) per-dimension median. With N = sum(weights) it is
    element (N - 1) // 2 of the sorted multiset, found by a partial sort of the repeated rows.
    """
    k = (int(weights.sum()) - 1) // 2
    return np.partition(np.repeat(values, weights, axis=0), k, axis=0)[k]


def weighted_outlier_mask(norms: np.ndarray, weights: np.ndarray, n_sigma: float) -> np.ndarray:
    """Rows with | r - median(r) | > n_sigma * std(r) over the weighted multiset of norms (std with N - 1)."""
    n = weights.sum()
    mean = (weights * norms).sum() / n
    std = math.sqrt((weights * (norms - mean) ** 2).sum() / (n - 1))
    return np.abs(norms - weighted_lower_median(norms, weights)) > n_sigma * std


def _cross_nuclear_norm(a: np.ndarray, b: np.ndarray) -> float:
    """||a b^T||_* (sum of singular values), product and SVD both in torch.

    (Mixing numpy's OpenBLAS GEMM with torch's LAPACK made each call several times slower on a busy 2-core
    machine: the two thread pools compete.)
    """
    product = torch.from_numpy(a) @ torch.from_numpy(b).T
    return float(torch.linalg.svdvals(product).sum()) if product.numel() else 0.0


class _Modality:
    """One modality's rows of one layer in float64 with their norms, prepared once for all replicates."""

    def __init__(self, rows, what: str):
        rows = check_rows(rows, what)
        self.rows = rows.double().numpy() if isinstance(rows, torch.Tensor) else rows.astype(np.float64)
        self.norms = np.sqrt(np.einsum("ij,ij->i", self.rows, self.rows))

    def factor(self, weights: np.ndarray, outliers: str, n_sigma: float):
        """(weighted mean, R with S = R^T R) of the replicate, outliers handled (raw scale).

        Only rows of nonzero weight are kept (each once: its weight enters through sqrt(w) in R).
        """
        mask = np.zeros(len(weights), dtype=bool)
        if outliers != "none":
            mask = weighted_outlier_mask(self.norms, weights, n_sigma) & (weights > 0)
        if outliers == "drop":
            weights = np.where(mask, 0, weights)
        keep = weights > 0
        rows = self.rows[keep]
        if outliers == "replace" and mask.any():  # the median is taken over all rows, outliers included
            rows[mask[keep]] = weighted_lower_median(self.rows, weights)
        weights = weights[keep].astype(np.float64)
        n = weights.sum()
        if n < 2:
            raise ValueError(f"fewer than 2 rows left after outlier handling ({outliers})")
        mu = weights @ rows / n
        return mu, (rows - mu) * np.sqrt(weights / (n - 1))[:, None]


def weighted_layer_fd(image: _Modality, text: _Modality, image_weights: np.ndarray, text_weights: np.ndarray,
                      outliers: str = "replace", n_sigma: float = 3.0) -> float:
    """Exact FD_k of a replicate given per-row weights (see the module docstring), in float64.

    FD is computed on the raw rows and multiplied by s^2 (FD and the 3σ step are scale-equivariant).
    """
    scale = text_weights.sum() / (text_weights * text.norms).sum()
    mu_v, R_v = image.factor(image_weights, outliers, n_sigma)
    mu_t, R_t = text.factor(text_weights, outliers, n_sigma)
    traces = np.sum(R_v ** 2) + np.sum(R_t ** 2)
    if min(len(R_v), len(R_t)) > R_v.shape[1]:  # both clouds have more rows than dimensions: d x d route
        cross = trace_sqrt_of_factors(R_v, R_t)
    else:
        cross = _cross_nuclear_norm(R_v, R_t)
    fd = np.sum((mu_v - mu_t) ** 2) + traces - 2.0 * cross
    return float(max(fd, 0.0) * scale ** 2)  # FD >= 0; a negative value can only be rounding


# --- resampling ---------------------------------------------------------------------------------------------------

def pair_counts(n_pairs: int, n_boot: int, seed: int) -> np.ndarray:
    """(n_boot, n_pairs) integer matrix: how often each pair is drawn in each replicate (rows sum to n_pairs)."""
    draws = np.random.default_rng(seed).integers(0, n_pairs, size=(n_boot, n_pairs))
    return np.stack([np.bincount(d, minlength=n_pairs) for d in draws])


def replicate_rows(counts: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """Row indices of one replicate laid out explicitly: pair p's block of sizes[p] rows, counts[p] times."""
    starts = np.cumsum(sizes) - sizes
    drawn = np.repeat(np.arange(len(sizes)), counts)
    return np.concatenate([np.arange(starts[p], starts[p] + sizes[p]) for p in drawn])


def _pair_sizes(hidden_states) -> dict[str, np.ndarray]:
    """Rows per pair and modality, from hidden_states.samples (columns n_image, n_text)."""
    samples = getattr(hidden_states, "samples", None)
    if not isinstance(samples, pd.DataFrame) or not {"n_image", "n_text"} <= set(samples.columns):
        raise ValueError("bootstrap_mir needs mirlab.HiddenStates (or any object with a .samples DataFrame with "
                         "columns n_image, n_text that iterates (layer, image_rows, text_rows)) to know which "
                         "rows belong to which pair")
    if len(samples) < 2:
        raise ValueError(f"a bootstrap over pairs needs at least 2 pairs, got {len(samples)}")
    sizes = {m: samples[f"n_{m}"].to_numpy(dtype=np.int64) for m in ("image", "text")}
    for modality, size in sizes.items():
        if (size < 1).any():
            raise ValueError(f"pair {int(np.argmin(size))} has no {modality} rows")
    return sizes


def _check_options(n_boot, method, confidence, outliers, interval) -> None:
    if isinstance(n_boot, bool) or not isinstance(n_boot, (int, np.integer)) or n_boot < 1:
        raise ValueError(f"n_boot must be a positive int, got {n_boot!r}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if outliers not in OUTLIER_MODES:
        raise ValueError(f"outliers must be one of {OUTLIER_MODES}, got {outliers!r}")
    if isinstance(confidence, bool) or not isinstance(confidence, (int, float)) or not 0 < confidence < 1:
        raise ValueError(f"confidence must be a number in (0, 1), got {confidence!r}")
    if interval not in INTERVALS:
        raise ValueError(f"interval must be one of {INTERVALS}, got {interval!r}")


def _known_point(result, method, outliers, n_sigma) -> dict | None:
    """{layer: FD} of a given MIRResult, after checking it was computed with the same settings."""
    if result is None:
        return None
    settings = (result.method, result.outliers, float(result.n_sigma))
    if settings != (method, outliers, float(n_sigma)):
        raise ValueError(f"result was computed with (method, outliers, n_sigma) = {settings}, "
                         f"the bootstrap asks for {(method, outliers, float(n_sigma))}")
    return dict(zip(result.per_layer["layer"].tolist(), result.per_layer["fd"].tolist()))


def replicate_layer_fds(image, text, counts: np.ndarray, sizes: dict[str, np.ndarray], method: str = "exact",
                        outliers: str = "replace", n_sigma: float = 3.0, layer="?") -> np.ndarray:
    """FD_k of one layer for every replicate (row b of counts): weighted route for "exact", else materialized."""
    out = np.empty(len(counts))
    if method != "exact":
        for b, c in enumerate(counts):
            rows_v, rows_t = replicate_rows(c, sizes["image"]), replicate_rows(c, sizes["text"])
            out[b] = layer_fd(image[rows_v], text[rows_t], method, outliers, n_sigma, layer)["fd"]
        return out
    v, t = _Modality(image, f"layer {layer}, image rows"), _Modality(text, f"layer {layer}, text rows")
    for b, c in enumerate(counts):
        try:
            out[b] = weighted_layer_fd(v, t, np.repeat(c, sizes["image"]), np.repeat(c, sizes["text"]),
                                       outliers, n_sigma)
        except ValueError as err:
            raise ValueError(f"layer {layer}, replicate {b}: {err}") from None
    return out


def bootstrap_mir(hidden_states, n_boot: int = 200, seed: int = 0, method: str = "exact",
                  confidence: float = 0.95, interval: str = "percentile", outliers: str = "replace",
                  n_sigma: float = 3.0, result=None, progress: bool = False) -> BootstrapResult:
    """MIR of `hidden_states` with a bootstrap interval over pairs (see the module docstring).

    hidden_states: `mirlab.HiddenStates` (its `.samples` table says which rows belong to which pair; its
    layers are read one at a time). n_boot replicates drawn with `numpy.random.default_rng(seed)`: same
    seed, same result. interval: "percentile" or "basic". method / outliers / n_sigma: as in
    `mirlab.compute_mir`. result: the MIRResult of the same states and settings, if already computed (its
    per-layer FD is the point estimate, saving one FD per layer). Returns a `BootstrapResult`; its `mir`
    equals compute_mir(hidden_states).mir.
    """
    _check_options(n_boot, method, confidence, outliers, interval)
    sizes = _pair_sizes(hidden_states)
    known = _known_point(result, method, outliers, n_sigma)
    counts = pair_counts(len(sizes["text"]), int(n_boot), seed)
    from tqdm.auto import tqdm
    bar = tqdm(total=len(hidden_states) if hasattr(hidden_states, "__len__") else None,
               desc=f"bootstrap MIR ({method})", unit="layer", disable=not progress)
    layers, point, fds = [], [], []
    for item in hidden_states:  # a plain loop with del: one layer alive at a time
        layer, image, text = item
        del item
        for modality, rows in (("image", image), ("text", text)):
            if len(rows) != sizes[modality].sum():
                raise ValueError(f"layer {layer}: {len(rows)} {modality} rows, but the samples table "
                                 f"accounts for {sizes[modality].sum()}")
        if known is not None and layer not in known:
            raise ValueError(f"result has no FD for layer {layer}")
        point.append(known[layer] if known is not None else layer_fd(image, text, method, outliers, n_sigma,
                                                                      layer)["fd"])
        fds.append(replicate_layer_fds(image, text, counts, sizes, method, outliers, n_sigma, layer))
        layers.append(layer)
        del image, text
        bar.update(1)
    bar.close()
    if not layers:
        raise ValueError("no layers: hidden_states yielded nothing")
    fds = np.stack(fds, axis=1)
    totals = fds.sum(axis=1)
    if not math.fsum(point) > 0 or not (totals > 0).all():
        raise ValueError("a sum of per-layer FD is 0: MIR = log10(sum) is undefined")
    mir, replicates = math.log10(math.fsum(point)), np.log10(totals)  # fsum, as compute_mir: bit-identical MIR
    low, high = bootstrap_interval(mir, replicates, confidence, interval)
    fd_low, fd_high = bootstrap_interval(point, fds, confidence, interval)
    per_layer = pd.DataFrame({"layer": layers, "fd": point, "fd_low": fd_low, "fd_high": fd_high})
    return BootstrapResult(mir, float(low), float(high), float(confidence), interval, replicates, fds, per_layer,
                           method, outliers, int(seed))
