"""Projector pre-training (mirlab.tiny.pretrain) and the downstream scores (mirlab.tiny.evaluate)."""
import csv
import math

import numpy as np
import pytest
import torch

from mirlab.tiny import evaluate
from mirlab.tiny import pretrain
from mirlab.tiny.build import embedded_checkpoints, embedded_model, init_projector, projector_dir
from mirlab.tiny.pretrain import IGNORE, Recipe
from mirlab.pairs.scenes import scene_dataset


@pytest.fixture(scope="module")
def tiny(embedded_cache):
    """A private (model, processor) with the seeded random projector; tests reset the projector they train."""
    return embedded_model("random", cache_dir=embedded_cache)


@pytest.fixture(scope="module")
def scenes():
    return scene_dataset(6, seed=7, split="train")


@pytest.fixture(scope="module")
def features(tiny, scenes):
    model, processor = tiny
    return pretrain.image_features(model, processor, [s["image"] for s in scenes])


def _projector(model):
    return {k: v.clone() for k, v in model.model.multi_modal_projector.state_dict().items()}


# --- pure pieces -------------------------------------------------------------------------------------------

def test_learning_rate_warms_up_then_decays_to_zero():
    recipe = Recipe(name="r", lr=1e-3, steps=100, warmup=10)
    lrs = [pretrain.learning_rate(s, recipe) for s in range(1, 101)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)  # linear warmup to the peak
    assert all(a > b for a, b in zip(lrs[9:], lrs[10:]))  # strictly decreasing afterwards
    assert lrs[-1] == pytest.approx(0.0, abs=1e-12)
    assert pretrain.learning_rate(55, recipe) == pytest.approx(0.5e-3)  # cosine midpoint


def test_batches_cover_each_epoch_once_and_are_seeded():
    recipe = Recipe(name="r", steps=10, batch_size=3, warmup=0, train_scenes=6, trajectory=())
    stream = [i for step in range(1, 9) for i in pretrain.batch_indices(step, recipe)]  # 24 = 4 epochs
    for epoch in range(4):
        assert sorted(stream[6 * epoch:6 * epoch + 6]) == list(range(6))
    assert stream[:6] != stream[6:12]  # a new order each epoch
    other = Recipe(name="r", steps=10, batch_size=3, warmup=0, train_scenes=6, trajectory=(), seed=1)
    assert pretrain.batch_indices(1, other) + pretrain.batch_indices(2, other) != stream[:6]


def test_trajectory_steps_start_at_zero_end_at_last_and_are_denser_early():
    steps = pretrain.trajectory_steps(400, 8)
    assert len(steps) == 8 and steps[0] == 0 and steps[-1] == 400
    gaps = np.diff(steps)
    assert gaps[0] < gaps[-1]


def test_recipe_rejects_nonsense():
    with pytest.raises(ValueError, match="trajectory"):
        Recipe(name="r", steps=10, warmup=0, trajectory=(0, 11))
    with pytest.raises(ValueError, match="name"):
        Recipe(name="final")


# --- inputs and the fast path ------------------------------------------------------------------------------

def test_encoded_captions_match_the_processor_and_target_only_the_caption(tiny, scenes):
    model, processor = tiny
    captions = [s["caption"] for s in scenes[:3]]
    input_ids, attention_mask, labels = pretrain.encode_captions(processor, captions)
    texts = [processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}]},
                                            {"role": "assistant", "content": c}], tokenize=False) for c in captions]
    reference = processor(images=[s["image"] for s in scenes[:3]], text=texts, return_tensors="pt", padding=True)
    assert torch.equal(input_ids, reference["input_ids"])
    assert torch.equal(attention_mask, reference["attention_mask"])
    tokenizer = processor.tokenizer
    for row, caption in enumerate(captions):
        targets = labels[row][labels[row] != IGNORE]
        assert tokenizer.decode(targets) == caption + "<|im_end|>"
    assert not (labels[input_ids == model.config.image_token_id] != IGNORE).any()


def test_fast_path_loss_equals_the_plain_llava_forward(tiny, scenes, features):
    model, processor = tiny
    captions = [s["caption"] for s in scenes[:3]]  # different lengths: padding is exercised
    input_ids, attention_mask, labels = pretrain.encode_captions(processor, captions)
    assert (attention_mask == 0).any()
    pixels = processor.image_processor([s["image"] for s in scenes[:3]], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        full = model(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixels, labels=labels).loss
        fast = pretrain.caption_loss(model, features[:3], input_ids, attention_mask, labels)
    assert math.isfinite(full.item()) and full.item() > 0.5
    assert abs(fast.item() - full.item()) < 1e-5
    # the cached features are exactly what LLaVA projects
    with torch.no_grad():
        projected = model.model.get_image_features(pixel_values=pixels).pooler_output
    torch.testing.assert_close(torch.stack(list(projected)), model.model.multi_modal_projector(features[:3]),
                               atol=1e-5, rtol=0)


def test_a_few_steps_reduce_the_loss_on_a_fixed_batch(tiny, scenes, features, tmp_path):
    model, processor = tiny
    init_projector(model)
    captions = [s["caption"] for s in scenes[:2]]
    batch = pretrain.encode_captions(processor, captions)
    with torch.no_grad():
        before = pretrain.caption_loss(model, features[:2], *batch).item()
    recipe = Recipe(name="fixed", lr=2e-3, steps=3, batch_size=2, warmup=0, train_scenes=2, trajectory=(0, 3))
    pretrain.train(model, recipe, features[:2], captions, processor, out_dir=tmp_path / "out",
                   state_dir=tmp_path / "state", progress=False)
    with torch.no_grad():
        after = pretrain.caption_loss(model, features[:2], *batch).item()
    init_projector(model)
    assert after < before - 0.1
    assert not any(p.requires_grad for p in model.parameters())  # train() leaves the model frozen
    assert sorted(p.name for p in (tmp_path / "out" / "fixed").iterdir()) == [
        "log.csv", "step-0000.safetensors", "step-0003.safetensors"]


def test_resume_gives_identical_weights_and_log(tiny, scenes, features, tmp_path):
    model, processor = tiny
    captions = [s["caption"] for s in scenes]
    recipe = Recipe(name="resume", lr=1e-3, steps=4, batch_size=2, warmup=1, train_scenes=6, checkpoint_every=2,
                    trajectory=(0, 2, 4))

    init_projector(model)
    pretrain.train(model, recipe, features, captions, processor, out_dir=tmp_path / "a", state_dir=tmp_path / "sa",
                   progress=False)
    straight = _projector(model)

    init_projector(model)
    step = pretrain.train(model, recipe, features, captions, processor, out_dir=tmp_path / "b",
                          state_dir=tmp_path / "sb", stop_after=2, progress=False)
    assert step == 2 and not (tmp_path / "b" / "resume" / "step-0004.safetensors").exists()
    init_projector(model, seed=99)  # whatever is in memory must not matter: the state file is the truth
    with open(tmp_path / "b" / "resume" / "log.csv", "a") as f:
        f.write("3,9.9,0.001,1.0\n")  # a row of lost work (after the last saved state): must be dropped
    pretrain.train(model, recipe, features, captions, processor, out_dir=tmp_path / "b", state_dir=tmp_path / "sb",
                   progress=False)
    resumed = _projector(model)
    init_projector(model)

    for name in straight:
        assert torch.equal(straight[name], resumed[name]), name

    def losses(folder):
        with open(folder / "resume" / "log.csv") as f:
            return [(row["step"], row["loss"], row["lr"]) for row in csv.DictReader(f)]

    assert losses(tmp_path / "a") == losses(tmp_path / "b")
    assert [s for s, _, _ in losses(tmp_path / "a")] == ["1", "2", "3", "4"]
    # re-running a finished recipe does nothing
    assert pretrain.train(model, recipe, features, captions, processor, out_dir=tmp_path / "b",
                          state_dir=tmp_path / "sb", progress=False) == 4
    assert losses(tmp_path / "b") == losses(tmp_path / "a")
    init_projector(model)


def test_resume_refuses_another_recipe(tiny, scenes, features, tmp_path):
    model, processor = tiny
    captions = [s["caption"] for s in scenes]
    recipe = Recipe(name="r", steps=2, batch_size=1, warmup=0, train_scenes=6, checkpoint_every=1, trajectory=())
    pretrain.train(model, recipe, features, captions, processor, out_dir=tmp_path, state_dir=tmp_path / "s",
                   stop_after=1, progress=False)
    init_projector(model)
    changed = Recipe(name="r", lr=5e-4, steps=2, batch_size=1, warmup=0, train_scenes=6, checkpoint_every=1,
                     trajectory=())
    with pytest.raises(ValueError, match="different recipe"):
        pretrain.train(model, changed, features, captions, processor, out_dir=tmp_path, state_dir=tmp_path / "s",
                       progress=False)
    init_projector(model)


# --- evaluation --------------------------------------------------------------------------------------------

def test_distractor_kinds_are_recognised():
    metadata = [s["metadata"] for s in scene_dataset(20, seed=3, split="test")]
    for candidates in evaluate.retrieval_candidates(metadata, k=3, seed=0):
        kinds = [evaluate.change_kind(candidates[0], d) for d in candidates[1:]]
        assert sorted(kinds) == ["colour", "count", "shape"], candidates
    assert evaluate.change_kind("A red circle on the left and a blue circle on the right.",
                                "A red square on the left and a blue circle on the right.") == "shape"


def test_retrieval_table_counts_only_strict_wins():
    candidates = [["A red circle.", "A blue circle.", "A red square.", "Two red circles."]] * 3
    scores = torch.tensor([[-1.0, -2.0, -3.0, -4.0],   # true caption first
                           [-2.0, -1.0, -3.0, -4.0],   # loses to the colour distractor
                           [-1.0, -1.0, -3.0, -4.0]])  # a tie is not a win
    table = evaluate.retrieval_table(candidates, scores, torch.full((3, 4), 5))
    assert table["retrieved"].tolist() == [True, False, False]
    assert table["rank"].tolist() == [0, 1, 1]
    summary = evaluate.retrieval_summary(table, k=3)
    assert summary["retrieval_accuracy"] == pytest.approx(1 / 3) and summary["retrieval_chance"] == 0.25
    assert summary["beats_colour"] == pytest.approx(1 / 3) and summary["beats_shape"] == 1.0
    assert summary["heldout_caption_loss"] == pytest.approx(4 / 15)


def test_retrieval_on_the_model_is_consistent_with_the_caption_loss(tiny):
    model, processor = tiny
    init_projector(model)
    test = scene_dataset(2, seed=0, split="test")
    metadata = [s["metadata"] for s in test]
    features = pretrain.image_features(model, processor, [s["image"] for s in test])
    table = evaluate.caption_retrieval(model, processor, features, metadata, k=2, seed=0, scenes_per_batch=2)
    assert len(table) == 2 and np.isfinite(table["score"]).all() and (table["score"] < 0).all()
    summary = evaluate.retrieval_summary(table, k=2)
    assert 0.0 <= summary["retrieval_accuracy"] <= 1.0
    loss = evaluate.heldout_caption_loss(model, processor, features, [m["caption"] for m in metadata])
    assert summary["heldout_caption_loss"] == pytest.approx(loss, rel=1e-4)
    # the shared-prompt (KV cache) scores equal the plain per-caption scores, whatever the batching
    candidates = evaluate.retrieval_candidates(metadata, k=2, seed=0)
    flat = [c for cands in candidates for c in cands]
    plain, tokens = evaluate.caption_logprobs(model, processor, features[torch.tensor([0, 0, 0, 1, 1, 1])], flat,
                                              batch_size=4)
    shared, shared_tokens = evaluate.candidate_logprobs(model, processor, features, candidates, scenes_per_batch=1)
    torch.testing.assert_close(shared.flatten(), plain, atol=2e-4, rtol=1e-5)
    assert torch.equal(shared_tokens.flatten(), tokens)


def test_captioning_scores_against_own_scene_and_chance():
    test = scene_dataset(12, seed=0, split="test")
    metadata = [s["metadata"] for s in test]
    other = evaluate.derangement(12, seed=0)
    assert sorted(other) == list(range(12)) and not (other == np.arange(12)).any()
    table = evaluate.captioning_scores([m["caption"] for m in metadata], metadata, seed=0)
    summary = evaluate.captioning_summary(table)
    assert summary["shape_recall"] == summary["colour_recall"] == summary["exact_match"] == 1.0
    assert summary["chance_shape_recall"] < 1.0 and summary["chance_colour_recall"] < 1.0
    blind = evaluate.captioning_summary(evaluate.captioning_scores(["Nothing here."] * 12, metadata))
    assert blind["shape_recall"] == blind["colour_recall"] == 0.0


def test_greedy_captions_return_one_string_per_image(tiny):
    model, processor = tiny
    init_projector(model)
    images = [s["image"] for s in scene_dataset(2, seed=0, split="test")]
    captions = evaluate.greedy_captions(model, processor, images, max_new_tokens=4)
    assert len(captions) == 2 and all(isinstance(c, str) for c in captions)


# --- the shipped checkpoints ----------------------------------------------------------------------------------

SHIPPED = embedded_checkpoints()


@pytest.mark.skipif(not SHIPPED, reason="no trained projector shipped in data/projector yet")
def test_shipped_checkpoints_load_and_give_finite_hidden_states(tiny):
    from safetensors import safe_open

    from mirlab.tiny.build import checkpoint_path, load_projector

    model, processor = tiny
    scene = scene_dataset(1, seed=0, split="test")[0]
    prompt = processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}]},
                                            {"role": "assistant", "content": scene["caption"]}], tokenize=False)
    inputs = processor(images=[scene["image"]], text=[prompt], return_tensors="pt")
    for name in SHIPPED:
        path = checkpoint_path(name)
        with safe_open(str(path), "pt") as f:
            meta = f.metadata()
        assert meta["format"] == "mirlab-projector-v1"
        if name != "final":
            recipe, step = name.split("/")
            assert meta["recipe"] == recipe and int(meta["step"]) == int(step.removeprefix("step-"))
        load_projector(model, path)
        with torch.no_grad():
            out = model(**inputs, output_hidden_states=True)
        assert len(out.hidden_states) == 31
        assert all(torch.isfinite(h).all() for h in out.hidden_states), name
    init_projector(model)
    for recipe in {n.split("/")[0] for n in SHIPPED if "/" in n}:
        assert (projector_dir() / recipe / "log.csv").is_file()
