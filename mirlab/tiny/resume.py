"""Resumable training state as safetensors + JSON: nothing mirlab reads back from disk is unpickled.

A resume state is everything a training loop needs to continue exactly where it stopped:

    tensors    the trained parts' tensors (`trainable.named_state`, float32)
    optimizer  `optimizer.state_dict()`: per-parameter tensors (AdamW: step, exp_avg, exp_avg_sq) and param groups
    rng        torch's CPU random-number-generator state (a uint8 tensor)
    meta       a JSON-able dict: step, recipe, whatever the loop records to check it resumes the same run

File layout (one safetensors file, written atomically): tensor names

    state.<name>                 a trained tensor
    optimizer.<param>.<key>      a tensor of the optimizer's per-parameter state (<param> = its integer index)
    rng.torch                    the RNG state

and the header metadata {"format": "mirlab-resume-v1", "meta": JSON, "optimizer": JSON of the param groups and of
the non-tensor per-parameter entries}. `torch.load` (pickle: a file from a shared cache could run code) is never
used: safetensors holds only tensors, and the rest is JSON.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from mirlab.paths import atomic_write

FORMAT = "mirlab-resume-v1"


def save(path, tensors: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer, meta: dict) -> Path:
    """Write a resume state to `path` (atomically: a temporary sibling, then rename). Returns the path."""
    from safetensors.torch import save_file

    out = {f"state.{name}": tensor.detach().to("cpu").contiguous().clone() for name, tensor in tensors.items()}
    opt = optimizer.state_dict()
    plain = {}
    for index, entries in opt["state"].items():
        for key, value in entries.items():
            if isinstance(value, torch.Tensor):
                out[f"optimizer.{index}.{key}"] = value.detach().to("cpu").contiguous().clone()
            else:
                plain.setdefault(str(index), {})[key] = value
    out["rng.torch"] = torch.get_rng_state()
    header = {"format": FORMAT, "meta": json.dumps(meta),
              "optimizer": json.dumps({"param_groups": opt["param_groups"], "plain": plain})}
    return atomic_write(path, lambda tmp: save_file(out, str(tmp), metadata=header))


def load(path, optimizer: torch.optim.Optimizer | None = None, restore_rng: bool = True):
    """Read a resume state: (tensors {name: tensor}, meta dict). Loads the optimizer's state into `optimizer`
    (if given) and restores torch's RNG (if `restore_rng`). A file that is not a mirlab resume state is an
    error naming it."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    with safe_open(str(path), "pt") as f:
        header = f.metadata() or {}
    if header.get("format") != FORMAT:
        raise ValueError(f"{path} is not a mirlab resume state (format {header.get('format')!r}, expected "
                         f"{FORMAT!r}); delete its folder to start the run over")
    raw = load_file(str(path))
    tensors = {name[len("state."):]: t for name, t in raw.items() if name.startswith("state.")}
    if optimizer is not None:
        saved = json.loads(header["optimizer"])
        state: dict[int, dict] = {}
        for name, tensor in raw.items():
            if name.startswith("optimizer."):
                _, index, key = name.split(".", 2)
                state.setdefault(int(index), {})[key] = tensor
        for index, entries in saved["plain"].items():
            state.setdefault(int(index), {}).update(entries)
        optimizer.load_state_dict({"state": state, "param_groups": saved["param_groups"]})
    if restore_rng:
        torch.set_rng_state(raw["rng.torch"])
    return tensors, json.loads(header["meta"])
