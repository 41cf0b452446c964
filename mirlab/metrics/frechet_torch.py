"""The exact Fréchet distance in torch float64 on the rows' own device: MIR's per-layer statistics on a GPU.

Same quantity and the same routes as ``method="exact"`` of mirlab.metrics.frechet (read its docstring first),
written with torch operations so that the means, covariances and the trace-sqrt term run where the rows are
(CUDA, or the CPU in tests); only the final scalars come back to the host:

    FD = ||mu_x - mu_y||^2 + tr S_x + tr S_y - 2 tr (S_x S_y)^{1/2}         S = X_c^T X_c / (n - 1)

    cloud with n <= d rows:  kept as factor rows R ((n - 1) x d, S = R^T R): the centred rows with the all-ones
                             direction removed by a Householder reflection (see frechet._centred_factor_rows)
    both such clouds:        tr (S_x S_y)^{1/2} = ||R_x R_y^T||_*
    one such cloud (b):      ||R_b L_a||_*  with S_a = L_a L_a^T (Cholesky; eigen factors if S_a is singular)
    both n > d:              sum_i sqrt(lambda_i(L^T S_y L))  with S_x = L L^T
    nuclear norms:           sum sqrt(eigvalsh) of the smaller Gram matrix, or singular values when near-zero
                             ones would make the square roots inaccurate (the CPU path's rule)

The CPU path (numpy + LAPACK) stays the default for CPU rows; mirlab.metrics.mir.layer_fd uses this module when
the rows are on another device, or when it is given ``device=``. Both agree to ~1e-12 relative in float64.
"""
from __future__ import annotations

import torch

from mirlab.metrics.frechet import CHOLESKY_MIN_PIVOT, CHUNK_ELEMENTS, EPS64, _assemble
from mirlab.metrics.normalize import check_rows


def mean_and_covariance(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mu, S) of float64 rows x (n x d) on x's device: S = sum over row chunks of X_c^T X_c, / (n - 1).

    Centred chunks (never E[x x^T] - mu mu^T, which cancels when |mu| is large); one chunk of ~16M entries at
    a time, so the memory beyond x is one d x d matrix and one chunk.
    """
    n, d = x.shape
    mu = x.mean(dim=0)
    cov = torch.zeros((d, d), dtype=x.dtype, device=x.device)
    step = max(1, min(n, CHUNK_ELEMENTS // d))
    for start in range(0, n, step):
        chunk = x[start:start + step] - mu
        cov.addmm_(chunk.T, chunk)
    cov /= n - 1
    return mu, cov


def centred_factor_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(mu, R) with R ((n - 1) x d) such that S = R^T R: H X_c without its first (zero) row, / sqrt(n - 1),
    where H maps 1/sqrt(n) to e_1 (v = 1/sqrt(n) - e_1; frechet._centred_factor_rows has the derivation)."""
    n = x.shape[0]
    mu = x.mean(dim=0)
    centred = x - mu
    v = torch.full((n,), n ** -0.5, dtype=x.dtype, device=x.device)
    v[0] -= 1.0
    R = centred[1:] - (2.0 / float(v @ v) / n ** 0.5) * (v @ centred)
    return mu, R / (n - 1) ** 0.5


def cholesky(S: torch.Tensor) -> torch.Tensor | None:
    """Lower Cholesky factor of S, or None when S is singular or a pivot is below CHOLESKY_MIN_PIVOT * d * eps *
    max diag(S) (a rounding-size pivot would add a spurious direction; frechet._cholesky)."""
    L, info = torch.linalg.cholesky_ex(S)
    if int(info) != 0:
        return None
    if float((torch.diagonal(L) ** 2).min()) <= CHOLESKY_MIN_PIVOT * len(S) * EPS64 * float(torch.diagonal(S).max()):
        return None
    return L


def eigen_factor(S: torch.Tensor) -> torch.Tensor:
    """F = V_r diag(sqrt(w_r)) with F F^T = S, keeping the eigenvalues w > d * eps * max(w)."""
    w, V = torch.linalg.eigh(S)
    keep = w > len(S) * EPS64 * max(float(w.max()), 0.0)
    return V[:, keep] * torch.sqrt(w[keep])


def sqrt_sum_if_accurate(w: torch.Tensor) -> float | None:
    """sum sqrt(w) for a PSD matrix's eigenvalues w, or None when their rounding error (~sqrt(d) eps max w)
    moves the sum by more than 1e-10 of it (frechet._sqrt_sum_if_accurate)."""
    delta = len(w) ** 0.5 * EPS64 * float(w.max())
    w = w.clamp(min=0.0)
    roots = torch.sqrt(w)
    total = float(roots.sum())
    error = float((torch.sqrt(w + delta) - roots).sum())
    return total if error <= 1e-10 * total else None


def nuclear_norm(m: torch.Tensor) -> float:
    """||m||_* from the smaller Gram matrix's eigenvalues, or from singular values when that is inaccurate."""
    if m.numel() == 0:
        return 0.0
    gram = m @ m.T if m.shape[0] <= m.shape[1] else m.T @ m
    fast = sqrt_sum_if_accurate(torch.linalg.eigvalsh(gram))
    return fast if fast is not None else float(torch.linalg.svdvals(m).sum())


def trace_sqrt_product(S1: torch.Tensor, S2: torch.Tensor) -> float:
    """tr (S1 S2)^{1/2} of two PSD d x d matrices: eigenvalues of L^T S2 L (S1 = L L^T), or the nuclear norm of
    F1^T F2 (psd factors) when S1 is singular or the fast route is inaccurate."""
    L = cholesky(S1)
    if L is not None:
        fast = sqrt_sum_if_accurate(torch.linalg.eigvalsh(L.T @ (S2 @ L)))
        if fast is not None:
            return fast
    F1 = L if L is not None else eigen_factor(S1)
    L2 = cholesky(S2)
    return float(torch.linalg.svdvals(F1.T @ (L2 if L2 is not None else eigen_factor(S2))).sum())


def frechet_distance(x, y, device=None) -> float:
    """Exact Fréchet distance of rows x (n x d) and y (m x d) in float64 on ``device`` (default: x's device).

    The same value as ``mirlab.metrics.frechet.frechet_distance(x, y)`` (the CPU path) to ~1e-12 relative.
    Memory on the device: a float64 copy of each cloud plus d x d matrices (two covariances and a product).
    """
    if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
        raise TypeError(f"frechet_torch needs torch tensors, got {type(x).__name__} and {type(y).__name__}")
    device = x.device if device is None else torch.device(device)
    x, y = (check_rows(rows.detach().to(device=device, dtype=torch.float64), what)
            for rows, what in ((x, "x rows"), (y, "y rows")))
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"x rows have width {x.shape[1]} but y rows have width {y.shape[1]}")
    d = x.shape[1]
    small = [len(rows) <= d for rows in (x, y)]
    stats = [centred_factor_rows(rows) if few else mean_and_covariance(rows) for rows, few in zip((x, y), small)]
    traces = [float((m * m).sum()) if few else float(torch.trace(m)) for (_, m), few in zip(stats, small)]
    (mu_x, a), (mu_y, b) = stats
    if all(small):
        cross = nuclear_norm(a @ b.T)
    elif any(small):
        rows, cov = (a, b) if small[0] else (b, a)
        L = cholesky(cov)
        cross = nuclear_norm(rows @ (L if L is not None else eigen_factor(cov)))
    else:
        cross = trace_sqrt_product(a, b)
    return _assemble(float(((mu_x - mu_y) ** 2).sum()), traces[0], traces[1], cross)


def on_device(layers, device):
    """The layers of ``layers`` ((layer, image_rows, text_rows) triples, e.g. a HiddenStates) with their rows moved
    to ``device``, one layer at a time: ``compute_mir(on_device(states, "cuda"))`` runs every layer's statistics
    on the GPU while at most one layer is there (compute_mir drops each layer before it asks for the next)."""
    for item in layers:  # no name may hold a layer while the next one is read (nor the host copy after the move)
        moved = (item[0], item[1].to(device), item[2].to(device))
        del item
        yield moved
        del moved
