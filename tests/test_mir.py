"""compute_mir: the per-layer pipeline against an independent reference, laziness, invariances, I/O, errors."""
import gc
import math
import weakref
from functools import partial

import numpy as np
import pandas as pd
import pytest
import scipy.linalg
import torch

from mirlab import MIRResult, compute_mir
from mirlab.metrics.probes import compute_probes

D = 24


def layer_rows(layer, n_image=120, n_text=60, seed=0):
    """A synthetic layer: vision and text clouds that drift apart and grow with depth."""
    rng = np.random.default_rng(1000 * seed + layer)
    scale = 1.0 + 0.5 * layer
    image = rng.standard_normal((n_image, D)) * np.linspace(0.2, 2, D) * scale + 0.3 * layer
    text = rng.standard_normal((n_text, D)) * scale
    return image, text


def reference_layer_fd(image, text):
    """Scale by 1/mean text norm, no outlier step, FD with scipy sqrtm in float64 (full-rank clouds)."""
    s = 1.0 / np.mean(np.linalg.norm(text, axis=1))
    v, t = s * image, s * text
    Sv, St = np.cov(v, rowvar=False), np.cov(t, rowvar=False)
    cross = np.trace(scipy.linalg.sqrtm(Sv @ St)).real
    return np.sum((v.mean(0) - t.mean(0)) ** 2) + np.trace(Sv) + np.trace(St) - 2 * cross


def test_mir_matches_independent_reference():
    layers = [layer_rows(k) for k in range(1, 6)]
    result = compute_mir(iter(layers), outliers="none")
    ref = [reference_layer_fd(v, t) for v, t in layers]
    np.testing.assert_allclose(result.per_layer["fd"], ref, rtol=1e-9)
    assert result.mir == pytest.approx(math.log10(sum(ref)), rel=1e-12)
    assert result.per_layer["layer"].tolist() == [1, 2, 3, 4, 5]
    assert list(result.per_layer.columns) == ["layer", "fd", "scale", "n_image", "n_text",
                                              "image_outliers", "text_outliers"]
    np.testing.assert_allclose(result.per_layer["scale"],
                               [1 / np.mean(np.linalg.norm(t, axis=1)) for _, t in layers], rtol=1e-12)


@pytest.mark.parametrize("measure", [compute_mir, partial(compute_probes, probes=("norm_ratio", "rank"))],
                         ids=["compute_mir", "compute_probes"])
def test_layers_are_consumed_one_at_a_time(measure):
    """Both per-layer consumers (metrics.mir.each_layer) hold one layer at a time."""
    alive = []

    def layers():
        for k in range(1, 5):
            # when layer k is requested, the consumer must have released every earlier layer
            gc.collect()
            assert all(ref() is None for ref in alive), f"an earlier layer is still alive at layer {k}"
            image, text = (torch.from_numpy(a) for a in layer_rows(k))
            alive.extend([weakref.ref(image), weakref.ref(text)])
            yield image, text
            del image, text

    result = measure(layers(), progress=True)
    assert len(result.per_layer if measure is compute_mir else result) == 4


def test_mir_invariant_to_rescaling_raw_features_per_layer():
    layers = [layer_rows(k, seed=1) for k in range(1, 5)]
    layers[1][0][[3, 17]] *= 40            # planted outliers: the 3-sigma step must be scale-equivariant
    base = compute_mir(layers)
    factors = [1e-3, 7.5, 0.2, 1e4]
    scaled = compute_mir((c * v, c * t) for c, (v, t) in zip(factors, layers))
    assert scaled.mir == pytest.approx(base.mir, abs=1e-12)
    np.testing.assert_allclose(scaled.per_layer["fd"], base.per_layer["fd"], rtol=1e-9)
    clean = compute_mir([layer_rows(2, seed=1)])
    assert base.per_layer.loc[1, "image_outliers"] == clean.per_layer.loc[0, "image_outliers"] + 2


def test_planted_outliers_are_counted_and_change_fd():
    image, text = layer_rows(2)
    text[[0, 5, 9]] *= 50
    replaced = compute_mir([(image, text)])
    dropped = compute_mir([(image, text)], outliers="drop")
    kept = compute_mir([(image, text)], outliers="none")
    assert replaced.per_layer.loc[0, "text_outliers"] == 3
    assert dropped.per_layer.loc[0, "text_outliers"] == 3
    assert kept.per_layer.loc[0, "text_outliers"] == 0
    assert replaced.per_layer.loc[0, "n_text"] == len(text)
    assert len({replaced.mir, dropped.mir, kept.mir}) == 3


def test_layer_triples_and_torch_input():
    items = [(3, *layer_rows(3)), (7, *layer_rows(7))]
    result = compute_mir(items)
    assert result.per_layer["layer"].tolist() == [3, 7]
    as_torch = compute_mir((k, torch.from_numpy(v).float(), torch.from_numpy(t).float()) for k, v, t in items)
    assert as_torch.mir == pytest.approx(result.mir, rel=1e-5)


def test_official_fast_mir_is_higher_than_exact():
    layers = [layer_rows(k, seed=2) for k in range(1, 5)]
    exact = compute_mir(layers)
    fast = compute_mir(layers, method="official-fast")
    accurate = compute_mir(layers, method="official-accurate")
    assert fast.method == "official-fast" and fast.mir > exact.mir
    assert accurate.mir == pytest.approx(exact.mir, abs=1e-4)


def test_json_round_trip_is_exact(tmp_path):
    result = compute_mir([layer_rows(k) for k in range(1, 4)], method="exact")
    back = MIRResult.from_json(result.to_json())
    assert back.mir == result.mir and back.method == result.method and back.outliers == result.outliers
    pd.testing.assert_frame_equal(back.per_layer, result.per_layer, check_exact=True)
    path = tmp_path / "mir.json"
    result.to_json(str(path))
    pd.testing.assert_frame_equal(MIRResult.from_json(str(path)).per_layer, result.per_layer, check_exact=True)
    assert result.to_dict()["per_layer"][0]["layer"] == 1
    assert "MIR" in result._repr_html_() and f"{result.mir:.4f}" in repr(result)


def bad_layers(kind):
    v, t = layer_rows(1)
    v2, t2 = layer_rows(2)
    if kind == "nan":
        t2 = t2.copy()
        t2[[1, 4, 8]] = np.nan
    elif kind == "width":
        v2 = v2[:, :-1]
    elif kind == "one row":
        v2 = v2[:1]
    elif kind == "empty":
        t2 = t2[:0]
    return [(v, t), (v2, t2)]


@pytest.mark.parametrize("kind, message", [
    ("nan", "layer 2, text rows: 3 rows contain NaN/inf"),
    ("width", "layer 2: image rows have width 23 but text rows have width 24"),
    ("one row", "layer 2, image rows: need at least 2 rows"),
    ("empty", "layer 2, text rows: no rows"),
])
def test_bad_layers_raise_naming_layer_and_modality(kind, message):
    with pytest.raises(ValueError, match=message):
        compute_mir(bad_layers(kind))


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="no layers"):
        compute_mir(iter([]))
    with pytest.raises(ValueError, match="method"):
        compute_mir([layer_rows(1)], method="accurate")
    with pytest.raises(ValueError, match="outliers"):
        compute_mir([layer_rows(1)], outliers="clip")
    with pytest.raises(ValueError, match="layer 4 appears twice"):
        compute_mir([(4, *layer_rows(1)), (4, *layer_rows(2))])
    with pytest.raises(ValueError, match="expected"):
        compute_mir([layer_rows(1)[0]])
    v, t = layer_rows(1)
    with pytest.raises(ValueError, match="layer 1, text rows: every row is zero"):
        compute_mir([(v, np.zeros_like(t))])


# --- low-precision caches: rows are upcast before any arithmetic ------------------------------------------------

LOW_PRECISION = [torch.float16, torch.bfloat16, torch.float32]


def low_precision_layers(dtype, n_layers=4, n_image=150, n_text=80, d=16, seed=5):
    """(layer, image, text) in `dtype`, with planted outlier rows in both modalities (the 3-sigma rule fires)."""
    rng = np.random.default_rng(seed)
    items = []
    for k in range(1, n_layers + 1):
        spread = np.exp(rng.normal(0.0, 0.7, d))
        image = rng.standard_normal((n_image, d)) * spread * (1 + 0.4 * k) + rng.normal(0.0, 3.0, d)
        text = rng.standard_normal((n_text, d)) * spread + rng.normal(0.0, 3.0, d)
        image[[0, 40]] *= 20.0
        text[[7]] *= 15.0
        items.append((k, torch.from_numpy(image).to(dtype), torch.from_numpy(text).to(dtype)))
    return items


def numpy_reference_fd(image, text):
    """Independent float64 reference of one layer: scale, 3-sigma replacement by hand, FD via eigh.

    s = 1 / mean ||t_j||; per modality, rows with | ||x_i|| - lower median | > 3 std (n - 1) become the
    per-dimension lower median; tr((Sv St)^1/2) = sum sqrt(eig(Sv^1/2 St Sv^1/2)).
    """
    s = 1.0 / np.linalg.norm(text, axis=1).mean()
    clean, counts = [], []
    for x in (s * image, s * text):
        r = np.linalg.norm(x, axis=1)
        median = np.sort(r)[(len(r) - 1) // 2]
        flagged = np.abs(r - median) > 3.0 * r.std(ddof=1)
        x = x.copy()
        x[flagged] = np.sort(x, axis=0)[(len(x) - 1) // 2]
        clean.append(x)
        counts.append(int(flagged.sum()))
    v, t = clean
    Sv, St = np.cov(v, rowvar=False), np.cov(t, rowvar=False)
    w, U = np.linalg.eigh(Sv)
    root = (U * np.sqrt(np.clip(w, 0, None))) @ U.T
    cross = np.sqrt(np.clip(np.linalg.eigvalsh(root @ St @ root), 0, None)).sum()
    fd = np.sum((v.mean(0) - t.mean(0)) ** 2) + np.trace(Sv) + np.trace(St) - 2 * cross
    return fd, s, counts


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
def test_exact_mir_of_low_precision_rows_is_the_float64_mir_of_the_same_rows(dtype):
    items = low_precision_layers(dtype)
    result = compute_mir(items)
    upcast = compute_mir((k, v.double(), t.double()) for k, v, t in items)
    assert (result.per_layer["image_outliers"] > 0).all() and (result.per_layer["text_outliers"] > 0).all()
    assert result.mir == pytest.approx(upcast.mir, rel=1e-12)
    np.testing.assert_allclose(result.per_layer["fd"], upcast.per_layer["fd"], rtol=1e-12)
    np.testing.assert_allclose(result.per_layer["scale"], upcast.per_layer["scale"], rtol=1e-12)
    for column in ("layer", "n_image", "n_text", "image_outliers", "text_outliers"):
        assert result.per_layer[column].tolist() == upcast.per_layer[column].tolist()


@pytest.mark.parametrize("dtype", LOW_PRECISION, ids=str)
def test_exact_mir_of_low_precision_rows_matches_a_numpy_float64_reference(dtype):
    items = low_precision_layers(dtype, seed=6)
    result = compute_mir(items)
    reference = [numpy_reference_fd(v.double().numpy(), t.double().numpy()) for _, v, t in items]
    np.testing.assert_allclose(result.per_layer["fd"], [fd for fd, _, _ in reference], rtol=1e-9)
    np.testing.assert_allclose(result.per_layer["scale"], [s for _, s, _ in reference], rtol=1e-12)
    assert result.per_layer["image_outliers"].tolist() == [c[0] for _, _, c in reference]
    assert result.per_layer["text_outliers"].tolist() == [c[1] for _, _, c in reference]
    assert result.mir == pytest.approx(math.log10(math.fsum(fd for fd, _, _ in reference)), rel=1e-12)
