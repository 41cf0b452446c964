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
- BLIP-2 / InstructBLIP (the processor has ``num_query_tokens``): the text alone; the processor itself puts the
  ``num_query_tokens`` image tokens in front of it (before BOS), where the model writes the Q-Former outputs.
- anything else: ``<image token>\\n text`` (the official user turn ``<image>\\n`` followed by the text).

Families MIR does not apply to: images that reach the decoder through cross-attention layers (Mllama, Idefics 1)
leave no image rows in the decoder sequence; ``image_token_id`` refuses them (see ``cross_attention_layers``).
Which family does what: docs/families.md.
"""
from __future__ import annotations

import hashlib
import inspect
import json
import re
from dataclasses import dataclass

import torch

from mirlab.errors import UserError

CONFIG_IMAGE_TOKEN_KEYS = ("image_token_id", "image_token_index")
# image codes computed on a batch padded to its largest image (Emu3's VQ-VAE sees the padding): extraction runs
# such a model on images of one size at a time (mirlab.lvlm.extract, docs/families.md)
SAME_SIZE_BATCHES = ("emu3",)
# where a model that ships its own code may be registered, most specific first
REMOTE_AUTO_CLASSES = ("AutoModelForImageTextToText", "AutoModelForVision2Seq", "AutoModelForCausalLM", "AutoModel")
TRUST_REMOTE_CODE_HELP = ("run the Python modelling / processing files that the model folder or Hub repository "
                          "ships (its config's auto_map), with your permissions; only for sources you trust")


class MissingDependency(ImportError, UserError):
    """A package the model or its processor needs is not installed; ``name`` is that package."""


def resolve_dtype(dtype):
    """A torch dtype from a dtype or its name ('bfloat16'); None stays None. Unknown names: ValueError."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str) and isinstance(getattr(torch, dtype, None), torch.dtype):
        return getattr(torch, dtype)
    raise ValueError(f"unknown dtype {dtype!r}: use a torch dtype name such as 'float32' or 'bfloat16'")


def load_pretrained(name_or_path: str, dtype=None, device_map=None, base_llm: str | None = None,
                    trust_remote_code: bool = False, **kwargs):
    """(model, processor) for any checkpoint transformers loads as an image-text-to-text model.

    name_or_path: a local folder or a Hub id (Hub ids need internet).
    trust_remote_code: False (default) refuses a checkpoint that ships its own modelling code (MiniCPM-V,
        Phi-3.5-vision, the original InternVL releases: an ``auto_map`` in its config) with a UserError saying so.
        True lets transformers import and run those Python files (TRUST_REMOTE_CODE_HELP); the model is then
        loaded through the first of REMOTE_AUTO_CLASSES its auto_map names, and extraction works when it follows
        the usual conventions (an image token id in its config or processor, ``num_hidden_layers``, hidden states
        returned by ``forward``); otherwise the first check that fails names what it could not find.
    dtype: torch dtype (or its name) of the weights, e.g. torch.bfloat16 for large models; default float32
        on CPU, as stored otherwise.
    device_map: passed to `from_pretrained` (accelerate), e.g. "auto" to spread a large model over devices.
    base_llm: folder / id of a causal LM whose weights replace the language model's (the official
        ``--base_llm``: a checkpoint that trained only the projector ships without the LLM).
    kwargs: passed to the model's `from_pretrained`.
    (``mirlab.load_model`` also knows the embedded "mirlab/tiny-llava"; this function is the HF part.)
    """
    import transformers
    from transformers import AutoConfig, AutoProcessor

    dtype = resolve_dtype(dtype)
    trust = bool(trust_remote_code)
    config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=True) if trust else _plain_config(name_or_path)
    auto_map = getattr(config, "auto_map", None) or {}
    auto_class = next((name for name in REMOTE_AUTO_CLASSES if trust and name in auto_map),
                      "AutoModelForImageTextToText")
    try:
        processor = AutoProcessor.from_pretrained(name_or_path, trust_remote_code=trust)
    except (ImportError, ValueError) as err:
        _raise_missing(err, f"the processor of {name_or_path!r}")
        raise
    try:
        model = getattr(transformers, auto_class).from_pretrained(name_or_path, dtype=dtype, device_map=device_map,
                                                                  trust_remote_code=trust, **kwargs)
    except (ImportError, ValueError) as err:
        _raise_missing(err, f"the model {name_or_path!r}")
        raise
    return finish_loading(model, processor, base_llm)


def _plain_config(name_or_path: str):
    """The config of a checkpoint, refusing (UserError) one that ships its own code while it is not trusted."""
    from transformers import AutoConfig, PretrainedConfig

    raw, _ = PretrainedConfig.get_config_dict(name_or_path)
    if raw.get("auto_map"):
        raise UserError(f"{name_or_path!r} ships its own modelling code (auto_map: {sorted(raw['auto_map'])}); "
                        "mirlab does not run it unless you pass trust_remote_code=True, which lets transformers "
                        f"{TRUST_REMOTE_CODE_HELP}")
    return AutoConfig.from_pretrained(name_or_path)


def _raise_missing(err: Exception, what: str) -> None:
    """MissingDependency naming the package ``err`` says is missing (a ModuleNotFoundError's top-level module, or
    the package of a transformers "requires the X library" / "requires `X` to be installed" message); returns if
    ``err`` names none (another error, a model's own module that failed to import ...: the caller re-raises it)."""
    found = re.search(r"requires (?:the )?`?(\w+)`? (?:librar|to be installed)", str(err))
    module = getattr(err, "name", None) if isinstance(err, ModuleNotFoundError) else None
    package = found.group(1).lower() if found else (module.split(".")[0] if module else None)
    if package is None or package == "transformers_modules":
        return
    hint = " (the build that matches your torch)" if package == "torchvision" else ""
    raise MissingDependency(f"cannot build {what}: it needs {package}, which is not installed; install "
                            f"{package}{hint} and retry ({' '.join(str(err).split())[:200]})", name=package) from err


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


def cross_attention_layers(model) -> list[int]:
    """Decoder layers that read the image through cross-attention (Mllama's ``cross_attention_layers``; Idefics 1's
    every ``cross_layer_interval``-th layer); [] for models whose images enter the decoder sequence."""
    config = getattr(model, "config", model)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for source in (text, config):
        layers = getattr(source, "cross_attention_layers", None)
        if layers:
            return [int(layer) for layer in layers]
        interval = getattr(source, "cross_layer_interval", None)
        if isinstance(interval, int) and interval > 0:
            return list(range(0, int(getattr(source, "num_hidden_layers", 0)), interval))
    return []


def image_token_id(model, processor=None) -> int:
    """The token id whose positions in ``input_ids`` are the image rows.

    Looked up in order: ``config.image_token_id``, ``config.image_token_index`` (the id the model overwrites
    with projected vision features), then the processor's ``image_token`` string. The config comes first:
    Gemma3's ``processor.image_token`` is the begin-of-image marker, not the soft image token.
    A model whose images enter through cross-attention (``cross_attention_layers``) has no image rows: UserError
    saying why, whatever its config holds (Mllama's ``<|image|>`` marker is not an image row).
    """
    config = getattr(model, "config", model)
    crossing = cross_attention_layers(model)
    if crossing:
        raise UserError(f"{type(model).__name__} reads the image through cross-attention (decoder layers "
                        f"{crossing}, counted from 0), so its decoder sequence holds no image rows, only text (and "
                        "image markers); MIR, the distance between the image rows and the text rows of each layer, "
                        "is undefined for it")
    for key in CONFIG_IMAGE_TOKEN_KEYS:
        value = getattr(config, key, None)
        if isinstance(value, int) and value >= 0:
            return value
    token = token_text(getattr(processor, "image_token", None))
    tokenizer = getattr(processor, "tokenizer", None)
    if isinstance(token, str) and tokenizer is not None:
        value = tokenizer.convert_tokens_to_ids(token)
        if isinstance(value, int) and value != tokenizer.unk_token_id:
            return value
    raise ValueError(
        f"{type(model).__name__} has no image token: looked at config keys {list(CONFIG_IMAGE_TOKEN_KEYS)} "
        f"and the processor's `image_token` ({token!r}); MIR needs a model that marks image positions in "
        "input_ids")


def token_text(token):
    """A token as a string: BLIP-2's processor keeps its image token as an AddedToken (``.content``)."""
    return getattr(token, "content", token)


def same_size_batches(model) -> bool:
    """Whether the model must see images of one size per forward pass for its image rows to equal those of each
    image alone (SAME_SIZE_BATCHES: image codes computed on the padded batch)."""
    return getattr(getattr(model, "config", None), "model_type", None) in SAME_SIZE_BATCHES


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


def prepends_image_tokens(processor) -> bool:
    """Whether the processor itself puts the image tokens before the text (BLIP-2, InstructBLIP:
    ``num_query_tokens`` tokens, no placeholder in the prompt)."""
    return isinstance(getattr(processor, "num_query_tokens", None), int)


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
    if prepends_image_tokens(processor):
        return Prompt(text, None, text, 0, len(text))
    image_token = token_text(getattr(processor, "image_token", None))
    if not isinstance(image_token, str):
        raise ValueError(f"{type(processor).__name__} has neither a chat template nor an `image_token`, and does not "
                         "prepend image tokens itself (`num_query_tokens`): mirlab cannot write its prompt")
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
