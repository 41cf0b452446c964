"""Trainable state: the named parts of a model that mirlab trains, and their checkpoint files.

A *state name* ("projector", "moca"; the language model tomorrow) maps to a function model -> module in
`REGISTRY`; a new trainable part registers itself in one line:

    register("projector", lambda model: model.model.multi_modal_projector)

For a list of names, the *state* is the union of the modules' state dicts with every tensor name prefixed by
its state name: {"projector.linear_1.weight": ..., "projector.linear_1.bias": ..., ...}.

State file (`save_state` / `load_state`): safetensors holding those tensors (floating ones cast to `dtype`,
float16 by default; None keeps each tensor's dtype; a dict gives one per state name, e.g. float32 for MoCa, whose
u ~ 1 float16 would round to steps of 2**-10) and the metadata

    format = "mirlab-trainable-v1"     names = JSON list of state names     recipe = JSON object (how it was made)

Older single-module files are read too: the shipped projector checkpoints (`data/projector/`, format
"mirlab-projector-v1") hold the projector's own tensor names (``linear_1.weight``, no prefix) and flat string
metadata; `load_state` reads such a file as the state ["projector"] and returns that metadata as the recipe.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Iterable

import torch

STATE_FORMAT = "mirlab-trainable-v1"
PROJECTOR_FORMAT = "mirlab-projector-v1"
SINGLE_MODULE_FORMATS = {PROJECTOR_FORMAT: "projector"}  # older files: format -> the one state name they hold

REGISTRY: dict[str, Callable[[torch.nn.Module], torch.nn.Module]] = {}


def register(name: str, locate: Callable[[torch.nn.Module], torch.nn.Module]) -> None:
    """Make `name` a state name: `locate(model)` returns the module it designates on a model."""
    if not name.isidentifier():
        raise ValueError(f"a state name must be a plain identifier (no dots), got {name!r}")
    REGISTRY[name] = locate


register("projector", lambda model: model.model.multi_modal_projector)  # LLaVA's connector (MLP or linear)
register("moca", lambda model: model.moca)  # MoCa's scales and shifts, while attached (mirlab.lvlm.moca)


def _names(names: Iterable[str] | str) -> list[str]:
    names = [names] if isinstance(names, str) else list(names)
    if not names:
        raise ValueError("no state names given")
    if len(set(names)) != len(names):
        raise ValueError(f"state names repeat: {names}")
    unknown = [n for n in names if n not in REGISTRY]
    if unknown:
        raise ValueError(f"unknown state names {unknown}; known: {sorted(REGISTRY)}")
    return names


def trainable_modules(model: torch.nn.Module, names: Iterable[str] | str) -> dict[str, torch.nn.Module]:
    """{name: module} for the state names, looked up on `model` through REGISTRY."""
    modules = {}
    for name in _names(names):
        try:
            module = REGISTRY[name](model)
        except AttributeError as err:
            raise ValueError(f"{type(model).__name__} has no {name!r} part ({err})") from None
        if not isinstance(module, torch.nn.Module):
            raise ValueError(f"{name!r} of {type(model).__name__} is a {type(module).__name__}, not a module")
        modules[name] = module
    return modules


def freeze_all_but(model: torch.nn.Module, names: Iterable[str] | str) -> int:
    """requires_grad on the named parts' parameters only (every other parameter frozen).

    Returns the number of trainable scalars: sum of numel over the distinct parameters left trainable.
    Does not touch train/eval mode.
    """
    modules = trainable_modules(model, names)
    for p in model.parameters():
        p.requires_grad_(False)
    for module in modules.values():
        for p in module.parameters():
            p.requires_grad_(True)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def named_state(model: torch.nn.Module, names: Iterable[str] | str) -> dict[str, torch.Tensor]:
    """The state of the named parts: {"<name>.<tensor name>": tensor} (the modules' own tensors, not copies)."""
    return {f"{name}.{key}": tensor for name, module in trainable_modules(model, names).items()
            for key, tensor in module.state_dict().items()}


def state_shapes(model: torch.nn.Module, names: Iterable[str] | str) -> dict[str, tuple[int, ...]]:
    """{"<name>.<tensor name>": shape} of the named parts, as a state file stores them."""
    return {key: tuple(tensor.shape) for key, tensor in named_state(model, names).items()}


def assign_state(model: torch.nn.Module, tensors: dict[str, torch.Tensor], names: Iterable[str] | str,
                 source: str = "state") -> None:
    """Load prefixed tensors into the named parts, each cast to the dtype of the tensor it replaces.

    The tensor names and shapes must be exactly those of `state_shapes(model, names)`; otherwise a
    ValueError names `source` and lists the missing, unexpected and mis-shaped tensors.
    """
    names = _names(names)
    expected = state_shapes(model, names)
    got = {key: tuple(t.shape) for key, t in tensors.items()}
    if got != expected:
        problems = []
        missing = sorted(set(expected) - set(got))
        unexpected = sorted(set(got) - set(expected))
        shapes = [f"{k} {got[k]} (model {expected[k]})" for k in sorted(set(got) & set(expected))
                  if got[k] != expected[k]]
        for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", shapes)):
            if items:
                problems.append(f"{label}: {', '.join(map(str, items))}")
        raise ValueError(f"{source} does not fit the {names} state of this {type(model).__name__}: "
                         f"{'; '.join(problems)}")
    for name, module in trainable_modules(model, names).items():
        own = module.state_dict()
        module.load_state_dict({key: tensors[f"{name}.{key}"].to(own[key].dtype) for key in own})


def _file_dtypes(dtype, names: list[str]) -> dict[str, torch.dtype | None]:
    """{state name: dtype its floating tensors are stored in, None = their own} from save_state's `dtype`."""
    per_name = dict(dtype) if isinstance(dtype, dict) else {name: dtype for name in names}
    stray = sorted(set(per_name) - set(names))
    if stray:
        raise ValueError(f"dtype names parts that are not saved: {stray} (saved: {names})")
    for name, value in per_name.items():
        if not (value is None or (isinstance(value, torch.dtype) and value.is_floating_point)):
            raise ValueError(f"dtype must be a floating torch dtype or None, got {value!r} for {name!r}")
    return {name: per_name.get(name) for name in names}


def save_state(model: torch.nn.Module, names: Iterable[str] | str, path, recipe: dict,
               dtype: torch.dtype | None | dict = torch.float16) -> Path:
    """Write the named parts to a safetensors state file (floating tensors cast to `dtype`); returns the path.

    dtype: one floating dtype for every part, None (each tensor keeps its dtype), or {state name: dtype or None}
    (a name left out keeps its dtypes). `recipe` (how the state was made) must be JSON-serializable; it comes
    back from `load_state` as JSON gives it back (tuples as lists).
    """
    from safetensors.torch import save_file

    names = _names(names)
    dtypes = _file_dtypes(dtype, names)
    if not isinstance(recipe, dict):
        raise ValueError(f"recipe must be a dict, got {type(recipe).__name__}")
    try:
        recipe_json = json.dumps(recipe)
    except TypeError as err:
        raise ValueError(f"recipe is not JSON-serializable: {err}") from None
    tensors = {}
    for name in names:
        target = dtypes[name]
        for key, t in named_state(model, [name]).items():
            keep = target is None or not t.is_floating_point()
            tensors[key] = t.detach().to(device="cpu", dtype=t.dtype if keep else target, copy=True).contiguous()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={"format": STATE_FORMAT, "names": json.dumps(names),
                                            "recipe": recipe_json})
    return path


def read_state(path) -> tuple[dict[str, torch.Tensor], list[str], dict]:
    """(prefixed tensors, state names, recipe) of a state file, or of an older single-module file."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no state file {path}")
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
        tensors = {key: f.get_tensor(key) for key in f.keys()}
    fmt = meta.get("format")
    if fmt == STATE_FORMAT:
        try:
            names, recipe = json.loads(meta["names"]), json.loads(meta["recipe"])
        except (KeyError, json.JSONDecodeError) as err:
            raise ValueError(f"{path}: damaged {STATE_FORMAT} metadata ({err!r})") from None
        return tensors, names, recipe
    if fmt in SINGLE_MODULE_FORMATS:
        name = SINGLE_MODULE_FORMATS[fmt]
        recipe = {k: v for k, v in meta.items() if k != "format"}
        return {f"{name}.{key}": t for key, t in tensors.items()}, [name], recipe
    raise ValueError(f"{path} is not a mirlab state file: format {fmt!r}, expected {STATE_FORMAT!r} "
                     f"(or one of {sorted(SINGLE_MODULE_FORMATS)})")


def load_state(model: torch.nn.Module, path, names: Iterable[str] | str | None = None) -> dict:
    """Load a state file into `model` (cast to the model's dtypes); returns the recipe stored with it.

    names: the state names the file must hold (None: whatever it holds). Errors name the file.
    """
    tensors, held, recipe = read_state(path)
    if names is not None:
        names = _names(names)
        if sorted(names) != sorted(held):
            raise ValueError(f"{path} holds the state {held}, not {names}")
    assign_state(model, tensors, held, source=str(path))
    return recipe
