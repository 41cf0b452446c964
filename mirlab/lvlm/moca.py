"""MoCa, modality calibration (arXiv 2410.07167 §4, Eq. 5): a learned per-layer scale and shift of the image rows.

At the output of decoder layer l (l = 1..L; what ``hidden_states[l]`` holds and extraction reads), every
image row h becomes

    h  <-  u_l ⊙ h + v_l          u_l, v_l in R^d (one value per hidden dimension)

Text rows and pad rows stay as they are. u = 1 and v = 0 at initialisation, so a freshly attached MoCa changes
nothing, bit for bit. The paper trains (u, v) with the projector in pre-training and again in SFT, with no extra
loss term, and measures MIR with MoCa active.

    handle = attach(model, processor)    # hooks on the decoder layers; the module is model.moca
    optimizer = torch.optim.AdamW(handle.parameters(), lr=1e-3)
    handle.save("moca.safetensors"); handle.load("moca.safetensors")
    handle.remove()                      # hooks and model.moca gone: the original model, bit for bit

How it attaches to any Hugging Face LVLM, without forked modeling code:

- Decoder layers: the ``layers`` ModuleList of the language model (``decoder_chain``: from
  ``mirlab.lvlm.models.language_model`` through ``get_decoder()``, e.g. BLIP-2's OPTForCausalLM -> OPTDecoder,
  Chameleon's base model). A forward hook on each chosen layer rewrites its output (a tensor, or a tuple whose
  first element is the hidden states), in the output's dtype and device. It is registered with
  ``prepend=True`` so it runs before transformers' own output-capturing hooks: ``hidden_states[l]`` is the
  calibrated output, the one layer l + 1 reads (``hidden_states[L]`` is, as always, the calibrated last output
  after the final norm).
- Image rows: ``image_row_mask(input_ids, attention_mask, image_token_id)``, the rule extraction uses, applied
  to the input_ids of the outermost call into the model. A forward pre-hook on the model, on its base model
  (``model.model``) and on the modules of its decoder chain reads them: LVLMs hand the language model only
  inputs_embeds. A model whose image codes depend on the padded batch (Emu3) is extracted in one pass per image
  size; each pass is an outermost call with its own rows.
- Generation with a KV cache: a decoding step's input_ids are only the new tokens, (B, 1), while its
  attention_mask covers past and new tokens; the new tokens' columns are the mask's last ones. Generated tokens
  are text, so decoding steps calibrate nothing; the image rows were calibrated in the prefill and their keys
  and values went into the cache calibrated. BLIP-2 and InstructBLIP generate by handing their language model's
  generate the prompt as inputs_embeds, so the prefill's input_ids are None: ``model.generate`` is wrapped (an
  instance attribute, gone after ``remove()``) to keep its prompt's image rows, which a call with inputs_embeds
  of the same (batch, tokens) and no input_ids then calibrates.
- A call straight into the language model with inputs_embeds (a training loop that builds the embeddings
  itself) must name its image rows: ``with handle.image_rows(mask): model.model.language_model(...)``. Without
  them MoCa raises rather than guess.
- The rows of the latest outermost call are kept after it returns: a layer re-run during backward calibrates
  the same rows (transformers 4's gradient checkpointing re-ran a layer's whole call, hooks included;
  transformers 5 checkpoints only ``forward``, so the hook stays outside). Not thread-safe: one forward at a
  time per model.

Where it lives: MoCa is registered as the submodule ``model.moca``, so ``model.parameters()``, ``.to()``,
``state_dict()`` and ``model_fingerprint`` include it (an extraction with MoCa attached gets its own cache key);
``remove()`` deletes it again. A trainable-state registry finds it as ``lambda model: model.moca``.

File (``save``/``load``): safetensors with the float32 tensors ``scale`` (n x d) and ``shift`` (n x d) and the
metadata format = "mirlab-moca-v1", layers = JSON list of the n layer numbers, hidden_size = d.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import json
from pathlib import Path

import torch

from mirlab.lvlm.extract import image_row_mask, select_layers
from mirlab.lvlm.models import image_token_id, language_model, num_layers

FORMAT = "mirlab-moca-v1"
ATTRIBUTE = "moca"  # model.moca while attached


class MoCa(torch.nn.Module):
    """Per-layer scale ``u_l`` and shift ``v_l`` of the image rows (Eq. 5): ``h <- u_l ⊙ h + v_l``.

    layers: the decoder layer numbers l (1..L, as in ``hidden_states[l]``) it calibrates; row k of ``scale`` and
    ``shift`` (both (len(layers), hidden_size)) belongs to ``layers[k]``. Initialised u = 1, v = 0.
    """

    def __init__(self, layers: list[int], hidden_size: int, dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        layers = [int(layer) for layer in layers]
        if not layers or any(layer < 1 for layer in layers) or layers != sorted(set(layers)):
            raise ValueError(f"MoCa layers must be increasing decoder layer numbers >= 1, got {layers}")
        if isinstance(hidden_size, bool) or not isinstance(hidden_size, int) or hidden_size < 1:
            raise ValueError(f"hidden_size must be a positive int, got {hidden_size!r}")
        self.layers = layers
        self.hidden_size = hidden_size
        shape = (len(layers), hidden_size)
        self.scale = torch.nn.Parameter(torch.ones(shape, dtype=dtype, device=device))
        self.shift = torch.nn.Parameter(torch.zeros(shape, dtype=dtype, device=device))

    def forward(self, hidden: torch.Tensor, image: torch.Tensor, row: int) -> torch.Tensor:
        """hidden (B, T, d) with the image rows (``image``, bool (B, T)) replaced by ``scale[row] * h + shift[row]``.

        Computed in hidden's dtype and device; other rows are returned unchanged.
        """
        scale = self.scale[row].to(device=hidden.device, dtype=hidden.dtype)
        shift = self.shift[row].to(device=hidden.device, dtype=hidden.dtype)
        return torch.where(image.unsqueeze(-1), hidden * scale + shift, hidden)

    def extra_repr(self) -> str:
        return f"layers={self.layers}, hidden_size={self.hidden_size}"

    def save(self, path) -> Path:
        """Write scale and shift (float32) with the metadata of the module docstring; returns the path."""
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {name: getattr(self, name).detach().to("cpu", torch.float32).contiguous()
                   for name in ("scale", "shift")}
        save_file(tensors, str(path), metadata={"format": FORMAT, "layers": json.dumps(self.layers),
                                                "hidden_size": str(self.hidden_size)})
        return path

    @classmethod
    def from_file(cls, path) -> "MoCa":
        """The MoCa stored at ``path`` (float32, CPU). Errors name the file."""
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no MoCa file {path}")
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}
        if meta.get("format") != FORMAT:
            raise ValueError(f"{path} is not a MoCa file: format {meta.get('format')!r}, expected {FORMAT!r}")
        try:
            layers, hidden_size = json.loads(meta["layers"]), int(meta["hidden_size"])
        except (KeyError, ValueError) as err:
            raise ValueError(f"{path}: damaged {FORMAT} metadata ({err!r})") from None
        shape = (len(layers), hidden_size)
        got = {key: tuple(t.shape) for key, t in tensors.items()}
        if got != {"scale": shape, "shift": shape}:
            raise ValueError(f"{path}: tensors {got} do not match its metadata (scale and shift {shape})")
        moca = cls(layers, hidden_size)
        with torch.no_grad():
            moca.scale.copy_(tensors["scale"])
            moca.shift.copy_(tensors["shift"])
        return moca


def decoder_chain(model) -> list[torch.nn.Module]:
    """The modules from ``model``'s language model down to its decoder stack, the first that has a ``layers``
    ModuleList: ``mirlab.lvlm.models.language_model`` (``model`` itself where it names none: Chameleon),
    then ``get_decoder()`` until one has ``layers``. One step for LLaVA-style models (``model.model.language_model``
    is the stack); BLIP-2 / InstructBLIP wrap a causal LM (OPTForCausalLM -> OPTDecoder); Chameleon's base model
    is the stack."""
    try:
        chain = [language_model(model)]
    except ValueError:
        chain = [model]
    while not isinstance(getattr(chain[-1], "layers", None), torch.nn.ModuleList):
        step = chain[-1].get_decoder() if hasattr(chain[-1], "get_decoder") else None
        if not isinstance(step, torch.nn.Module) or any(step is module for module in chain):
            raise ValueError(f"{type(model).__name__}: no module with a `layers` ModuleList found from "
                             f"{type(chain[0]).__name__} through get_decoder() "
                             f"({' -> '.join(type(m).__name__ for m in chain)}): cannot find its decoder layers")
        chain.append(step)
    return chain


def decoder_layers(model) -> torch.nn.ModuleList:
    """The decoder layers of ``model``: the ``layers`` ModuleList at the end of ``decoder_chain(model)``, of length
    num_layers(model)."""
    decoder = decoder_chain(model)[-1]
    layers = decoder.layers
    if len(layers) != num_layers(model):
        raise ValueError(f"{type(decoder).__name__}.layers holds {len(layers)} layers but the text config says "
                         f"num_hidden_layers = {num_layers(model)}")
    return layers


def _input_reader(function):
    """A function (args, kwargs) -> (input_ids, attention_mask, inputs_embeds) for ``function``'s signature
    (a forward, or a generate, whose ``inputs`` argument counts as input_ids)."""
    signature = inspect.signature(function)
    collected = [p.name for p in signature.parameters.values() if p.kind is inspect.Parameter.VAR_KEYWORD]

    def read(args, kwargs):
        try:
            arguments = signature.bind_partial(*args, **kwargs).arguments
        except TypeError:
            arguments = kwargs
        for name in collected:  # what a ``**kwargs`` parameter collected
            arguments = {**arguments, **arguments.get(name, {})}
        input_ids = arguments.get("input_ids", arguments.get("inputs"))
        return input_ids, arguments.get("attention_mask"), arguments.get("inputs_embeds")
    return read


class MoCaHandle:
    """MoCa attached to a model: ``.moca`` (the module, also ``model.moca``), ``.parameters()``, ``.remove()``,
    ``.save(path)`` / ``.load(path)``, and ``.image_rows(mask)`` for calls that bypass the model's forward."""

    def __init__(self, model, moca: MoCa, image_id: int, blocks: torch.nn.ModuleList):
        self.model, self.moca, self.image_id = model, moca, image_id
        self._current = None   # image rows of the latest outermost call (None: unknown)
        self._explicit = None  # rows named by image_rows(mask); win over _current
        self._depth = 0        # open calls among the watched modules
        self._prompt = None    # image rows of the prompt of a model.generate call in progress
        model.add_module(ATTRIBUTE, moca)
        self._hooks = []
        watched = [model, getattr(model, "model", None), *decoder_chain(model)]
        for module in dict.fromkeys(m for m in watched if isinstance(m, torch.nn.Module)):
            read = _input_reader(module.forward)
            self._hooks.append(module.register_forward_pre_hook(
                lambda _m, args, kwargs, read=read: self._enter(read(args, kwargs)), with_kwargs=True))
            self._hooks.append(module.register_forward_hook(self._leave, always_call=True))
        for row, layer in enumerate(moca.layers):
            self._hooks.append(blocks[layer - 1].register_forward_hook(self._calibrator(row, layer), prepend=True))
        self._generate = self._naming_prompt_rows(model.generate) if hasattr(model, "generate") else None
        self._shadowed = model.__dict__.get("generate")  # an instance generate of someone else's, restored later
        if self._generate is not None:
            model.generate = self._generate  # an instance attribute over the class's method, undone by remove()

    # --- which rows ---------------------------------------------------------------------------------------------

    def _enter(self, inputs) -> None:
        self._depth += 1
        if self._depth > 1:  # an inner call (the model calling its language model): the outer call's rows hold
            return
        input_ids, attention_mask, embeds = inputs
        if not isinstance(input_ids, torch.Tensor):  # embeddings only: the prompt's rows if they fit, else unknown
            fits = (self._prompt is not None and isinstance(embeds, torch.Tensor)
                    and tuple(embeds.shape[:2]) == tuple(self._prompt.shape))
            self._current = self._prompt if fits else None
            return
        if not (isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2
                and attention_mask.shape[1] >= input_ids.shape[1]):
            attention_mask = None  # no mask, or a custom 4-D one: every position counts
        else:  # a cached step: the mask covers past + new tokens, the new ones are its last columns
            attention_mask = attention_mask[:, attention_mask.shape[1] - input_ids.shape[1]:]
        self._current = image_row_mask(input_ids, attention_mask, self.image_id)

    def _naming_prompt_rows(self, generate):
        """``generate`` that keeps its prompt's image rows (from its input_ids and attention_mask) while it runs.

        For models whose generate hands the language model the prompt as embeddings alone (BLIP-2, InstructBLIP
        merge the query outputs into inputs_embeds, and the prefill's input_ids are None): a call into the watched
        modules with inputs_embeds and no input_ids calibrates these rows when its (batch, tokens) match.
        """
        read = _input_reader(generate)

        @functools.wraps(generate)
        def wrapped(*args, **kwargs):
            input_ids, attention_mask, _ = read(args, kwargs)
            rows = None
            if isinstance(input_ids, torch.Tensor) and input_ids.dim() == 2:
                mask = attention_mask if (isinstance(attention_mask, torch.Tensor)
                                          and attention_mask.shape == input_ids.shape) else None
                rows = image_row_mask(input_ids, mask, self.image_id)
            previous, self._prompt = self._prompt, rows
            try:
                return generate(*args, **kwargs)
            finally:
                self._prompt = previous
        return wrapped

    def _leave(self, *_) -> None:
        self._depth = max(0, self._depth - 1)

    @contextlib.contextmanager
    def image_rows(self, mask: torch.Tensor):
        """Calibrate the rows where ``mask`` (bool (B, T)) is True in the calls made inside this block."""
        if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
            raise ValueError("image_rows needs a 2-D boolean (batch, tokens) tensor")
        previous, self._explicit = self._explicit, mask.bool()
        try:
            yield self
        finally:
            self._explicit = previous

    def _rows(self, hidden: torch.Tensor, layer: int) -> torch.Tensor:
        rows = self._explicit if self._explicit is not None else self._current
        if rows is None:
            raise RuntimeError(
                f"MoCa at layer {layer} does not know the image rows: the decoder ran without input_ids reaching "
                f"{type(self.model).__name__} (e.g. language_model(inputs_embeds=...)); wrap the call in "
                "`with handle.image_rows(input_ids == image_token_id):`")
        if tuple(rows.shape) != tuple(hidden.shape[:2]):
            raise RuntimeError(f"MoCa at layer {layer}: image-row mask {tuple(rows.shape)} does not match the "
                               f"layer's hidden states {tuple(hidden.shape[:2])} (batch, tokens)")
        return rows.to(hidden.device)

    def _calibrator(self, row: int, layer: int):
        def hook(module, args, output):
            hidden = output[0] if isinstance(output, tuple) else output
            if not isinstance(hidden, torch.Tensor):
                raise TypeError(f"MoCa: {type(module).__name__} (layer {layer}) returned {type(output).__name__}; "
                                "expected hidden states or a tuple starting with them")
            image = self._rows(hidden, layer)
            if not bool(image.any()):  # text-only call or decoding step: the output as it is
                return None
            calibrated = self.moca(hidden, image, row)
            return (calibrated, *output[1:]) if isinstance(output, tuple) else calibrated
        return hook

    # --- the handle ---------------------------------------------------------------------------------------------

    def parameters(self):
        """The trainable tensors (scale, shift), e.g. for an optimizer."""
        return self.moca.parameters()

    @property
    def attached(self) -> bool:
        return bool(self._hooks)

    def remove(self) -> None:
        """Remove every hook and ``model.moca``: the model computes exactly what it did before attach."""
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        if self.model._modules.get(ATTRIBUTE) is self.moca:
            del self.model._modules[ATTRIBUTE]
        if self._generate is not None and self.model.__dict__.get("generate") is self._generate:
            if self._shadowed is None:
                del self.model.__dict__["generate"]
            else:
                self.model.__dict__["generate"] = self._shadowed
        self._generate = None
        self._current = self._explicit = self._prompt = None

    def save(self, path) -> Path:
        """Write the MoCa parameters to ``path`` (see MoCa.save)."""
        return self.moca.save(path)

    def load(self, path) -> "MoCaHandle":
        """Load a MoCa file into the attached module (cast to its dtype); layers and hidden size must match."""
        stored = MoCa.from_file(path)
        if stored.layers != self.moca.layers or stored.hidden_size != self.moca.hidden_size:
            raise ValueError(f"{path} holds MoCa for layers {stored.layers} with hidden size {stored.hidden_size}; "
                             f"the attached one has layers {self.moca.layers} and hidden size {self.moca.hidden_size}")
        with torch.no_grad():
            self.moca.scale.copy_(stored.scale)
            self.moca.shift.copy_(stored.shift)
        return self

    def __repr__(self) -> str:
        state = "attached to" if self.attached else "removed from"
        return f"MoCaHandle({self.moca.extra_repr()}, {state} {type(self.model).__name__})"


def attach(model, processor=None, layers=None, moca: MoCa | None = None) -> MoCaHandle:
    """Attach MoCa to ``model``'s decoder layers; returns the handle (module docstring).

    processor: only needed when the model's config does not name its image token (see image_token_id).
    layers: decoder layer numbers 1..L to calibrate (negative counts from L; default all L).
    moca: an existing MoCa (e.g. ``MoCa.from_file(path)``) to attach instead of a fresh u = 1, v = 0 one; it is
        moved to the language model's device, keeps its dtype, and its layers are used when ``layers`` is None.
    """
    if ATTRIBUTE in model._modules or hasattr(model, ATTRIBUTE):
        raise ValueError(f"{type(model).__name__} already has a `{ATTRIBUTE}` attribute: remove the attached MoCa "
                         "(handle.remove()) before attaching another")
    image_id = image_token_id(model, processor)
    blocks = decoder_layers(model)
    if layers is None and moca is not None:
        layers = moca.layers
    chosen = select_layers(len(blocks), layers)
    if 0 in chosen:
        raise ValueError("layer 0 is the embedding output, not a decoder layer: MoCa layers are 1..L")
    hidden_size = model.config.get_text_config().hidden_size
    device = next(decoder_chain(model)[-1].parameters()).device
    if moca is None:
        moca = MoCa(chosen, hidden_size, device=device)
    else:
        if moca.layers != chosen or moca.hidden_size != hidden_size:
            raise ValueError(f"this MoCa has layers {moca.layers} and hidden size {moca.hidden_size}; the model "
                             f"needs layers {chosen} and hidden size {hidden_size}")
        moca.to(device)
    return MoCaHandle(model, moca, image_id, blocks)
