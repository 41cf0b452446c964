"""The two steps MIR applies to a layer's token rows before the Fréchet distance.

For one decoder layer with image-token rows V (n_v x d) and text-token rows T (n_t x d):

    text_centric_scale(T) = s = 1 / mean_j ||T_j||_2      both V and T are multiplied by s
    replace_outliers(X)   : r_i = ||X_i||_2 ; rows with |r_i - median(r)| > 3 * std(r) are replaced
                            by the per-dimension median vector of X (one modality at a time)

Official semantics (docs/mir.md, 'The 3σ rule'): `std` is the unbiased one (n - 1) and `median` is torch's, i.e. the
*lower* of the two middle values when the count is even; this holds both for the median norm and for the
per-dimension median vector, which is taken over all rows of the matrix (outliers included).

Everything here works on torch tensors and numpy arrays and returns the same kind it was given.
`check_rows` is the input validation shared by the whole math (frechet, mir).

`prepare_layer` is the seam between extraction and any per-layer metric: it upcasts one layer's image and
text rows (so float16/bfloat16/float32 caches all get float64 arithmetic), applies the text-centric scale and
the 3-sigma rule, and returns the rows a metric consumes. MIR's `layer_fd` is prepare_layer + Fréchet
distance; a new metric can start from the same prepared rows (docs/architecture.md, "Adding a metric").

Where mirlab and the paper differ (docs/paper-differences.md, 'Outliers: replaced or removed'): the paper's
Eq. 3 *removes* the 3-sigma outliers, while the official code *replaces* them by the per-dimension median.
mirlab follows the code (``outliers="replace"``, the default) and offers the paper's reading as
``outliers="drop"``.
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

OUTLIER_MODES = ("replace", "drop", "none")


def _is_torch(x) -> bool:
    return isinstance(x, torch.Tensor)


def _as_float_rows(x):
    """x as a float torch tensor or numpy array (integers become float64); anything else via np.asarray."""
    if _is_torch(x):
        return x if x.is_floating_point() else x.double()
    x = np.asarray(x)
    return x if np.issubdtype(x.dtype, np.floating) else x.astype(np.float64)


def check_rows(x, what: str = "rows"):
    """Validate a token matrix: 2-D, at least 2 rows, every entry finite. Returns it as float rows.

    `what` names the matrix in error messages, e.g. "layer 7, text rows".
    """
    x = _as_float_rows(x)
    if x.ndim != 2:
        raise ValueError(f"{what}: expected a 2-D matrix [rows, dims], got shape {tuple(x.shape)}")
    n, d = x.shape
    if n == 0:
        raise ValueError(f"{what}: no rows (empty layer)")
    if d == 0:
        raise ValueError(f"{what}: rows have zero width")
    if n < 2:
        raise ValueError(f"{what}: need at least 2 rows for a covariance, got {n}")
    finite_rows = torch.isfinite(x).all(dim=1) if _is_torch(x) else np.isfinite(x).all(axis=1)
    n_bad = int((~finite_rows).sum())
    if n_bad:
        raise ValueError(f"{what}: {n_bad} {'rows contain' if n_bad > 1 else 'row contains'} NaN/inf")
    return x


def row_norms(x) -> np.ndarray:
    """||x_i||_2 for every row, accumulated in float64, as a numpy array."""
    if _is_torch(x):
        return torch.linalg.vector_norm(x.detach(), dim=1, dtype=torch.float64).cpu().numpy()
    return np.sqrt(np.einsum("ij,ij->i", x, x, dtype=np.float64))


def text_centric_scale(text) -> float:
    """s = 1 / mean_j ||t_j||_2 over the text rows t_j (the factor MIR multiplies both modalities by)."""
    text = check_rows(text, "text rows")
    mean_norm = float(row_norms(text).mean())
    if mean_norm == 0.0:
        raise ValueError("text rows: every row is zero, the text-centric scale 1/mean norm is undefined")
    return 1.0 / mean_norm


def lower_median(values: np.ndarray) -> float:
    """torch's median of a 1-D array: the lower middle value, sorted[(n - 1) // 2]."""
    k = (len(values) - 1) // 2
    return float(np.partition(values, k)[k])


def outlier_mask(x, n_sigma: float = 3.0) -> np.ndarray:
    """Boolean numpy mask of rows with | ||x_i|| - median ||x|| | > n_sigma * std ||x|| (std with n - 1)."""
    if not n_sigma > 0:
        raise ValueError(f"n_sigma must be positive, got {n_sigma}")
    norms = row_norms(x)
    return np.abs(norms - lower_median(norms)) > n_sigma * norms.std(ddof=1)


def dimension_median(x):
    """Per-dimension lower median over the rows of x (torch.median(x, dim=0) semantics); same kind as x."""
    if _is_torch(x):
        return torch.median(x, dim=0).values
    k = (x.shape[0] - 1) // 2
    return np.partition(x, k, axis=0)[k]


def replace_outliers(x, n_sigma: float = 3.0, mode: str = "replace"):
    """3-sigma outlier handling on row norms, the official way. Returns (x_clean, mask).

    mask[i] is True when | ||x_i|| - median_j ||x_j|| | > n_sigma * std_j ||x_j||  (unbiased std, lower
    median). mode="replace" (official): those rows become the per-dimension median vector of x (taken over
    all rows), so the row count is unchanged. mode="drop": those rows are removed.
    x_clean is the same kind (torch/numpy) and dtype as x; when no row is flagged it is x itself (no copy).
    The step is scale-equivariant: replace_outliers(s * x) == s * replace_outliers(x) for s > 0.
    """
    if mode not in ("replace", "drop"):
        raise ValueError(f"mode must be 'replace' or 'drop', got {mode!r}")
    x = check_rows(x)
    mask = outlier_mask(x, n_sigma)
    if _is_torch(x):
        mask = torch.from_numpy(mask).to(x.device)
    if not mask.any():
        return x, mask
    if mode == "drop":
        return x[~mask], mask
    clean = x.clone() if _is_torch(x) else x.copy()
    clean[mask] = dimension_median(x)
    return clean, mask


class PreparedLayer(NamedTuple):
    """One layer's rows as MIR measures them: scaled by ``scale`` and outlier-handled, in ``image.dtype``."""
    image: torch.Tensor | np.ndarray
    text: torch.Tensor | np.ndarray
    scale: float
    image_outliers: int
    text_outliers: int


def _upcast(x, dtype):
    if _is_torch(x):
        return x.detach().to(dtype=dtype)
    return np.asarray(x, dtype=np.float64 if dtype == torch.float64 else np.float32)


def prepare_layer(image, text, outliers: str = "replace", n_sigma: float = 3.0, layer: int | str = "?",
                  dtype: torch.dtype = torch.float64) -> PreparedLayer:
    """Text-centric scale and 3-sigma rule for one layer, in ``dtype`` (float64 unless asked otherwise).

        s   = 1 / mean_j ||T_j||_2            (T: text rows, norms in float64)
        V'  = outliers(s V),  T' = outliers(s T)   per modality, see `replace_outliers`

    The rows are converted to ``dtype`` *before* any arithmetic, so the result does not depend on the dtype
    the hidden states were stored in (float16, bfloat16, float32): they are exact inputs, upcast exactly.
    outliers: "replace" (official code, default), "drop" (the paper's Eq. 3 read literally) or "none".
    Errors name ``layer`` and the modality. Memory: a float64 copy of the layer's rows.
    """
    if outliers not in OUTLIER_MODES:
        raise ValueError(f"outliers must be one of {OUTLIER_MODES}, got {outliers!r}")
    if dtype not in (torch.float64, torch.float32):
        raise ValueError(f"dtype must be torch.float64 or torch.float32, got {dtype}")
    image = check_rows(image, f"layer {layer}, image rows")
    text = check_rows(text, f"layer {layer}, text rows")
    if image.shape[1] != text.shape[1]:
        raise ValueError(f"layer {layer}: image rows have width {image.shape[1]} "
                         f"but text rows have width {text.shape[1]}")
    image, text = _upcast(image, dtype), _upcast(text, dtype)
    try:
        scale = text_centric_scale(text)
    except ValueError as err:
        raise ValueError(f"layer {layer}, {err}") from None
    counts = []
    prepared = []
    for rows in (image * scale, text * scale):
        if outliers == "none":
            prepared.append(rows)
            counts.append(0)
        else:
            clean, mask = replace_outliers(rows, n_sigma=n_sigma, mode=outliers)
            prepared.append(clean)
            counts.append(int(mask.sum()))
    return PreparedLayer(prepared[0], prepared[1], scale, counts[0], counts[1])
