"""Text-centric scale and 3-sigma outlier handling against hand-computed / torch-computed references."""
import numpy as np
import pytest
import torch

from mirlab import replace_outliers, text_centric_scale
from mirlab.metrics.normalize import check_rows, prepare_layer


def rows(n=200, d=16, seed=0):
    return np.random.default_rng(seed).standard_normal((n, d)) * np.linspace(0.5, 2.0, d) + 0.3


def torch_reference(x, n_sigma):
    """The official rule written with torch's own median/std (lower median, unbiased std)."""
    x = torch.as_tensor(x, dtype=torch.float64)
    r = x.norm(dim=1)
    mask = (r - r.median()).abs() > n_sigma * r.std()
    clean = x.clone()
    clean[mask] = x.median(dim=0).values
    return clean.numpy(), mask.numpy()


def test_text_centric_scale_is_inverse_mean_norm():
    t = rows(50, 8)
    expected = 1.0 / np.mean([np.sqrt(sum(v * v for v in row)) for row in t])
    assert text_centric_scale(t) == pytest.approx(expected, rel=1e-12)
    assert text_centric_scale(torch.from_numpy(t).float()) == pytest.approx(expected, rel=1e-6)
    assert text_centric_scale(3.0 * t) == pytest.approx(expected / 3.0, rel=1e-12)


def test_planted_outliers_are_found_and_replaced_by_the_dimension_median():
    x = rows(300, 12, seed=1)
    planted = [5, 77, 150, 299]
    x[planted] *= 25.0
    clean, mask = replace_outliers(x)
    assert np.flatnonzero(mask).tolist() == planted
    assert mask.sum() == len(planted)
    k = (len(x) - 1) // 2
    lower_median = np.sort(x, axis=0)[k]          # taken over all rows, outliers included
    np.testing.assert_array_equal(clean[planted], np.tile(lower_median, (len(planted), 1)))
    keep = ~mask
    np.testing.assert_array_equal(clean[keep], x[keep])
    assert clean.shape == x.shape


@pytest.mark.parametrize("seed", range(6))
def test_matches_torch_rule_on_heavy_tailed_rows(seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_t(df=2, size=(201 + seed, 6))   # odd and even row counts, heavy tails
    ref_clean, ref_mask = torch_reference(x, 3.0)
    clean, mask = replace_outliers(x)
    np.testing.assert_array_equal(mask, ref_mask)
    np.testing.assert_allclose(clean, ref_clean, rtol=0, atol=0)
    t_clean, t_mask = replace_outliers(torch.from_numpy(x))
    np.testing.assert_array_equal(t_mask.numpy(), ref_mask)
    np.testing.assert_array_equal(t_clean.numpy(), ref_clean)


def test_lower_median_and_unbiased_std_semantics():
    # norms 1, 2, 3, 10: lower median 2 (not 2.5); std (n-1) = 4.0825, std (n) = 3.5355
    x = np.array([[1.0], [2.0], [3.0], [10.0]])
    # threshold 1.898*4.0825 = 7.75 sits between |10-2.5| = 7.5 and |10-2| = 8: lower median flags row 3
    assert replace_outliers(x, n_sigma=1.898)[1].tolist() == [False, False, False, True]
    # threshold 2.1*std: unbiased std gives 8.57 > 8 (not flagged); the biased one would give 7.42
    assert not replace_outliers(x, n_sigma=2.1)[1].any()
    clean, _ = replace_outliers(x, n_sigma=1.898)
    assert clean[3, 0] == 2.0                     # per-dimension lower median of [1, 2, 3, 10]


def test_drop_mode_removes_rows_and_kinds_are_preserved():
    x = rows(100, 5, seed=2)
    x[[3, 40]] *= 30
    dropped, mask = replace_outliers(x, mode="drop")
    assert dropped.shape == (98, 5) and mask.sum() == 2
    np.testing.assert_array_equal(dropped, x[~mask])
    xt = torch.from_numpy(x).float()
    clean, tmask = replace_outliers(xt)
    assert isinstance(clean, torch.Tensor) and clean.dtype == torch.float32
    assert isinstance(tmask, torch.Tensor) and tmask.dtype == torch.bool
    clean32, _ = replace_outliers(x.astype(np.float32))
    assert isinstance(clean32, np.ndarray) and clean32.dtype == np.float32


def test_scale_equivariance():
    x = rows(150, 7, seed=3)
    x[[0, 9]] *= 20
    for s in (1e-3, 0.37, 250.0):
        clean_s, mask_s = replace_outliers(s * x)
        clean, mask = replace_outliers(x)
        np.testing.assert_array_equal(mask_s, mask)
        np.testing.assert_allclose(clean_s, s * clean, rtol=1e-13)


def test_no_outliers_returns_input_unchanged():
    x = np.ones((10, 3)) + np.arange(10)[:, None] * 1e-3
    clean, mask = replace_outliers(x)
    assert not mask.any()
    np.testing.assert_array_equal(clean, x)


@pytest.mark.parametrize("bad, message", [
    (np.array([[1.0, np.nan], [1.0, 2.0], [np.inf, 0.0]]), "2 rows contain NaN/inf"),
    (np.array([[1.0, 2.0]]), "at least 2 rows"),
    (np.zeros((0, 4)), "no rows"),
    (np.zeros(5), "2-D"),
])
def test_bad_rows_raise(bad, message):
    with pytest.raises(ValueError, match=message):
        replace_outliers(bad)
    with pytest.raises(ValueError, match=message):
        check_rows(torch.as_tensor(bad), "layer 7, text rows")


def test_bad_arguments_raise():
    x = rows(20, 3)
    with pytest.raises(ValueError, match="mode"):
        replace_outliers(x, mode="clip")
    with pytest.raises(ValueError, match="n_sigma"):
        replace_outliers(x, n_sigma=0)
    with pytest.raises(ValueError, match="zero"):
        text_centric_scale(np.zeros((4, 3)))
    with pytest.raises(ValueError, match="layer 7, text rows: 1 row contains NaN/inf"):
        check_rows(np.array([[1.0, 2.0], [np.nan, 1.0]]), "layer 7, text rows")


# --- prepare_layer: upcast, scale, 3-sigma rule for one layer -------------------------------------------------

def layer_pair(seed=4):
    """Image and text rows of one layer with planted outliers: 2 image rows, 1 text row."""
    image, text = rows(120, 10, seed=seed) * 4.0 + 1.0, rows(70, 10, seed=seed + 1)
    image[[5, 60]] *= 25.0
    text[[3]] *= 20.0
    return image, text


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64], ids=str)
def test_prepare_layer_upcasts_before_any_arithmetic(dtype):
    image, text = (torch.from_numpy(x).to(dtype) for x in layer_pair())
    prepared = prepare_layer(image, text, layer=3)
    assert prepared.image.dtype == prepared.text.dtype == torch.float64
    assert (prepared.image_outliers, prepared.text_outliers) == (2, 1)
    exact = [x.double().numpy() for x in (image, text)]  # the stored values, upcast exactly
    s = 1.0 / np.linalg.norm(exact[1], axis=1).mean()
    assert prepared.scale == pytest.approx(s, rel=1e-14)
    for got, x in zip((prepared.image, prepared.text), exact):
        ref_clean, _ = torch_reference(s * x, 3.0)
        np.testing.assert_array_equal(got.numpy(), ref_clean)
    again = prepare_layer(image.double(), text.double())
    assert again.scale == prepared.scale
    assert torch.equal(again.image, prepared.image) and torch.equal(again.text, prepared.text)


def test_prepare_layer_kinds_and_float32_option():
    image, text = layer_pair()
    prepared = prepare_layer(image.astype(np.float32), text.astype(np.float32))
    assert isinstance(prepared.image, np.ndarray) and prepared.image.dtype == np.float64
    single = prepare_layer(torch.from_numpy(image).half(), torch.from_numpy(text).half(), dtype=torch.float32)
    assert single.image.dtype == single.text.dtype == torch.float32
    assert (single.image_outliers, single.text_outliers) == (2, 1)


def test_prepare_layer_is_scale_equivariant():
    image, text = layer_pair(seed=8)
    base = prepare_layer(image, text)
    for c in (1e-4, 3.7, 2e3):
        scaled = prepare_layer(c * image, c * text)
        assert scaled.scale == pytest.approx(base.scale / c, rel=1e-13)
        assert (scaled.image_outliers, scaled.text_outliers) == (base.image_outliers, base.text_outliers)
        np.testing.assert_allclose(scaled.image, base.image, rtol=1e-12)
        np.testing.assert_allclose(scaled.text, base.text, rtol=1e-12)


def test_prepare_layer_drop_removes_rows_and_none_keeps_them():
    image, text = layer_pair()
    s = 1.0 / np.linalg.norm(text, axis=1).mean()
    dropped = prepare_layer(image, text, outliers="drop")
    assert dropped.image.shape == (118, 10) and dropped.text.shape == (69, 10)
    assert (dropped.image_outliers, dropped.text_outliers) == (2, 1)
    np.testing.assert_array_equal(dropped.image, (s * image)[np.setdiff1d(np.arange(120), [5, 60])])
    np.testing.assert_array_equal(dropped.text, np.delete(s * text, 3, axis=0))
    kept = prepare_layer(image, text, outliers="none")
    assert (kept.image_outliers, kept.text_outliers) == (0, 0)
    np.testing.assert_array_equal(kept.image, s * image)
    np.testing.assert_array_equal(kept.text, s * text)


def test_prepare_layer_errors_name_the_layer_and_modality():
    image, text = layer_pair()
    bad = image.copy()
    bad[2, 1] = np.nan
    with pytest.raises(ValueError, match="layer 5, image rows: 1 row contains NaN/inf"):
        prepare_layer(bad, text, layer=5)
    with pytest.raises(ValueError, match="layer 5, text rows: need at least 2 rows"):
        prepare_layer(image, text[:1], layer=5)
    with pytest.raises(ValueError, match="layer 5: image rows have width 9 but text rows have width 10"):
        prepare_layer(image[:, :9], text, layer=5)
    with pytest.raises(ValueError, match="layer 5, text rows: every row is zero"):
        prepare_layer(image, np.zeros_like(text), layer=5)
    with pytest.raises(ValueError, match=r"outliers must be one of \('replace', 'drop', 'none'\), got 'clip'"):
        prepare_layer(image, text, outliers="clip")
    with pytest.raises(ValueError, match="dtype must be torch.float64 or torch.float32, got torch.float16"):
        prepare_layer(image, text, dtype=torch.float16)
