"""Pre-training recipe axes of the tiny model (mirlab.tiny.pretrain): connector, MoCa, caption detail.

The recipe-level tests need no model; the others train the embedded model a few steps (batch 2) and compare
against independent references: the plain `LlavaForConditionalGeneration` forward, the model's own tensors
before training, a second model rebuilt from the saved file, an uninterrupted run.
"""
import argparse
import csv
import dataclasses
import json

import pytest
import torch
from safetensors import safe_open
from tiny_models import build as tiny_build

from mirlab import paths
from mirlab.pairs.scenes import describe_short, scene_dataset
from mirlab.tiny import build, pretrain
from mirlab.tiny.pretrain import Recipe
from mirlab.tiny.trainable import named_state

SHORT = dict(steps=2, batch_size=2, warmup=0, train_scenes=6, trajectory=(0, 2))


# --- recipes, without a model ------------------------------------------------------------------------------

def test_shipped_recipes_keep_their_meaning_and_default_axes():
    info = json.loads((paths.data_dir() / "projector" / "recipes.json").read_text())
    for entry in info["recipes"]:
        recipe = Recipe(**entry)
        assert recipe.default_axes and recipe.trained == ("projector",)
        assert (recipe.connector, recipe.moca, recipe.captions) == ("mlp", False, "detailed")
        assert {k: v for k, v in dataclasses.asdict(recipe).items() if k in entry} == {
            k: tuple(v) if isinstance(v, list) else v for k, v in entry.items()}
        # a resumable state saved before the axes existed records exactly these fields: it is the same recipe
        assert pretrain._saved_recipe(dict(entry)) == recipe
    assert pretrain._saved_recipe({**info["recipes"][0], "connector": "linear"}) != Recipe(**info["recipes"][0])
    assert pretrain._saved_recipe({"name": "x", "unknown_field": 1}) is None


def test_recipe_axes_are_checked():
    assert Recipe(name="m", moca=True).trained == ("projector", "moca")
    assert not Recipe(name="s", captions="short").default_axes
    with pytest.raises(ValueError, match="connector must be one of"):
        Recipe(name="r", connector="mlp3")
    with pytest.raises(ValueError, match="captions must be one of"):
        Recipe(name="r", captions="long")
    with pytest.raises(ValueError, match="moca must be True or False"):
        Recipe(name="r", moca="yes")


def test_cli_options_set_the_axes():
    parser = pretrain.add_arguments(argparse.ArgumentParser())
    plain = pretrain.recipe_from_args(parser.parse_args(["--recipe", "a"]))
    assert plain == Recipe(name="a") and plain.default_axes
    axes = pretrain.recipe_from_args(parser.parse_args(
        ["--recipe", "b", "--connector", "linear", "--moca", "--captions", "short"]))
    assert (axes.connector, axes.moca, axes.captions) == ("linear", True, "short")
    assert dataclasses.replace(axes, connector="mlp", moca=False, captions="detailed") == Recipe(name="b")
    with pytest.raises(SystemExit):
        parser.parse_args(["--recipe", "c", "--connector", "conv"])


def test_short_captions_are_those_of_the_same_scenes():
    metadata = [s["metadata"] for s in scene_dataset(20, seed=3, split="train")]
    assert pretrain.scene_captions(metadata, "detailed") == [m["caption"] for m in metadata]
    assert pretrain.scene_captions(metadata, "short") == [describe_short(m["groups"]) for m in metadata]
    with pytest.raises(ValueError, match="captions must be one of"):
        pretrain.scene_captions(metadata, "long")


def test_an_old_resumable_state_still_resumes(tmp_path):
    """A state whose recipe predates the axes (no connector/moca/captions in it) resumes as their defaults."""
    from mirlab.tiny import resume

    model = tiny_build("llava").model
    recipe = Recipe(name="r", steps=10, warmup=0, train_scenes=4, trajectory=())
    optimizer = torch.optim.AdamW(pretrain.freeze_all_but_projector(model), lr=1e-3)
    path = tmp_path / pretrain.STATE_FILE
    pretrain._save_state(path, model, optimizer, 3, recipe)
    tensors, meta = resume.load(path, restore_rng=False)
    for key in ("connector", "moca", "captions"):
        del meta["recipe"][key]
    resume.save(path, tensors, optimizer, meta)
    assert pretrain._load_state(path, model, optimizer, recipe) == 3
    with pytest.raises(ValueError, match="different recipe"):
        pretrain._load_state(path, model, optimizer, dataclasses.replace(recipe, moca=True))


def test_moca_handle_is_found_however_moca_was_attached():
    from mirlab.lvlm.moca import attach

    model = tiny_build("llava").model
    assert build.moca_handle(model) is None
    handle = attach(model)
    assert build.moca_handle(model) is handle
    ids = torch.tensor([[model.config.image_token_id, 5, 6]])
    with build.moca_rows(model, ids):
        assert torch.equal(handle._explicit, ids == model.config.image_token_id)
    assert handle._explicit is None
    assert build.remove_moca(model) is model and not hasattr(model, "moca") and not handle.attached
    assert build.moca_handle(model) is None


# --- the embedded model ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny(embedded_cache):
    return build.embedded_model("random", cache_dir=embedded_cache)


@pytest.fixture
def model(tiny):
    """The shared model; put back to the baseline's step 0 (MLP, no MoCa) after each test."""
    yield tiny
    pretrain.prepare(*tiny, Recipe(name="baseline"))


@pytest.fixture(scope="module")
def scenes():
    return scene_dataset(6, seed=7, split="train")


@pytest.fixture(scope="module")
def features(tiny, scenes):
    model, processor = tiny
    return pretrain.image_features(model, processor, [s["image"] for s in scenes])


def _inputs(processor, scenes, n=2):
    prompts = [processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}]},
                                              {"role": "assistant", "content": s["caption"]}], tokenize=False)
               for s in scenes[:n]]
    return processor(images=[s["image"] for s in scenes[:n]], text=prompts, return_tensors="pt", padding=True)


def _hidden_states(model, inputs):
    with torch.no_grad():
        return model(**inputs, output_hidden_states=True).hidden_states


def test_linear_connector_is_what_llava_projects_with(model, scenes, features):
    model, processor = model
    mlp_linear_1 = {k: v.clone() for k, v in model.model.multi_modal_projector.linear_1.state_dict().items()}
    build.set_connector(model, "linear")
    projector = model.model.multi_modal_projector
    assert build.connector_kind(model) == "linear"
    assert build.projector_shapes(model) == build.projector_shapes(kind="linear") == {
        "linear_1.weight": (576, 384), "linear_1.bias": (576,)}
    for k, v in projector.linear_1.state_dict().items():  # seeded: the MLP's first layer, same seed
        assert torch.equal(v, mlp_linear_1[k]), k
    # LLaVA projects with it: get_image_features, and the fast path's cached features, are one affine map
    pixels = processor.image_processor([s["image"] for s in scenes[:2]], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        projected = torch.stack(list(model.model.get_image_features(pixel_values=pixels).pooler_output))
        reference = features[:2] @ projector.linear_1.weight.T + projector.linear_1.bias
    torch.testing.assert_close(projected, reference, atol=1e-5, rtol=0)
    # the fast-path loss equals the plain forward's loss (different caption lengths: padding is exercised)
    captions = [s["caption"] for s in scenes[:3]]
    input_ids, attention_mask, labels = pretrain.encode_captions(processor, captions)
    assert (attention_mask == 0).any()
    pixels = processor.image_processor([s["image"] for s in scenes[:3]], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        full = model(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixels, labels=labels).loss
        fast = pretrain.caption_loss(model, features[:3], input_ids, attention_mask, labels)
    assert full.item() > 0.5 and abs(fast.item() - full.item()) < 1e-5
    assert all(torch.isfinite(h).all() for h in _hidden_states(model, _inputs(processor, scenes)))
    with pytest.raises(ValueError, match="connector must be one of"):
        build.set_connector(model, "conv")


def _randomize_moca(model, seed=0):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        model.moca.scale.copy_(1 + 0.2 * torch.randn(model.moca.scale.shape, generator=generator))
        model.moca.shift.copy_(0.2 * torch.randn(model.moca.shift.shape, generator=generator))


def test_with_moca_the_fast_path_and_the_retrieval_scores_equal_the_plain_forward(model, scenes, features):
    from mirlab.tiny import evaluate

    model, processor = model
    pretrain.prepare(model, processor, Recipe(name="m", moca=True))
    _randomize_moca(model)
    captions = [s["caption"] for s in scenes[:3]]
    input_ids, attention_mask, labels = pretrain.encode_captions(processor, captions)
    pixels = processor.image_processor([s["image"] for s in scenes[:3]], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        full = model(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixels, labels=labels).loss
        fast = pretrain.caption_loss(model, features[:3], input_ids, attention_mask, labels)
        build.remove_moca(model)
        without = pretrain.caption_loss(model, features[:3], input_ids, attention_mask, labels)
    assert abs(fast.item() - full.item()) < 1e-5 and abs(without.item() - full.item()) > 1e-2
    # the shared-prompt (KV cache) retrieval scores calibrate the prompt's image rows as well
    pretrain.prepare(model, processor, Recipe(name="m", moca=True))
    _randomize_moca(model)
    candidates = [[s["caption"], "A green star."] for s in scenes[:2]]
    shared, _ = evaluate.candidate_logprobs(model, processor, features[:2], candidates, scenes_per_batch=2)
    plain, _ = evaluate.caption_logprobs(model, processor, features[torch.tensor([0, 0, 1, 1])],
                                         [c for pair in candidates for c in pair], batch_size=4)
    torch.testing.assert_close(shared.flatten(), plain, atol=2e-4, rtol=1e-5)


def test_train_refuses_a_model_that_is_not_the_recipes(model, scenes, features, tmp_path):
    model, processor = model
    recipe = Recipe(name="lin", connector="linear", **SHORT)
    with pytest.raises(ValueError, match="linear connector without MoCa; the model has a mlp connector"):
        pretrain.train(model, recipe, features, [s["caption"] for s in scenes], processor, out_dir=tmp_path,
                       state_dir=tmp_path / "s", progress=False)


def _changed(before, model):
    return sorted(n for n, p in model.state_dict().items() if not torch.equal(p, before[n]))


def test_moca_recipe_trains_u_v_and_the_projector_only_and_its_checkpoints_rebuild_the_model(
        model, scenes, features, tmp_path):
    model, processor = model
    recipe = Recipe(name="moca", moca=True, lr=1e-3, **SHORT)
    pretrain.prepare(model, processor, recipe)
    before = {n: p.clone() for n, p in model.state_dict().items()}
    pretrain.train(model, recipe, features, [s["caption"] for s in scenes], processor, out_dir=tmp_path,
                   state_dir=tmp_path / "s", progress=False)
    projector = sorted(f"model.multi_modal_projector.{k}" for k in model.model.multi_modal_projector.state_dict())
    assert _changed(before, model) == sorted(projector + ["moca.scale", "moca.shift"])
    assert not any(p.requires_grad for p in model.parameters())

    folder = tmp_path / "moca"
    with safe_open(str(folder / "step-0000.safetensors"), "pt") as f:  # step 0: the init, MoCa the identity
        assert json.loads(f.metadata()["names"]) == ["projector", "moca"]
        assert torch.equal(f.get_tensor("moca.scale"), torch.ones(30, 576))
        assert torch.equal(f.get_tensor("moca.shift"), torch.zeros(30, 576))
        assert torch.equal(f.get_tensor("projector.linear_2.bias"),
                           before["model.multi_modal_projector.linear_2.bias"].half())
    with safe_open(str(folder / "step-0002.safetensors"), "pt") as f:
        assert f.get_tensor("moca.scale").dtype == torch.float32  # float16 would round u ~ 1
        assert f.get_tensor("projector.linear_1.weight").dtype == torch.float16
        record = json.loads(f.metadata()["recipe"])
    assert record["moca"] is True and record["step"] == 2 and record["recipe"] == "moca"
    assert Recipe(**{k: v for k, v in record.items() if k not in ("recipe", "step", "train_loss")}) == recipe

    # the file rebuilds the model: MoCa attached, same hidden states as the trained model (projector in fp16)
    with torch.no_grad():
        for p in model.model.multi_modal_projector.parameters():
            p.copy_(p.half().float())
    path = folder / "step-0002.safetensors"
    loaded, _ = build.embedded_model(path)
    assert loaded.moca is not None and build.connector_kind(loaded) == "mlp"
    assert loaded.name_or_path == f"mirlab/tiny-llava@{path.resolve().as_posix()}"
    inputs = _inputs(processor, scenes)
    ours, theirs = _hidden_states(model, inputs), _hidden_states(loaded, inputs)
    assert not torch.equal(ours[5], _hidden_states(build.remove_moca(loaded), inputs)[5])  # MoCa matters
    for layer, (a, b) in enumerate(zip(ours, theirs)):
        assert torch.equal(a, b), layer


def test_linear_checkpoint_rebuilds_the_linear_model(model, scenes, features, tmp_path):
    model, processor = model
    recipe = Recipe(name="linear", connector="linear", captions="short", **SHORT)
    pretrain.prepare(model, processor, recipe)
    captions = pretrain.scene_captions([s["metadata"] for s in scenes], "short")
    pretrain.train(model, recipe, features, captions, processor, out_dir=tmp_path, state_dir=tmp_path / "s",
                   progress=False)
    with torch.no_grad():
        for p in model.model.multi_modal_projector.parameters():
            p.copy_(p.half().float())
    loaded, _ = build.embedded_model(str(tmp_path / "linear" / "step-0002.safetensors"))
    assert build.connector_kind(loaded) == "linear" and getattr(loaded, "moca", None) is None
    inputs = _inputs(processor, scenes)
    for layer, (a, b) in enumerate(zip(_hidden_states(model, inputs), _hidden_states(loaded, inputs))):
        assert torch.equal(a, b), layer
    with pytest.raises(FileNotFoundError, match="no checkpoint file"):
        build.embedded_model(tmp_path / "absent.safetensors")


def test_short_caption_features_are_those_of_the_detailed_scenes(tiny):
    model, processor = tiny
    detailed, captions, metadata = pretrain.scene_features(model, processor, 3, seed=5)
    short, short_captions, short_metadata = pretrain.scene_features(model, processor, 3, seed=5, captions="short")
    assert torch.equal(detailed, short) and metadata == short_metadata
    assert captions == [m["caption"] for m in metadata]
    assert short_captions == [describe_short(m["groups"]) for m in metadata] != captions


def test_resume_with_moca_gives_identical_weights_and_log(model, scenes, features, tmp_path):
    model, processor = model
    captions = [s["caption"] for s in scenes]
    recipe = Recipe(name="resume", moca=True, lr=1e-3, steps=3, batch_size=2, warmup=1, train_scenes=6,
                    checkpoint_every=2, trajectory=(0, 3))

    def trained():
        return {k: v.clone() for k, v in named_state(model, recipe.trained).items()}

    pretrain.prepare(model, processor, recipe)
    pretrain.train(model, recipe, features, captions, processor, out_dir=tmp_path / "a", state_dir=tmp_path / "sa",
                   progress=False)
    straight = trained()

    pretrain.prepare(model, processor, recipe)
    assert pretrain.train(model, recipe, features, captions, processor, out_dir=tmp_path / "b",
                          state_dir=tmp_path / "sb", stop_after=2, progress=False) == 2
    with torch.no_grad():  # whatever is in memory must not matter: the state file is the truth
        model.moca.scale.fill_(3.0)
        model.moca.shift.fill_(-1.0)
    pretrain.train(model, recipe, features, captions, processor, out_dir=tmp_path / "b", state_dir=tmp_path / "sb",
                   progress=False)
    resumed = trained()
    assert not torch.equal(straight["moca.scale"], torch.ones_like(straight["moca.scale"]))
    for name in straight:
        assert torch.equal(straight[name], resumed[name]), name

    def losses(folder):
        with open(folder / "resume" / "log.csv") as f:
            return [(row["step"], row["loss"], row["lr"]) for row in csv.DictReader(f)]

    assert losses(tmp_path / "a") == losses(tmp_path / "b") and len(losses(tmp_path / "a")) == 3
