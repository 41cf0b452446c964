"""LayerExplorer driven from code: the slider and toggles change the data and the figure to the right layer."""
import matplotlib.colors
import numpy as np
import pandas as pd
import pytest
import torch

from mirlab import compute_mir
from mirlab.widgets import HIGHLIGHT, LayerExplorer, pca_2d

D = 6


class LayerStates:
    """In-memory stand-in for HiddenStates (.layers, .layer(k), iteration); counts every layer read."""

    def __init__(self, layers=(1, 2, 3, 4, 5), seed=0):
        rng = np.random.default_rng(seed)
        self.layers = list(layers)
        self.rows = {}
        for k in self.layers:  # every layer looks different: the image cloud shrinks and moves with depth
            image = rng.standard_normal((40, D)) * np.linspace(0.3, 3.0, D) / k + 2.0 * k
            text = rng.standard_normal((25, D)) * (1.0 + 0.2 * k)
            self.rows[k] = (torch.from_numpy(image).float(), torch.from_numpy(text).float())
        self.reads = []

    def layer(self, k):
        self.reads.append(k)
        return self.rows[k]

    def __iter__(self):
        for k in self.layers:
            yield (k, *self.layer(k))


def independent_view(image, text):
    """Scale by 1/mean text norm, norms of the scaled rows, PCA of the union by numpy's SVD."""
    v, t = image.double().numpy(), text.double().numpy()
    s = 1.0 / np.linalg.norm(t, axis=1).mean()
    rows = np.concatenate([v, t]) * s
    centred = rows - rows.mean(axis=0)
    u, sigma, _ = np.linalg.svd(centred, full_matrices=False)
    return np.linalg.norm(rows, axis=1), u[:, :2] * sigma[:2]


@pytest.fixture
def explorer():
    return LayerExplorer(LayerStates())


def test_slider_moves_the_data_to_the_selected_layer(explorer):
    states = explorer.hidden_states
    for k in (4, 2, 5):
        explorer.slider.value = k
        assert explorer.layer == k
        data = explorer.current_data()
        norms, projected = independent_view(*states.rows[k])
        assert list(data["modality"]) == ["image"] * 40 + ["text"] * 25
        np.testing.assert_array_equal(data["row"], np.r_[np.arange(40), np.arange(25)])
        np.testing.assert_allclose(data["norm"], norms, rtol=1e-10)
        # principal components agree up to the sign of each component
        for j, column in enumerate(("pc1", "pc2")):
            np.testing.assert_allclose(np.abs(data[column]), np.abs(projected[:, j]), rtol=1e-7, atol=1e-9)
    explorer.layer = 1
    assert explorer.slider.value == 1
    assert not np.allclose(explorer.current_data()["norm"], independent_view(*states.rows[5])[0])


def test_figure_follows_the_slider_and_highlights_the_selected_layer(explorer):
    fd = compute_mir(iter(explorer.hidden_states)).per_layer.set_index("layer")["fd"]
    png_before = explorer.image.value
    explorer.slider.value = 3
    assert explorer.image.value[:8] == b"\x89PNG\r\n\x1a\n" and explorer.image.value != png_before
    assert explorer.axes["pca"].get_title().startswith("layer 3:")
    highlighted = [p for p in explorer.axes["fd"].patches
                   if matplotlib.colors.same_color(p.get_facecolor(), HIGHLIGHT)]
    assert len(highlighted) == 1
    bar = highlighted[0]
    assert bar.get_x() + bar.get_width() / 2 == pytest.approx(3)
    assert bar.get_height() == pytest.approx(fd.loc[3], rel=1e-12)
    assert len(explorer.axes["fd"].patches) == 5
    # the scatter shows exactly the current points
    offsets = np.concatenate([c.get_offsets() for c in explorer.axes["pca"].collections])
    data = explorer.current_data()
    np.testing.assert_allclose(np.sort(offsets[:, 0]), np.sort(data["pc1"]), rtol=1e-12)


def test_modality_toggles_filter_data_and_figure(explorer):
    explorer.show["text"].value = False
    data = explorer.current_data()
    assert set(data["modality"]) == {"image"} and len(data) == 40
    assert len(np.concatenate([c.get_offsets() for c in explorer.axes["pca"].collections])) == 40
    explorer.show["image"].value = False
    assert explorer.current_data().empty
    assert any(t.get_text() == "no modality selected" for t in explorer.axes["pca"].texts)
    assert "showing nothing" in repr(explorer)


def test_mir_is_computed_once_and_layers_are_read_from_the_cache_once():
    states = LayerStates()
    explorer = LayerExplorer(states, layer=2)
    assert states.reads == [1, 2, 3, 4, 5, 2]  # compute_mir once over all layers, then the shown layer
    for k in (3, 2, 3, 5):
        explorer.slider.value = k
    assert states.reads == [1, 2, 3, 4, 5, 2, 3, 5]
    given = compute_mir(iter(LayerStates()))
    states = LayerStates()
    LayerExplorer(states, result=given)
    assert states.reads == [1]


def test_readable_in_light_and_dark_themes(explorer):
    assert matplotlib.colors.same_color(explorer.figure.get_facecolor(), "white")
    for ax in explorer.axes.values():
        assert matplotlib.colors.same_color(ax.get_facecolor(), "white")
        assert sum(matplotlib.colors.to_rgb(ax.title.get_color())) < 1.0  # dark text on white


def test_notebook_display_is_the_widget_with_a_short_text_repr(explorer):
    bundle = explorer._repr_mimebundle_()
    assert "application/vnd.jupyter.widget-view+json" in bundle
    assert bundle["text/plain"].startswith("LayerExplorer(layer 1 of 1..5")


def test_pca_signs_are_fixed_and_variance_ratios_sorted():
    rows = np.random.default_rng(2).standard_normal((50, 4)) * [3.0, 1.0, 0.5, 0.1]
    projected, explained = pca_2d(rows)
    again, _ = pca_2d(-rows)  # flipping the data must not flip the picture's components' loadings
    np.testing.assert_allclose(projected, -again, atol=1e-12)
    assert explained[0] > explained[1] > 0 and explained.sum() < 1


def test_subsampling_is_seeded_and_reports_rows():
    states = LayerStates()
    a = LayerExplorer(states, max_points=10, seed=1).current_data()
    b = LayerExplorer(states, max_points=10, seed=1).current_data()
    assert (a["modality"] == "image").sum() == 10 and (a["modality"] == "text").sum() == 10
    np.testing.assert_array_equal(a["row"], b["row"])
    norms = np.linalg.norm(states.rows[1][0].double().numpy(), axis=1)
    scale = 1.0 / np.linalg.norm(states.rows[1][1].double().numpy(), axis=1).mean()
    image = a[a["modality"] == "image"]
    np.testing.assert_allclose(image["norm"], norms[image["row"]] * scale, rtol=1e-10)


def test_bad_input_is_named():
    states = LayerStates()
    with pytest.raises(ValueError, match="layer 9 was not extracted"):
        LayerExplorer(states, layer=9)
    explorer = LayerExplorer(states)
    with pytest.raises(ValueError, match="layer 0 was not extracted"):
        explorer.layer = 0
    partial = compute_mir(iter(LayerStates(layers=(1, 2))))
    with pytest.raises(ValueError, match=r"no FD for layers \[3, 4, 5\]"):
        LayerExplorer(LayerStates(), result=partial)


def test_on_cached_hidden_states_of_a_tiny_llava(tmp_path):
    from PIL import Image
    from tiny_models import build, single_thread

    from mirlab import extract_hidden_states
    from mirlab.lvlm.extract import HiddenStates

    tiny = build("llava")
    size = tiny.image_sizes[0]
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)) for _ in range(3)]
    with single_thread():
        states = extract_hidden_states(tiny.model, tiny.processor, images, ["a cat", "two dogs", "a red square"],
                                       include_embeddings=True, cache_dir=tmp_path, progress=False)
    reopened = HiddenStates(states.path)  # a later session: the cache alone, no model
    explorer = LayerExplorer(reopened)
    explorer.slider.value = 2
    image, text = reopened.layer(2)
    norms, _ = independent_view(image, text)
    np.testing.assert_allclose(explorer.current_data()["norm"], norms, rtol=1e-10)
    assert explorer.slider.options == (0, 1, 2)


def norm_ratio_table(states):
    """A per-layer metric other than MIR: mean image-row norm / mean text-row norm, rows in shuffled order."""
    ratios = {k: np.linalg.norm(v.double().numpy(), axis=1).mean() / np.linalg.norm(t.double().numpy(), axis=1).mean()
              for k, (v, t) in states.rows.items()}
    return pd.DataFrame({"layer": list(ratios), "norm_ratio": list(ratios.values())}).sample(frac=1, random_state=0)


def test_any_per_layer_table_drives_the_third_panel_without_computing_mir():
    states = LayerStates()
    table = norm_ratio_table(states)
    explorer = LayerExplorer(states, table=table, value="norm_ratio", layer=4)
    assert states.reads == [4]  # no MIR over the whole cache: only the shown layer is read
    panel = explorer.axes["fd"]
    expected = table.set_index("layer")["norm_ratio"].loc[[1, 2, 3, 4, 5]]
    np.testing.assert_array_equal([p.get_height() for p in panel.patches], expected)
    highlighted = [p for p in panel.patches if matplotlib.colors.same_color(p.get_facecolor(), HIGHLIGHT)]
    assert len(highlighted) == 1 and highlighted[0].get_x() + highlighted[0].get_width() / 2 == pytest.approx(4)
    assert panel.get_title() == f"norm_ratio per layer; layer 4: {expected.loc[4]:.3g}"
    assert panel.get_ylabel() == "norm_ratio" and panel.get_yscale() == "linear"  # span < 2 decades
    # the norms panel's own ratio (scaled image norms / text mean = 1) is the same quantity for layer 4
    assert explorer.layer_data(4)[1]["norm_ratio"] == pytest.approx(expected.loc[4], rel=1e-12)
    explorer.slider.value = 2
    assert panel.get_title().startswith("norm_ratio per layer; layer 2:")
    assert repr(explorer).endswith("showing image + text, norm_ratio per layer)")


def test_other_columns_of_a_mir_result_and_log_scale_for_wide_spans():
    states = LayerStates()
    result = compute_mir(iter(LayerStates()))
    explorer = LayerExplorer(states, result=result, value="scale")
    np.testing.assert_array_equal([p.get_height() for p in explorer.axes["fd"].patches], result.per_layer["scale"])
    assert explorer.result is result and "MIR" in repr(explorer)
    wide = pd.DataFrame({"layer": [1, 2, 3, 4, 5], "gap": [1e-3, 1e-2, 0.1, 1.0, 10.0]})
    assert LayerExplorer(states, table=wide, value="gap").axes["fd"].get_yscale() == "log"


def test_bad_tables_are_named():
    states = LayerStates()
    table = norm_ratio_table(states)
    with pytest.raises(ValueError, match=r"the table has no 'norm_ratio' for layers \[4, 5\]"):
        LayerExplorer(states, table=table[table["layer"] < 4], value="norm_ratio")
    with pytest.raises(ValueError, match=r"LayerExplorer: the table has no column 'cka' \(columns"):
        LayerExplorer(states, table=table, value="cka")
    with pytest.raises(ValueError, match="either result= .* or table="):
        LayerExplorer(states, result=compute_mir(iter(states)), table=table, value="norm_ratio")
    runs = pd.concat([table.assign(label="a"), table.assign(label="b")])
    with pytest.raises(ValueError, match=r"shows one run; the table has labels \['a', 'b'\]"):
        LayerExplorer(states, table=runs, value="norm_ratio")
    LayerExplorer(states, table=runs[runs["label"] == "b"], value="norm_ratio")  # one run is fine
