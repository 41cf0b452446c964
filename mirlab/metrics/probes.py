"""Modality-bias probes beside MIR: functions of one layer's raw image rows V (n_v x d) and text rows T (n_t x d).

Every probe reads the rows the MIR extraction already stored (no extra forward pass). The rows are upcast to
float64 before any arithmetic (like ``mirlab.metrics.normalize.prepare_layer``) and used *raw*: no
text-centric scale, no 3-sigma rule. Every probe below is invariant to a common positive scale of V and T, so
MIR's text-centric scale (one factor per layer for both clouds) would not change it; the 3-sigma rule would.

    norm_ratio           mean_i ||V_i|| / mean_j ||T_j||       (the gap MIR's text-centric scale keeps, §2.1)
    modality_gap         ||mean_i V^_i - mean_j T^_j||, x^ = x / ||x||           (Liang et al. 2022,
                         and mean_ij cos(V_i, T_j) = mean_i V^_i . mean_j T^_j    "Mind the Gap")
    effective_rank       exp(H(p)), p_k = s_k / sum s, s = singular values of the centred rows
                         (Roy & Vetterli 2007)
    participation_ratio  (sum_k l_k)^2 / sum_k l_k^2, l = eigenvalues of the covariance of the rows
    linear_cka           ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F), X, Y centred    (Kornblith et al. 2019)
    mutual_knn           mean_i |N_k^X(i) ∩ N_k^Y(i)| / k, cosine k nearest neighbours without i itself
                         (Huh et al. 2024, "The Platonic Representation Hypothesis"); chance level k / (n - 1)

The last two compare *paired* samples: per pair p, the mean of its image rows against the mean of its text rows
(``pool_rows``), meaningful when the texts describe the images (captions). Each comes with a shuffled-pairs
baseline: the same measure after randomly re-pairing the pooled text rows (``n_shuffles`` permutations, mean).

``layer_probes`` returns one row of a per-layer table; ``compute_probes`` runs it over an iterable of layers
(one layer in memory at a time, like ``compute_mir``) and returns a wide table, one row per layer with a
``layer`` column and one column per probe value: what ``mirlab.plots.per_layer_figure(table, value=...)``,
``LayerExplorer(..., table=table, value=...)`` and ``mirlab.cli.summary`` take. ``tidy_probes`` turns it into
the long (layer, probe, value) form, ``wide_probes`` back.
"""
from __future__ import annotations

from typing import Iterable

import numpy as np
import pandas as pd
import torch

from mirlab.metrics.mir import each_layer
from mirlab.metrics.normalize import check_rows, row_norms

ROW_PROBES = ("norm_ratio", "modality_gap", "rank", "alignment")
DEFAULT_K = 10  # Huh et al. 2024 use k = 10 nearest neighbours


def _float64(x, what: str) -> np.ndarray:
    """Rows as a float64 numpy array (exact upcast before any arithmetic), checked by ``check_rows``."""
    x = check_rows(x, what)
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu", torch.float64).numpy()
    return np.asarray(x, dtype=np.float64)


def _unit_rows(x: np.ndarray, what: str) -> np.ndarray:
    norms = row_norms(x)
    if (norms == 0).any():
        raise ValueError(f"{what}: {int((norms == 0).sum())} rows are zero; their direction is undefined")
    return x / norms[:, None]


def _same_width(image: np.ndarray, text: np.ndarray, layer) -> None:
    if image.shape[1] != text.shape[1]:
        raise ValueError(f"layer {layer}: image rows have width {image.shape[1]} "
                         f"but text rows have width {text.shape[1]}")


def norm_ratio(image, text, layer: int | str = "?") -> float:
    """mean_i ||V_i||_2 / mean_j ||T_j||_2 on the raw rows (norms in float64). Invariant to a common scale."""
    image = _float64(image, f"layer {layer}, image rows")
    text = _float64(text, f"layer {layer}, text rows")
    text_norm = row_norms(text).mean()
    if text_norm == 0:
        raise ValueError(f"layer {layer}, text rows: every row is zero, the norm ratio is undefined")
    return float(row_norms(image).mean() / text_norm)


def modality_gap(image, text, layer: int | str = "?") -> tuple[float, float]:
    """(gap, mean cosine) of the L2-normalized clouds (Liang et al. 2022, "Mind the Gap"):

        gap         = || mean_i V_i/||V_i||  -  mean_j T_j/||T_j|| ||_2       in [0, 2]
        mean cosine = mean_{i,j} cos(V_i, T_j) = (mean_i V^_i) . (mean_j T^_j)   (bilinear: exact, no n_v x n_t)

    Identical clouds give gap 0; the gap sees directions only, so it is invariant to any positive scale of
    either cloud. Zero rows are an error.
    """
    image = _float64(image, f"layer {layer}, image rows")
    text = _float64(text, f"layer {layer}, text rows")
    _same_width(image, text, layer)
    image_mean = _unit_rows(image, f"layer {layer}, image rows").mean(axis=0)
    text_mean = _unit_rows(text, f"layer {layer}, text rows").mean(axis=0)
    return float(np.linalg.norm(image_mean - text_mean)), float(image_mean @ text_mean)


SINGLE_THREAD_EIGEN = 1024  # symmetric eigenproblems up to this size run on one thread


def _eigvalsh(matrix: np.ndarray) -> np.ndarray:
    """Ascending eigenvalues of a symmetric float64 matrix (torch's LAPACK). Up to SINGLE_THREAD_EIGEN rows it
    runs on one thread: on a busy 2-core machine a 2-thread solver took 3-6 s instead of 0.03 s at size 576."""
    if len(matrix) > SINGLE_THREAD_EIGEN:
        return torch.linalg.eigvalsh(torch.from_numpy(matrix)).numpy()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return torch.linalg.eigvalsh(torch.from_numpy(matrix)).numpy()
    finally:
        torch.set_num_threads(threads)


def covariance_spectrum(rows, what: str = "rows") -> np.ndarray:
    """Eigenvalues (descending, >= 0) of the d x d covariance (1/(n-1)) X_c^T X_c of the centred rows X_c.

    Computed from the smaller Gram matrix G (X_c^T X_c or X_c X_c^T: same non-zero eigenvalues). Eigenvalues
    below max(eigenvalue) * size(G) * eps are rounding noise of a zero eigenvalue (the tolerance of
    numpy.linalg.matrix_rank, applied to G) and are set to 0, so a rank-r cloud has exactly r non-zero values.
    The singular values of X_c are sqrt((n - 1) * eigenvalues).
    """
    x = _float64(rows, what)
    centred = x - x.mean(axis=0)
    gram = centred.T @ centred if x.shape[0] >= x.shape[1] else centred @ centred.T
    eigenvalues = _eigvalsh(gram)[::-1] / (x.shape[0] - 1)
    tolerance = max(eigenvalues[0], 0.0) * len(gram) * np.finfo(np.float64).eps
    return np.where(eigenvalues > tolerance, eigenvalues, 0.0)


def _effective_rank_of(eigenvalues: np.ndarray) -> float:
    singular = np.sqrt(eigenvalues)
    total = singular.sum()
    if total == 0:
        return 0.0
    p = singular[singular > 0] / total
    return float(np.exp(-(p * np.log(p)).sum()))


def _participation_ratio_of(eigenvalues: np.ndarray) -> float:
    total = eigenvalues.sum()
    return float(total ** 2 / (eigenvalues ** 2).sum()) if total > 0 else 0.0


def effective_rank(rows, what: str = "rows") -> float:
    """Effective rank (Roy & Vetterli 2007) of the centred rows: exp(-sum_k p_k log p_k), p_k = s_k / sum_l s_l,
    s = singular values of X - mean(X). In [1, min(n - 1, d)]: d for an isotropic cloud with n >> d, r for r equal
    directions; 0 for a cloud of identical rows (no direction used). Invariant to scale and rotation."""
    return _effective_rank_of(covariance_spectrum(rows, what))


def participation_ratio(rows, what: str = "rows") -> float:
    """Participation ratio (sum_k l_k)^2 / sum_k l_k^2 of the covariance eigenvalues l_k (centred rows).
    d for an isotropic cloud, r for r equal directions; 0 for identical rows. Invariant to scale and rotation."""
    return _participation_ratio_of(covariance_spectrum(rows, what))


def _centred(x: np.ndarray) -> np.ndarray:
    return x - x.mean(axis=0)


def linear_cka(x, y) -> float:
    """Linear CKA (Kornblith et al. 2019, Eq. 5; the biased HSIC) of paired samples x (n x d1), y (n x d2):

        CKA = ||Y_c^T X_c||_F^2 / ( ||X_c^T X_c||_F ||Y_c^T Y_c||_F ),   X_c, Y_c: columns centred

    1 for y = x Q (Q orthogonal) or y = a x; invariant to isotropic scale and rotation of either side; in [0, 1].
    Computed with n x n Gram matrices when n is smaller than the widths. NaN when one side has no centred
    variance (all its rows equal: e.g. image rows that do not depend on the image), where CKA is undefined.
    """
    x, y = _float64(x, "CKA, first rows"), _float64(y, "CKA, second rows")
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"CKA needs paired samples: {x.shape[0]} rows against {y.shape[0]}")
    x, y = _centred(x), _centred(y)
    if x.shape[0] < max(x.shape[1], y.shape[1]):
        kx, ky = x @ x.T, y @ y.T
        cross, self_x, self_y = (kx * ky).sum(), np.linalg.norm(kx), np.linalg.norm(ky)
    else:
        cross = np.linalg.norm(y.T @ x) ** 2
        self_x, self_y = np.linalg.norm(x.T @ x), np.linalg.norm(y.T @ y)
    if self_x == 0 or self_y == 0:
        return float("nan")
    return float(cross / (self_x * self_y))


def knn_indices(x, k: int) -> np.ndarray:
    """(n, k) indices of each row's k nearest other rows by cosine similarity (itself excluded; ties: lower index)."""
    unit = _unit_rows(_float64(x, "kNN rows"), "kNN rows")
    similarity = unit @ unit.T
    np.fill_diagonal(similarity, -np.inf)
    return np.argsort(-similarity, axis=1, kind="stable")[:, :k]


def _check_k(k: int, n: int) -> None:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= n - 2:
        raise ValueError(f"mutual kNN needs 1 <= k <= n - 2 = {n - 2} (n = {n} samples), got k={k!r}")


def mutual_knn(x, y, k: int = DEFAULT_K) -> float:
    """Mutual k-nearest-neighbour alignment (Huh et al. 2024) of paired samples x (n x d1), y (n x d2):

        m = mean_i |N_k^x(i) ∩ N_k^y(i)| / k,   N_k: the k nearest other samples by cosine similarity

    1 when both sides have the same neighbourhoods; k / (n - 1) in expectation when the pairing is random
    (``mutual_knn_chance``). Invariant to scale and rotation of either side. Needs 1 <= k <= n - 2.
    """
    n = len(x)
    if len(y) != n:
        raise ValueError(f"mutual kNN needs paired samples: {n} rows against {len(y)}")
    _check_k(k, n)
    a, b = knn_indices(x, k), knn_indices(y, k)
    shared = [len(np.intersect1d(a[i], b[i], assume_unique=True)) for i in range(n)]
    return float(np.mean(shared) / k)


def mutual_knn_chance(k: int, n: int) -> float:
    """Expected mutual kNN alignment of a random pairing: each of the k neighbours on one side is among the k
    of the other side with probability k / (n - 1)."""
    return k / (n - 1)


def pool_rows(rows, counts) -> np.ndarray:
    """(n_pairs, d) float64: the mean of each pair's rows; ``rows`` holds the pairs' rows one pair after the
    other, ``counts[p]`` of them for pair p (HiddenStates.samples' n_image / n_text)."""
    rows = _float64(rows, "rows to pool")
    counts = np.asarray(counts, dtype=np.int64)
    if (counts < 1).any():
        raise ValueError(f"every pair needs at least one row to pool; counts {counts[counts < 1][:5].tolist()}")
    if counts.sum() != rows.shape[0]:
        raise ValueError(f"the pair counts sum to {int(counts.sum())} rows but there are {rows.shape[0]}")
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    return np.add.reduceat(rows, starts, axis=0) / counts[:, None]


def paired_alignment(image_pooled, text_pooled, k: int = DEFAULT_K, n_shuffles: int = 10,
                     seed: int = 0) -> dict[str, float]:
    """Linear CKA and mutual kNN of pooled per-pair image rows against pooled text rows, and their
    shuffled-pairs baselines: the mean over ``n_shuffles`` random re-pairings (seeded permutations of the text
    side). Keys: cka, cka_shuffled, mutual_knn, mutual_knn_shuffled, knn_k, mutual_knn_chance, n_pairs."""
    n = len(image_pooled)
    _check_k(k, n)
    if n_shuffles < 1:
        raise ValueError(f"n_shuffles must be >= 1, got {n_shuffles}")
    rng = np.random.default_rng(seed)
    permutations = [rng.permutation(n) for _ in range(n_shuffles)]
    return {"cka": linear_cka(image_pooled, text_pooled),
            "cka_shuffled": float(np.mean([linear_cka(image_pooled, text_pooled[p]) for p in permutations])),
            "mutual_knn": mutual_knn(image_pooled, text_pooled, k),
            "mutual_knn_shuffled": float(np.mean([mutual_knn(image_pooled, text_pooled[p], k)
                                                  for p in permutations])),
            "knn_k": int(k), "mutual_knn_chance": mutual_knn_chance(k, n), "n_pairs": int(n)}


def _pair_counts(pairs_info, n_image: int, n_text: int, layer) -> tuple[np.ndarray, np.ndarray]:
    """(image counts, text counts) per pair from a table with n_image / n_text columns (HiddenStates.samples)."""
    try:
        image_counts = np.asarray(pairs_info["n_image"], dtype=np.int64)
        text_counts = np.asarray(pairs_info["n_text"], dtype=np.int64)
    except (KeyError, TypeError, IndexError):
        raise ValueError("pairs_info needs n_image and n_text per pair (e.g. HiddenStates.samples)") from None
    if image_counts.sum() != n_image or text_counts.sum() != n_text:
        raise ValueError(f"layer {layer}: pairs_info counts {int(image_counts.sum())} image and "
                         f"{int(text_counts.sum())} text rows, the layer has {n_image} and {n_text}")
    return image_counts, text_counts


def _check_probes(probes) -> tuple[str, ...]:
    probes = tuple(probes)
    unknown = [p for p in probes if p not in ROW_PROBES]
    if unknown or not probes:
        raise ValueError(f"row probes must be a non-empty subset of {ROW_PROBES}, got {list(probes)}")
    return probes


def layer_probes(image, text, layer: int | str = "?", pairs_info=None, probes=ROW_PROBES, k: int = DEFAULT_K,
                 n_shuffles: int = 10, seed: int = 0) -> dict:
    """One per-layer row: the chosen probes (ROW_PROBES) of one layer's raw image and text rows.

    Columns: layer, n_image, n_text, then per probe
      "norm_ratio"    norm_ratio
      "modality_gap"  modality_gap, mean_cosine
      "rank"          image_effective_rank, text_effective_rank, image_participation_ratio,
                      text_participation_ratio
      "alignment"     cka, cka_shuffled, mutual_knn, mutual_knn_shuffled, knn_k, mutual_knn_chance, n_pairs
                      (needs ``pairs_info``: a table with n_image and n_text per pair, e.g. HiddenStates.samples;
                      k is lowered to n_pairs - 2 when there are fewer pairs)
    """
    probes = _check_probes(probes)
    image = _float64(image, f"layer {layer}, image rows")
    text = _float64(text, f"layer {layer}, text rows")
    _same_width(image, text, layer)
    row = {"layer": layer, "n_image": int(image.shape[0]), "n_text": int(text.shape[0])}
    if "norm_ratio" in probes:
        row["norm_ratio"] = norm_ratio(image, text, layer)
    if "modality_gap" in probes:
        row["modality_gap"], row["mean_cosine"] = modality_gap(image, text, layer)
    if "rank" in probes:
        for name, rows in (("image", image), ("text", text)):
            spectrum = covariance_spectrum(rows, f"layer {layer}, {name} rows")
            row[f"{name}_effective_rank"] = _effective_rank_of(spectrum)
            row[f"{name}_participation_ratio"] = _participation_ratio_of(spectrum)
    if "alignment" in probes:
        if pairs_info is None:
            raise ValueError("the alignment probe needs pairs_info (n_image and n_text per pair, e.g. "
                             "HiddenStates.samples) to pool each pair's rows")
        image_counts, text_counts = _pair_counts(pairs_info, len(image), len(text), layer)
        if len(image_counts) < 3:
            raise ValueError(f"layer {layer}: the alignment probe needs at least 3 pairs, got {len(image_counts)}")
        row.update(paired_alignment(pool_rows(image, image_counts), pool_rows(text, text_counts),
                                    min(k, len(image_counts) - 2), n_shuffles, seed))
    return row


def compute_probes(layers: Iterable, pairs_info=None, probes=ROW_PROBES, k: int = DEFAULT_K, n_shuffles: int = 10,
                   seed: int = 0, progress: bool = False) -> pd.DataFrame:
    """The wide per-layer probe table over an iterable of layers, consumed one layer at a time.

    layers: (image_rows, text_rows) per layer (numbered 1, 2, ...) or (layer, image_rows, text_rows) triples,
    e.g. a ``HiddenStates``. pairs_info: n_image / n_text per pair (``HiddenStates.samples``), needed by the
    "alignment" probe only. Returns one row per layer (columns: see ``layer_probes``).
    """
    probes = _check_probes(probes)
    rows = each_layer(layers, lambda image, text, layer: layer_probes(image, text, layer, pairs_info, probes, k,
                                                                   n_shuffles, seed), "row probes", progress)
    return pd.DataFrame(rows)


ID_COLUMNS = ("layer",)


def tidy_probes(table: pd.DataFrame) -> pd.DataFrame:
    """The long form (layer, probe, value) of a wide per-layer table (every numeric column but ``layer``)."""
    if "layer" not in table.columns:
        raise ValueError(f"a per-layer table needs a 'layer' column (columns: {list(table.columns)})")
    values = [c for c in table.columns if c != "layer" and pd.api.types.is_numeric_dtype(table[c])]
    long = table.melt(id_vars="layer", value_vars=values, var_name="probe", value_name="value")
    return long.astype({"value": "float64"}).reset_index(drop=True)


def wide_probes(tidy: pd.DataFrame) -> pd.DataFrame:
    """The wide per-layer table (one column per probe, a ``layer`` column) of a (layer, probe, value) table."""
    missing = [c for c in ("layer", "probe", "value") if c not in tidy.columns]
    if missing:
        raise ValueError(f"a tidy probe table needs columns layer, probe, value; missing {missing}")
    wide = tidy.pivot(index="layer", columns="probe", values="value")
    wide.columns.name = None
    return wide.reset_index()
