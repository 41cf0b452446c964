"""MIR of a model on (image, text) pairs, end to end: load -> pairs -> hidden states -> MIR -> files.

    run_mir("path/to/model", images="textvqa/train_images", texts="cnn/stories", eval_num=100, out_dir="out")

writes ``out/mir.json`` (MIRResult.to_json, with the run's settings in ``meta``), ``out/per_layer.csv`` and
``out/per_layer.png``.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

from mirlab.errors import UserError
from mirlab.lvlm.extract import extract_hidden_states
from mirlab.lvlm.models import finish_loading, load_pretrained, resolve_dtype
from mirlab.pairs.readers import Pairs, folder_pairs, jsonl_pairs

EMBEDDED_MODEL = "mirlab/tiny-llava"


def load_model(name_or_path: str = EMBEDDED_MODEL, dtype=None, device_map=None, base_llm: str | None = None,
               **kwargs):
    """(model, processor) of any image-text-to-text model, or of mirlab's embedded offline model.

    name_or_path: "mirlab/tiny-llava" (the embedded model with its shipped projector "final"),
        "mirlab/tiny-llava@<checkpoint>" (e.g. "@random", "@lr2e-3/step-0128"; see
        `mirlab.tiny.embedded_checkpoints()`), or a local folder / Hub id (see `mirlab.lvlm.load_pretrained`).
    dtype: torch dtype or its name; device_map: accelerate's device map for Hub models. For the embedded model
        (one small module) device_map may be None, "auto" (CUDA if available, else CPU), a device name or a
        torch.device, or {"": device}; the whole model goes there.
    base_llm, kwargs: see `mirlab.lvlm.load_pretrained`. The embedded model takes no `from_pretrained`
        options: any kwargs are an error naming them (never silently dropped).
    """
    name, _, checkpoint = str(name_or_path).partition("@")
    if name != EMBEDDED_MODEL:
        return load_pretrained(name_or_path, dtype=dtype, device_map=device_map, base_llm=base_llm, **kwargs)
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


def run_mir(model=EMBEDDED_MODEL, images=None, texts=None, *, pairs_file=None, eval_num: int | None = 100,
            seed: int = 0, method: str = "exact", outliers: str = "replace", batch_size: int = 8,
            cache_dir=None, out_dir=None, base_llm=None, dtype=None, device_map=None,
            text_span: str = "after_image", layers=None, include_embeddings: bool = False,
            max_text_tokens: int | None = None, store_dtype: str = "float32", on_error: str = "raise",
            progress: bool = True):
    """MIR of ``model`` on ``eval_num`` pairs; returns the MIRResult (and writes files if ``out_dir``).

    model: name / folder / Hub id (see ``load_model``; ``base_llm``, ``dtype``, ``device_map`` go there) or
        an already loaded ``(model, processor)`` tuple.
    images, texts: two folders (drawn with ``seed``, see mirlab.pairs.readers) or two equal-length lists (the first
        ``eval_num`` are used); or ``pairs_file``: a JSONL of {"image", "text"}.
    method / outliers: see ``mirlab.compute_mir``. The remaining options: see ``extract_hidden_states``
        (``on_error="skip"`` also leaves out pairs whose text file is unusable, see ``folder_pairs``).

    Inputs are checked before the model is loaded: the pairs are read and ``cache_dir`` / ``out_dir`` must be
    writable folders (UserError naming them otherwise).
    """
    from mirlab.metrics.mir import compute_mir

    for folder, what in ((cache_dir, "cache_dir"), (out_dir, "out_dir")):
        if folder is not None:
            check_writable_folder(folder, what)
    data = _pairs(images, texts, pairs_file, eval_num, seed, on_error)
    if isinstance(model, (tuple, list)):
        model, processor = model
    else:
        model, processor = load_model(model, dtype=dtype, device_map=device_map, base_llm=base_llm)
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
