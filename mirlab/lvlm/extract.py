"""Hidden states of image tokens and text tokens, per decoder layer, over N (image, text) pairs.

    hs = extract_hidden_states(model, processor, images, texts, batch_size=8, cache_dir="cache")
    for layer, image_rows, text_rows in hs:      # one layer in memory at a time
        ...
    mirlab.compute_mir(hs)

Which rows (per pair; hidden_states of the language model has L + 1 entries, index 0 = the embedding
output, index L = the last layer *after* the final norm, as Hugging Face returns it; layers 1..L by default,
``include_embeddings=True`` adds 0, ``layers=[...]`` picks a subset):

- image rows: the positions where ``input_ids == image_token_id`` (see ``mirlab.lvlm.models.image_token_id``):
  exactly the rows the model overwrites with projected vision features. Never a hard-coded count.
- text rows, ``text_span="after_image"`` (default, the official definition): every non-pad position after
  the last image row -- the text plus the template tokens around it.
  ``text_span="caption"``: only the tokens of the text itself (found through the tokenizer's offsets).

Per family (the prompt is built by ``mirlab.lvlm.models.render_prompt``):

=================  ==================================================  =========================================
family             image rows                                          "after_image" text rows also include
=================  ==================================================  =========================================
LLaVA-1.5          (crop/patch)^2 ``<image>`` rows                     template ("\\n ASSISTANT: ", ``</s>``)
LLaVA-NeXT / -OV   base tile + anyres grid, image-newline rows         template tokens
                   included (they carry the image_token id)
Qwen2-VL / 2.5-VL  ``<|image_pad|>`` rows, (h/14)(w/14)/4              ``<|vision_end|>``, template tokens
Idefics3/SmolVLM   ``<image>`` rows of every tile; the                 the closing ``<fake_token_around_image>``
                   ``<fake_token_around_image>``, ``<row_i_col_j>``,   and template tokens
                   ``<global-img>`` markers between tiles are neither
                   image nor text rows
PaliGemma          ``<image>`` rows, (size/patch)^2                    ``<bos>``, ``\\n``, ``<eos>``
Gemma3             ``<image_soft_token>`` rows (mm_tokens_per_image);  ``<end_of_image>``, template tokens
                   ``<start_of_image>`` is neither
BLIP-2 /           the ``num_query_tokens`` query rows the             BOS (if any) and the text
InstructBLIP       processor puts before the text
=================  ==================================================  =========================================

Every tested family (Qwen3-VL, GLM-4V, InternVL, Janus, Emu3 ... ), the refused ones (cross-attention: Mllama)
and those that need torchvision or timm: docs/families.md.

Memory and storage: each batch is one forward pass ``model(**inputs, output_hidden_states=True)`` under
``torch.inference_mode`` (no generate, no attention maps, only the last position's logits when the model
accepts ``logits_to_keep``). Right after it, every selected layer's rows are written to disk:
``<store>/layer_XXX/{image,text}_BBBBB.npy`` (BBBBB = batch number), float32 by default or float16
(``store_dtype``), each file written whole (``mirlab.paths.atomic_write``: a temporary sibling, then renamed
into place); the batch's manifest ``batches/BBBBB.json`` (which pairs, how many rows each) is written last, so
a batch counts as done only once all its rows are on disk. Iterating reads one layer back at a time. Peak RAM is
therefore one batch's hidden states (all layers of that batch) plus one layer of rows, whatever L is. Disk use is
(rows per pair) x (hidden size) x (#layers) x (2 or 4 bytes) per pair.

A model whose image codes depend on the padded batch (Emu3: ``mirlab.lvlm.models.same_size_batches``) gets one
forward pass per image size inside a batch; those passes' rows are gathered on the host (all selected layers of
the batch) and written in pair order, so the store is laid out as with one pass.

Cache: ``cache_dir=`` keeps the store at ``cache_dir/<key>``, key = sha256 of the model fingerprint (config +
sampled weights), processor settings, the pairs' content (image bytes, texts) and the options. A second call
with the same key returns at once; an interrupted call resumes at the first batch without a manifest.
Without ``cache_dir`` the store lives in a temporary folder deleted with the returned object.
"""
from __future__ import annotations

import hashlib
import inspect
import json
import shutil
import tempfile
import warnings
import weakref
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from mirlab.errors import UserError
from mirlab.paths import atomic_write
from mirlab.pairs.readers import load_image
from mirlab.lvlm.models import (image_token_id, model_fingerprint, num_layers, processor_fingerprint, render_prompt,
                                 same_size_batches, text_token_ids, token_text, truncate_text)

FORMAT = "mirlab-hidden-states-v2"  # v2: image_*.npy shards, n_image columns
TEXT_SPANS = ("after_image", "caption")
STORE_DTYPES = {"float32": np.float32, "float16": np.float16}
ON_ERROR = ("raise", "skip")
MODALITIES = ("image", "text")


class PairError(UserError):
    """A pair that cannot be used (unreadable image, empty text, no rows ...); the message names it."""


# --- row selection ---------------------------------------------------------------------------------------------

def select_layers(n_layers: int, layers=None, include_embeddings: bool = False) -> list[int]:
    """Sorted hidden-state indices to keep: 1..L by default (0 = embeddings only if asked); negative = from L."""
    if layers is None:
        chosen = set(range(1, n_layers + 1))
    else:
        chosen = set()
        for layer in layers:
            if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)):
                raise ValueError(f"layers must be ints, got {layer!r}")
            index = int(layer) + n_layers + 1 if layer < 0 else int(layer)
            if not 0 <= index <= n_layers:
                raise ValueError(f"layer {layer} out of range: the model has layers 0 (embeddings) .. {n_layers}")
            chosen.add(index)
        if not chosen:
            raise ValueError("layers is empty")
    if include_embeddings:
        chosen.add(0)
    return sorted(chosen)


def _find_last(sequence: list[int], pattern: list[int]) -> int:
    """Start of the last occurrence of ``pattern`` in ``sequence``, or -1."""
    for start in range(len(sequence) - len(pattern), -1, -1):
        if sequence[start:start + len(pattern)] == pattern:
            return start
    return -1


def image_row_mask(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, image_id: int) -> torch.Tensor:
    """Boolean (B, T): the image rows, ``input_ids == image_id`` on non-pad positions (attention_mask 1;
    None = no padding). The one definition of image rows: extraction and MoCa (mirlab.lvlm.moca) use it."""
    image = input_ids == image_id
    if attention_mask is None:
        return image
    if attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask {tuple(attention_mask.shape)} does not match input_ids "
                         f"{tuple(input_ids.shape)}")
    return image & attention_mask.bool()


def select_rows(input_ids: torch.Tensor, attention_mask: torch.Tensor, image_id: int, text_span: str = "after_image",
                text_ids: list[list[int]] | None = None) -> tuple[torch.Tensor, torch.Tensor, list[str | None]]:
    """Boolean (B, T) masks of the image rows and text rows of a padded batch, and a problem per sample.

    image rows: ``input_ids == image_id`` on non-pad positions. Text rows: non-pad positions after the last
    image row ("after_image"), or the last occurrence there of the sample's text token ids ("caption").
    ``problems[b]`` is None, or why sample b has no usable rows (its masks are then all False).
    """
    if text_span not in TEXT_SPANS:
        raise ValueError(f"text_span must be one of {TEXT_SPANS}, got {text_span!r}")
    valid = attention_mask.bool()
    image = image_row_mask(input_ids, attention_mask, image_id)
    text = torch.zeros_like(image)
    problems: list[str | None] = []
    for b in range(input_ids.shape[0]):
        image_positions = image[b].nonzero().flatten()
        if len(image_positions) == 0:
            problems.append(f"no image rows (no token {image_id} in input_ids)")
            continue
        after = valid[b].clone()
        after[: int(image_positions[-1]) + 1] = False
        positions = after.nonzero().flatten()
        if text_span == "caption":
            pattern = list(text_ids[b]) if text_ids is not None else []
            start = _find_last(input_ids[b, positions].tolist(), pattern) if pattern else -1
            after[:] = False
            if start >= 0:
                after[positions[start:start + len(pattern)]] = True
        if not after.any():
            image[b] = False
            problems.append("no text rows after the image (text empty or truncated away?)"
                            if text_span == "after_image" else "its text tokens were not found after the image")
            continue
        text[b] = after
        problems.append(None)
    return image, text, problems


# --- storage ---------------------------------------------------------------------------------------------------

def _write_json(path: Path, data) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(data, indent=1)))


def _shard(root: Path, layer: int, modality: str, batch: int) -> Path:
    return root / f"layer_{layer:03d}" / f"{modality}_{batch:05d}.npy"


def _manifest(root: Path, batch: int) -> Path:
    return root / "batches" / f"{batch:05d}.json"


class HiddenStates:
    """Per-layer image and text rows stored on disk; iterating yields ``(layer, image_rows, text_rows)``.

    image_rows: float32 tensor (n_image, d), all pairs' image rows concatenated in pair order;
    text_rows: float32 tensor (n_text, d), likewise. ``samples`` says which rows belong to which pair.
    """

    def __init__(self, path: str | Path, temporary: bool = False):
        self.path = Path(path)
        complete = self.path / "complete.json"
        if not complete.is_file():
            raise ValueError(f"{self.path} holds no finished extraction (complete.json missing)")
        info = json.loads(complete.read_text())
        self.layers: list[int] = info["layers"]
        self.hidden_size: int = info["hidden_size"]
        self.store_dtype: str = info["store_dtype"]
        self.skipped: list[dict] = info["skipped"]
        self.meta: dict = json.loads((self.path / "meta.json").read_text())
        self._samples = info["samples"]
        self._batches = info["batches"]
        if temporary:
            self._cleanup = weakref.finalize(self, shutil.rmtree, str(self.path), True)

    @property
    def samples(self) -> pd.DataFrame:
        """One row per kept pair: pair (index in the input), name, n_image, n_text, image_start, text_start."""
        frame = pd.DataFrame(self._samples, columns=["pair", "name", "n_image", "n_text"])
        frame["image_start"] = frame["n_image"].cumsum() - frame["n_image"]
        frame["text_start"] = frame["n_text"].cumsum() - frame["n_text"]
        return frame

    @property
    def n_pairs(self) -> int:
        return len(self._samples)

    def layer(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(image_rows, text_rows) of one layer, read from disk into float32 tensors."""
        if layer not in self.layers:
            raise ValueError(f"layer {layer} was not extracted; available: {self.layers}")
        rows = []
        for modality in MODALITIES:
            total = sum(s[f"n_{modality}"] for s in self._samples)
            out = np.empty((total, self.hidden_size), dtype=STORE_DTYPES[self.store_dtype])
            filled = 0
            for batch in self._batches:
                shard = np.load(_shard(self.path, layer, modality, batch), mmap_mode="r")
                out[filled:filled + len(shard)] = shard
                filled += len(shard)
            if filled != total:
                raise ValueError(f"{self.path}: layer {layer} {modality} holds {filled} rows, expected {total}")
            rows.append(torch.from_numpy(out).float())
        return rows[0], rows[1]

    def __iter__(self):
        # no local names for the rows: the generator must not keep layer k alive while k + 1 is read
        for layer in self.layers:
            yield (layer, *self.layer(layer))

    def __len__(self) -> int:
        return len(self.layers)

    def __repr__(self) -> str:
        return (f"HiddenStates({self.n_pairs} pairs, layers {self.layers[0]}..{self.layers[-1]} "
                f"({len(self.layers)}), d={self.hidden_size}, {self.store_dtype}, skipped {len(self.skipped)}, "
                f"at {self.path})")


# --- inputs ----------------------------------------------------------------------------------------------------

def _image_digest(image) -> str:
    """sha256 of an image's content: file bytes for paths, mode/size/pixels for PIL images and arrays."""
    digest = hashlib.sha256()
    if isinstance(image, (str, Path)):
        path = Path(image)
        if not path.is_file():
            return f"missing:{path}"
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    elif isinstance(image, np.ndarray):
        digest.update(f"{image.dtype}{image.shape}".encode())
        digest.update(np.ascontiguousarray(image).tobytes())
    elif hasattr(image, "tobytes"):
        digest.update(f"{image.mode}{image.size}".encode())
        digest.update(image.tobytes())
    else:
        digest.update(repr(type(image)).encode())
    return digest.hexdigest()


def _prepare_text(processor, text, max_text_tokens, max_positions=None):
    """(prompt, whether max_text_tokens cut the text) of one text, or PairError if the text is unusable.

    A prompt whose tokens alone (the image placeholder counted once) exceed ``max_positions`` can never fit
    the model: PairError before any forward pass.
    """
    if not isinstance(text, str):
        raise PairError(f"text must be a string, got {type(text).__name__}")
    if not text.strip():
        raise PairError("empty text")
    image_token = token_text(getattr(processor, "image_token", None))
    if isinstance(image_token, str) and image_token in text:
        raise PairError(f"text contains the image placeholder {image_token!r}")
    cut = False
    if max_text_tokens is not None:
        whole, text = text, truncate_text(processor.tokenizer, text, max_text_tokens)
        if not text.strip():
            raise PairError(f"text truncates to nothing at max_text_tokens={max_text_tokens}")
        cut = text != whole
    prompt = render_prompt(processor, text)
    if not text_token_ids(processor.tokenizer, prompt):
        raise PairError("text has no tokens")
    if max_positions:
        n_tokens = len(processor.tokenizer(prompt.context, add_special_tokens=False)["input_ids"])
        if n_tokens > max_positions:
            raise PairError(f"its prompt has {n_tokens} tokens before the image is added: they exceed the "
                            f"model's {max_positions} positions (set max_text_tokens to cut texts)")
    return prompt, cut


def check_pairs(images, texts, names=None) -> tuple[list, list, list[str]]:
    """(images, texts, names) as lists, checked to pair up: as many images as texts, at least one pair, and as many
    names (default "pair i") as pairs; ValueError saying which count is off otherwise."""
    images, texts = list(images), list(texts)
    if len(images) != len(texts):
        raise ValueError(f"{len(images)} images but {len(texts)} texts: pairs need one of each")
    if not texts:
        raise ValueError("no pairs: images and texts are empty")
    names = list(names) if names is not None else [f"pair {i}" for i in range(len(texts))]
    if len(names) != len(texts):
        raise ValueError(f"{len(names)} names for {len(texts)} pairs")
    return images, texts, names


def _check_options(batch_size, text_span, store_dtype, on_error, max_text_tokens):
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if text_span not in TEXT_SPANS:
        raise ValueError(f"text_span must be one of {TEXT_SPANS}, got {text_span!r}")
    if store_dtype not in STORE_DTYPES:
        raise ValueError(f"store_dtype must be one of {tuple(STORE_DTYPES)}, got {store_dtype!r}")
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
    if max_text_tokens is not None and (not isinstance(max_text_tokens, int) or max_text_tokens < 1):
        raise ValueError(f"max_text_tokens must be a positive int or None, got {max_text_tokens!r}")


class _Problems:
    """Collects unusable pairs: raises at once (on_error="raise") or records them with a reason."""

    def __init__(self, on_error: str, names: list[str]):
        self.on_error, self.names = on_error, names

    def __call__(self, pair: int, reason: str, skipped: list[dict]) -> None:
        if self.on_error == "raise":
            raise PairError(f"{self.names[pair]}: {reason} (pass on_error='skip' to leave such pairs out)")
        skipped.append({"pair": pair, "name": self.names[pair], "reason": reason})


# --- the forward pass --------------------------------------------------------------------------------------------

def model_inputs(model, processor, images: list, prompts: list) -> dict:
    """Processor output for a batch, on the model's device, floating tensors in the model's dtype.

    Every tensor the processor returns is kept (Qwen's mm_token_type_ids, Gemma3's / PaliGemma's
    token_type_ids change the attention) except ``labels``.
    """
    kwargs = {"text": [p.text for p in prompts]}
    if prompts[0].suffix is not None:
        kwargs["suffix"] = [p.suffix for p in prompts]
    batch = processor(images=[[image] for image in images], padding=True, return_tensors="pt", **kwargs)
    dtype = next(model.parameters()).dtype
    inputs = {}
    for name, value in batch.items():
        if name == "labels" or not isinstance(value, torch.Tensor):
            continue
        value = value.to(model.device)
        inputs[name] = value.to(dtype) if value.is_floating_point() else value
    return inputs


def forward_hidden_states(model, inputs: dict) -> tuple[torch.Tensor, ...]:
    """``hidden_states`` (L + 1 tensors of shape (B, T, d)) of one forward pass, no logits beyond one position.

    Read from the output's ``hidden_states``, or, for models that wrap their language model's output (BLIP-2,
    InstructBLIP), from ``language_model_outputs.hidden_states``.
    """
    extra = {"output_hidden_states": True, "use_cache": False, "return_dict": True}
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        extra["logits_to_keep"] = 1
    with torch.inference_mode():
        output = model(**inputs, **extra)
    hidden = getattr(output, "hidden_states", None)
    if hidden is None:
        hidden = getattr(getattr(output, "language_model_outputs", None), "hidden_states", None)
    if hidden is None:
        raise ValueError(f"{type(model).__name__} returned no decoder hidden states ({type(output).__name__} has "
                         "neither `hidden_states` nor `language_model_outputs.hidden_states`): mirlab needs a "
                         "decoder-only language model (an encoder-decoder one, e.g. BLIP-2 with Flan-T5, keeps the "
                         "image rows in its encoder)")
    return hidden


def _save_rows(root: Path, batch: int, layer: int, modality: str, rows: np.ndarray, store_dtype) -> None:
    """One shard: float32 ``rows`` of one layer and modality of a batch, stored as ``store_dtype``."""
    if store_dtype == np.float16 and rows.size and np.abs(rows).max() > np.finfo(np.float16).max:
        raise ValueError(f"layer {layer} has {modality} values beyond the float16 range "
                         f"(max |x| = {np.abs(rows).max():.3g}): use store_dtype='float32'")
    rows = rows.astype(store_dtype, copy=False)
    atomic_write(_shard(root, layer, modality, batch), lambda tmp: np.save(tmp, rows))


def _selected(states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The rows of ``states`` (B, T, d) where ``mask`` (B, T) is True, as float32 on the CPU (sample order)."""
    return states[mask.to(states.device)].to("cpu", torch.float32)


def _write_batch(root: Path, batch: int, hidden_states, image, text, layers, store_dtype) -> None:
    """Each selected layer's image rows and text rows of this batch, one .npy file per layer and modality."""
    for layer in layers:
        for modality, mask in (("image", image), ("text", text)):
            _save_rows(root, batch, layer, modality, _selected(hidden_states[layer], mask).numpy(), store_dtype)


def _pair_rows(hidden_states, image, text, layers) -> dict:
    """{(layer, modality): one float32 CPU tensor of rows per sample} of one forward pass (sub-batched batches)."""
    counts = {"image": image.sum(dim=1).tolist(), "text": text.sum(dim=1).tolist()}
    return {(layer, modality): torch.split(_selected(hidden_states[layer], mask), counts[modality])
            for layer in layers for modality, mask in (("image", image), ("text", text))}


def _image_size_groups(model, kept: list) -> list[list]:
    """The kept (pair, image, prompt) items of a batch in groups run as one forward pass each: all of them, or,
    for a model that must see one image size per pass (mirlab.lvlm.models.same_size_batches, e.g. Emu3), one
    group per image size (first-appearance order; pair order inside a group)."""
    if not same_size_batches(model):
        return [kept]
    groups: dict = {}
    for item in kept:
        groups.setdefault(item[1].size, []).append(item)
    return list(groups.values())


def _usable_pairs(pairs, images, prompts, problems, skipped):
    """The pairs of a batch whose text rendered and whose image loads: (pair indices, RGB images, prompts)."""
    kept = []
    for pair in pairs:
        if isinstance(prompts[pair], PairError):
            problems(pair, str(prompts[pair]), skipped)
            continue
        try:
            kept.append((pair, load_image(images[pair]), prompts[pair]))
        except ValueError as err:
            problems(pair, str(err), skipped)
    return kept


def _batch_inputs(model, processor, kept, max_positions, problems, skipped):
    """Model inputs of the kept pairs, after dropping any longer than the model's position table."""
    inputs = model_inputs(model, processor, [k[1] for k in kept], [k[2] for k in kept])
    lengths = inputs["attention_mask"].sum(dim=1).tolist()
    fits = [not max_positions or n <= max_positions for n in lengths]
    if all(fits):
        return kept, inputs
    for (pair, _, _), n, ok in zip(kept, lengths, fits):
        if not ok:
            problems(pair, f"{n} tokens exceed the model's {max_positions} positions (set max_text_tokens)",
                     skipped)
    kept = [k for k, ok in zip(kept, fits) if ok]
    return kept, (model_inputs(model, processor, [k[1] for k in kept], [k[2] for k in kept]) if kept else None)


def _run_batch(model, processor, root, batch, pairs, images, prompts, problems, options, image_id, layers,
               max_positions):
    """Extract one batch of pair indices: forward, write its shards, then (last) its manifest.

    Normally one forward pass whose rows are written layer by layer. A model that needs one image size per pass
    gets one pass per size; their rows are gathered (all layers of the batch, on the host) and written in pair
    order, so the store is laid out exactly as with one pass.
    """
    skipped, samples, hidden_size = [], [], None
    kept = _usable_pairs(pairs, images, prompts, problems, skipped)
    passes = []
    for group in _image_size_groups(model, kept) if kept else []:
        group, inputs = _batch_inputs(model, processor, group, max_positions, problems, skipped)
        if group:
            passes.append((group, inputs))
    gathered = []  # (pair, {(layer, modality): rows}) when there are several passes
    for group, inputs in passes:
        text_ids = [text_token_ids(processor.tokenizer, k[2]) for k in group]
        image, text, why = select_rows(inputs["input_ids"].cpu(), inputs["attention_mask"].cpu(), image_id,
                                        options["text_span"], text_ids)
        for (pair, _, _), reason in zip(group, why):
            if reason is not None:
                problems(pair, reason, skipped)
        hidden_states = forward_hidden_states(model, inputs)
        if len(hidden_states) != options["n_layers"] + 1:
            raise ValueError(f"the model returned {len(hidden_states)} hidden states, expected "
                             f"{options['n_layers'] + 1} (num_hidden_layers + embeddings)")
        hidden_size = int(hidden_states[0].shape[-1])
        samples += [{"pair": pair, "name": problems.names[pair], "n_image": int(image[i].sum()),
                     "n_text": int(text[i].sum())} for i, (pair, _, _) in enumerate(group) if why[i] is None]
        if len(passes) == 1:
            _write_batch(root, batch, hidden_states, image, text, layers, STORE_DTYPES[options["store_dtype"]])
            continue
        rows = _pair_rows(hidden_states, image, text, layers)
        gathered += [(pair, {key: parts[i] for key, parts in rows.items()}) for i, (pair, _, _) in enumerate(group)]
        del hidden_states, rows
    if len(passes) > 1:
        gathered.sort(key=lambda item: item[0])
        for layer in layers:
            for modality in MODALITIES:
                rows = torch.cat([item[1][(layer, modality)] for item in gathered])
                _save_rows(root, batch, layer, modality, rows.numpy(), STORE_DTYPES[options["store_dtype"]])
        samples.sort(key=lambda sample: sample["pair"])
    _write_json(_manifest(root, batch), {"samples": samples, "skipped": skipped, "hidden_size": hidden_size})


# --- the entry point -----------------------------------------------------------------------------------------------

def extract_hidden_states(model, processor, images, texts, *, batch_size: int = 8, layers=None,
                          include_embeddings: bool = False, text_span: str = "after_image",
                          max_text_tokens: int | None = None, store_dtype: str = "float32",
                          cache_dir: str | Path | None = None, on_error: str = "raise",
                          names: list[str] | None = None, progress: bool = True) -> HiddenStates:
    """Run the model on (image, text) pairs and store every selected layer's image and text rows.

    images: paths, PIL images or uint8 arrays (any mode: converted to RGB); texts: strings (same length).
    batch_size: pairs per forward pass. layers / include_embeddings / text_span: which rows (module docstring).
    max_text_tokens: cut each text to this many tokens first, with one warning naming the texts cut (None: keep
        texts whole; a pair longer than the model's position table is then an unusable pair: PairError before
        any forward pass when its text alone is too long, else before its batch's forward pass).
    store_dtype: "float32" (default, what MIR needs) or "float16" (half the disk; rows are read back as
        float32). cache_dir: keep and reuse the store (see module docstring); None = temporary.
    on_error: "raise" (default: first unusable pair -> PairError naming it) or "skip" (leave it out, warn with
        the count; ``HiddenStates.skipped`` lists them). names: how errors name pair i (default "pair i").
    """
    _check_options(batch_size, text_span, store_dtype, on_error, max_text_tokens)
    images, texts, names = check_pairs(images, texts, names)
    problems = _Problems(on_error, names)
    image_id = image_token_id(model, processor)
    n_layers = num_layers(model)
    chosen = select_layers(n_layers, layers, include_embeddings)
    text_config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    max_positions = getattr(text_config, "max_position_embeddings", None)

    # validate every pair up front (texts rendered, images decoded) so bad inputs fail before any forward pass
    prompts, digests, cut = [], [], []
    for pair, (image, text) in enumerate(zip(images, texts)):
        try:
            prompt, was_cut = _prepare_text(processor, text, max_text_tokens, max_positions)
            prompts.append(prompt)
            if was_cut:
                cut.append(names[pair])
        except PairError as err:
            problems(pair, str(err), [])
            prompts.append(err)
        try:
            load_image(image)
        except ValueError as err:
            problems(pair, str(err), [])
        digests.append(_image_digest(image) + hashlib.sha256(str(text).encode()).hexdigest())
    if cut:
        warnings.warn(f"max_text_tokens={max_text_tokens} cut {len(cut)} of {len(texts)} texts: "
                      + ", ".join(cut[:5]) + (" ..." if len(cut) > 5 else ""), stacklevel=2)

    options = {"format": FORMAT, "batch_size": batch_size, "layers": chosen, "n_layers": n_layers,
               "text_span": text_span, "max_text_tokens": max_text_tokens, "store_dtype": store_dtype}
    meta = {**options, "model": model_fingerprint(model), "model_name": str(getattr(model, "name_or_path", "")),
            "processor": processor_fingerprint(processor), "dtype": str(next(model.parameters()).dtype),
            "pairs": hashlib.sha256("".join(digests).encode()).hexdigest(), "n_pairs": len(texts)}
    key = hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:24]
    if cache_dir is None:
        root, temporary = Path(tempfile.mkdtemp(prefix="mirlab-hidden-states-")), True
    else:
        root, temporary = Path(cache_dir) / key, False
    if not (root / "complete.json").is_file():
        root.mkdir(parents=True, exist_ok=True)
        _write_json(root / "meta.json", meta)
        batches = [list(range(start, min(start + batch_size, len(texts))))
                   for start in range(0, len(texts), batch_size)]
        done = [b for b in range(len(batches)) if _manifest(root, b).is_file()]
        from tqdm.auto import tqdm
        bar = tqdm(total=len(batches), initial=len(done), desc="hidden states", unit="batch",
                   disable=not progress)
        for b, pairs in enumerate(batches):
            if b in done:
                continue
            _run_batch(model, processor, root, b, pairs, images, prompts, problems, options, image_id, chosen,
                       max_positions)
            bar.update(1)
        bar.close()
        _finish(root, len(batches), chosen, store_dtype)
    states = HiddenStates(root, temporary=temporary)
    if states.skipped:
        if on_error == "raise":  # a store completed earlier with on_error="skip"
            first = states.skipped[0]
            raise PairError(f"{first['name']}: {first['reason']} (stored at {root} by an on_error='skip' run)")
        warnings.warn(f"skipped {len(states.skipped)} of {len(texts)} pairs: "
                      + "; ".join(f"{s['name']}: {s['reason']}" for s in states.skipped[:5])
                      + (" ..." if len(states.skipped) > 5 else ""), stacklevel=2)
    return states


def _finish(root: Path, n_batches: int, layers: list[int], store_dtype: str) -> None:
    """Gather the batch manifests into complete.json (written last: marks the store as finished)."""
    samples, skipped, used, hidden_size = [], [], [], None
    for b in range(n_batches):
        manifest = json.loads(_manifest(root, b).read_text())
        samples += manifest["samples"]
        skipped += manifest["skipped"]
        if manifest["hidden_size"] is not None:
            used.append(b)
            hidden_size = manifest["hidden_size"]
    if not samples:
        raise PairError(f"no usable pairs: all {len(skipped)} were skipped ("
                        + "; ".join(f"{s['name']}: {s['reason']}" for s in skipped[:3]) + ")")
    _write_json(root / "complete.json", {"layers": layers, "hidden_size": hidden_size, "store_dtype": store_dtype,
                                         "samples": samples, "skipped": skipped, "batches": used})
