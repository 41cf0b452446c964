"""Fréchet distance: exact vs independent references, closed forms, invariances, official parity, bad input."""
import subprocess
import sys
from pathlib import Path

import mpmath
import numpy as np
import pytest
import scipy.linalg
import torch

from mirlab import frechet_distance, frechet_from_stats, gaussian_stats, trace_sqrt_product
from mirlab.metrics.frechet import _centred_factor_rows, _nuclear_norm_gram

ROOT = Path(__file__).resolve().parent.parent


def cloud(n, d, seed, decades=2.5, offset=0.0):
    """Anisotropic rows: standard deviations spread over `decades` decades, mixed by a well-conditioned
    non-orthogonal matrix I + 0.3 G / sqrt(d) (no QR: cheap at d = 576), shifted mean."""
    rng = np.random.default_rng(seed)
    mixing = np.eye(d) + 0.3 * rng.standard_normal((d, d)) / np.sqrt(d)
    stds = np.logspace(-decades, 0, d) * rng.uniform(0.5, 2.0, d)
    return (rng.standard_normal((n, d)) * stds) @ mixing + offset + rng.standard_normal(d)


def reference_fd(x, y):
    """FD with the cross term as sum sqrt(eig(S_a^{1/2} S_b S_a^{1/2})), scipy eigh, float64, np.cov.

    a is the cloud of lower rank r = min(n - 1, d). S_a^{1/2} = V_r diag(sqrt w_r) V_r^T, the other d - r
    eigenvalues being exactly 0; so the non-zero eigenvalues of S_a^{1/2} S_b S_a^{1/2} are those of its
    r x r block diag(sqrt w_r) V_r^T S_b V_r diag(sqrt w_r) (this avoids square roots of rounding noise).
    """
    (na, a), (nb, b) = sorted([(len(x), x), (len(y), y)], key=lambda p: min(p[0] - 1, x.shape[1]))
    Sa, Sb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    r = min(na - 1, a.shape[1])
    w, V = scipy.linalg.eigh(Sa)
    half = V[:, -r:] * np.sqrt(w[-r:])
    lam = scipy.linalg.eigh(half.T @ Sb @ half, eigvals_only=True)
    assert lam.min() > -1e-12 * lam.max()
    cross = np.sqrt(np.clip(lam, 0, None)).sum()
    mean_term = np.sum((x.mean(0) - y.mean(0)) ** 2)
    return mean_term + np.trace(Sa) + np.trace(Sb) - 2 * cross


def sizes(d):
    return {"both n<d": (d // 2 + 1, d - 1), "both n>d": (2 * d + 1, 3 * d),
            "x small": (d // 2, 3 * d), "y small": (3 * d, d // 2 + 2)}


@pytest.mark.parametrize("d", [8, 64, 576])
@pytest.mark.parametrize("case", ["both n<d", "both n>d", "x small", "y small"])
def test_exact_matches_float64_eigen_reference(d, case):
    nx, ny = sizes(d)[case]
    x, y = cloud(nx, d, seed=d), 0.6 * cloud(ny, d, seed=d + 1, decades=1.5, offset=0.2)
    fd, ref = frechet_distance(x, y), reference_fd(x, y)
    assert abs(fd - ref) <= 1e-9 * ref


def shaped_rows(n, mu, variances, rotation, seed):
    """Rows whose sample mean is exactly mu and sample covariance exactly Q diag(variances) Q^T."""
    support = np.flatnonzero(variances)
    assert len(support) <= n - 1
    z = np.random.default_rng(seed).standard_normal((n, n))
    z[:, 0] = 1.0                          # QR: first column of u is the mean direction, the others centred
    u, _ = np.linalg.qr(z)
    coords = np.zeros((n, len(mu)))
    coords[:, support] = u[:, 1:len(support) + 1]
    return np.sqrt(n - 1) * (coords * np.sqrt(variances)) @ rotation.T + mu


@pytest.mark.parametrize("n_x, n_y, support_x, support_y", [
    (80, 80, slice(0, 40), slice(0, 40)),           # n > d, full rank
    (20, 20, slice(0, 19), slice(10, 29)),          # n <= d, partially overlapping supports
    (120, 20, slice(0, 40), slice(10, 15)),         # x full rank, y small of rank 5: Gram guard -> svdvals
    (100, 20, slice(0, 30), slice(5, 24)),          # x has n > d but a singular covariance (eigen factor)
    (100, 120, slice(0, 30), slice(10, 40)),        # both n > d, both singular
])
def test_closed_form_commuting_covariances(n_x, n_y, support_x, support_y):
    d = 40
    rng = np.random.default_rng(5)
    rotation, _ = np.linalg.qr(rng.standard_normal((d, d)))
    a, b = np.zeros(d), np.zeros(d)
    a[support_x] = rng.uniform(0.1, 4.0, support_x.stop - support_x.start)
    b[support_y] = rng.uniform(0.1, 4.0, support_y.stop - support_y.start)
    mu_x, mu_y = rng.standard_normal(d), rng.standard_normal(d)
    x = shaped_rows(n_x, mu_x, a, rotation, seed=1)
    y = shaped_rows(n_y, mu_y, b, rotation, seed=2)
    expected = np.sum((mu_x - mu_y) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet_distance(x, y) == pytest.approx(expected, rel=1e-10)
    assert frechet_distance(y, x) == pytest.approx(expected, rel=1e-10)
    Sx, Sy = rotation @ np.diag(a) @ rotation.T, rotation @ np.diag(b) @ rotation.T
    assert frechet_from_stats(mu_x, Sx, mu_y, Sy) == pytest.approx(expected, rel=1e-9)


def test_deflated_centred_rows_factor_the_covariance():
    x = cloud(30, 50, seed=4, offset=3.0)
    mu, R = _centred_factor_rows(x)
    assert R.shape == (29, 50)                       # the all-ones direction is removed
    np.testing.assert_allclose(mu, x.mean(0), rtol=1e-14)
    np.testing.assert_allclose(R.T @ R, np.cov(x, rowvar=False), rtol=1e-12, atol=1e-14)
    assert np.linalg.svd(R, compute_uv=False).min() > 1e-6   # no exact-zero singular value left


@pytest.mark.parametrize("rank", [None, 3])
def test_gram_nuclear_norm_matches_singular_values(rank):
    rng = np.random.default_rng(6)
    m = rng.standard_normal((30, 70)) * np.logspace(0, -3, 70)
    if rank is not None:                             # near-zero singular values: the guard falls back
        m = rng.standard_normal((30, rank)) @ rng.standard_normal((rank, 70))
    expected = np.linalg.svd(m, compute_uv=False).sum()
    assert _nuclear_norm_gram(m) == pytest.approx(expected, rel=1e-13)
    assert _nuclear_norm_gram(m.T) == pytest.approx(expected, rel=1e-13)


def mp_trace_sqrt(S1, S2, digits=40):
    """tr (S1 S2)^{1/2} at `digits` decimal digits (mpmath): sqrt-eigenvalues of S1^{1/2} S2 S1^{1/2}."""
    with mpmath.workdps(digits):
        A, B = mpmath.matrix(S1.tolist()), mpmath.matrix(S2.tolist())
        w, V = mpmath.eigsy(A)
        half = V * mpmath.diag([mpmath.sqrt(max(v, 0)) for v in w]) * V.T
        lam, _ = mpmath.eigsy(half * B * half)
        return float(sum(mpmath.sqrt(max(v, 0)) for v in lam))


def spd(d, log10_cond, seed):
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    S = (q * np.logspace(-log10_cond, 0, d)) @ q.T
    return (S + S.T) / 2


@pytest.mark.parametrize("log10_cond", [2, 9])
def test_trace_sqrt_ill_conditioned_vs_40_digit_reference(log10_cond):
    S1, S2 = spd(10, log10_cond, 1), spd(10, log10_cond, 2)
    assert trace_sqrt_product(S1, S2) == pytest.approx(mp_trace_sqrt(S1, S2), rel=1e-9)


def test_trace_sqrt_singular_covariance_given_as_matrix():
    # integer matrices: S2 = B B^T is exactly rank 4 in float64, S1 exactly positive definite
    rng = np.random.default_rng(3)
    A, B = rng.integers(-5, 6, (12, 12)).astype(float), rng.integers(-5, 6, (12, 4)).astype(float)
    S1, S2 = A @ A.T + 12 * np.eye(12), B @ B.T
    # independent identity: the non-zero eigenvalues of S1 B B^T are those of B^T S1 B (4 x 4)
    with mpmath.workdps(40):
        lam, _ = mpmath.eigsy(mpmath.matrix((B.T @ S1 @ B).tolist()))
        expected = float(sum(mpmath.sqrt(v) for v in lam))
    assert trace_sqrt_product(S1, S2) == pytest.approx(expected, rel=1e-10)
    assert trace_sqrt_product(S2, S1) == pytest.approx(expected, rel=1e-10)


def test_trace_sqrt_numerically_singular_covariance():
    # S2 = B B^T with B 12 x 11 in floating point: rank 11 up to rounding. Cholesky of such a matrix often
    # "succeeds" with a rounding-size pivot (a spurious sqrt(eps) direction, ~1e-9 relative error);
    # exact must treat it as singular.
    for seed in range(10):
        rng = np.random.default_rng(seed)
        A, B = rng.standard_normal((12, 12)), rng.standard_normal((12, 11))
        S1, S2 = A @ A.T + np.eye(12), B @ B.T
        with mpmath.workdps(40):
            lam, _ = mpmath.eigsy(mpmath.matrix((B.T @ S1 @ B).tolist()))
            expected = float(sum(mpmath.sqrt(v) for v in lam))
        assert trace_sqrt_product(S1, S2) == pytest.approx(expected, rel=1e-12)


def test_identity_symmetry_scale_permutation_translation():
    x, y = cloud(300, 24, seed=7), cloud(150, 24, seed=8, offset=1.0)
    fd = frechet_distance(x, y)
    scale = np.trace(np.cov(x, rowvar=False))
    assert abs(frechet_distance(x, x)) <= 1e-10 * scale
    assert abs(frechet_distance(x[:20], x[:20])) <= 1e-10 * scale      # n <= d route
    assert frechet_distance(y, x) == pytest.approx(fd, rel=1e-12)
    assert frechet_distance(3.7 * x, 3.7 * y) == pytest.approx(3.7 ** 2 * fd, rel=1e-11)
    perm = np.random.default_rng(0).permutation(len(x))
    assert frechet_distance(x[perm], y) == pytest.approx(fd, rel=1e-11)
    assert frechet_distance(x + 50.0, y + 50.0) == pytest.approx(fd, rel=1e-9)
    assert frechet_distance(torch.from_numpy(x), torch.from_numpy(y)) == pytest.approx(fd, rel=1e-14)
    assert frechet_distance(x, y) >= 0


def test_gaussian_stats_centres_before_multiplying():
    z = cloud(500, 6, seed=9)
    mu, S = gaussian_stats(z + 1e6)              # E[xx^T] - mu mu^T would lose ~1e-4 here
    np.testing.assert_allclose(S, np.cov(z, rowvar=False), rtol=1e-7, atol=1e-9 * np.abs(S).max())
    np.testing.assert_allclose(mu, z.mean(0) + 1e6, rtol=1e-14)


def test_frechet_from_stats_agrees_with_rows():
    x, y = cloud(400, 16, seed=10), cloud(300, 16, seed=11)
    fd = frechet_from_stats(*gaussian_stats(x), *gaussian_stats(y))
    assert fd == pytest.approx(frechet_distance(x, y), rel=1e-12)


def test_official_accurate_equals_scipy_sqrtm_on_float32_covariances():
    x, y = cloud(400, 32, seed=12, decades=1), cloud(350, 32, seed=13, decades=1)
    x32, y32 = x.astype(np.float32), y.astype(np.float32)
    xc, yc = x32 - x32.mean(0), y32 - y32.mean(0)
    Sx, Sy = xc.T @ xc / np.float32(len(x) - 1), yc.T @ yc / np.float32(len(y) - 1)
    cross = np.trace(scipy.linalg.sqrtm(Sx @ Sy)).real
    expected = np.sum((x32.mean(0) - y32.mean(0)) ** 2) + np.trace(Sx) + np.trace(Sy) - 2 * cross
    assert frechet_distance(x, y, method="official-accurate") == pytest.approx(expected, rel=1e-4)
    assert frechet_distance(x, y, method="official-accurate") == pytest.approx(frechet_distance(x, y), rel=1e-3)


def test_official_fast_is_its_fixed_point_tr_SxSy():
    # well-conditioned: the 5-step iteration started at (A, I) stays at A, so the cross term is tr(S_x S_y)
    x, y = cloud(600, 20, seed=14, decades=0.5), 0.8 * cloud(500, 20, seed=15, decades=0.5, offset=0.3)
    Sx, Sy = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    fixed_point = np.sum((x.mean(0) - y.mean(0)) ** 2) + np.trace(Sx) + np.trace(Sy) - 2 * np.trace(Sx @ Sy)
    fast = frechet_distance(x, y, method="official-fast")
    assert fast == pytest.approx(fixed_point, rel=1e-4)
    exact = frechet_distance(x, y)
    assert abs(fast - exact) > 0.02 * exact          # the defect is real, not rounding
    S = np.diag(np.full(5, 4.0))
    assert frechet_from_stats(np.zeros(5), S, np.zeros(5), S, method="official-fast") == pytest.approx(
        2 * 20 - 2 * 5 * 16, rel=1e-6)              # tr(S S) = 80, not tr((S S)^{1/2}) = 20
    assert frechet_from_stats(np.zeros(5), S, np.zeros(5), S) == pytest.approx(0, abs=1e-12)


@pytest.mark.parametrize("x, y, message", [
    (np.ones((5, 3)) * np.nan, np.ones((5, 3)), "x rows: 5 rows contain NaN/inf"),
    (np.ones((5, 3)), np.ones((5, 4)), "width 3 .* width 4"),
    (np.ones((1, 3)), np.ones((5, 3)), "at least 2 rows"),
    (np.ones((5, 3)), np.zeros((0, 3)), "y rows: no rows"),
    (np.ones((5, 3, 1)), np.ones((5, 3)), "2-D"),
])
def test_bad_inputs_raise(x, y, message):
    with pytest.raises(ValueError, match=message):
        frechet_distance(x, y)


def test_bad_methods_and_stats_raise():
    x = cloud(10, 3, seed=0)
    with pytest.raises(ValueError, match="method"):
        frechet_distance(x, x, method="fast")
    with pytest.raises(ValueError, match="symmetric"):
        trace_sqrt_product(np.triu(np.ones((3, 3))), np.eye(3))
    with pytest.raises(ValueError, match="NaN"):
        frechet_from_stats(np.zeros(3), np.eye(3) * np.nan, np.zeros(3), np.eye(3))
    with pytest.raises(ValueError, match="mismatch"):
        frechet_from_stats(np.zeros(3), np.eye(3), np.zeros(2), np.eye(3))


@pytest.mark.slow  # runs a benchmark script
def test_benchmark_quick_runs(tmp_path):
    out = tmp_path / "bench.csv"
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_frechet.py"), "--quick",
                           "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    import pandas as pd
    table = pd.read_csv(out)
    assert {"d", "n", "method", "seconds", "rel_error"} <= set(table.columns)
    assert (table.loc[table.method == "exact", "rel_error"] <= 1e-9).all()


def test_trace_sqrt_of_factors_equals_the_covariance_route():
    from mirlab.metrics.frechet import trace_sqrt_of_factors, trace_sqrt_product

    rng = np.random.default_rng(7)
    R1, R2 = rng.normal(size=(40, 6)) * np.arange(1, 7), rng.normal(size=(25, 6))
    assert trace_sqrt_of_factors(R1, R2) == pytest.approx(trace_sqrt_product(R1.T @ R1, R2.T @ R2), rel=1e-12)
