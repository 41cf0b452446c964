"""Seaborn figures of per-layer results: MIR's FD_k or any other per-layer metric."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

# y-axis labels of known per-layer columns; any other column is labelled with its own name
LABELS = {"fd": "FD$_k$ (image vs text rows)", "scale": "text-centric scale s$_k$"}


def per_layer_table(result_or_table, value: str = "fd", what: str = "per_layer_figure") -> pd.DataFrame:
    """The per-layer DataFrame of a result (its ``per_layer``) or the DataFrame itself, checked: it has a
    ``layer`` column and a numeric ``value`` column, and one row per layer (per ``label`` when there is one)."""
    table = getattr(result_or_table, "per_layer", result_or_table)
    if not isinstance(table, pd.DataFrame):
        raise ValueError(f"{what} needs a MIRResult (or any result with a per_layer DataFrame) or a DataFrame, "
                         f"got {type(result_or_table).__name__}")
    missing = [c for c in ("layer", value) if c not in table.columns]
    if missing:
        raise ValueError(f"{what}: the table has no column {' or '.join(map(repr, missing))} "
                         f"(columns: {list(table.columns)})")
    if not pd.api.types.is_numeric_dtype(table[value]):
        raise ValueError(f"{what}: column {value!r} is not numeric (dtype {table[value].dtype})")
    keys = ["label", "layer"] if "label" in table.columns else ["layer"]
    repeated = table[table.duplicated(keys)]
    if len(repeated):
        layer = repeated["layer"].iloc[0]
        raise ValueError(f"{what}: several rows for layer {layer}"
                         + (f" of label {repeated['label'].iloc[0]!r}" if "label" in keys else "")
                         + "; give each run its own 'label' to draw one line per run")
    return table


def wants_log_scale(values, value: str = "fd") -> bool:
    """The default y scale: logarithmic for FD (it spans decades across layers) and for any column whose
    values are all positive and span more than two decades (max / min > 100); linear otherwise."""
    values = np.asarray(values, dtype=np.float64)
    values = values[~np.isnan(values)]
    if len(values) == 0 or not (values > 0).all():
        return False
    return bool(value == "fd" or values.max() / values.min() > 100.0)


def per_layer_figure(result_or_table, value: str = "fd", title: str | None = None, ax=None,
                     log: bool | None = None):
    """Line plot of a per-layer value against the layer index k; returns the Figure.

    result_or_table: a MIRResult (its ``per_layer`` table; ``value="fd"`` plots FD_k) or any DataFrame with a
    ``layer`` column and the numeric ``value`` column; several runs: add a ``label`` column, one line each.
    log: y on a log scale; None chooses (`wants_log_scale`): FD and positive values spanning > 2 decades.
    The y label is LABELS[value] for known columns, else the column name. Default title for a MIRResult
    plotting FD: its MIR.
    """
    import matplotlib.pyplot as plt
    import seaborn as sns

    table = per_layer_table(result_or_table, value)
    if log is None:
        log = wants_log_scale(table[value], value)
    elif log and not (table[value].dropna() > 0).all():
        raise ValueError(f"per_layer_figure: log scale needs positive values, column {value!r} has "
                         f"minimum {table[value].min():.4g}")
    if ax is None:
        _, ax = plt.subplots(figsize=(7, 3.5), layout="constrained")
    hue = "label" if "label" in table.columns else None
    sns.lineplot(data=table, x="layer", y=value, hue=hue, marker="o", estimator=None, ax=ax)
    if log:
        ax.set_yscale("log")
    ax.set_xlabel("decoder layer k")
    ax.set_ylabel(LABELS.get(value, value))
    if title is None and value == "fd" and hasattr(result_or_table, "mir"):
        title = f"MIR = log10(sum FD) = {result_or_table.mir:.4f}  ({result_or_table.method})"
    if title:
        ax.set_title(title)
    return ax.figure


def save_per_layer_figure(result, path: str | Path, title: str | None = None, value: str = "fd",
                          log: bool | None = None) -> Path:
    """per_layer_figure written to ``path`` (PNG at 150 dpi); the figure is closed afterwards."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    figure = per_layer_figure(result, value=value, title=title, log=log)
    path = Path(path)
    try:
        figure.savefig(path, dpi=150)
    finally:
        plt.close(figure)
    return path
