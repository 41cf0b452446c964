"""MIR of a model on (image, text) pairs, end to end: load -> pairs -> hidden states -> MIR -> files.

    run_mir("path/to/model", images="textvqa/train_images", texts="cnn/stories", eval_num=100, out_dir="out")

writes ``out/mir.json`` (MIRResult.to_json, with the run's settings in ``meta``), ``out/per_layer.csv`` and
``out/per_layer.png``.

    run_probes("mirlab/tiny-llava", images, captions, eval_num=64, out_dir="probes")

runs the modality-bias probes beside MIR (mirlab.metrics.probes on the extracted rows, mirlab.lvlm.probes with
extra forward passes) and writes ``probes.csv`` (layer, probe, value), one PNG per probe and the per-pair and
per-token tables.
"""
from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from mirlab.errors import UserError
from mirlab.lvlm.extract import extract_hidden_states
from mirlab.lvlm.models import finish_loading, load_pretrained, resolve_dtype
from mirlab.metrics.probes import ROW_PROBES
from mirlab.pairs.readers import Pairs, folder_pairs, jsonl_pairs

EMBEDDED_MODEL = "mirlab/tiny-llava"


def load_model(name_or_path: str = EMBEDDED_MODEL, dtype=None, device_map=None, base_llm: str | None = None,
               trust_remote_code: bool = False, **kwargs):
    """(model, processor) of any image-text-to-text model, or of mirlab's embedded offline model.

    name_or_path: "mirlab/tiny-llava" (the embedded model with its shipped projector "final"),
        "mirlab/tiny-llava@<checkpoint>" (e.g. "@random", "@lr2e-3/step-0128"; see
        `mirlab.tiny.embedded_checkpoints()`), or a local folder / Hub id (see `mirlab.lvlm.load_pretrained`).
    dtype: torch dtype or its name; device_map: accelerate's device map for Hub models. For the embedded model
        (one small module) device_map may be None, "auto" (CUDA if available, else CPU), a device name or a
        torch.device, or {"": device}; the whole model goes there.
    base_llm, trust_remote_code, kwargs: see `mirlab.lvlm.load_pretrained`. The embedded model takes no
        `from_pretrained` options: any kwargs are an error naming them (never silently dropped); it ships no code of
        its own, so trust_remote_code (a permission, not an action) changes nothing for it.
    """
    name, _, checkpoint = str(name_or_path).partition("@")
    if name != EMBEDDED_MODEL:
        return load_pretrained(name_or_path, dtype=dtype, device_map=device_map, base_llm=base_llm,
                               trust_remote_code=trust_remote_code, **kwargs)
    if kwargs:
        raise TypeError(f"load_model({name_or_path!r}): the embedded model takes no from_pretrained options, "
                        f"got {sorted(kwargs)}")
    from mirlab.tiny.build import embedded_model

    dtype = resolve_dtype(dtype)
    device = _single_device(device_map, name_or_path)
    model, processor = embedded_model(checkpoint) if checkpoint else embedded_model()
    if dtype is not None or device is not None:
        model = model.to(device=device, dtype=dtype)
    return finish_loading(model, processor, base_llm)


def _single_device(device_map, name):
    """The one device a small model goes to, from a device_map value (None: leave it where it is)."""
    import torch

    if device_map is None:
        return None
    if device_map == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if isinstance(device_map, dict):
        devices = set(device_map.values())
        if len(devices) != 1:
            raise ValueError(f"load_model({name!r}): the embedded model is small and goes to one device; "
                             f"device_map {device_map!r} names {len(devices)}")
        device_map = devices.pop()
    try:
        return torch.device(device_map)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"load_model({name!r}): device_map {device_map!r} is not a device: {err}") from None


def check_writable_folder(path, what: str) -> Path:
    """``path`` as a Path if it is, or can become, a folder mirlab may write to; else UserError naming ``what``.

    Tried, not guessed (permission bits lie for root and on read-only mounts): a temporary folder is made and
    removed in ``path`` or, if ``path`` does not exist yet, in its nearest existing ancestor. Nothing is created.
    """
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise UserError(f"{what} {path} is a file, not a folder: give a folder path or move the file away")
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"{what} {path} cannot be created: {existing} is a file, not a folder")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".mirlab-write-test-", dir=existing))
    except OSError as err:
        raise UserError(f"{what} {path} cannot be written ({err.strerror or err} in {existing}): give a folder "
                        f"you can write to") from None
    return path


def _pairs(images, texts, pairs_file, eval_num, seed, on_error) -> Pairs:
    if pairs_file is not None:
        if images is not None or texts is not None:
            raise ValueError("give either a pairs JSONL file or images + texts, not both")
        return jsonl_pairs(pairs_file, n=eval_num, seed=seed)
    if images is None or texts is None:
        raise ValueError("need images and texts (folders or lists), or a pairs JSONL file")
    if isinstance(images, (str, Path)) and isinstance(texts, (str, Path)):
        return folder_pairs(images, texts, n=eval_num, seed=seed, on_error=on_error)
    if isinstance(images, (str, Path)) or isinstance(texts, (str, Path)):
        raise ValueError("images and texts must both be folders or both be lists")
    pairs = Pairs(list(images), list(texts))
    if eval_num is not None:
        if eval_num > len(pairs):
            raise ValueError(f"asked for {eval_num} pairs but only {len(pairs)} were given")
        pairs = Pairs(pairs.images[:eval_num], pairs.texts[:eval_num], pairs.names[:eval_num])
    return pairs


def _checked_inputs_then_model(model, images, texts, pairs_file, eval_num, seed, on_error, cache_dir, out_dir,
                               load_options: dict):
    """(pairs, model, processor): the folders and the pairs are checked first, then the model is loaded (unless
    ``model`` is already a loaded ``(model, processor)`` tuple), so a bad input fails before a slow load."""
    for folder, what in ((cache_dir, "cache_dir"), (out_dir, "out_dir")):
        if folder is not None:
            check_writable_folder(folder, what)
    data = _pairs(images, texts, pairs_file, eval_num, seed, on_error)
    if isinstance(model, (tuple, list)):
        model, processor = model
    else:
        model, processor = load_model(model, **load_options)
    return data, model, processor


def run_mir(model=EMBEDDED_MODEL, images=None, texts=None, *, pairs_file=None, eval_num: int | None = 100,
            seed: int = 0, method: str = "exact", outliers: str = "replace", batch_size: int = 8,
            cache_dir=None, out_dir=None, base_llm=None, dtype=None, device_map=None,
            text_span: str = "after_image", layers=None, include_embeddings: bool = False,
            max_text_tokens: int | None = None, store_dtype: str = "float32", on_error: str = "raise",
            progress: bool = True, trust_remote_code: bool = False):
    """MIR of ``model`` on ``eval_num`` pairs; returns the MIRResult (and writes files if ``out_dir``).

    model: name / folder / Hub id (see ``load_model``; ``base_llm``, ``dtype``, ``device_map``,
        ``trust_remote_code`` go there) or an already loaded ``(model, processor)`` tuple.
    images, texts: two folders (drawn with ``seed``, see mirlab.pairs.readers) or two equal-length lists (the first
        ``eval_num`` are used); or ``pairs_file``: a JSONL of {"image", "text"}.
    method / outliers: see ``mirlab.compute_mir``. The remaining options: see ``extract_hidden_states``
        (``on_error="skip"`` also leaves out pairs whose text file is unusable, see ``folder_pairs``).

    Inputs are checked before the model is loaded: the pairs are read and ``cache_dir`` / ``out_dir`` must be
    writable folders (UserError naming them otherwise).
    """
    from mirlab.metrics.mir import compute_mir

    data, model, processor = _checked_inputs_then_model(
        model, images, texts, pairs_file, eval_num, seed, on_error, cache_dir, out_dir,
        dict(dtype=dtype, device_map=device_map, base_llm=base_llm, trust_remote_code=trust_remote_code))
    states = extract_hidden_states(model, processor, data.images, data.texts, batch_size=batch_size,
                                   layers=layers, include_embeddings=include_embeddings, text_span=text_span,
                                   max_text_tokens=max_text_tokens, store_dtype=store_dtype,
                                   cache_dir=cache_dir, on_error=on_error, names=data.names, progress=progress)
    result = compute_mir(states, method=method, outliers=outliers, progress=progress)
    result.meta.update({
        "model": str(getattr(model, "name_or_path", "")), "base_llm": None if base_llm is None else str(base_llm),
        "n_pairs": states.n_pairs, "skipped": data.skipped + states.skipped, "eval_num": eval_num, "seed": seed,
        "text_span": text_span, "layers": states.layers, "batch_size": batch_size,
        "hidden_states": str(states.path) if cache_dir is not None else None,
    })
    if out_dir is not None:
        write_outputs(result, out_dir)
    return result


def write_outputs(result, out_dir, value: str = "fd", name: str = "mir") -> dict[str, Path]:
    """``<name>.json``, ``per_layer.csv`` and ``per_layer.png`` of a per-layer result in ``out_dir`` (created).

    result: a MIRResult, any object with a ``per_layer`` DataFrame (and optionally ``to_json(path)``), or the
    DataFrame itself; the table needs a ``layer`` column and the numeric ``value`` column the figure plots
    (MIR: "fd"). The JSON is written only for a result object with ``to_json`` (not for a bare table).
    """
    from mirlab.plots import per_layer_table, save_per_layer_figure

    table = per_layer_table(result, value, what="write_outputs")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"csv": out_dir / "per_layer.csv", "png": out_dir / "per_layer.png"}
    if result is not table and hasattr(result, "to_json"):
        paths = {"json": out_dir / f"{name}.json", **paths}
        result.to_json(str(paths["json"]))
    table.to_csv(paths["csv"], index=False)
    save_per_layer_figure(result, paths["png"], value=value)  # a MIRResult's FD figure is titled with its MIR
    return paths


# --- modality-bias probes --------------------------------------------------------------------------------------------

# the row probes read the extracted rows (no extra forward pass); the others run the model again
PROBES = (*ROW_PROBES, "visual_dependence", "attention_share", "logit_lens")

# figure -> the per-layer columns it draws (one line each; attention_share: every attention_share* column)
PROBE_FIGURES = {
    "norm_ratio": ("norm_ratio",),
    "modality_gap": ("modality_gap", "mean_cosine"),
    "effective_rank": ("image_effective_rank", "text_effective_rank"),
    "participation_ratio": ("image_participation_ratio", "text_participation_ratio"),
    "cka": ("cka", "cka_shuffled"),
    "mutual_knn": ("mutual_knn", "mutual_knn_shuffled", "mutual_knn_chance"),
    "attention_share": ("attention_share",),
}


@dataclass
class ProbeResult:
    """The probes of one model on one set of pairs.

    per_layer: wide per-layer table (a ``layer`` column, one column per probe value: plots, LayerExplorer and
        ``mirlab.cli.summary`` take it with ``value=<column>``); ``tidy`` is its (layer, probe, value) form.
    visual_dependence: per pair (``mirlab.lvlm.probes.visual_dependence``); logit_lens: per layer, the most
        frequent tokens of the image rows (``mirlab.lvlm.probes.logit_lens``). None when not asked for.
    """
    per_layer: pd.DataFrame
    visual_dependence: pd.DataFrame | None = None
    logit_lens: pd.DataFrame | None = None
    meta: dict = field(default_factory=dict)

    @property
    def tidy(self) -> pd.DataFrame:
        from mirlab.metrics.probes import tidy_probes
        return tidy_probes(self.per_layer)

    def figure_table(self, figure: str) -> pd.DataFrame | None:
        """(layer, label, <figure>) rows of the columns PROBE_FIGURES[figure] names (one line per label), the
        wide table itself for a one-column figure, or None when none of its columns was measured."""
        wanted = PROBE_FIGURES[figure]
        if figure == "attention_share":
            wanted = tuple(c for c in self.per_layer.columns if c.startswith("attention_share"))
        columns = [c for c in wanted if c in self.per_layer.columns]
        if not columns:
            return None
        if columns == [figure]:
            return self.per_layer
        long = self.per_layer[["layer", *columns]].melt(id_vars="layer", var_name="label", value_name="value")
        if figure == "attention_share":  # "attention_share[heads 0-2]" -> "heads 0-2"
            long["label"] = long["label"].map(lambda c: c[len(figure) + 1:-1] if c != figure else "all heads")
        return long.rename(columns={"value": figure}).astype({figure: "float64"})

    def visual_dependence_summary(self) -> dict | None:
        from mirlab.lvlm.probes import visual_dependence_summary
        return None if self.visual_dependence is None else visual_dependence_summary(self.visual_dependence)

    def summary(self) -> str:
        """A few lines: pairs and layers, the range of each main probe over layers, visual dependence, the logit
        lens's most frequent token at its last layer."""
        lines = [f"model {self.meta.get('model') or '?'}: {self.meta.get('n_pairs', '?')} pairs, "
                 f"{len(self.per_layer)} layers, probes {', '.join(self.meta.get('probes', []))}"]
        for column in ("norm_ratio", "modality_gap", "mean_cosine", "image_effective_rank", "text_effective_rank",
                       "cka", "cka_shuffled", "mutual_knn", "mutual_knn_shuffled", "attention_share"):
            if column in self.per_layer.columns:
                values = self.per_layer[column]
                lines.append(f"  {column:<22} {values.min():.4g} .. {values.max():.4g} "
                             f"(layer {int(self.per_layer['layer'][values.idxmin()])} .. "
                             f"{int(self.per_layer['layer'][values.idxmax()])})")
        if "mutual_knn_chance" in self.per_layer.columns:
            lines.append(f"  mutual kNN chance level k/(n-1) = {self.per_layer['mutual_knn_chance'].iloc[0]:.4g} "
                         f"(k = {int(self.per_layer['knn_k'].iloc[0])})")
        vd = self.visual_dependence_summary()
        if vd is not None:
            lines.append(f"  visual dependence      {vd['mean']:.4g} ± {vd['sem']:.2g} nats per pair (mean ± s.e.), "
                         f"{vd['mean_per_token']:.4g} per token; {vd['share_positive']:.0%} of pairs > 0")
        if self.logit_lens is not None and len(self.logit_lens):
            last = self.logit_lens[self.logit_lens["layer"] == self.logit_lens["layer"].max()].iloc[0]
            lines.append(f"  logit lens, layer {int(last['layer'])}: {last['token']!r} in the top-k of "
                         f"{last['frequency']:.0%} of image rows")
        return "\n".join(lines)


def run_probes(model=EMBEDDED_MODEL, images=None, texts=None, *, pairs_file=None, eval_num: int | None = 100,
               seed: int = 0, probes=PROBES, batch_size: int = 8, cache_dir=None, out_dir=None, base_llm=None,
               dtype=None, device_map=None, text_span: str = "caption", layers=None,
               include_embeddings: bool = False, max_text_tokens: int | None = None, store_dtype: str = "float32",
               on_error: str = "raise", k: int = 10, n_shuffles: int = 10, head_groups: int = 4, blind="blank",
               lens_layers=None, top_k: int = 5, n_tokens: int = 10, lens_max_rows: int | None = None,
               progress: bool = True, trust_remote_code: bool = False) -> ProbeResult:
    """Modality-bias probes of ``model`` on ``eval_num`` pairs; returns a ProbeResult (and writes files if
    ``out_dir``: see ``write_probe_outputs``).

    Model and data arguments as ``run_mir``. probes: any of PROBES. The row probes ("norm_ratio",
    "modality_gap", "rank", "alignment"; ``mirlab.metrics.probes``) and the logit lens read the rows of one
    extraction (``extract_hidden_states``, cached in ``cache_dir`` like MIR's); "visual_dependence" (two forward
    passes per batch) and "attention_share" (one eager pass per batch) run the model again
    (``mirlab.lvlm.probes``). text_span defaults to "caption" (the text's own tokens: paired alignment pools
    them per pair); "alignment" is meaningful when the texts describe their images (captions), its shuffled
    baseline says how far it is from chance. k, n_shuffles: mutual kNN and baseline (k is lowered to
    n_pairs - 2 for few pairs). head_groups: attention share per group of contiguous heads. blind: the
    uninformative image of visual dependence. lens_layers (default 4 evenly spaced decoder layers, the last
    included), top_k, n_tokens, lens_max_rows: the logit lens (``lens_max_rows`` reads a random subset of each
    layer's image rows). on_error="skip": pairs the extraction skips are left out of every probe.
    """
    from mirlab.lvlm.extract import select_layers
    from mirlab.lvlm.models import num_layers
    from mirlab.lvlm.probes import attention_share, default_lens_layers, logit_lens_rows, visual_dependence
    from mirlab.metrics.probes import compute_probes

    probes = tuple(probes)
    unknown = [p for p in probes if p not in PROBES]
    if unknown or not probes:
        raise ValueError(f"probes must be a non-empty subset of {PROBES}, got {list(probes)}")
    data, model, processor = _checked_inputs_then_model(
        model, images, texts, pairs_file, eval_num, seed, on_error, cache_dir, out_dir,
        dict(dtype=dtype, device_map=device_map, base_llm=base_llm, trust_remote_code=trust_remote_code))
    row_probes = tuple(p for p in probes if p in ROW_PROBES)
    lens = None
    if "logit_lens" in probes:
        n_layers = num_layers(model)
        lens = select_layers(n_layers, default_lens_layers(n_layers) if lens_layers is None else lens_layers)
    seconds, tables, kept = {}, [], list(range(len(data.texts)))
    meta = {"model": str(getattr(model, "name_or_path", "")), "base_llm": None if base_llm is None else str(base_llm),
            "probes": list(probes), "eval_num": eval_num, "seed": seed, "text_span": text_span,
            "batch_size": batch_size, "skipped": list(data.skipped)}
    logit_table = vd_table = None
    if row_probes or lens:
        start = time.perf_counter()
        states = extract_hidden_states(model, processor, data.images, data.texts, batch_size=batch_size,
                                       layers=layers if row_probes else lens, include_embeddings=include_embeddings,
                                       text_span=text_span, max_text_tokens=max_text_tokens,
                                       store_dtype=store_dtype, cache_dir=cache_dir, on_error=on_error,
                                       names=data.names, progress=progress)
        seconds["extraction"] = time.perf_counter() - start
        kept = states.samples["pair"].tolist()
        meta.update({"skipped": meta["skipped"] + states.skipped, "layers": states.layers,
                     "hidden_states": str(states.path) if cache_dir is not None else None})
        if row_probes:
            start = time.perf_counter()
            tables.append(compute_probes(states, states.samples if "alignment" in row_probes else None,
                                         row_probes, k, n_shuffles, seed, progress))
            seconds["row_probes"] = time.perf_counter() - start
        if lens:
            missing = sorted(set(lens) - set(states.layers))
            if missing:
                raise ValueError(f"logit lens layers {missing} were not extracted (layers: {states.layers})")
            start = time.perf_counter()
            logit_table = logit_lens_rows(model, processor.tokenizer, ((l, states.layer(l)[0]) for l in lens),
                                          top_k, n_tokens, lens_max_rows, seed, progress)
            seconds["logit_lens"] = time.perf_counter() - start
    pair_images = [data.images[i] for i in kept]
    pair_texts = [data.texts[i] for i in kept]
    pair_names = [data.names[i] for i in kept]
    if "visual_dependence" in probes:
        start = time.perf_counter()
        vd_table = visual_dependence(model, processor, pair_images, pair_texts, blind, batch_size,
                                     max_text_tokens, pair_names, progress)
        vd_table["pair"] = [kept[i] for i in vd_table["pair"]]  # indices into the pairs given
        seconds["visual_dependence"] = time.perf_counter() - start
    if "attention_share" in probes:
        start = time.perf_counter()
        tables.append(attention_share(model, processor, pair_images, pair_texts, head_groups, batch_size,
                                      text_span, max_text_tokens, pair_names, progress))
        seconds["attention_share"] = time.perf_counter() - start
    per_layer = pd.DataFrame({"layer": pd.Series(dtype="int64")})
    for table in tables:
        per_layer = per_layer.merge(table, on="layer", how="outer")
    meta.update({"n_pairs": len(kept), "seconds": seconds})
    result = ProbeResult(per_layer.sort_values("layer").reset_index(drop=True), vd_table, logit_table, meta)
    if out_dir is not None:
        write_probe_outputs(result, out_dir)
    return result


def write_probe_outputs(result: ProbeResult, out_dir) -> dict[str, Path]:
    """Files of a ProbeResult in ``out_dir`` (created): probes.csv (tidy: layer, probe, value), one
    ``<figure>.png`` per PROBE_FIGURES entry that was measured, visual_dependence.csv and logit_lens.csv when
    measured, probes.json (meta, settings, visual dependence summary)."""
    import json

    from mirlab.plots import save_per_layer_figure

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"probes": out_dir / "probes.csv"}
    if len(result.per_layer):
        result.tidy.to_csv(paths["probes"], index=False)
    else:
        pd.DataFrame(columns=["layer", "probe", "value"]).to_csv(paths["probes"], index=False)
    for figure in PROBE_FIGURES:
        table = result.figure_table(figure)
        if table is not None:
            paths[figure] = save_per_layer_figure(table, out_dir / f"{figure}.png", value=figure, title=figure)
    for name in ("visual_dependence", "logit_lens"):
        table = getattr(result, name)
        if table is not None:
            paths[name] = out_dir / f"{name}.csv"
            table.to_csv(paths[name], index=False)
    paths["json"] = out_dir / "probes.json"
    paths["json"].write_text(json.dumps({"meta": result.meta,
                                         "visual_dependence": result.visual_dependence_summary()},
                                        indent=1, default=str))
    return paths
