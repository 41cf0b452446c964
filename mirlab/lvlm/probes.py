"""Modality-bias probes that need the model: visual dependence, attention share on image rows, logit lens.

Each runs batched over (image, text) pairs on any family extraction supports, building its inputs the way
extraction does (``render_prompt`` -> ``model_inputs``; image rows = ``input_ids == image_token_id``; text rows =
``select_rows`` with ``text_span``), with a tqdm bar over batches. The row probes that need no extra forward
pass (norm ratio, modality gap, ranks, paired alignment) are in ``mirlab.metrics.probes``.

    visual_dependence   log p(text | real image) - log p(text | blind image), per pair       (2 passes / batch)
    attention_share     share of attention mass text-row queries put on image-row keys, per layer and head
                        group (eager attention, 1 pass / batch)
    logit_lens          the vocabulary tokens nearest to the image rows of chosen layers, through the model's own
                        final norm and output head (1 pass / batch; ``logit_lens_rows`` reuses stored rows)

Visual dependence is the "blind gap" of the modality-bias literature (MMStar's multi-modal gain idea: what the
image adds over an uninformative one). Positive = the text is more likely with its real image.

Attention share needs the attention probabilities, which only the eager implementation materialises (sdpa and
flash kernels never form them). ``eager_attention`` switches the *language model* to eager for the call and
back afterwards; a forward hook on every decoder layer's ``self_attn`` reduces that layer's (B, H, T, T)
probabilities to per-head sums at once and drops them, so the extra memory is one layer's B·H·T² floats, not L
of them as ``output_attentions=True`` would keep. Measured on the embedded model (batch of 8 captions, T = 95
positions, 9 heads, 30 layers; one CPU thread, CPU time): 1.4 s per batch with sdpa, 1.55 s with eager + the
hooks (about +10 %); extra memory 8·9·95²·4 B ≈ 2.6 MB at a time. Eager's cost grows with T² (long texts,
many-tile images): about B·H·T²·4 bytes per layer, e.g. 4 GB for B = 8, H = 32, T = 2000 (lower batch_size).
"""
from __future__ import annotations

import contextlib
import inspect

import numpy as np
import pandas as pd
import torch
from PIL import Image

from mirlab.lvlm.extract import (PairError, _prepare_text, check_pairs, forward_hidden_states, image_row_mask,
                                 model_inputs, select_layers, select_rows)
from mirlab.lvlm.models import image_token_id, language_model, num_layers, text_token_ids
from mirlab.pairs.readers import load_image

BLIND_MODES = ("blank",)
GREY = (128, 128, 128)
PLACEHOLDER_TEXT = "a picture"  # the text after the image when logit_lens is given images only


# --- batches of pairs, built like extraction's ---------------------------------------------------------------------

def _positive_int(value, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{what} must be a positive int, got {value!r}")


def _prompts(processor, images, texts, names, max_text_tokens):
    """Rendered prompts of every pair (PairError naming the first unusable one), and the names."""
    images, texts, names = check_pairs(images, texts, names)
    prompts = []
    for name, text in zip(names, texts):
        try:
            prompts.append(_prepare_text(processor, text, max_text_tokens)[0])
        except PairError as err:
            raise PairError(f"{name}: {err}") from None
    return images, prompts, names


def _batches(model, processor, images, prompts, names, batch_size, text_span, desc, progress):
    """Yield (pair indices, RGB images, prompts, inputs, image mask, text mask) per batch, with a tqdm bar."""
    from tqdm.auto import tqdm

    image_id = image_token_id(model, processor)
    starts = range(0, len(prompts), batch_size)
    for start in tqdm(starts, desc=desc, unit="batch", disable=not progress):
        pairs = list(range(start, min(start + batch_size, len(prompts))))
        loaded = []
        for pair in pairs:
            try:
                loaded.append(load_image(images[pair]))
            except ValueError as err:
                raise PairError(f"{names[pair]}: {err}") from None
        batch_prompts = [prompts[pair] for pair in pairs]
        inputs = model_inputs(model, processor, loaded, batch_prompts)
        text_ids = [text_token_ids(processor.tokenizer, prompt) for prompt in batch_prompts]
        image, text, problems = select_rows(inputs["input_ids"].cpu(), inputs["attention_mask"].cpu(), image_id,
                                            text_span, text_ids)
        for pair, problem in zip(pairs, problems):
            if problem is not None:
                raise PairError(f"{names[pair]}: {problem}")
        yield pairs, loaded, batch_prompts, inputs, image, text


# --- visual dependence ---------------------------------------------------------------------------------------------

def blank_image(image: Image.Image) -> Image.Image:
    """The 'blank' blind image: uniform mid-grey RGB (128, 128, 128) of ``image``'s size (so every family gives
    it the same number of image rows as the real image)."""
    return Image.new("RGB", image.size, GREY)


def _blind_maker(blind):
    if callable(blind):
        return blind
    if blind == "blank":
        return blank_image
    raise ValueError(f"blind must be one of {BLIND_MODES} or a function image -> image, got {blind!r}")


def text_logliks(model, inputs: dict, text: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(sum of log p(token | everything before it) over each sample's text rows, number of text rows), per sample.

    Logits are computed only for the last positions that predict a text row (``logits_to_keep`` when the model
    takes it), and log-softmaxed in float32.
    """
    first = int(text.int().argmax(dim=1).min())  # earliest text row over the batch (every sample has one)
    length = text.shape[1]
    extra = {"use_cache": False, "return_dict": True}
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        extra["logits_to_keep"] = length - first + 1
    with torch.inference_mode():
        logits = model(**inputs, **extra).logits
    offset = length - logits.shape[1]  # logits[:, j] belongs to position offset + j
    ids = inputs["input_ids"]
    sums, counts = [], []
    for b in range(text.shape[0]):
        positions = text[b].nonzero().flatten().to(logits.device)
        predicted = torch.log_softmax(logits[b, positions - 1 - offset].float(), dim=-1)
        sums.append(float(predicted.gather(1, ids[b, positions].unsqueeze(1)).double().sum()))
        counts.append(len(positions))
    return np.array(sums), np.array(counts)


def visual_dependence(model, processor, images, texts, blind="blank", batch_size: int = 8,
                      max_text_tokens: int | None = None, names=None, progress: bool = True) -> pd.DataFrame:
    """Per pair, the log-likelihood of the text with its real image minus with an uninformative image.

        loglik_image = sum_{i in text} log p(t_i | prompt with the real image, t_<i)
        loglik_blind = the same with the blind image
        visual_dependence = loglik_image - loglik_blind   (nats; > 0: the image makes the text more likely)

    The text tokens are the text's own tokens (extraction's ``text_span="caption"`` rows), not the template.
    blind: "blank" (uniform mid-grey RGB (128, 128, 128) of the real image's size) or a function image -> image
    (its output must give the same prompt tokens, i.e. the same number of image rows).
    Returns one row per pair: pair, name, n_tokens, loglik_image, loglik_blind, visual_dependence,
    visual_dependence_per_token (= visual_dependence / n_tokens). ``visual_dependence_summary`` gives the mean.
    """
    _positive_int(batch_size, "batch_size")
    make_blind = _blind_maker(blind)
    images, prompts, names = _prompts(processor, images, texts, names, max_text_tokens)
    rows = []
    for pairs, loaded, batch_prompts, inputs, _, text in _batches(model, processor, images, prompts, names,
                                                                   batch_size, "caption", "visual dependence",
                                                                   progress):
        real, counts = text_logliks(model, inputs, text)
        blind_inputs = model_inputs(model, processor, [make_blind(image) for image in loaded], batch_prompts)
        if not torch.equal(blind_inputs["input_ids"], inputs["input_ids"]):
            raise ValueError("the blind image changes the prompt's tokens (a different number of image rows?): "
                             "give a blind image of the real image's size")
        blind_sums, _ = text_logliks(model, blind_inputs, text)
        for i, pair in enumerate(pairs):
            gap = real[i] - blind_sums[i]
            rows.append({"pair": pair, "name": names[pair], "n_tokens": int(counts[i]),
                         "loglik_image": real[i], "loglik_blind": blind_sums[i], "visual_dependence": gap,
                         "visual_dependence_per_token": gap / counts[i]})
    return pd.DataFrame(rows)


def visual_dependence_summary(table: pd.DataFrame) -> dict:
    """Mean, standard error, median and share of pairs > 0 of the per-pair visual dependence (nats), and the
    mean per text token."""
    gap = table["visual_dependence"].to_numpy(dtype=np.float64)
    return {"n_pairs": len(gap), "mean": float(gap.mean()),
            "sem": float(gap.std(ddof=1) / np.sqrt(len(gap))) if len(gap) > 1 else float("nan"),
            "median": float(np.median(gap)), "share_positive": float((gap > 0).mean()),
            "mean_per_token": float(table["visual_dependence_per_token"].mean())}


# --- attention share -------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def eager_attention(model):
    """The language model's attention set to "eager" inside the block (``set_attn_implementation``), restored
    after. Composite models switch only their ``text_config``; the vision tower keeps its implementation."""
    config = model.config
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    before = getattr(text_config, "_attn_implementation", None)
    if before == "eager":
        yield model
        return
    composite = "text_config" in (getattr(config, "sub_configs", None) or {})
    model.set_attn_implementation({"text_config": "eager"} if composite else "eager")
    try:
        yield model
    finally:
        restore = before or "sdpa"
        model.set_attn_implementation({"text_config": restore} if composite else restore)


def split_heads(n_heads: int, groups: int) -> list[np.ndarray]:
    """Head indices split into ``min(groups, n_heads)`` contiguous groups of (nearly) equal size."""
    _positive_int(groups, "head_groups")
    return np.array_split(np.arange(n_heads), min(groups, n_heads))


def group_label(group) -> str:
    """"heads a-b" for a group of contiguous heads a..b, "head a" for one head."""
    return f"heads {group[0]}-{group[-1]}" if len(group) > 1 else f"head {group[0]}"


class _ShareHooks:
    """Forward hooks on each decoder layer's self_attn: per head, the sum over text-row queries of the attention
    probability on image-row keys (the (B, H, T, T) probabilities are reduced at once and dropped)."""

    def __init__(self, model):
        self.layers = list(language_model(model).layers)
        self.sums: list[torch.Tensor | None] = [None] * len(self.layers)
        self.queries = 0
        self.image = self.text = None
        self.handles = [layer.self_attn.register_forward_hook(self._hook(i)) for i, layer in enumerate(self.layers)]

    def _hook(self, index: int):
        def hook(module, args, output):
            weights = output[1] if isinstance(output, tuple) and len(output) > 1 else None
            if weights is None:
                raise ValueError(f"decoder layer {index + 1} returned no attention probabilities although eager "
                                 "attention was asked for: this family cannot give the attention share")
            keys = self.image.to(weights.device, torch.float32)
            on_image = torch.einsum("bhqk,bk->bhq", weights.float(), keys)  # (B, H, T)
            per_head = on_image.permute(0, 2, 1)[self.text.to(weights.device)].sum(dim=0).double().cpu()
            self.sums[index] = per_head if self.sums[index] is None else self.sums[index] + per_head
        return hook

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def attention_share(model, processor, images, texts, head_groups: int = 4, batch_size: int = 8,
                    text_span: str = "caption", max_text_tokens: int | None = None, names=None,
                    progress: bool = True) -> pd.DataFrame:
    """Per decoder layer l (1..L) and head group: the mean share of attention mass text-row queries put on
    image-row keys,

        share_{l,h} = (1 / |Q|) sum_{q in Q} sum_{k in image rows} A_{l,h}[q, k]        in [0, 1]

    with Q = every text row of every pair (``text_span`` as in extraction; default the text's own tokens) and
    A the post-softmax attention probabilities of head h. Returns a wide per-layer table: layer,
    attention_share (mean over all heads), ``attention_share[heads a-b]`` per group of contiguous heads (``[head a]``
    for a group of one)
    (``head_groups`` groups, fewer if the model has fewer heads), n_queries. Runs the language model with
    eager attention (see the module docstring for the cost).
    """
    _positive_int(batch_size, "batch_size")
    _positive_int(head_groups, "head_groups")
    images, prompts, names = _prompts(processor, images, texts, names, max_text_tokens)
    hooks = _ShareHooks(model)
    try:
        with eager_attention(model):
            for _, _, _, inputs, image, text in _batches(model, processor, images, prompts, names, batch_size,
                                                         text_span, "attention share", progress):
                hooks.image, hooks.text = image, text
                hooks.queries += int(text.sum())
                with torch.inference_mode():
                    model(**inputs, use_cache=False, return_dict=True,
                          **({"logits_to_keep": 1} if "logits_to_keep" in
                             inspect.signature(model.forward).parameters else {}))
    finally:
        hooks.remove()
    rows = []
    for index, sums in enumerate(hooks.sums):
        per_head = sums.numpy() / hooks.queries
        row = {"layer": index + 1, "attention_share": float(per_head.mean())}
        for group in split_heads(len(per_head), head_groups):
            row[f"attention_share[{group_label(group)}]"] = float(per_head[group].mean())
        row["n_queries"] = hooks.queries
        rows.append(row)
    return pd.DataFrame(rows)


# --- logit lens ------------------------------------------------------------------------------------------------------

def default_lens_layers(n_layers: int, count: int = 4) -> list[int]:
    """``count`` evenly spaced decoder layers ending at the last: round(L k / count), k = 1..count (unique)."""
    return sorted({max(1, round(n_layers * k / count)) for k in range(1, count + 1)})


def lens_top_tokens(model, rows: torch.Tensor, layer: int, top_k: int = 5, chunk: int = 1024) -> torch.Tensor:
    """(n, top_k) ids of the highest logits of ``rows`` (n x d hidden states of ``layer``) read through the
    model's own final norm and output head: head(norm(h)). Layer L's hidden states are already normed (Hugging
    Face returns hidden_states[L] after the final norm): only the head is applied there."""
    decoder = language_model(model)
    norm = getattr(decoder, "norm", None)
    if norm is None:
        raise ValueError(f"{type(decoder).__name__} has no final `norm`: cannot read its rows as logits")
    head = model.get_output_embeddings()
    if head is None:
        raise ValueError(f"{type(model).__name__} has no output head (get_output_embeddings() is None)")
    last = layer == num_layers(model)
    parameter = head.weight
    out = []
    with torch.inference_mode():
        for start in range(0, len(rows), chunk):
            h = rows[start:start + chunk].to(parameter.device, parameter.dtype)
            logits = head(h if last else norm(h))
            out.append(logits.topk(top_k, dim=-1).indices.cpu())
    return torch.cat(out) if out else torch.empty(0, top_k, dtype=torch.long)


def _lens_table(counts: dict[int, np.ndarray], totals: dict[int, int], tokenizer, n_tokens: int) -> pd.DataFrame:
    rows = []
    for layer in sorted(counts):
        order = np.argsort(-counts[layer], kind="stable")[:n_tokens]
        for rank, token in enumerate(order, start=1):
            if counts[layer][token] == 0:
                break
            rows.append({"layer": layer, "rank": rank, "token_id": int(token),
                         "token": tokenizer.decode([int(token)]), "count": int(counts[layer][token]),
                         "frequency": counts[layer][token] / totals[layer], "n_rows": totals[layer]})
    return pd.DataFrame(rows, columns=["layer", "rank", "token_id", "token", "count", "frequency", "n_rows"])


def _check_lens(top_k, n_tokens, max_rows):
    _positive_int(top_k, "top_k")
    _positive_int(n_tokens, "n_tokens")
    if max_rows is not None:
        _positive_int(max_rows, "max_rows")


def _subsample(rows, max_rows, seed):
    if max_rows is None or len(rows) <= max_rows:
        return rows
    keep = np.sort(np.random.default_rng(seed).choice(len(rows), size=max_rows, replace=False))
    return rows[torch.from_numpy(keep)]


def logit_lens_rows(model, tokenizer, layer_rows, top_k: int = 5, n_tokens: int = 10, max_rows: int | None = None,
                    seed: int = 0, progress: bool = False) -> pd.DataFrame:
    """Logit lens of stored image rows: ``layer_rows`` yields (layer, image_rows) (e.g. from a HiddenStates,
    ``((l, v) for l, v, _ in states)``); no forward pass. See ``logit_lens`` for the table; ``max_rows``
    reads a seeded random subset of each layer's rows (None: all)."""
    _check_lens(top_k, n_tokens, max_rows)
    vocabulary = model.get_output_embeddings().weight.shape[0]
    counts, totals = {}, {}
    from tqdm.auto import tqdm
    for layer, rows in tqdm(layer_rows, desc="logit lens", unit="layer", disable=not progress):
        rows = _subsample(torch.as_tensor(rows), max_rows, seed)
        top = lens_top_tokens(model, rows, int(layer), top_k)
        counts[int(layer)] = np.bincount(top.flatten().numpy(), minlength=vocabulary)
        totals[int(layer)] = len(rows)
    return _lens_table(counts, totals, tokenizer, n_tokens)


def logit_lens(model, processor, images, texts=None, layers=None, top_k: int = 5, n_tokens: int = 10,
               batch_size: int = 8, names=None, progress: bool = True) -> pd.DataFrame:
    """The vocabulary tokens nearest to the image rows of chosen decoder layers (the logit lens).

    Every image row h of layer l is read as logits head(norm(h)) through the model's own final norm and output
    head (``lens_top_tokens``); its ``top_k`` tokens are counted. Returns a tidy table, per layer the
    ``n_tokens`` most frequent: layer, rank, token_id, token (decoded), count (image rows with the token among
    their top_k), frequency (count / n_rows), n_rows. layers: decoder layers (default ``default_lens_layers``).
    texts: the text after each image (default ``PLACEHOLDER_TEXT``; image rows do not see the text in causal
    decoders).
    """
    _positive_int(batch_size, "batch_size")
    _check_lens(top_k, n_tokens, None)
    images = list(images)
    texts = [PLACEHOLDER_TEXT] * len(images) if texts is None else texts
    n_layers = num_layers(model)
    chosen = select_layers(n_layers, default_lens_layers(n_layers) if layers is None else layers)
    images, prompts, names = _prompts(processor, images, texts, names, None)
    vocabulary = model.get_output_embeddings().weight.shape[0]
    counts = {layer: np.zeros(vocabulary, dtype=np.int64) for layer in chosen}
    totals = dict.fromkeys(chosen, 0)
    image_id = image_token_id(model, processor)
    for _, _, _, inputs, _, _ in _batches(model, processor, images, prompts, names, batch_size, "caption",
                                          "logit lens", progress):
        mask = image_row_mask(inputs["input_ids"], inputs["attention_mask"], image_id)
        hidden = forward_hidden_states(model, inputs)
        for layer in chosen:
            top = lens_top_tokens(model, hidden[layer][mask.to(hidden[layer].device)], layer, top_k)
            counts[layer] += np.bincount(top.flatten().numpy(), minlength=vocabulary)
            totals[layer] += int(mask.sum())
        del hidden
    return _lens_table(counts, totals, processor.tokenizer, n_tokens)
