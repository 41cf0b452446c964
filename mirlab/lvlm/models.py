"""Load a Hugging Face LVLM and answer the questions extraction asks about it.

    load_pretrained(name_or_path)   -> (model, processor) of a Hub id or local folder
    image_token_id(model, processor) -> the id whose positions in input_ids are the image rows
    num_layers(model)               -> L, the number of decoder layers of the language model
    render_prompt(processor, text)  -> how one (image, text) pair is written for this model
    model_fingerprint(model)        -> a hash of the model's identity (config + sampled weights)

Prompt (the official script used the vicuna template, image in the user turn, text as the assistant's answer).
Where mirlab differs from it (docs/paper-differences.md, 'The prompt and the text rows'): we use the model's
own chat template, not the official vicuna_v1 system prompt. If the processor has a chat template we render

    [{"role": "user", "content": [{"type": "image"}]},
     {"role": "assistant", "content": [{"type": "text", "text": text}]}]

with it (no generation prompt: the text *is* the assistant turn). Processors without a chat template:
- PaliGemma (its processor takes a ``suffix``): prefix = the image alone, suffix = the text, i.e. the
  model sees ``<image>*n <bos> \\n text <eos>``, the layout PaliGemma is trained on (prefix = task, suffix =
  answer); the suffix has token_type_ids 1, so it is causal like an answer.
- anything else: ``<image token>\\n text`` (the official user turn ``<image>\\n`` followed by the text).
"""
from __future__ import annotations

import hashlib
import inspect
import json
from dataclasses import dataclass

import torch

CONFIG_IMAGE_TOKEN_KEYS = ("image_token_id", "image_token_index")


def resolve_dtype(dtype):
    """A torch dtype from a dtype or its name ('bfloat16'); None stays None. Unknown names: ValueError."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str) and isinstance(getattr(torch, dtype, None), torch.dtype):
        return getattr(torch, dtype)
    raise ValueError(f"unknown dtype {dtype!r}: use a torch dtype name such as 'float32' or 'bfloat16'")


def load_pretrained(name_or_path: str, dtype=None, device_map=None, base_llm: str | None = None, **kwargs):
    """(model, processor) for any checkpoint transformers loads as an image-text-to-text model.

    name_or_path: a local folder or a Hub id (Hub ids need internet).
    dtype: torch dtype (or its name) of the weights, e.g. torch.bfloat16 for large models; default float32
        on CPU, as stored otherwise.
    device_map: passed to `from_pretrained` (accelerate), e.g. "auto" to spread a large model over devices.
    base_llm: folder / id of a causal LM whose weights replace the language model's (the official
        ``--base_llm``: a checkpoint that trained only the projector ships without the LLM).
    kwargs: passed to the model's `from_pretrained`.
    (``mirlab.load_model`` also knows the embedded "mirlab/tiny-llava"; this function is the HF part.)
    """
    from transformers import AutoModelForImageTextToText, AutoProcessor

    dtype = resolve_dtype(dtype)
    try:
        processor = AutoProcessor.from_pretrained(name_or_path)
    except (ImportError, ModuleNotFoundError) as err:
        raise ImportError(f"cannot build the processor of {name_or_path!r}: {err}. Processors with a video "
                          "slot (Qwen2-VL, LLaVA-OneVision, SmolVLM) need torchvision") from err
    model = AutoModelForImageTextToText.from_pretrained(name_or_path, dtype=dtype, device_map=device_map, **kwargs)
    return finish_loading(model, processor, base_llm)


def finish_loading(model, processor, base_llm: str | None = None):
    """Swap in ``base_llm``'s weights if given, check the model marks image positions, return it in eval mode."""
    if base_llm is not None:
        load_base_llm(model, base_llm)
    image_token_id(model, processor)  # fail now, with the keys looked at, rather than mid-extraction
    return model.eval(), processor


def language_model(model) -> torch.nn.Module:
    """The decoder stack of a composite LVLM: ``model.model.language_model`` in transformers 5, else what
    ``model.get_decoder()`` names (Idefics3 / SmolVLM: ``model.model.text_model``)."""
    inner = getattr(model, "model", model)
    decoder = getattr(inner, "language_model", None)
    if decoder is None and hasattr(model, "get_decoder"):
        found = model.get_decoder()
        decoder = found if found is not model and found is not inner else None
    if decoder is None:
        raise ValueError(f"{type(model).__name__} has no `.model.language_model` and `get_decoder()` names "
                         "none: cannot find its LLM")
    return decoder


def load_base_llm(model, base_llm: str) -> None:
    """Copy the weights of the causal LM at ``base_llm`` into ``model``'s language model and LM head.

    Shapes must match exactly (same architecture and vocabulary, image token included); anything missing or
    unexpected is an error rather than a silent partial load.
    """
    from transformers import AutoModelForCausalLM
    llm = AutoModelForCausalLM.from_pretrained(base_llm, dtype=next(model.parameters()).dtype)
    decoder = language_model(model)
    source = llm.get_decoder() if hasattr(llm, "get_decoder") else llm.model
    result = decoder.load_state_dict(source.state_dict(), strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(f"base LLM {base_llm!r} does not fit {type(model).__name__}'s language model: "
                         f"missing {result.missing_keys[:5]}, unexpected {result.unexpected_keys[:5]}")
    head, base_head = model.get_output_embeddings(), llm.get_output_embeddings()
    if head is not None and base_head is not None and head.weight is not decoder.get_input_embeddings().weight:
        if head.weight.shape != base_head.weight.shape:
            raise ValueError(f"base LLM {base_llm!r}: LM head {tuple(base_head.weight.shape)} does not match "
                             f"{tuple(head.weight.shape)}")
        with torch.no_grad():
            head.weight.copy_(base_head.weight)


def image_token_id(model, processor=None) -> int:
    """The token id whose positions in ``input_ids`` are the image rows.

    Looked up in order: ``config.image_token_id``, ``config.image_token_index`` (the id the model overwrites
    with projected vision features), then the processor's ``image_token`` string. The config comes first:
    Gemma3's ``processor.image_token`` is the begin-of-image marker, not the soft image token.
    """
    config = getattr(model, "config", model)
    for key in CONFIG_IMAGE_TOKEN_KEYS:
        value = getattr(config, key, None)
        if isinstance(value, int) and value >= 0:
            return value
    token = getattr(processor, "image_token", None)
    tokenizer = getattr(processor, "tokenizer", None)
    if isinstance(token, str) and tokenizer is not None:
        value = tokenizer.convert_tokens_to_ids(token)
        if isinstance(value, int) and value != tokenizer.unk_token_id:
            return value
    raise ValueError(
        f"{type(model).__name__} has no image token: looked at config keys {list(CONFIG_IMAGE_TOKEN_KEYS)} "
        f"and the processor's `image_token` ({token!r}); MIR needs a model that marks image positions in "
        "input_ids")


def num_layers(model) -> int:
    """Number of decoder layers L of the language model (hidden_states has L + 1 entries)."""
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    layers = getattr(config, "num_hidden_layers", None)
    if not isinstance(layers, int) or layers < 1:
        raise ValueError(f"{type(model).__name__}: text config has no positive `num_hidden_layers`")
    return layers


@dataclass(frozen=True)
class Prompt:
    """How one pair is written: ``text`` (the prompt) and optional ``suffix`` go to the processor;
    the user's text sits at characters [start, end) of ``context`` (the prompt, or the suffix)."""
    text: str
    suffix: str | None
    context: str
    start: int
    end: int


def _takes_suffix(processor) -> bool:
    return "suffix" in inspect.signature(processor.__call__).parameters


def render_prompt(processor, text: str) -> Prompt:
    """The prompt of one (image, text) pair for this processor (see the module docstring for the rules)."""
    if getattr(processor, "chat_template", None):
        messages = [{"role": "user", "content": [{"type": "image"}]},
                    {"role": "assistant", "content": [{"type": "text", "text": text}]}]
        prompt = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
        start = prompt.rfind(text)
        if start < 0:
            raise ValueError(f"the chat template of {type(processor).__name__} changed the text "
                             f"{text[:40]!r}...: it no longer appears verbatim in the prompt")
        return Prompt(prompt, None, prompt, start, start + len(text))
    image_token = getattr(processor, "image_token", None)
    if not isinstance(image_token, str):
        raise ValueError(f"{type(processor).__name__} has neither a chat template nor an `image_token`")
    if _takes_suffix(processor):
        return Prompt(image_token, text, text, 0, len(text))
    prompt = f"{image_token}\n{text}"
    return Prompt(prompt, None, prompt, len(prompt) - len(text), len(prompt))


def text_token_ids(tokenizer, prompt: Prompt) -> list[int]:
    """Ids of the tokens that carry the user's text, as it is tokenized inside its context.

    Uses the tokenizer's character offsets: a token belongs to the text if its span overlaps the text's
    characters (so a BPE token merging the template's space with the first word counts). Tokenizers
    without offsets fall back to tokenizing the text alone.
    """
    try:
        encoding = tokenizer(prompt.context, add_special_tokens=False, return_offsets_mapping=True)
    except (NotImplementedError, ValueError, TypeError):
        return tokenizer(prompt.context[prompt.start:prompt.end], add_special_tokens=False)["input_ids"]
    return [token for token, (a, b) in zip(encoding["input_ids"], encoding["offset_mapping"])
            if b > a and a < prompt.end and b > prompt.start]


def truncate_text(tokenizer, text: str, max_tokens: int) -> str:
    """The longest prefix of ``text`` that tokenizes (alone) to at most ``max_tokens`` tokens."""
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    offsets = [span for span in encoding["offset_mapping"] if span[1] > span[0]]
    if len(offsets) <= max_tokens:
        return text
    return text[:offsets[max_tokens - 1][1]].rstrip() if max_tokens > 0 else ""


def _checksum(tensor: torch.Tensor, samples: int = 1024) -> bytes:
    """float64 bytes of ~``samples`` evenly strided entries (every tensor touched, cheap for any size)."""
    if tensor.device.type == "meta":
        return b"meta"
    flat = tensor.detach().reshape(-1)
    step = max(1, flat.numel() // samples)
    return flat[::step][:samples].to(device="cpu", dtype=torch.float64).numpy().tobytes()


def model_fingerprint(model) -> str:
    """sha256 of the model's identity: class, name, full config, and a strided sample of every parameter.

    A tiny model built from a config has an empty ``name_or_path``, and two projector checkpoints of the same
    model share name and config: the weight samples tell them apart.
    """
    digest = hashlib.sha256()
    digest.update(type(model).__name__.encode())
    digest.update(str(getattr(model, "name_or_path", "")).encode())
    config = model.config.to_dict()
    config.pop("transformers_version", None)
    digest.update(json.dumps(config, sort_keys=True, default=str).encode())
    for name, parameter in model.named_parameters():
        digest.update(f"{name}{tuple(parameter.shape)}{parameter.dtype}".encode())
        digest.update(_checksum(parameter))
    return digest.hexdigest()


def processor_fingerprint(processor) -> str:
    """sha256 of what changes the inputs: processor class, image processor settings, chat template, vocab size."""
    parts = [type(processor).__name__, str(getattr(processor, "chat_template", None)),
             str(len(processor.tokenizer)), str(getattr(processor, "image_token", None))]
    image_processor = getattr(processor, "image_processor", None)
    if image_processor is not None:
        parts.append(image_processor.to_json_string())
    return hashlib.sha256("\x00".join(parts).encode()).hexdigest()
