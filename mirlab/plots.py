"""Seaborn figures of MIR results."""
from __future__ import annotations

from pathlib import Path

import pandas as pd


def per_layer_figure(result, title: str | None = None, ax=None):
    """Line plot of the per-layer Fréchet distance FD_k (log scale) against the layer index k.

    result: a MIRResult (its ``per_layer`` table and ``mir`` are used) or a DataFrame with columns
    ``layer`` and ``fd`` (several runs: add a ``label`` column, one line each). Returns the Figure.
    """
    import matplotlib.pyplot as plt
    import seaborn as sns

    table = result.per_layer if hasattr(result, "per_layer") else result
    if not isinstance(table, pd.DataFrame) or not {"layer", "fd"} <= set(table.columns):
        raise ValueError("per_layer_figure needs a MIRResult or a DataFrame with columns 'layer' and 'fd'")
    if ax is None:
        _, ax = plt.subplots(figsize=(7, 3.5), layout="constrained")
    hue = "label" if "label" in table.columns else None
    sns.lineplot(data=table, x="layer", y="fd", hue=hue, marker="o", ax=ax)
    ax.set_yscale("log")
    ax.set_xlabel("decoder layer k")
    ax.set_ylabel("FD$_k$ (image vs text rows)")
    if title is None and hasattr(result, "mir"):
        title = f"MIR = log10(sum FD) = {result.mir:.4f}  ({result.method})"
    if title:
        ax.set_title(title)
    return ax.figure


def save_per_layer_figure(result, path: str | Path, title: str | None = None) -> Path:
    """per_layer_figure written to ``path`` (PNG at 150 dpi); the figure is closed afterwards."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    figure = per_layer_figure(result, title=title)
    path = Path(path)
    figure.savefig(path, dpi=150)
    plt.close(figure)
    return path
