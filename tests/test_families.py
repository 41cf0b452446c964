"""Extraction on tiny random models of every further sequence-image family of the installed transformers (built
offline from their real config and processor classes: tests/tiny_models_more.py, tests/tiny_models_fusion.py),
the families MIR does not apply to, and the families that cannot be built here (docs/families.md)."""
import json

import pytest
import torch

import mirlab.lvlm.models as models
from mirlab import extract_hidden_states
from mirlab.errors import UserError
from mirlab.lvlm.extract import forward_hidden_states, model_inputs, select_rows
from mirlab.lvlm.models import MissingDependency, load_pretrained, render_prompt, text_token_ids
from test_extract import family_pairs
from tiny_models import LAYERS, single_thread
import tiny_models
import tiny_models_fusion
import tiny_models_more

# PaliGemma-style processors build labels with np.array(torch tensor), which numpy 2 flags; not ours to fix
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

# every family mirlab extracts from, by name -> the builder file that has it (Mllama: cross-attention, refused)
BUILDERS = {**{name: tiny_models.build for name in tiny_models.FAMILIES},
            **{name: tiny_models_more.build for name in tiny_models_more.FAMILIES},
            **{name: tiny_models_fusion.build for name in tiny_models_fusion.FAMILIES if name != "mllama"}}


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    with single_thread():
        yield


def build(family):
    return BUILDERS[family](family)


def single_pair_rows(tiny, images, texts, text_span):
    """Per pair alone (batch of one, no padding): {layer: (image rows, text rows)} concatenated in pair order."""
    image_id = tiny.model.config.image_token_id
    rows = {}
    for image, text in zip(images, texts):
        prompt = render_prompt(tiny.processor, text)
        inputs = model_inputs(tiny.model, tiny.processor, [image], [prompt])
        image_mask, text_mask, problems = select_rows(inputs["input_ids"], inputs["attention_mask"], image_id,
                                                      text_span, [text_token_ids(tiny.processor.tokenizer, prompt)])
        assert problems == [None]
        for layer, states in enumerate(forward_hidden_states(tiny.model, inputs)):
            rows.setdefault(layer, ([], []))
            rows[layer][0].append(states[image_mask])
            rows[layer][1].append(states[text_mask])
    return {layer: (torch.cat(a), torch.cat(b)) for layer, (a, b) in rows.items()}


# --- every family: rows by the family's arithmetic, disjoint spans, batch = one at a time ------------------------

@pytest.mark.parametrize("family", list(BUILDERS))
def test_image_rows_match_the_family_arithmetic(family):
    tiny = build(family)
    images, texts, sizes = family_pairs(tiny)
    states = extract_hidden_states(tiny.model, tiny.processor, images, texts, batch_size=4, progress=False)
    assert states.samples["n_image"].tolist() == [tiny.expected_image_rows(w, h) for w, h in sizes]
    assert (states.samples["n_text"] > 0).all() and states.layers == list(range(1, LAYERS + 1))
    for _, image, text in states:
        assert image.shape == (states.samples["n_image"].sum(), tiny.model.config.get_text_config().hidden_size)
        assert torch.isfinite(image).all() and torch.isfinite(text).all()


@pytest.mark.parametrize("family", list(BUILDERS))
def test_text_rows_follow_the_image_and_the_caption_decodes_to_the_text(family):
    tiny = build(family)
    images, texts, _ = family_pairs(tiny)
    prompts = [render_prompt(tiny.processor, t) for t in texts]
    inputs = model_inputs(tiny.model, tiny.processor, images, prompts)
    returned = tiny.processor(images=[[im] for im in images], text=[p.text for p in prompts], padding=True,
                              return_tensors="pt", **({"suffix": [p.suffix for p in prompts]}
                                                      if prompts[0].suffix is not None else {}))
    assert set(inputs) == set(returned) - {"labels"}  # every tensor reaches the model (token types included)
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    image_id = tiny.model.config.image_token_id
    image, after, problems = select_rows(ids, mask, image_id, "after_image")
    _, caption, caption_problems = select_rows(ids, mask, image_id, "caption",
                                               [text_token_ids(tiny.processor.tokenizer, p) for p in prompts])
    assert problems == caption_problems == [None] * len(texts)
    assert not (image & after).any() and not (caption & ~after).any() and not ((after | image) & ~mask.bool()).any()
    for b, text in enumerate(texts):
        assert tiny.processor.tokenizer.decode(ids[b][caption[b]]).strip() == text
        assert after[b].nonzero().min() == image[b].nonzero().max() + 1


@pytest.mark.parametrize("family", list(BUILDERS))
def test_rows_of_a_padded_mixed_size_batch_equal_each_pair_alone(family):
    tiny = build(family)
    images, texts, _ = family_pairs(tiny, n=3)
    states = extract_hidden_states(tiny.model, tiny.processor, images, texts, batch_size=3, progress=False,
                                   text_span="caption", include_embeddings=True)
    alone = single_pair_rows(tiny, images, texts, "caption")
    for layer, image, text in states:
        torch.testing.assert_close(image, alone[layer][0], atol=2e-4, rtol=1e-4)
        torch.testing.assert_close(text, alone[layer][1], atol=2e-4, rtol=1e-4)


# --- early fusion: batch-dependent image codes -----------------------------------------------------------------

def test_emu3_image_codes_depend_on_the_batch_unless_sizes_are_grouped(monkeypatch):
    """Emu3 pads a batch's images to the largest, and its VQ-VAE (convolutions, attention) sees the padding: one
    padded pass gives other image rows than each image alone, already at the embedding output (other codes).
    Extraction therefore runs one pass per image size (same_size_batches), and the store keeps pair order."""
    tiny = build("emu3")
    images, texts, _ = family_pairs(tiny, n=3)  # sizes 24x16, 16x32, 32x32
    alone = single_pair_rows(tiny, images, texts, "after_image")
    monkeypatch.setattr(models, "SAME_SIZE_BATCHES", ())
    one_pass = extract_hidden_states(tiny.model, tiny.processor, images, texts, batch_size=3, layers=[0],
                                     progress=False)
    assert not torch.allclose(one_pass.layer(0)[0], alone[0][0], atol=1e-3)
    monkeypatch.undo()
    grouped = extract_hidden_states(tiny.model, tiny.processor, images, texts, batch_size=3, layers=[0],
                                     progress=False)
    assert grouped.samples["pair"].tolist() == [0, 1, 2]
    assert json.loads((grouped.path / "complete.json").read_text())["batches"] == [0]  # one batch, three passes
    torch.testing.assert_close(grouped.layer(0)[0], alone[0][0])


def test_grouped_passes_keep_pair_order_with_repeated_sizes_and_skipped_pairs():
    tiny = build("emu3")
    images, _, _ = family_pairs(tiny, n=5)  # sizes a, b, c, a, b: two of the passes hold two pairs each
    texts = ["a cat sits on the mat", "two dogs", "   ", "a red square", "the lazy dog"]
    with pytest.warns(UserWarning, match="skipped 1 of 5"):
        states = extract_hidden_states(tiny.model, tiny.processor, images, texts, batch_size=5, on_error="skip",
                                       progress=False)
    kept = [0, 1, 3, 4]
    assert states.samples["pair"].tolist() == kept
    alone = single_pair_rows(tiny, [images[i] for i in kept], [texts[i] for i in kept], "after_image")
    for layer, image, text in states:
        torch.testing.assert_close(image, alone[layer][0], atol=2e-4, rtol=1e-4)
        torch.testing.assert_close(text, alone[layer][1], atol=2e-4, rtol=1e-4)


def test_chameleon_code_rows_are_the_embeddings_of_the_vq_codes():
    """Layer 0 at Chameleon's image rows is the text embedding of the BPE token each VQ code maps to."""
    tiny = build("chameleon")
    images, texts, _ = family_pairs(tiny, n=2)
    states = extract_hidden_states(tiny.model, tiny.processor, images, texts, layers=[0], progress=False)
    inputs = model_inputs(tiny.model, tiny.processor, images, [render_prompt(tiny.processor, t) for t in texts])
    codes = tiny.model.model.get_image_tokens(inputs["pixel_values"])
    torch.testing.assert_close(states.layer(0)[0], tiny.model.get_input_embeddings()(codes.flatten()))


# --- query tokens -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["blip2", "instructblip"])
def test_query_token_families_write_the_text_alone_and_take_the_queries_as_image_rows(family):
    tiny = build(family)
    assert render_prompt(tiny.processor, "two dogs").text == "two dogs"
    images, texts, _ = family_pairs(tiny, n=2)
    inputs = model_inputs(tiny.model, tiny.processor, images, [render_prompt(tiny.processor, t) for t in texts])
    image, after, _ = select_rows(inputs["input_ids"], inputs["attention_mask"], tiny.model.config.image_token_id)
    queries = tiny.model.config.num_query_tokens
    for b in range(len(texts)):  # the processor puts the queries first, before BOS and the text
        assert image[b].nonzero().flatten().tolist() == list(range(queries))
    with pytest.raises(Exception, match="image placeholder '<image>'"):
        extract_hidden_states(tiny.model, tiny.processor, images[:1], ["a <image> here"], progress=False)


# --- families MIR does not apply to, families that cannot be built here -----------------------------------------------

def test_cross_attention_family_is_refused_with_the_reason():
    from mirlab.lvlm.moca import attach

    tiny = tiny_models_fusion.build("mllama")
    images, texts, _ = family_pairs(tiny, n=1)
    # the decoder sequence does hold one <|image|> marker per image: that is what extraction must not take
    inputs = model_inputs(tiny.model, tiny.processor, images, [render_prompt(tiny.processor, t) for t in texts])
    assert int((inputs["input_ids"] == tiny.model.config.image_token_id).sum()) == 1
    for call in (lambda: extract_hidden_states(tiny.model, tiny.processor, images, texts, progress=False),
                 lambda: attach(tiny.model, tiny.processor)):
        with pytest.raises(UserError, match=r"cross-attention \(decoder layers \[1\], counted from 0\).*no image rows"):
            call()
    assert not hasattr(tiny.model, "moca")


def test_a_model_that_needs_timm_names_it(tmp_path):
    """FastVLM's vision tower is a timm model: the config and processor load, the model cannot be built."""
    from safetensors.torch import save_file
    from transformers import FastVlmConfig

    llava = tiny_models_more.build("deepseek_vl")  # any saved processor: FastVLM's is an ordinary LLaVA one
    FastVlmConfig(vision_config={"model_type": "timm_wrapper", "architecture": "fastvit_mci3", "hidden_size": 64},
                  text_config={"model_type": "qwen2", "hidden_size": 32, "intermediate_size": 64,
                               "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 2,
                               "vocab_size": 400}).save_pretrained(tmp_path)
    llava.processor.save_pretrained(tmp_path)
    save_file({}, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})  # no tensors: never read
    with pytest.raises(MissingDependency, match=r"cannot build the model .*: it needs timm, which is not") as err:
        load_pretrained(str(tmp_path))
    assert err.value.name == "timm" and isinstance(err.value, ValueError)  # the command line shows one line


def test_a_processor_that_needs_torchvision_names_it(tmp_path):
    """Mistral3's processor (Pixtral) exists only with torchvision: a clear error before any model is built."""
    from transformers import Mistral3Config

    Mistral3Config(text_config={"model_type": "mistral", "hidden_size": 32, "intermediate_size": 64,
                                "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 2,
                                "vocab_size": 400}).save_pretrained(tmp_path)
    tiny_models_more.build("deepseek_vl").processor.tokenizer.save_pretrained(tmp_path)
    (tmp_path / "processor_config.json").write_text(json.dumps({"processor_class": "PixtralProcessor",
                                                                "patch_size": 4, "spatial_merge_size": 2}))
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"image_processor_type": "PixtralImageProcessor",
                                                                   "processor_class": "PixtralProcessor"}))
    with pytest.raises(MissingDependency, match=r"cannot build the processor .*: it needs torchvision") as err:
        load_pretrained(str(tmp_path))
    assert err.value.name == "torchvision"


@pytest.mark.parametrize("family", ["qwen2_vl", "internvl"])
def test_a_checkpoint_whose_processor_has_a_video_slot_names_torchvision(family, tmp_path):
    """Extraction of these families is tested with processors built without their video processor; a saved
    checkpoint's processor always builds one, which needs torchvision (Qwen2-VL raises an ImportError for it,
    InternVL a ValueError: both become the same clear MissingDependency)."""
    tiny = build(family)
    tiny.model.save_pretrained(tmp_path)
    tiny.processor.image_processor.save_pretrained(tmp_path)
    tiny.processor.tokenizer.save_pretrained(tmp_path)
    (tmp_path / "processor_config.json").write_text(json.dumps({"processor_class": type(tiny.processor).__name__}))
    with pytest.raises(MissingDependency, match="cannot build the processor .*: it needs torchvision"):
        load_pretrained(str(tmp_path))


def test_idefics_1_gated_cross_attention_is_refused_too():
    from transformers import IdeficsConfig

    config = IdeficsConfig(num_hidden_layers=4, cross_layer_interval=2)
    assert models.cross_attention_layers(config) == [0, 2]
    with pytest.raises(UserError, match=r"decoder layers \[0, 2\], counted from 0\).*MIR.*undefined"):
        models.image_token_id(config)
