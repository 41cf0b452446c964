"""LayerExplorer: an ipywidgets view of cached hidden states, one decoder layer at a time.

    explorer = LayerExplorer(hidden_states)        # mirlab.HiddenStates (e.g. from a cache_dir)
    explorer                                       # in Jupyter: slider + modality toggles + figure
    LayerExplorer(hidden_states, table=df, value="norm_ratio")   # any per-layer column in panel (c)
    explorer.slider.value = 12                     # or drive it from code; explorer.current_data()

For the selected layer k with image rows V and text rows T (as `hidden_states.layer(k)` returns them):

    s   = 1 / mean_j ||T_j||                       text-centric scale, as MIR applies it (`prepare_layer`
                                                   with outliers="none": rows upcast to float64, then scaled)
    (a) PCA: the rows of s V and s T (together) centred on their joint mean and projected on the two leading
        principal directions (eigenvectors of the centred scatter matrix); a component's sign is fixed so that
        its loading of largest magnitude is positive (deterministic pictures)
    (b) histograms of the normalized row norms s ||x|| per modality (text mean = 1, so the image histogram
        shows the norm gap directly)
    (c) a per-layer value, layer k highlighted: by default FD_k of a MIRResult computed once (pass `result=`
        to reuse one); or the `value` column of any per-layer `table` (a DataFrame with a `layer` column, or a
        result holding one as `per_layer`), e.g. a probe beside MIR -- then no MIR is computed. Log scale as
        in `mirlab.plots.wants_log_scale` (FD, or positive values spanning more than two decades).

Nothing re-runs the model: a move reads one layer from the cache (each layer's picture is kept once
computed). With more than `max_points` rows in a modality, a seeded subset of that many rows is drawn
(the `row` column of `current_data()` says which). The figure is a plain matplotlib Figure rendered to a
PNG `Image` widget, so it needs no interactive matplotlib backend, and it has an explicit white background
with dark text: readable in light and dark JupyterLab themes.
"""
from __future__ import annotations

import io

import numpy as np
import pandas as pd
import torch

from mirlab.metrics.mir import compute_mir
from mirlab.metrics.normalize import prepare_layer, row_norms
from mirlab.plots import per_layer_table, wants_log_scale

MODALITIES = ("image", "text")
PALETTE = {"image": "#d95f02", "text": "#1b9e77"}
BAR_COLOR, HIGHLIGHT = "#b8c4d6", "#e7298a"


def pca_2d(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(projections (n, 2), explained variance ratio (2,)) of rows centred on their mean, signs fixed.

    The components are the two leading eigenvectors of X_c^T X_c (= the leading right singular vectors of
    the centred rows X_c); each is flipped so that its largest-magnitude loading is positive.
    """
    centred = rows - rows.mean(axis=0)
    eigenvalues, eigenvectors = (t.numpy() for t in torch.linalg.eigh(torch.from_numpy(centred.T @ centred)))
    components = eigenvectors[:, ::-1][:, :2].T  # eigh sorts ascending
    signs = np.sign(components[np.arange(2), np.abs(components).argmax(axis=1)])
    components = components * signs[:, None]
    return centred @ components.T, eigenvalues[::-1][:2] / eigenvalues.sum()


def _subset(n_rows: int, max_points: int, rng: np.random.Generator) -> np.ndarray:
    return np.arange(n_rows) if n_rows <= max_points else np.sort(rng.choice(n_rows, max_points, replace=False))


class LayerExplorer:
    """Slider over the extracted layers, modality toggles, and a 3-panel figure of the selected layer."""

    def __init__(self, hidden_states, result=None, layer: int | None = None, max_points: int = 2000,
                 seed: int = 0, table=None, value: str = "fd"):
        import ipywidgets as widgets

        self.hidden_states = hidden_states
        self.layers = [int(k) for k in hidden_states.layers]
        if not self.layers:
            raise ValueError("hidden_states holds no layers")
        if table is not None and result is not None:
            raise ValueError("give either result= (a MIRResult) or table= (any per-layer table), not both")
        if table is None:  # MIR: the given result, else computed once over the cache
            self.result = result if result is not None else compute_mir(hidden_states)
            table, source = self.result, "MIR result"
        else:
            self.result, source = None, "table"
        self.value = value
        values = per_layer_table(table, value, what="LayerExplorer")
        if "label" in values.columns and values["label"].nunique() > 1:
            raise ValueError(f"LayerExplorer shows one run; the table has labels {sorted(values['label'].unique())}"
                             f" (select one first)")
        values = values.set_index("layer")[value]
        missing = sorted(set(self.layers) - set(values.index))
        if missing:
            raise ValueError(f"the {source} has no {'FD' if value == 'fd' else repr(value)} for layers {missing} "
                             f"of the hidden states")
        self.values = values.loc[self.layers]
        if max_points < 2:
            raise ValueError(f"max_points must be at least 2, got {max_points}")
        self.max_points, self.seed = int(max_points), seed
        self._cache: dict[int, tuple[pd.DataFrame, dict]] = {}

        start = self.layers[0] if layer is None else layer
        if start not in self.layers:
            raise ValueError(f"layer {start} was not extracted; available: {self.layers}")
        self.slider = widgets.SelectionSlider(options=self.layers, value=start, description="layer",
                                              continuous_update=False, layout=widgets.Layout(width="420px"))
        self.show = {m: widgets.ToggleButton(value=True, description=f"{m} tokens", icon="check",
                                             tooltip=f"show the {m} rows") for m in MODALITIES}
        for toggle in self.show.values():  # the check mark says whether a modality is shown
            toggle.observe(lambda change: setattr(change["owner"], "icon", "check" if change["new"] else ""),
                           names="value")
        self.image = widgets.Image(format="png")
        self.widget = widgets.VBox([widgets.HBox([self.slider, *self.show.values()]), self.image])
        self.widget.add_class("mirlab-layer-explorer")
        self.figure, self.axes = self._make_figure()
        self.slider.observe(lambda _: self.render(), names="value")
        for toggle in self.show.values():
            toggle.observe(lambda _: self.render(), names="value")
        self.render()

    # --- state ----------------------------------------------------------------------------------------------

    @property
    def layer(self) -> int:
        return int(self.slider.value)

    @layer.setter
    def layer(self, value: int) -> None:
        if value not in self.layers:
            raise ValueError(f"layer {value} was not extracted; available: {self.layers}")
        self.slider.value = value

    @property
    def visible(self) -> list[str]:
        return [m for m in MODALITIES if self.show[m].value]

    def layer_data(self, layer: int) -> tuple[pd.DataFrame, dict]:
        """(points, info) of one layer: points has modality, row, pc1, pc2, norm; info the scale and PCA."""
        if layer not in self._cache:
            prepared = prepare_layer(*self.hidden_states.layer(layer), outliers="none", layer=layer)
            image, text = (x.cpu().numpy() if isinstance(x, torch.Tensor) else x
                           for x in (prepared.image, prepared.text))  # s V, s T in float64
            scale = prepared.scale
            rng = np.random.default_rng([self.seed, layer])
            picks = {m: _subset(len(x), self.max_points, rng) for m, x in zip(MODALITIES, (image, text))}
            rows = np.concatenate([image[picks["image"]], text[picks["text"]]])
            projected, explained = pca_2d(rows)
            points = pd.DataFrame({
                "modality": np.repeat(MODALITIES, [len(picks["image"]), len(picks["text"])]),
                "row": np.concatenate([picks["image"], picks["text"]]),
                "pc1": projected[:, 0], "pc2": projected[:, 1], "norm": row_norms(rows)})
            info = {"layer": layer, "scale": scale, "explained": explained,
                    "norm_ratio": float(row_norms(image).mean())}
            self._cache[layer] = (points, info)
        return self._cache[layer]

    def current_data(self) -> pd.DataFrame:
        """The points drawn for the selected layer and visible modalities (modality, row, pc1, pc2, norm)."""
        points, _ = self.layer_data(self.layer)
        return points[points["modality"].isin(self.visible)].reset_index(drop=True)

    # --- drawing --------------------------------------------------------------------------------------------

    def _make_figure(self):
        import seaborn as sns
        from matplotlib.figure import Figure

        with sns.axes_style("whitegrid"), sns.plotting_context("notebook", font_scale=0.85):
            figure = Figure(figsize=(13, 3.9), facecolor="white", layout="constrained")
            panels = figure.subplots(1, 3, gridspec_kw={"width_ratios": [1, 1, 1.3]})
        return figure, dict(zip(("pca", "norms", "fd"), panels))

    def render(self) -> None:
        """Redraw the three panels for the selected layer and refresh the PNG in the widget."""
        import seaborn as sns
        from matplotlib.ticker import LogLocator, NullFormatter, StrMethodFormatter

        _, info = self.layer_data(self.layer)
        shown = self.current_data()
        for ax in self.axes.values():
            ax.clear()
        pca, norms, fd = self.axes["pca"], self.axes["norms"], self.axes["fd"]
        if len(shown):
            sns.scatterplot(data=shown, x="pc1", y="pc2", hue="modality", palette=PALETTE, s=9, alpha=0.6,
                            linewidth=0, ax=pca)
            sns.histplot(data=shown, x="norm", hue="modality", palette=PALETTE, stat="density",
                         common_norm=False, element="step", log_scale=True, bins=40, ax=norms)
        else:
            for ax in (pca, norms):
                ax.text(0.5, 0.5, "no modality selected", ha="center", va="center", transform=ax.transAxes)
        explained = info["explained"]
        pca.set(title=f"layer {self.layer}: PCA of normalized rows", xlabel=f"PC1 ({100 * explained[0]:.0f}%)",
                ylabel=f"PC2 ({100 * explained[1]:.0f}%)")
        norms.set(title=f"normalized row norms (image/text mean = {info['norm_ratio']:.2f})",
                  xlabel="||x|| / mean text norm")
        if len(shown):  # plain numbers at 1, 1.5, 2, 3, 5, 7 x 10^n on the log axis (not "3x10^0" labels)
            norms.xaxis.set_major_locator(LogLocator(subs=(1, 1.5, 2, 3, 5, 7)))
            norms.xaxis.set_major_formatter(StrMethodFormatter("{x:g}"))
            norms.xaxis.set_minor_formatter(NullFormatter())
        colors = [HIGHLIGHT if k == self.layer else BAR_COLOR for k in self.layers]
        fd.bar(self.layers, self.values.to_numpy(), color=colors, width=0.8)
        if wants_log_scale(self.values, self.value):
            fd.set_yscale("log")
        current = self.values.loc[self.layer]
        if self.value == "fd" and self.result is not None:
            title, ylabel = (f"FD per layer (MIR = {self.result.mir:.3f}); FD$_{{{self.layer}}}$ = "
                             f"{current:.3g}"), "FD$_k$"
        else:
            title, ylabel = f"{self.value} per layer; layer {self.layer}: {current:.3g}", self.value
        fd.set(title=title, xlabel="decoder layer k", ylabel=ylabel)
        for ax in self.axes.values():
            ax.set_facecolor("white")
        buffer = io.BytesIO()
        self.figure.savefig(buffer, format="png", dpi=90, facecolor="white")
        self.image.value = buffer.getvalue()

    # --- display --------------------------------------------------------------------------------------------

    def _repr_mimebundle_(self, **kwargs):
        bundle = self.widget._repr_mimebundle_(**kwargs)
        bundle["text/plain"] = repr(self)
        return bundle

    def __repr__(self) -> str:
        about = f"MIR {self.result.mir:.4f}" if self.result is not None else f"{self.value} per layer"
        return (f"LayerExplorer(layer {self.layer} of {self.layers[0]}..{self.layers[-1]}, "
                f"showing {' + '.join(self.visible) or 'nothing'}, {about})")
