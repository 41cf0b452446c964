"""Model loading, image-token lookup, prompts and fingerprints (tiny offline models, see tiny_models.py)."""
import copy
import types

import pytest
import torch

import mirlab.tiny.build
from mirlab.run import load_model
from mirlab.lvlm.models import (image_token_id, model_fingerprint, num_layers, render_prompt,
                           text_token_ids, truncate_text)
from tiny_models import LAYERS, build, single_thread


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    with single_thread():
        yield


def test_image_token_id_comes_from_the_config_first():
    gemma = build("gemma3")
    soft = gemma.processor.tokenizer.convert_tokens_to_ids("<image_soft_token>")
    assert gemma.processor.image_token_id != soft  # the processor's attribute is the begin-of-image marker
    assert image_token_id(gemma.model, gemma.processor) == soft
    llava = build("llava")
    assert image_token_id(llava.model) == llava.processor.tokenizer.convert_tokens_to_ids("<image>")


def test_image_token_id_falls_back_to_the_processor_and_names_the_keys_when_missing():
    llava = build("llava")
    bare = types.SimpleNamespace(config=types.SimpleNamespace())
    assert image_token_id(bare, llava.processor) == llava.processor.tokenizer.convert_tokens_to_ids("<image>")
    with pytest.raises(ValueError, match=r"image_token_id.*image_token_index.*image_token"):
        image_token_id(bare, types.SimpleNamespace(image_token=None, tokenizer=None))
    index_only = types.SimpleNamespace(config=types.SimpleNamespace(image_token_index=7))
    assert image_token_id(index_only) == 7


def test_num_layers_reads_the_text_config():
    for family in ("llava", "qwen2_vl", "gemma3"):
        assert num_layers(build(family).model) == LAYERS


def test_chat_prompt_puts_the_image_in_the_user_turn_and_the_text_as_the_answer():
    llava = build("llava")
    prompt = render_prompt(llava.processor, "a cat sits")
    assert prompt.text == "USER: <image>\n ASSISTANT: a cat sits</s>"
    assert prompt.context[prompt.start:prompt.end] == "a cat sits" and prompt.suffix is None


def test_paligemma_prompt_passes_the_text_as_suffix():
    pali = build("paligemma")
    prompt = render_prompt(pali.processor, "two dogs")
    assert prompt.text == "<image>" and prompt.suffix == "two dogs"


def test_prompt_without_chat_template_or_suffix_is_image_newline_text():
    processor = copy.copy(build("llava").processor)
    processor.chat_template = None
    prompt = render_prompt(processor, "two dogs")
    assert prompt.text == "<image>\ntwo dogs"
    assert prompt.context[prompt.start:prompt.end] == "two dogs"


@pytest.mark.parametrize("family", ["llava", "idefics3", "gemma3", "paligemma"])
def test_text_token_ids_decode_to_the_text(family):
    tiny = build(family)
    tokenizer = tiny.processor.tokenizer
    for text in ["a cat sits on the mat", "quick!  brown\nfox", "ünïcödé dog"]:
        ids = text_token_ids(tokenizer, render_prompt(tiny.processor, text))
        assert tokenizer.decode(ids).strip() == text


def test_truncate_text_keeps_a_prefix_of_at_most_n_tokens():
    tokenizer = build("llava").processor.tokenizer
    text = "the quick brown fox jumps over the lazy dog"
    for n in (1, 3, 5):
        cut = truncate_text(tokenizer, text, n)
        assert text.startswith(cut) and 0 < len(cut) < len(text)
        assert len(tokenizer(cut, add_special_tokens=False)["input_ids"]) <= n
    assert truncate_text(tokenizer, text, 1000) == text


def test_fingerprint_sees_a_single_weight_change_and_ignores_copies():
    model = build("llava").model
    twin = copy.deepcopy(model)
    assert model.config.name_or_path == ""  # tiny models have no name: the weights must tell them apart
    assert model_fingerprint(twin) == model_fingerprint(model)
    with torch.no_grad():
        twin.model.multi_modal_projector.linear_1.weight[0, 0] += 1.0
    assert model_fingerprint(twin) != model_fingerprint(model)


def test_load_model_round_trips_a_saved_checkpoint(tmp_path):
    llava = build("llava")
    llava.model.save_pretrained(tmp_path)
    llava.processor.save_pretrained(tmp_path)
    model, processor = load_model(str(tmp_path))
    assert type(model).__name__ == "LlavaForConditionalGeneration" and not model.training
    assert image_token_id(model, processor) == image_token_id(llava.model)
    assert model_fingerprint(model) != "" and render_prompt(processor, "x").text == render_prompt(
        llava.processor, "x").text
    for a, b in zip(model.parameters(), llava.model.parameters()):
        assert torch.equal(a, b)


def test_load_model_base_llm_replaces_the_language_model(tmp_path):
    from transformers import LlamaForCausalLM

    llava = build("llava")
    llava.model.save_pretrained(tmp_path / "vlm")
    llava.processor.save_pretrained(tmp_path / "vlm")
    torch.manual_seed(123)
    base = LlamaForCausalLM(llava.model.config.text_config)
    base.save_pretrained(tmp_path / "llm")
    model, _ = load_model(str(tmp_path / "vlm"), base_llm=str(tmp_path / "llm"))
    decoder = model.model.language_model
    assert torch.equal(decoder.layers[0].mlp.up_proj.weight, base.model.layers[0].mlp.up_proj.weight)
    assert torch.equal(model.lm_head.weight, base.lm_head.weight)
    assert torch.equal(model.model.multi_modal_projector.linear_1.weight,
                       llava.model.model.multi_modal_projector.linear_1.weight)


def test_load_model_base_llm_of_the_wrong_shape_is_an_error(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    llava = build("llava")
    llava.model.save_pretrained(tmp_path / "vlm")
    llava.processor.save_pretrained(tmp_path / "vlm")
    LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2)).save_pretrained(tmp_path / "small")
    with pytest.raises((ValueError, RuntimeError), match="size mismatch|does not fit"):
        load_model(str(tmp_path / "vlm"), base_llm=str(tmp_path / "small"))


def test_load_model_embedded_name_uses_the_embedded_model(monkeypatch):
    llava = build("llava")
    asked = []

    def fake_embedded_model(checkpoint="final"):
        asked.append(checkpoint)
        return llava.model, llava.processor

    monkeypatch.setattr(mirlab.tiny.build, "embedded_model", fake_embedded_model)
    model, processor = load_model("mirlab/tiny-llava")
    assert model is llava.model and processor is llava.processor
    load_model("mirlab/tiny-llava@random")
    assert asked == ["final", "random"]


def test_load_model_rejects_an_unknown_dtype_name():
    with pytest.raises(ValueError, match="unknown dtype 'float33'"):
        load_model("anything", dtype="float33")


def test_load_model_embedded_honours_dtype_and_device_map_and_refuses_other_options(monkeypatch):
    import copy

    llava = build("llava")  # shared by other tests: hand out a copy, since .to(dtype) converts in place
    monkeypatch.setattr(mirlab.tiny.build, "embedded_model",
                        lambda checkpoint="final": (copy.deepcopy(llava.model), llava.processor))
    model, _ = load_model("mirlab/tiny-llava@random", dtype="bfloat16", device_map={"": "cpu"})
    assert next(model.parameters()).dtype == torch.bfloat16 and next(model.parameters()).device.type == "cpu"
    with pytest.raises(TypeError, match=r"no from_pretrained options, got \['attn_implementation'\]"):
        load_model("mirlab/tiny-llava", attn_implementation="eager")
    with pytest.raises(ValueError, match="goes to one device"):
        load_model("mirlab/tiny-llava", device_map={"a": "cpu", "b": "meta"})
    with pytest.raises(ValueError, match="is not a device"):
        load_model("mirlab/tiny-llava", device_map="gpu-please")
