"""bootstrap_mir: replicates equal MIR of explicitly resampled rows, the interval behaves, bad input is named."""
import numpy as np
import pandas as pd
import pytest
import torch

from mirlab import bootstrap_mir, compute_mir
from mirlab.metrics.bootstrap import (_Modality, bootstrap_interval, pair_counts, replicate_rows, weighted_layer_fd,
                              weighted_lower_median)
from mirlab.metrics.mir import layer_fd


class PairStates:
    """In-memory stand-in for HiddenStates: per-pair row blocks, iterated (layer, image, text) as float32."""

    def __init__(self, vision_blocks, text_blocks):
        """vision_blocks[k][p]: rows of pair p in layer k (likewise text)."""
        self.vision_blocks, self.text_blocks = vision_blocks, text_blocks
        self.reads = []

    @property
    def samples(self):
        return pd.DataFrame({"pair": range(len(self.vision_blocks[0])),
                             "n_image": [len(b) for b in self.vision_blocks[0]],
                             "n_text": [len(b) for b in self.text_blocks[0]]})

    def __len__(self):
        return len(self.vision_blocks)

    def __iter__(self):
        for k, (v, t) in enumerate(zip(self.vision_blocks, self.text_blocks), start=1):
            self.reads.append(k)
            yield k, torch.from_numpy(np.concatenate(v)).float(), torch.from_numpy(np.concatenate(t)).float()


def synthetic_states(n_pairs=24, d=6, n_layers=3, image_rows=20, seed=0, outliers=True):
    """Pairs whose image rows and text rows come from two Gaussians per layer, plus a per-pair offset."""
    rng = np.random.default_rng(seed)
    text_rows = rng.integers(5, 12, n_pairs)  # a pair has the same rows in every layer
    image, text = [], []
    for k in range(n_layers):
        shift = np.linspace(1.0, 0.2, d) * (n_layers - k)
        v_blocks, t_blocks = [], []
        for p in range(n_pairs):
            offset = 0.3 * rng.standard_normal(d)
            v = rng.standard_normal((image_rows, d)) * np.linspace(0.5, 2.0, d) + shift + offset
            t = rng.standard_normal((text_rows[p], d)) + offset
            if outliers and p % 7 == 0:
                v[0] *= 25.0  # a planted outlier row (3σ on norms catches it)
            v_blocks.append(v)
            t_blocks.append(t)
        image.append(v_blocks)
        text.append(t_blocks)
    return PairStates(image, text)


# --- the replicate arithmetic ----------------------------------------------------------------------------------

def test_weighted_lower_median_is_torch_median_of_the_repeated_rows():
    rng = np.random.default_rng(1)
    values = rng.standard_normal((9, 4))
    for weights in ([1, 0, 2, 3, 0, 1, 1, 4, 1], [0, 0, 1, 1, 0, 0, 0, 0, 0], [2] * 9):
        weights = np.array(weights)
        expanded = torch.from_numpy(np.repeat(values, weights, axis=0))
        np.testing.assert_array_equal(weighted_lower_median(values, weights), torch.median(expanded, dim=0).values)
        assert weighted_lower_median(values[:, 0], weights) == torch.median(expanded[:, 0]).item()


def test_replicate_rows_repeat_each_drawn_pairs_block():
    sizes = np.array([2, 3, 1])
    np.testing.assert_array_equal(replicate_rows(np.array([0, 2, 1]), sizes), [2, 3, 4, 2, 3, 4, 5])
    counts = pair_counts(5, 7, seed=3)
    assert counts.shape == (7, 5) and (counts.sum(axis=1) == 5).all()


@pytest.mark.parametrize("outliers", ["replace", "drop", "none"])
def test_weighted_replicate_fd_equals_layer_fd_of_the_materialized_replicate(outliers):
    states = synthetic_states(n_pairs=10, d=8)
    sizes = {m: states.samples[f"n_{m}"].to_numpy() for m in ("image", "text")}
    _, image, text = next(iter(states))
    v, t = _Modality(image, "v"), _Modality(text, "t")
    flagged = 0
    for counts in pair_counts(10, 12, seed=5):
        rows_v, rows_t = replicate_rows(counts, sizes["image"]), replicate_rows(counts, sizes["text"])
        expected = layer_fd(image[rows_v].double(), text[rows_t].double(), outliers=outliers)
        flagged += expected["image_outliers"]
        got = weighted_layer_fd(v, t, np.repeat(counts, sizes["image"]), np.repeat(counts, sizes["text"]), outliers)
        assert got == pytest.approx(expected["fd"], rel=1e-9)
    assert outliers == "none" or flagged > 0  # the outlier branch was exercised


def test_more_rows_than_dimensions_in_both_clouds_takes_the_covariance_route():
    # d = 3 with dozens of rows per modality: the cross term goes through the 3 x 3 covariances
    states = synthetic_states(n_pairs=6, d=3, outliers=False)
    sizes = {m: states.samples[f"n_{m}"].to_numpy() for m in ("image", "text")}
    _, image, text = next(iter(states))
    counts = np.array([2, 0, 1, 1, 0, 2])
    rows_v, rows_t = replicate_rows(counts, sizes["image"]), replicate_rows(counts, sizes["text"])
    expected = layer_fd(image[rows_v].double(), text[rows_t].double())["fd"]
    got = weighted_layer_fd(_Modality(image, "v"), _Modality(text, "t"), np.repeat(counts, sizes["image"]),
                            np.repeat(counts, sizes["text"]))
    assert got == pytest.approx(expected, rel=1e-9)


# --- bootstrap_mir ------------------------------------------------------------------------------------------------

def test_point_estimate_is_compute_mir_and_the_interval_contains_it():
    states = synthetic_states()
    result = bootstrap_mir(states, n_boot=60, seed=0)
    assert result.mir == pytest.approx(compute_mir(iter(states)).mir, rel=1e-12)
    assert result.low < result.mir < result.high
    assert result.replicates.shape == (60,) and result.replicate_fd.shape == (60, 3)
    assert np.all(result.per_layer["fd_low"] <= result.per_layer["fd_high"])
    assert list(result.per_layer["layer"]) == [1, 2, 3]
    # MIR_b is log10 of the replicate's FD sum
    np.testing.assert_allclose(result.replicates, np.log10(result.replicate_fd.sum(axis=1)))


def test_a_given_result_supplies_the_point_estimate():
    states = synthetic_states()
    result = compute_mir(iter(states))
    given = bootstrap_mir(states, n_boot=10, seed=2, result=result)
    fresh = bootstrap_mir(states, n_boot=10, seed=2)
    assert given.mir == result.mir
    np.testing.assert_array_equal(given.replicates, fresh.replicates)
    np.testing.assert_allclose(given.per_layer["fd"], fresh.per_layer["fd"], rtol=1e-12)
    with pytest.raises(ValueError, match="computed with"):
        bootstrap_mir(states, n_boot=2, result=compute_mir(iter(states), outliers="none"))
    partial = compute_mir([(1, *next(iter(states))[1:])])
    with pytest.raises(ValueError, match="no FD for layer 2"):
        bootstrap_mir(states, n_boot=2, result=partial)


def test_each_layer_is_read_once():
    states = synthetic_states(n_layers=4)
    bootstrap_mir(states, n_boot=3)
    assert states.reads == [1, 2, 3, 4]


def test_deterministic_under_seed():
    states = synthetic_states()
    a, b = bootstrap_mir(states, n_boot=20, seed=7), bootstrap_mir(states, n_boot=20, seed=7)
    np.testing.assert_array_equal(a.replicates, b.replicates)
    assert (a.low, a.high) == (b.low, b.high)
    other = bootstrap_mir(states, n_boot=20, seed=8)
    assert not np.array_equal(a.replicates, other.replicates)


def test_identical_pairs_collapse_the_interval():
    one = synthetic_states(n_pairs=1, seed=4, outliers=False)
    copies = PairStates([blocks * 12 for blocks in one.vision_blocks], [blocks * 12 for blocks in one.text_blocks])
    result = bootstrap_mir(copies, n_boot=25, seed=0)
    assert result.high - result.low <= 1e-9
    assert result.low == pytest.approx(result.mir, rel=1e-7)  # point estimate: float32 rows scaled in float32
    assert abs(result.bias) <= 1e-7


def test_basic_interval_is_the_percentile_interval_reflected_around_the_estimate():
    states = synthetic_states()
    percentile = bootstrap_mir(states, n_boot=30, seed=1)
    basic = bootstrap_mir(states, n_boot=30, seed=1, interval="basic")
    assert basic.low == pytest.approx(2 * percentile.mir - percentile.high, rel=1e-12)
    assert basic.high == pytest.approx(2 * percentile.mir - percentile.low, rel=1e-12)
    assert basic.bias == pytest.approx(percentile.replicates.mean() - percentile.mir)
    low, high = bootstrap_interval(1.0, np.array([0.0, 1.0, 2.0, 3.0]), 0.5, "percentile")
    assert (low, high) == (0.75, 2.25)


def test_few_rows_per_dimension_bias_the_replicates_upwards():
    # FD of a small sample is biased up, and a replicate holds only ~63% distinct pairs: bias > 0
    states = synthetic_states(n_pairs=12, d=40, image_rows=4, outliers=False)
    result = bootstrap_mir(states, n_boot=40, seed=0)
    assert result.bias > 0
    assert result.to_dict()["bias"] == pytest.approx(result.bias)


def test_parity_method_resamples_materialized_rows():
    states = synthetic_states(n_pairs=6, n_layers=2)
    result = bootstrap_mir(states, n_boot=4, method="official-accurate")
    assert result.mir == pytest.approx(compute_mir(iter(states), method="official-accurate").mir, rel=1e-12)
    assert np.isfinite(result.replicates).all() and result.method == "official-accurate"


def test_on_real_hidden_states_of_a_tiny_llava():
    from PIL import Image
    from tiny_models import build, single_thread

    from mirlab import extract_hidden_states

    tiny = build("llava")
    rng = np.random.default_rng(0)
    size = tiny.image_sizes[0]
    images = [Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)) for _ in range(5)]
    texts = ["a cat sits on the mat", "two dogs", "a red square and a blue circle", "the quick brown fox",
             "photo of two dogs in the park at night"]
    with single_thread():
        states = extract_hidden_states(tiny.model, tiny.processor, images, texts, progress=False)
    result = bootstrap_mir(states, n_boot=10, seed=0)
    assert result.mir == pytest.approx(compute_mir(states).mir, rel=1e-12)
    assert np.isfinite(result.replicates).all() and len(result.per_layer) == len(states.layers)


@pytest.mark.parametrize("kwargs, message", [
    ({"n_boot": 0}, "n_boot must be a positive int"),
    ({"n_boot": 2.5}, "n_boot must be a positive int"),
    ({"confidence": 1.0}, "confidence must be"),
    ({"method": "fast"}, "method must be one of"),
    ({"interval": "bca"}, "interval must be one of"),
    ({"outliers": "clip"}, "outliers must be one of"),
])
def test_bad_options_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        bootstrap_mir(synthetic_states(n_pairs=3, n_layers=1), **kwargs)


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="samples"):
        bootstrap_mir([(np.ones((3, 2)), np.ones((3, 2)))])
    with pytest.raises(ValueError, match="at least 2 pairs"):
        bootstrap_mir(synthetic_states(n_pairs=1))
    states = synthetic_states(n_pairs=4, n_layers=2)
    states.text_blocks[1][2] = states.text_blocks[1][2][:-1]  # layer 2 loses a text row
    with pytest.raises(ValueError, match="layer 2: .* text rows"):
        bootstrap_mir(states, n_boot=2)
    states = synthetic_states(n_pairs=4, n_layers=1)
    states.vision_blocks[0][1][3, 0] = np.nan
    with pytest.raises(ValueError, match="layer 1, image rows"):
        bootstrap_mir(states, n_boot=2)
