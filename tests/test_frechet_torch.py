"""The torch float64 path of the exact Fréchet distance (mirlab.metrics.frechet_torch), run here on CPU tensors:
every route against the CPU numpy/LAPACK path (mirlab.metrics.frechet) to 1e-9 relative, and the dispatch that
sends rows on a GPU there. (GPU parity itself: benchmarks/bench_mir.py.)"""
import weakref

import numpy as np
import pytest
import torch

import mirlab.metrics.frechet as frechet
from mirlab import compute_mir
from mirlab.metrics import frechet_torch

RTOL = 1e-9


def cloud(n, d, seed, decades=2.0, offset=0.1, rank=None):
    """n rows in d dims with spreads over `decades` decades in a random basis (optionally only `rank` of them)."""
    rng = np.random.default_rng(seed)
    basis, _ = np.linalg.qr(rng.standard_normal((d, d)))
    stds = np.logspace(-decades, 0, d) * rng.uniform(0.5, 2.0, d)
    if rank is not None:
        stds[:d - rank] = 0.0
    return torch.from_numpy((rng.standard_normal((n, d)) * stds) @ basis.T + offset * rng.standard_normal(d))


CASES = {  # (n_x, n_y, d): which route each cloud takes
    "both rows (n <= d)": (20, 14, 32),
    "rows x covariance": (20, 50, 32),
    "covariance x rows": (50, 20, 32),
    "both covariances": (80, 60, 32),
    "n = d + 1": (33, 33, 32),
}


@pytest.mark.parametrize("case", list(CASES))
def test_every_route_matches_the_cpu_path(case):
    n_x, n_y, d = CASES[case]
    x, y = cloud(n_x, d, 0), 0.7 * cloud(n_y, d, 1, decades=1.5)
    expected = frechet.frechet_distance(x, y)
    assert frechet_torch.frechet_distance(x, y) == pytest.approx(expected, rel=RTOL)
    assert frechet_torch.frechet_distance(x.float(), y.float()) == pytest.approx(frechet.frechet_distance(
        x.float(), y.float()), rel=RTOL)  # float32 rows are upcast before any arithmetic, on both paths


def test_singular_covariances_take_the_accurate_fallback_on_both_paths():
    """Clouds with n > d that span only 10 of 32 dimensions: Cholesky is refused, eigen factors are used."""
    x, y = cloud(200, 32, 2, rank=10), cloud(150, 32, 3, rank=10)
    S = frechet_torch.mean_and_covariance(x)[1]
    assert frechet_torch.cholesky(S) is None
    assert frechet_torch.frechet_distance(x, y) == pytest.approx(frechet.frechet_distance(x, y), rel=RTOL)
    assert frechet_torch.frechet_distance(x, x) == pytest.approx(0.0, abs=1e-12 * float(torch.trace(S)))


def test_identical_and_far_shifted_clouds():
    x = cloud(90, 16, 4)
    assert frechet_torch.frechet_distance(x, x.clone()) == pytest.approx(0.0, abs=1e-12)
    far = x + 1e4  # |mu| >> spread: centred accumulation, no cancellation
    y = cloud(70, 16, 5) + 1e4
    assert frechet_torch.frechet_distance(far, y) == pytest.approx(frechet.frechet_distance(far, y), rel=RTOL)


def test_statistics_equal_gaussian_stats_also_in_chunks(monkeypatch):
    x = cloud(301, 24, 6)
    mu, S = frechet.gaussian_stats(x)
    monkeypatch.setattr(frechet_torch, "CHUNK_ELEMENTS", 24 * 7)  # 7 rows per chunk, the last one shorter
    mu_t, S_t = frechet_torch.mean_and_covariance(x)
    np.testing.assert_allclose(mu_t.numpy(), mu, rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(S_t.numpy(), S, rtol=1e-12, atol=1e-15)
    _, R = frechet_torch.centred_factor_rows(x[:20])
    np.testing.assert_allclose((R.T @ R).numpy(), frechet.gaussian_stats(x[:20])[1], rtol=1e-12, atol=1e-15)


def test_trace_sqrt_product_matches_the_cpu_path_for_full_rank_and_singular_matrices():
    a, b = cloud(100, 20, 7), cloud(80, 20, 8)
    Sa, Sb = (frechet_torch.mean_and_covariance(c)[1] for c in (a, b))
    singular = frechet_torch.mean_and_covariance(cloud(100, 20, 9, rank=6))[1]
    for S1, S2 in ((Sa, Sb), (singular, Sb), (Sa, singular)):
        assert frechet_torch.trace_sqrt_product(S1, S2) == pytest.approx(frechet.trace_sqrt_product(S1, S2),
                                                                        rel=RTOL)


def test_inputs_are_checked_and_named():
    x = cloud(10, 8, 0)
    with pytest.raises(TypeError, match="torch tensors"):
        frechet_torch.frechet_distance(x.numpy(), x)
    with pytest.raises(ValueError, match="width 8 .* width 6"):
        frechet_torch.frechet_distance(x, x[:, :6])
    bad = x.clone()
    bad[3, 2] = float("nan")
    with pytest.raises(ValueError, match="y rows: 1 row contains NaN"):
        frechet_torch.frechet_distance(x, bad)


def test_rows_on_a_gpu_take_the_torch_path_in_frechet_distance_and_compute_mir(monkeypatch):
    """On this CPU machine, a tensor counts as 'on a GPU' by patching the one test of it; everything else is the
    real dispatch: compute_mir -> layer_fd -> prepare_layer (on the rows' device) -> frechet_distance."""
    layers = [(k, cloud(40, 16, 10 + k) * (1 + k), cloud(30, 16, 20 + k)) for k in (1, 2, 3)]
    on_cpu = compute_mir(layers)
    calls = []
    original = frechet_torch.frechet_distance
    monkeypatch.setattr(frechet_torch, "frechet_distance", lambda x, y: calls.append(x.device) or original(x, y))
    monkeypatch.setattr(frechet, "on_accelerator", lambda x: isinstance(x, torch.Tensor))
    on_device = compute_mir(frechet_torch.on_device(layers, "cpu"))
    assert len(calls) == 3
    np.testing.assert_allclose(on_device.per_layer["fd"], on_cpu.per_layer["fd"], rtol=RTOL)
    assert on_device.mir == pytest.approx(on_cpu.mir, rel=RTOL)
    compute_mir([(k, v.numpy(), t.numpy()) for k, v, t in layers])  # numpy rows never take the torch path
    assert len(calls) == 3


def test_on_device_keeps_no_layer_alive_while_the_next_is_read():
    refs, alive_when_reading = [], []

    def rows(k):
        made = (cloud(5, 4, k), cloud(6, 4, k + 10))
        refs.append([weakref.ref(r) for r in made])
        return made

    def layers():  # the source: notes whether the previous layer is still alive when it reads the next one
        for k in (1, 2):
            alive_when_reading.append([r() is not None for ref in refs for r in ref])
            yield (k, *rows(k))  # no local name holds the rows

    for layer, image, text in frechet_torch.on_device(layers(), "cpu"):
        assert image.shape == (5, 4)
        del image, text  # the consumer drops the layer (as compute_mir does) before asking for the next
    assert alive_when_reading == [[], [False, False]]
