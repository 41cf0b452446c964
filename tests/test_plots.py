"""per_layer_figure on MIR results and on any per-layer table: the drawn lines are the table's column."""
import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402

from mirlab import compute_mir  # noqa: E402
from mirlab.plots import per_layer_figure, save_per_layer_figure, wants_log_scale  # noqa: E402


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


def mir_result():
    rng = np.random.default_rng(0)
    layers = [(rng.standard_normal((60, 5)) * (1 + k) + k, rng.standard_normal((40, 5))) for k in range(1, 6)]
    return compute_mir(layers)


def lines(figure):
    return [line for line in figure.axes[0].get_lines() if len(line.get_xdata())]


def test_a_mir_result_plots_its_fd_on_a_log_axis():
    result = mir_result()
    figure = per_layer_figure(result)
    (line,) = lines(figure)
    np.testing.assert_array_equal(line.get_xdata(), result.per_layer["layer"])
    np.testing.assert_array_equal(line.get_ydata(), result.per_layer["fd"])
    ax = figure.axes[0]
    assert ax.get_yscale() == "log" and ax.get_ylabel() == "FD$_k$ (image vs text rows)"
    assert ax.get_title().startswith(f"MIR = log10(sum FD) = {result.mir:.4f}")


def test_any_per_layer_column_plots_with_its_own_label():
    table = pd.DataFrame({"layer": [3, 1, 2, 4], "norm_ratio": [1.4, 0.8, 1.1, 2.0]})
    figure = per_layer_figure(table, value="norm_ratio", title="norms")
    (line,) = lines(figure)
    ordered = table.sort_values("layer")
    np.testing.assert_array_equal(line.get_xdata(), ordered["layer"])
    np.testing.assert_array_equal(line.get_ydata(), ordered["norm_ratio"])
    ax = figure.axes[0]
    assert ax.get_ylabel() == "norm_ratio" and ax.get_yscale() == "linear" and ax.get_title() == "norms"
    # the MIR result's other columns too, and log on request
    result = mir_result()
    figure = per_layer_figure(result, value="scale", log=True)
    np.testing.assert_array_equal(lines(figure)[0].get_ydata(), result.per_layer["scale"])
    assert figure.axes[0].get_yscale() == "log" and figure.axes[0].get_title() == ""


def test_several_labels_give_one_line_each():
    table = pd.DataFrame({"layer": [1, 2, 3] * 3, "label": ["a"] * 3 + ["b"] * 3 + ["c"] * 3,
                          "probe": np.arange(9.0) ** 2})
    figure = per_layer_figure(table, value="probe")
    drawn = lines(figure)
    assert len(drawn) == 3
    for line, label in zip(drawn, "abc"):
        np.testing.assert_array_equal(line.get_ydata(), table.loc[table["label"] == label, "probe"])
    assert [t.get_text() for t in figure.axes[0].get_legend().get_texts()] == ["a", "b", "c"]


def test_log_scale_by_default_only_for_fd_or_positive_values_over_two_decades():
    assert wants_log_scale([1.0, 2.0], "fd")
    assert not wants_log_scale([0.0, 2.0], "fd")           # a zero cannot go on a log axis
    assert wants_log_scale([0.5, 80.0], "cka") is True       # 2.2 decades
    assert not wants_log_scale([0.5, 40.0], "cka")           # 1.9 decades
    assert not wants_log_scale([-1.0, 400.0], "cka")
    table = pd.DataFrame({"layer": [1, 2, 3], "gap": [0.01, 0.5, 7.0]})
    assert per_layer_figure(table, value="gap").axes[0].get_yscale() == "log"
    assert per_layer_figure(table, value="gap", log=False).axes[0].get_yscale() == "linear"


def test_bad_input_is_named():
    table = pd.DataFrame({"layer": [1, 2], "fd": [1.0, 2.0], "name": ["x", "y"]})
    with pytest.raises(ValueError, match=r"no column 'norm_ratio' \(columns: \['layer', 'fd', 'name'\]\)"):
        per_layer_figure(table, value="norm_ratio")
    with pytest.raises(ValueError, match="no column 'layer' or 'value'"):
        per_layer_figure(pd.DataFrame({"k": [1]}), value="value")
    with pytest.raises(ValueError, match="column 'name' is not numeric"):
        per_layer_figure(table, value="name")
    with pytest.raises(ValueError, match="needs a MIRResult .* got list"):
        per_layer_figure([1.0, 2.0])
    with pytest.raises(ValueError, match="several rows for layer 1; give each run its own 'label'"):
        per_layer_figure(pd.DataFrame({"layer": [1, 1, 2], "fd": [1.0, 2.0, 3.0]}))
    with pytest.raises(ValueError, match="several rows for layer 2 of label 'b'"):
        per_layer_figure(pd.DataFrame({"layer": [1, 2, 2], "label": ["b"] * 3, "fd": [1.0, 2.0, 3.0]}))
    with pytest.raises(ValueError, match="log scale needs positive values, column 'delta' has minimum -1"):
        per_layer_figure(pd.DataFrame({"layer": [1, 2], "delta": [-1.0, 2.0]}), value="delta", log=True)


def test_save_writes_a_png_and_closes_the_figure(tmp_path):
    before = plt.get_fignums()
    path = save_per_layer_figure(mir_result(), tmp_path / "mir.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = pd.DataFrame({"layer": [1, 2], "norm_ratio": [1.0, 1.5]})
    other = save_per_layer_figure(table, tmp_path / "norms.png", title="norms", value="norm_ratio")
    assert other.stat().st_size > 1000
    assert plt.get_fignums() == before
