"""Modality Integration Rate: per-layer Fréchet distances of normalized token clouds, summed, log10.

For every decoder layer k with image rows V_k and text rows T_k (docs/mir.md):

    s_k   = 1 / mean_j ||T_k,j||_2                       (text-centric scale)
    V', T' = outlier-handled (s_k V_k), (s_k T_k)        (3-sigma on row norms, per modality)
    FD_k  = FD(V', T')                                   (Fréchet distance of Gaussian fits)
    MIR   = log10( sum_k FD_k )                          lower = better integrated modalities

compute_mir consumes the layers one at a time (a generator is fine), so peak memory is about one layer.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import numpy as np
import pandas as pd
import torch

from mirlab.metrics.frechet import METHODS, frechet_distance
from mirlab.metrics.normalize import OUTLIER_MODES, prepare_layer

COLUMNS = ["layer", "fd", "scale", "n_image", "n_text", "image_outliers", "text_outliers"]
_INT_COLUMNS = ["layer", "n_image", "n_text", "image_outliers", "text_outliers"]


@dataclass
class MIRResult:
    """MIR of one model on one set of pairs: `.mir` = log10(sum of `.per_layer.fd`)."""
    mir: float
    per_layer: pd.DataFrame
    method: str = "exact"
    outliers: str = "replace"
    n_sigma: float = 3.0
    meta: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Plain Python types only (json-ready); per_layer as a list of row dicts."""
        rows = [
            {c: (int(r[c]) if c in _INT_COLUMNS else float(r[c])) for c in COLUMNS}
            for r in self.per_layer.to_dict(orient="records")
        ]
        return {"mir": float(self.mir), "method": self.method, "outliers": self.outliers,
                "n_sigma": float(self.n_sigma), "meta": dict(self.meta), "per_layer": rows}

    def to_json(self, path: str | None = None, indent: int | None = 1) -> str:
        """JSON text (floats written with repr, so from_json gives back identical numbers); optional file."""
        text = json.dumps(self.to_dict(), indent=indent)
        if path is not None:
            with open(path, "w", encoding="utf-8") as f:
                f.write(text)
        return text

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "MIRResult":
        return cls(mir=float(data["mir"]), per_layer=_layer_frame(data["per_layer"]),
                   method=data["method"], outliers=data["outliers"],
                   n_sigma=float(data["n_sigma"]), meta=dict(data.get("meta", {})))

    @classmethod
    def from_json(cls, text_or_path: str) -> "MIRResult":
        """Inverse of to_json: accepts the JSON text or a path to a file holding it."""
        text = text_or_path
        if not text_or_path.lstrip().startswith("{"):
            with open(text_or_path, encoding="utf-8") as f:
                text = f.read()
        return cls.from_dict(json.loads(text))

    def __repr__(self) -> str:
        fd = self.per_layer["fd"]
        return (f"MIRResult(mir={self.mir:.4f}, method={self.method!r}, outliers={self.outliers!r}, "
                f"layers={len(fd)}, fd range=[{fd.min():.4g}, {fd.max():.4g}])")

    def _repr_html_(self) -> str:
        head = (f"<p><b>MIR = {self.mir:.4f}</b> &nbsp; method <code>{self.method}</code>, "
                f"outliers <code>{self.outliers}</code> ({self.n_sigma:g}&sigma;), "
                f"{len(self.per_layer)} layers</p>")
        return head + self.per_layer.to_html(index=False, float_format=lambda v: f"{v:.6g}")


def _layer_frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    frame = pd.DataFrame(rows, columns=COLUMNS)
    return frame.astype({c: "int64" for c in _INT_COLUMNS} | {"fd": "float64", "scale": "float64"})


def _unpack(item, position: int):
    """(layer, image, text) from a (image, text) pair (layer = position) or a (layer, image, text) triple."""
    if not isinstance(item, (tuple, list)) or len(item) not in (2, 3):
        raise ValueError(f"layer item {position}: expected (image_rows, text_rows) or "
                         f"(layer_index, image_rows, text_rows), got {type(item).__name__}")
    if len(item) == 2:
        return position, item[0], item[1]
    layer, image, text = item
    if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)):
        raise ValueError(f"layer item {position}: layer index must be an int, got {layer!r}")
    return int(layer), image, text


def each_layer(layers: Iterable, measure: Callable[[Any, Any, int], dict], desc: str,
               progress: bool = False) -> list[dict]:
    """[measure(image_rows, text_rows, layer) for every layer], consuming ``layers`` one layer at a time.

    layers: (image_rows, text_rows) per layer (numbered 1, 2, ...) or (layer, image_rows, text_rows) triples.
    A layer number that appears twice, or no layer at all, is a ValueError; ``desc`` names the progress bar.
    """
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(desc=desc, unit="layer")
    rows, seen, position = [], set(), 0
    # a plain loop with `del`: enumerate() and tqdm's iterator would keep the previous layer alive
    # while the next one is being produced, doubling peak memory
    for item in layers:
        position += 1
        layer, image, text = _unpack(item, position)
        del item
        if layer in seen:
            raise ValueError(f"layer {layer} appears twice")
        seen.add(layer)
        rows.append(measure(image, text, layer))
        del image, text
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    if not rows:
        raise ValueError("no layers: the layer iterable was empty")
    return rows


def layer_fd(image, text, method: str = "exact", outliers: str = "replace", n_sigma: float = 3.0,
             layer: int | str = "?") -> dict[str, Any]:
    """One layer of MIR: `prepare_layer` (scale s = 1/mean text norm, 3-sigma rule), then FD of the result.

    The rows are upcast before any arithmetic: float64 for method="exact" (so MIR does not depend on the dtype
    the hidden states were stored in), float32 for the official methods (the official script's arithmetic).
    The official script stays in float32 throughout (docs/paper-differences.md, 'Float64 before any arithmetic').
    Returns a per_layer row: layer, fd, scale, n_image, n_text, image_outliers, text_outliers.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    dtype = torch.float64 if method == "exact" else torch.float32
    prepared = prepare_layer(image, text, outliers, n_sigma, layer, dtype=dtype)
    try:
        fd = frechet_distance(prepared.image, prepared.text, method=method)
    except ValueError as err:
        raise ValueError(f"layer {layer}: {err}") from None
    dropped = outliers == "drop"  # n_image / n_text count the rows given, before any were dropped
    return {"layer": layer, "fd": fd, "scale": prepared.scale,
            "n_image": int(prepared.image.shape[0]) + dropped * prepared.image_outliers,
            "n_text": int(prepared.text.shape[0]) + dropped * prepared.text_outliers,
            "image_outliers": prepared.image_outliers, "text_outliers": prepared.text_outliers}


def compute_mir(layers: Iterable, method: str = "exact", outliers: str = "replace",
                n_sigma: float = 3.0, progress: bool = False) -> MIRResult:
    """MIR = log10(sum_k FD_k) over an iterable of layers, consumed one layer at a time.

    layers yields (image_rows, text_rows) per layer, numbered 1, 2, ... in order, or
    (layer_index, image_rows, text_rows) triples (e.g. to pass a subset of layers).
    method: "exact" | "official-fast" | "official-accurate" (see mirlab.metrics.frechet).
    outliers: "replace" (official) | "drop" | "none".
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if outliers not in OUTLIER_MODES:
        raise ValueError(f"outliers must be one of {OUTLIER_MODES}, got {outliers!r}")
    rows = each_layer(layers, lambda image, text, layer: layer_fd(image, text, method, outliers, n_sigma, layer),
                      f"MIR ({method})", progress)
    per_layer = _layer_frame(rows)
    total = math.fsum(per_layer["fd"])  # correctly rounded: the same MIR whatever the summation order
    if not total > 0:
        raise ValueError(f"sum of per-layer FD is {total:.6g}: MIR = log10(sum) is undefined")
    return MIRResult(math.log10(total), per_layer, method, outliers, float(n_sigma))
