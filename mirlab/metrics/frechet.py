"""Fréchet distance between Gaussian fits of two token clouds: exact, plus the official script's two modes.

For rows x (n_x x d) and y (n_y x d) with means mu_x, mu_y and covariances S_x, S_y (denominator n - 1):

    FD = ||mu_x - mu_y||^2 + tr S_x + tr S_y - 2 tr (S_x S_y)^{1/2}

The hard part is the cross term tr (S_x S_y)^{1/2}. S_x S_y is not symmetric, but it is similar to the
PSD matrix S_x^{1/2} S_y S_x^{1/2}, so its eigenvalues lambda_i are real and >= 0 and
tr (S_x S_y)^{1/2} = sum_i sqrt(lambda_i). With any factors S_x = F_x F_x^T, S_y = F_y F_y^T this is the
nuclear norm (sum of singular values) ||F_x^T F_y||_*. Factors can be the centred data itself
(F = X_c^T / sqrt(n - 1)), a Cholesky factor, or eigen factors V diag(sqrt(w)).

Methods:
  "exact"             float64, mathematically correct; routes (fastest first):
                      - n <= d (rank-deficient covariance): keep the centred rows (n - 1 of them after
                        removing the all-ones direction) as the factor R;
                        both small -> ||R_x R_y^T||_*, the other large -> ||R_y L_x||_* (L_x Cholesky),
                        each as sum sqrt(eigvalsh) of the smaller Gram matrix;
                      - both n > d: S = X_c^T X_c / (n - 1) by SYRK, L = cholesky(S_x),
                        sum sqrt(eigvalsh(L^T S_y L)) with L^T S_y L from LAPACK dsygst;
                      if eigenvalues are too close to 0 for their square roots to be accurate, or Cholesky
                      fails (singular S), singular values of the factors' product are used instead
                      (accurate to ~eps absolutely; slower).
  "official-accurate" the official --mode accurate: float32 covariances, tr(scipy.linalg.sqrtm(S_x S_y).real).
  "official-fast"     the official --mode fast (its default): float32 torch, A = S_x S_y, Y = A, Z = I, then
                      5 times  Y = (Y + Z^-1 A) / 2 ;  Z = (Z + Y^-1 A) / 2 ;  cross term = tr(Y).
                      DEFECT: (Y, Z) = (A, I) is already a fixed point of this update (Y <- (A + A)/2,
                      Z <- (I + A^-1 A)/2), so in exact arithmetic it returns tr(S_x S_y), not
                      tr((S_x S_y)^{1/2}). In floating point that fixed point is unstable: linearised in
                      the eigenbasis of A, an error coupling eigenvalues l_i >> l_j grows by ~l_i/(4 l_j)
                      per step, so float32 rounding is amplified by up to (cond(A)/4)^4 over the 5 steps:
                      the result is tr(S_x S_y) plus noise that grows with the layer's conditioning.
                      After text-centric scaling the eigenvalues of A are small (l < sqrt(l)), so the FD
                      comes out too high. Kept only to compare with published numbers.
                      On a CPU it reproduces the official arithmetic (float32, 5 steps), not a GPU's
                      rounding, which the defect amplifies (docs/paper-differences.md,
                      "`official-fast` on a CPU is not a GPU"; the defect: docs/mir.md).
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
import scipy.linalg
import torch

from mirlab.metrics.normalize import check_rows

METHODS = ("exact", "official-fast", "official-accurate")
EPS64 = np.finfo(np.float64).eps
OFFICIAL_FAST_STEPS = 5
CHOLESKY_MIN_PIVOT = 1e3
CHUNK_ELEMENTS = 1 << 24  # rows are converted to float64 in chunks of ~16M entries (128 MB)


def _numpy(x) -> np.ndarray:
    """numpy view of x; torch half/bfloat16 become float32 (numpy has no bfloat16)."""
    if not isinstance(x, torch.Tensor):
        return np.asarray(x)
    x = x.detach().cpu()
    return (x if x.dtype in (torch.float32, torch.float64) else x.float()).numpy()


def on_accelerator(x) -> bool:
    """Whether x is a torch tensor on a device other than the CPU (then the exact FD runs there, in torch)."""
    return isinstance(x, torch.Tensor) and x.device.type != "cpu"


def _check_method(method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")


def _check_pair(x, y):
    x, y = check_rows(x, "x rows"), check_rows(y, "y rows")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"x rows have width {x.shape[1]} but y rows have width {y.shape[1]}")
    return x, y


# ----------------------------------------------------------------------------------------------------
# Gaussian statistics

def gaussian_stats(x) -> tuple[np.ndarray, np.ndarray]:
    """(mu, S) in float64: mu = mean of the rows, S = X_c^T X_c / (n - 1) with X_c = x - mu.

    The covariance is accumulated from *centred* float64 chunks (never E[x x^T] - mu mu^T, which cancels
    catastrophically when |mu| is large compared with the spread).
    """
    mu, S = _stats64(_numpy(check_rows(x)))
    S = np.tril(S)
    return mu, S + np.tril(S, -1).T


def _stats64(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mu, S) with only the LOWER triangle of S filled (Fortran order, the layout LAPACK reads).

    S = sum over row chunks of X_c^T X_c (BLAS dsyrk: one triangle, half the flops of a GEMM, accumulated
    in place), / (n - 1). The chunks are centred into one reused float64 buffer.
    """
    n, d = x.shape
    mu = x.mean(axis=0, dtype=np.float64)
    cov = np.zeros((d, d), order="F")
    step = max(1, min(n, CHUNK_ELEMENTS // d))
    buffer = np.empty((step, d))
    for start in range(0, n, step):
        chunk = np.subtract(x[start:start + step], mu, out=buffer[:min(step, n - start)])
        # chunk.T is a Fortran-ordered d x m view: S += chunk^T chunk, lower triangle, no copies
        cov = scipy.linalg.blas.dsyrk(1.0, chunk.T, beta=1.0, c=cov, lower=1, overwrite_c=1)
    cov /= n - 1
    return mu, cov


def _centred_factor_rows(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mu, R) with R ((n - 1) x d, float64) such that S = R^T R: the deflated centred rows.

    The centred rows X_c = x - mu sum to zero (1^T X_c = 0), so X_c / sqrt(n - 1) has a spurious null
    direction. The Householder reflection H = I - 2 v v^T / v^T v with v = 1/sqrt(n) - e_1 maps 1/sqrt(n)
    to e_1, so the first row of H X_c is 1^T X_c / sqrt(n) = 0 and R = (H X_c)[1:] / sqrt(n - 1) keeps
    R^T R = S exactly; products of such factors then have no exact-zero singular value (O(n d) work).
    """
    n = x.shape[0]
    mu = x.mean(axis=0, dtype=np.float64)
    R = np.subtract(x, mu, dtype=np.float64)
    v = np.full(n, 1.0 / np.sqrt(n))
    v[0] -= 1.0
    R = R[1:] - (2.0 / (v @ v) / np.sqrt(n)) * (v @ R)   # rows 1.. of H X_c (v_i = 1/sqrt(n) there)
    R *= 1.0 / np.sqrt(n - 1)
    return mu, R


def _official_stats(x) -> tuple[torch.Tensor, torch.Tensor]:
    """(mu, S) as the official script has them: float32 torch, centred, denominator n - 1."""
    x = torch.as_tensor(_numpy(x)).float()
    mu = x.mean(dim=0)
    xc = x - mu
    return mu, xc.T @ xc / (x.shape[0] - 1)


# ----------------------------------------------------------------------------------------------------
# The cross term tr (S_x S_y)^{1/2}

# Which library runs what (measured at d = 4096, 1 thread, on the 2-core AMD dev machine): the symmetric
# eigenvalues go through torch (MKL dsyevd, 2x faster than scipy's OpenBLAS here); covariances, Cholesky and
# the congruence L^T S L go through scipy's BLAS/LAPACK (OpenBLAS dsyrk/dpotrf/dsygst; MKL's GEMM was 2x
# slower on this CPU), reading one triangle of Fortran-ordered arrays in place.
# Internally a covariance is a Fortran-ordered float64 array whose LOWER triangle holds S (the upper
# triangle is never read); a symmetric C-ordered S qualifies through the view S.T.

def _nuclear_norm(m: np.ndarray) -> float:
    """Sum of singular values; each is accurate to ~eps * ||m||, also the (near-)zero ones."""
    if m.size == 0:
        return 0.0
    return float(torch.linalg.svdvals(torch.from_numpy(np.ascontiguousarray(m))).sum())


def _nuclear_norm_gram(m: np.ndarray) -> float:
    """||m||_* = sum_i sqrt(eigvalsh(G)) with the smaller Gram matrix G = m m^T or m^T m.

    ~3-5x faster than singular values at the sizes used here (one SYRK and a symmetric eigenproblem), but
    squaring puts an absolute error ~eps ||m||^2 on the eigenvalues: when that makes the square roots
    inaccurate (near-zero singular values), the singular values are computed instead.
    """
    if m.size == 0:
        return 0.0
    gram = m @ m.T if m.shape[0] <= m.shape[1] else m.T @ m   # numpy runs these as SYRK
    w = _eigvalsh(gram)
    fast = _sqrt_sum_if_accurate(w, float(w.max()))
    return fast if fast is not None else _nuclear_norm(m)


def _eigvalsh(M: np.ndarray) -> np.ndarray:
    """Eigenvalues of the symmetric matrix whose lower triangle is stored in M."""
    return torch.linalg.eigvalsh(torch.from_numpy(M), UPLO="L").numpy()


def _cholesky(S: np.ndarray) -> np.ndarray | None:
    """Lower Cholesky factor of S (lower triangle read; returned with zeros above), or None when S is
    singular or too close to it.

    Cholesky of a singular PSD matrix may "succeed" with a pivot of rounding size (L_ii^2 ~ d eps ||S||),
    which would add a spurious direction of size sqrt(eps). Pivots below CHOLESKY_MIN_PIVOT * d * eps *
    max diag(S) are therefore refused (every pivot is >= lambda_min(S), so condition numbers up to ~1e9
    keep the fast route).
    """
    L, info = scipy.linalg.lapack.dpotrf(S, lower=1, clean=1)
    if info != 0:
        return None
    pivots = np.diagonal(L) ** 2
    if pivots.min() <= CHOLESKY_MIN_PIVOT * len(S) * EPS64 * np.diagonal(S).max():
        return None
    return L


def eigen_factor(S: np.ndarray) -> np.ndarray:
    """F = V_r diag(sqrt(w_r)) (d x r) with F F^T = S, from the eigenvalues w > d * eps * max(w).

    Reads the lower triangle of S. The dropped eigenvalues are rounding noise of a rank-r matrix (possibly
    slightly negative): treating them as exactly 0 is what keeps the cross term accurate when S is singular.
    """
    w, V = (t.numpy() for t in torch.linalg.eigh(torch.from_numpy(S), UPLO="L"))
    keep = w > len(S) * EPS64 * max(w.max(), 0.0)
    return V[:, keep] * np.sqrt(w[keep])


def psd_factor(S: np.ndarray) -> np.ndarray:
    """A factor F with F F^T = S: Cholesky (d x d) when S is safely positive definite, else eigen factors."""
    L = _cholesky(S)
    return L if L is not None else eigen_factor(S)


def _rows_times_factor(R: np.ndarray, S: np.ndarray) -> np.ndarray:
    """R F for rows R (m x d) and a factor F F^T = S: a triangular product (m d^2 flops) for Cholesky."""
    L = _cholesky(S)
    if L is None:
        return R @ eigen_factor(S)
    # R.T is R in Fortran order: dtrmm forms L^T R^T = (R L)^T without copying R
    return scipy.linalg.blas.dtrmm(1.0, L, R.T, lower=1, trans_a=1).T


def _sqrt_sum_if_accurate(w: np.ndarray, scale: float) -> float | None:
    """sum sqrt(w) for eigenvalues w of a PSD matrix, or None if rounding makes it inaccurate.

    Computed eigenvalues carry an absolute error ~ delta = sqrt(d) * eps * scale, which becomes
    sqrt(w + delta) - sqrt(w) after the square root: huge relative to w near 0. When the summed estimate
    exceeds 1e-10 of the result, the caller switches to singular values (error ~ eps, no square root).
    """
    delta = np.sqrt(len(w)) * EPS64 * scale
    w = np.clip(w, 0.0, None)
    roots = np.sqrt(w)
    total = float(roots.sum())
    error = float((np.sqrt(w + delta) - roots).sum())
    return total if error <= 1e-10 * total else None


def _cholesky_route(L: np.ndarray, S2: np.ndarray) -> float | None:
    """sum sqrt(eigvalsh(L^T S2 L)) with S1 = L L^T (None if inaccurate); the fastest full-rank route.

    L^T S2 L comes from LAPACK dsygst (itype 3), which uses the symmetry of S2: d^3 flops instead of the
    2 d^3 of two triangular products. Only its lower triangle is formed, which is all eigvalsh reads.
    """
    M, info = scipy.linalg.lapack.dsygst(S2, L, itype=3, lower=1)
    if info != 0:
        raise RuntimeError(f"LAPACK dsygst failed (info={info})")
    w = _eigvalsh(M)
    return _sqrt_sum_if_accurate(w, float(w.max()))


def trace_sqrt_product(S1, S2) -> float:
    """tr (S1 S2)^{1/2} = sum_i sqrt(lambda_i(S1^{1/2} S2 S1^{1/2})) for symmetric PSD S1, S2, in float64.

    Route: L = cholesky(S1), eigenvalues of L^T S2 L (same as those of S1 S2). When S1 is (near-)singular
    or eigenvalues of L^T S2 L too close to 0 make the square root inaccurate (e.g. S2 singular): the
    nuclear norm ||F1^T F2||_* of psd factors (Cholesky or eigen factors), whose singular values carry
    an absolute error ~eps instead of ~sqrt(eps).
    Note: for rank-deficient covariances the answer is only as good as their null space: a perturbation
    of size eps in S changes tr (S1 S2)^{1/2} by up to ~sqrt(eps). From data, frechet_distance avoids
    this by never forming the covariance of a cloud with n <= d rows.
    """
    S1, S2 = (_check_covariance(S, name) for S, name in ((S1, "S1"), (S2, "S2")))
    if S1.shape != S2.shape:
        raise ValueError(f"S1 is {S1.shape[0]}x{S1.shape[0]} but S2 is {S2.shape[0]}x{S2.shape[0]}")
    return _trace_sqrt_lower(S1.T, S2.T)


def trace_sqrt_of_factors(R1: np.ndarray, R2: np.ndarray) -> float:
    """tr (S1 S2)^{1/2} for S = R^T R, given float64 factor rows R (m x d; meant for m > d).

    Each covariance is formed by SYRK (one triangle, half the flops of R^T R as a GEMM), already in the
    layout the Cholesky/eigenvalue route reads, so nothing is re-checked or symmetrized.
    """
    S1, S2 = (scipy.linalg.blas.dsyrk(1.0, np.ascontiguousarray(R, dtype=np.float64).T, lower=1) for R in (R1, R2))
    return _trace_sqrt_lower(S1, S2)


def _trace_sqrt_lower(S1: np.ndarray, S2: np.ndarray) -> float:
    """trace_sqrt_product without input checks, for internal covariances (lower triangles, Fortran order)."""
    L = _cholesky(S1)
    if L is not None:
        fast = _cholesky_route(L, S2)
        if fast is not None:
            return fast
    F1 = L if L is not None else eigen_factor(S1)
    return _nuclear_norm(F1.T @ psd_factor(S2))


def _check_covariance(S, name: str) -> np.ndarray:
    """S as a symmetric float64 array ((S + S^T) / 2), after checking shape, finiteness and symmetry."""
    S = np.asarray(_numpy(S), dtype=np.float64)
    if S.ndim != 2 or S.shape[0] != S.shape[1] or S.shape[0] == 0:
        raise ValueError(f"{name}: expected a square d x d covariance, got shape {S.shape}")
    if not np.isfinite(S).all():
        raise ValueError(f"{name}: covariance contains NaN/inf")
    D = S - S.T                                     # antisymmetric part, times 2
    asym = max(float(D.max()), -float(D.min()))
    if asym > 1e-6 * max(np.abs(S).max(), np.finfo(np.float64).tiny):
        raise ValueError(f"{name}: covariance is not symmetric (max |S - S^T| = {asym:.3g})")
    D *= -0.5
    D += S                                          # S - (S - S^T) / 2 = (S + S^T) / 2
    return D


class _Cloud(NamedTuple):
    """A token cloud reduced to what the exact FD needs: mean, tr S, and either S (lower triangle, Fortran
    order, see _stats64) or rows R (S = R^T R)."""
    mu: np.ndarray
    trace: float
    cov: np.ndarray | None
    rows: np.ndarray | None


def _cloud(x: np.ndarray) -> _Cloud:
    n, d = x.shape
    if n <= d:  # rank-deficient: the centred rows are a cheap, exact factor
        mu, R = _centred_factor_rows(x)
        return _Cloud(mu, float(np.einsum("ij,ij->", R, R)), None, R)
    mu, S = _stats64(x)
    return _Cloud(mu, float(np.trace(S)), S, None)


def _cross_term(a: _Cloud, b: _Cloud) -> float:
    if a.rows is not None and b.rows is not None:   # ||R_a R_b^T||_*  (n_a - 1 x n_b - 1)
        return _nuclear_norm_gram(a.rows @ b.rows.T)
    if a.rows is not None:
        a, b = b, a
    if b.rows is not None:                            # ||R_b F_a||_*  (n_b - 1 x d)
        return _nuclear_norm_gram(_rows_times_factor(b.rows, a.cov))
    return _trace_sqrt_lower(a.cov, b.cov)


def _assemble(mean_term: float, tr1: float, tr2: float, cross: float) -> float:
    """||dmu||^2 + tr S1 + tr S2 - 2 cross; a negative value within rounding of the traces becomes 0."""
    fd = mean_term + tr1 + tr2 - 2.0 * cross
    if fd < 0 and -fd <= 1e-10 * (tr1 + tr2):
        return 0.0
    return fd


# ----------------------------------------------------------------------------------------------------
# The official modes (parity with published numbers)

def official_fast_trace(S1, S2, steps: int = OFFICIAL_FAST_STEPS, dtype: torch.dtype = torch.float32) -> float:
    """The official fast cross term (float32 torch like the official script; `dtype` only for benchmarks).

    Torch inputs stay on their device (the official script ran this on its GPU); numpy inputs run on the CPU.
    See the module docstring for why it is wrong.
    """
    S1, S2 = (S.detach().to(dtype) if isinstance(S, torch.Tensor) else torch.as_tensor(_numpy(S)).to(dtype)
              for S in (S1, S2))
    A = S1 @ S2
    Y, Z = A.clone(), torch.eye(A.shape[0], dtype=A.dtype, device=A.device)
    try:
        for _ in range(steps):
            Y = (Y + torch.linalg.inv(Z) @ A) / 2
            Z = (Z + torch.linalg.inv(Y) @ A) / 2
    except RuntimeError as err:  # torch.linalg.LinAlgError: exactly singular in float32
        raise ValueError(f"official-fast: S_x S_y is singular in float32 ({err})") from None
    return float(torch.trace(Y))


def official_accurate_trace(S1, S2) -> float:
    """The official accurate cross term: tr(scipy.linalg.sqrtm(S1 S2)) keeping only the real part."""
    S1, S2 = (np.asarray(_numpy(S), dtype=np.float32) for S in (S1, S2))
    return float(np.trace(scipy.linalg.sqrtm(S1 @ S2)).real)


# ----------------------------------------------------------------------------------------------------
# Public entry points

def frechet_from_stats(mu1, S1, mu2, S2, method: str = "exact") -> float:
    """FD from Gaussian statistics: ||mu1 - mu2||^2 + tr S1 + tr S2 - 2 tr (S1 S2)^{1/2}.

    "exact" works in float64 (see trace_sqrt_product); the official methods cast to float32 first.
    """
    _check_method(method)
    mu1, mu2 = (np.asarray(_numpy(m), dtype=np.float64).ravel() for m in (mu1, mu2))
    S1, S2 = _check_covariance(S1, "S1"), _check_covariance(S2, "S2")
    if not (len(mu1) == len(mu2) == S1.shape[0] == S2.shape[0]):
        raise ValueError(f"dimension mismatch: mu1 {len(mu1)}, mu2 {len(mu2)}, S1 {S1.shape}, S2 {S2.shape}")
    if not (np.isfinite(mu1).all() and np.isfinite(mu2).all()):
        raise ValueError("mean vector contains NaN/inf")
    if method == "exact":
        cross = _trace_sqrt_lower(S1.T, S2.T)   # S1, S2 are checked and symmetric: S.T is S in Fortran order
        return _assemble(float(np.sum((mu1 - mu2) ** 2)), float(np.trace(S1)), float(np.trace(S2)), cross)
    return _official_fd(torch.from_numpy(mu1).float(), torch.from_numpy(S1).float(),
                        torch.from_numpy(mu2).float(), torch.from_numpy(S2).float(), method)


def _official_fd(mu1, S1, mu2, S2, method: str) -> float:
    """FD assembled in float32 as the official script does."""
    if method == "official-fast":
        cross = official_fast_trace(S1, S2)
    else:
        cross = official_accurate_trace(S1, S2)
    diff = mu1 - mu2
    fd = float(diff @ diff) + float(torch.trace(S1)) + float(torch.trace(S2)) - 2.0 * cross
    if not np.isfinite(fd):
        raise ValueError(f"{method}: the Fréchet distance is not finite (ill-conditioned S_x S_y in float32)")
    return fd


def frechet_distance(x, y, method: str = "exact") -> float:
    """Fréchet distance between Gaussian fits of rows x [n, d] and y [m, d] (torch or numpy).

    method="exact" (default): float64 and correct, never complex/NaN, >= 0 up to rounding. Routes: a cloud
    with n <= d rows is kept as its centred rows (an exact factor of its covariance, cheap), so two small
    clouds need only the eigenvalues of an (n - 1) x (m - 1) Gram matrix; larger clouds go through their
    covariance, Cholesky and symmetric eigenvalues (see trace_sqrt_product and the module docstring).
    Rows that are torch tensors on a GPU (any device but the CPU): the same exact FD in torch float64 on that
    device (mirlab.metrics.frechet_torch), agreeing with the CPU route to ~1e-12 relative.
    method="official-fast" / "official-accurate": the official script's arithmetic in float32, for
    comparison with published tables; "official-fast" is defective (see the module docstring): it
    computes tr(S_x S_y) instead of tr((S_x S_y)^{1/2}), so its FD is too high, more so in deep layers.
    """
    _check_method(method)
    if method == "exact" and (on_accelerator(x) or on_accelerator(y)):
        from mirlab.metrics import frechet_torch  # it imports this module
        return frechet_torch.frechet_distance(x, y)
    x, y = _check_pair(x, y)
    if method != "exact":
        mu1, S1 = _official_stats(x)
        mu2, S2 = _official_stats(y)
        return _official_fd(mu1, S1, mu2, S2, method)
    a, b = _cloud(_numpy(x)), _cloud(_numpy(y))
    return _assemble(float(np.sum((a.mu - b.mu) ** 2)), a.trace, b.trace, _cross_term(a, b))
