"""Instruction tuning (mirlab.tiny.sft) on tiny random LLaVAs: targets, the loss against Hugging Face's own, which
parts train, exact resume, the weight files; one slow test on the embedded model (save, reload, same answers)."""
import argparse
import copy
import csv

import pytest
import torch

from mirlab.pairs import scene_qa
from mirlab.pairs.scenes import scene_dataset
from mirlab.tiny import instruct, pretrain, sft, trainable
from mirlab.tiny.build import CHAT_TEMPLATE, embedded_model
from mirlab.tiny.pretrain import IGNORE
from mirlab.tiny.sft import SFTRecipe

import tiny_models


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    with tiny_models.single_thread():
        yield


@pytest.fixture(scope="module")
def tied():
    model, processor = tiny_models.chatml_llava(CHAT_TEMPLATE, tied=True)
    assert sft.tied_head(model)
    return model, processor


@pytest.fixture(scope="module")
def untied():
    model, processor = tiny_models.chatml_llava(CHAT_TEMPLATE, tied=False)
    assert not sft.tied_head(model)
    return model, processor


@pytest.fixture(scope="module")
def scenes():
    return list(scene_dataset(4, seed=3, split="train"))


@pytest.fixture(scope="module")
def questions(scenes):
    return scene_qa.scene_questions([s["metadata"] for s in scenes], seed=0, split="train")


def _features(model, processor, scenes):
    return pretrain.image_features(model, processor, [s["image"] for s in scenes])


def _recipe(**changes):
    base = dict(name="t", lr=3e-3, steps=4, batch_size=3, warmup=1, train_scenes=4, checkpoint_every=2)
    return SFTRecipe(**{**base, **changes})


def _train(model, processor, scenes, questions, tmp_path, recipe, **kwargs):
    data = (questions, _features(model, processor, scenes))
    return sft.train_sft(model, processor, recipe, "random", out_dir=tmp_path / "out", state_dir=tmp_path / "state",
                         progress=False, data=data, **kwargs)


def _weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# --- targets and the loss --------------------------------------------------------------------------------------

def test_only_the_answer_tokens_are_targets(tied, scenes, questions):
    model, processor = tied
    features = _features(model, processor, scenes)
    batch = questions[:5]
    picked, input_ids, attention_mask, labels = sft.encode_batch(processor, features, batch)
    assert torch.equal(picked, features[[q["scene"] for q in batch]])
    for row, q in enumerate(batch):
        # reference: the processor's tokens of the full turn; targets = after the prompt, before the final "\n"
        conversation = [instruct.user_message(q["question"]),
                        {"role": "assistant", "content": [{"type": "text", "text": q["answer"]}]}]
        text = processor.apply_chat_template(conversation, tokenize=False)
        prompt = processor.apply_chat_template(conversation[:1], tokenize=False, add_generation_prompt=True)
        image = scenes[q["scene"]]["image"]
        ids = processor(images=[image], text=[text])["input_ids"][0]
        start = len(processor(images=[image], text=[prompt])["input_ids"][0])
        n = len(ids)
        assert input_ids[row, :n].tolist() == ids and not attention_mask[row, n:].any()
        expected = [IGNORE] * start + ids[start:n - 1] + [IGNORE] * (labels.shape[1] - n + 1)
        assert labels[row].tolist() == expected
        assert processor.tokenizer.decode(ids[start:n - 1]) == q["answer"] + "<|im_end|>"


def test_a_conversation_is_the_chat_template_with_every_answer_a_target(tied, scenes, questions):
    model, processor = tied
    features = _features(model, processor, scenes)
    conversation = [q for q in questions if q["scene"] == 1][:4]
    assert len(conversation) == 4
    _, input_ids, attention_mask, labels = sft.encode_batch(processor, features, [conversation, questions[:1]])
    messages = []
    for k, q in enumerate(conversation):
        messages += [instruct.user_message(q["question"], image=k == 0),
                     {"role": "assistant", "content": [{"type": "text", "text": q["answer"]}]}]
    text = processor.apply_chat_template(messages, tokenize=False)
    ids = processor(images=[scenes[1]["image"]], text=[text])["input_ids"][0]
    assert input_ids[0, :len(ids)].tolist() == ids and attention_mask[0].sum() == len(ids)
    # the targets, read back: each answer followed by the end-of-turn token, nothing else
    targets = [t for t in labels[0].tolist() if t != IGNORE]
    assert processor.tokenizer.decode(targets) == "".join(q["answer"] + "<|im_end|>" for q in conversation)
    image_id = model.config.image_token_id
    assert (input_ids[0] == image_id).sum() == instruct.image_token_count(processor)  # one image, first turn
    # a one-question conversation is exactly the single-turn encoding
    single = instruct.encode_qa(processor, [questions[0]["question"]], [questions[0]["answer"]])
    n = int(single[1].sum())
    assert input_ids[1, :n].tolist() == single[0][0].tolist() and labels[1, :n].tolist() == single[2][0].tolist()


def test_scene_conversations_hold_every_question_once_in_a_seeded_order(questions):
    single = sft.conversations(questions, _recipe(turns="single"))
    assert single == [[q] for q in questions]
    grouped = sft.conversations(questions, _recipe(turns="scene"))
    assert [c[0]["scene"] for c in grouped] == sorted({q["scene"] for q in questions})
    assert all(len({q["scene"] for q in c}) == 1 for c in grouped)
    assert sorted(id(q) for c in grouped for q in c) == sorted(id(q) for q in questions)
    assert grouped == sft.conversations(questions, _recipe(turns="scene"))
    assert grouped != sft.conversations(questions, _recipe(turns="scene", seed=5))


def test_conversations_train(tied, scenes, questions, tmp_path):
    model, processor = copy.deepcopy(tied[0]), tied[1]
    recipe = _recipe(turns="scene", batch_size=2, steps=3)
    assert _train(model, processor, scenes, questions, tmp_path, recipe) == 3
    tensors, _, record = trainable.read_state(tmp_path / "out" / sft.FINAL_FILE)
    assert record["recipe"]["turns"] == "scene"


@pytest.mark.parametrize("which", ["tied", "untied"])
def test_loss_equals_the_hugging_face_causal_lm_loss(which, request, scenes, questions):
    model, processor = request.getfixturevalue(which)
    features = _features(model, processor, scenes)
    batch = questions[:6]  # different lengths: padding is exercised
    picked, input_ids, attention_mask, labels = sft.encode_batch(processor, features, batch)
    assert (attention_mask == 0).any()
    pixels = processor.image_processor([scenes[q["scene"]]["image"] for q in batch],
                                       return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        reference = model(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixels,
                          labels=labels).loss
        ours = sft.answer_loss(model, picked, input_ids, attention_mask, labels)
    assert reference.item() > 1.0
    assert abs(ours.item() - reference.item()) < 1e-5


# --- what trains ------------------------------------------------------------------------------------------------

def test_a_few_steps_reduce_the_loss_on_a_fixed_batch(tied, scenes, questions, tmp_path):
    model, processor = copy.deepcopy(tied[0]), tied[1]
    features = _features(model, processor, scenes)
    fixed = questions[:3]
    with torch.no_grad():
        before = sft.answer_loss(model, *sft.encode_batch(processor, features, fixed)).item()
    recipe = _recipe(lr=3e-2, steps=5, batch_size=3, warmup=0)
    sft.train_sft(model, processor, recipe, "random", out_dir=tmp_path, state_dir=tmp_path, progress=False,
                  data=(fixed, features))
    with torch.no_grad():
        after = sft.answer_loss(model, *sft.encode_batch(processor, features, fixed)).item()
    assert after < 0.6 * before
    assert not any(p.requires_grad for p in model.parameters())  # left frozen
    with open(tmp_path / "log.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4, 5] and all(float(r["seconds"]) > 0 for r in rows)


def _changed(before, after, prefix):
    keys = [k for k in before if k.startswith(prefix)]
    assert keys, prefix
    return {k: not torch.equal(before[k], after[k]) for k in keys}


@pytest.mark.parametrize("which", ["tied", "untied"])
def test_exactly_the_language_model_and_projector_change(which, request, scenes, questions, tmp_path):
    model, processor = copy.deepcopy(request.getfixturevalue(which)[0]), request.getfixturevalue(which)[1]
    before = _weights(model)
    _train(model, processor, scenes, questions, tmp_path, _recipe())
    after = _weights(model)
    assert not any(_changed(before, after, "model.vision_tower.").values())
    assert all(_changed(before, after, "model.multi_modal_projector.").values())
    decoder = _changed(before, after, "model.language_model.layers.")
    assert all(decoder.values()), [k for k, v in decoder.items() if not v]
    assert all(_changed(before, after, "model.language_model.norm.").values())
    assert _changed(before, after, "lm_head.")["lm_head.weight"]
    if which == "tied":
        assert model.lm_head.weight is model.get_input_embeddings().weight
    assert set(before) == set(after)


@pytest.mark.parametrize("which", ["tied", "untied"])
def test_the_final_file_holds_each_trained_tensor_once(which, request, scenes, questions, tmp_path):
    model, processor = copy.deepcopy(request.getfixturevalue(which)[0]), request.getfixturevalue(which)[1]
    _train(model, processor, scenes, questions, tmp_path, _recipe())
    tensors, names, record = trainable.read_state(tmp_path / "out" / sft.FINAL_FILE)
    expected = ["language_model", "projector"] + ([] if which == "tied" else ["lm_head"])
    assert names == expected == record["names"]
    assert record["stage"] == "sft" and record["recipe"]["lr"] == 3e-3 and record["start"]["checkpoint"] == "random"
    assert all(t.dtype == torch.float32 for t in tensors.values())
    head = [k for k in tensors if "lm_head" in k or "embed_tokens" in k]
    assert head == (["language_model.embed_tokens.weight"] if which == "tied"
                    else ["language_model.embed_tokens.weight", "lm_head.weight"])
    # round trip: a fresh copy of the untrained model takes the file and equals the trained one exactly
    fresh = copy.deepcopy(request.getfixturevalue(which)[0])
    trainable.load_state(fresh, tmp_path / "out" / sft.FINAL_FILE)
    trained, loaded = model.state_dict(), fresh.state_dict()
    assert set(trained) == set(loaded)
    for key in trained:
        assert torch.equal(loaded[key], trained[key]), key


def test_moca_parameters_train_too(untied, scenes, questions, tmp_path):
    from mirlab.lvlm.moca import attach
    from mirlab.tiny.build import moca_handle

    model, processor = copy.deepcopy(untied[0]), untied[1]
    handle = attach(model, processor)
    before = {k: v.clone() for k, v in handle.moca.state_dict().items()}
    recipe = _recipe()
    assert sft.trained_names(model, recipe) == ["language_model", "projector", "lm_head", "moca"]
    assert moca_handle(model) is handle
    features = _features(model, processor, scenes)
    batch = sft.encode_batch(processor, features, questions[:3])
    with torch.no_grad():  # fresh MoCa = identity: the loss is the one without it
        with_moca = sft.answer_loss(model, *batch).item()
    _train(model, processor, scenes, questions, tmp_path, recipe)
    for key, tensor in handle.moca.state_dict().items():
        assert not torch.equal(tensor, before[key]), key
    tensors, names, _ = trainable.read_state(tmp_path / "out" / sft.FINAL_FILE)
    assert names == ["language_model", "projector", "lm_head", "moca"]
    assert {k: t.dtype for k, t in tensors.items() if k.startswith("moca.")} == {
        "moca.scale": torch.float32, "moca.shift": torch.float32}
    torch.testing.assert_close(tensors["moca.scale"], handle.moca.scale.detach(), atol=0, rtol=0)
    handle.remove()
    plain = copy.deepcopy(untied[0])
    with torch.no_grad():
        assert sft.answer_loss(plain, *batch).item() == pytest.approx(with_moca, abs=1e-6)


# --- resume ----------------------------------------------------------------------------------------------------

def test_resume_gives_identical_weights_and_log(tied, scenes, questions, tmp_path):
    start, processor = tied
    recipe = _recipe(steps=4, checkpoint_every=2)

    straight = copy.deepcopy(start)
    _train(straight, processor, scenes, questions, tmp_path / "a", recipe)

    interrupted = copy.deepcopy(start)
    assert _train(interrupted, processor, scenes, questions, tmp_path / "b", recipe, stop_after=2) == 2
    assert not (tmp_path / "b" / "out" / sft.FINAL_FILE).exists()
    with open(tmp_path / "b" / "out" / "log.csv", "a") as f:
        f.write("3,9.9,0.001,1.0\n")  # a row of lost work (after the last saved state): must be dropped
    resumed = copy.deepcopy(start)  # a new process: the start checkpoint loaded again, the state file does the rest
    assert _train(resumed, processor, scenes, questions, tmp_path / "b", recipe) == 4

    a, b = straight.state_dict(), resumed.state_dict()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    logs = []
    for run in ("a", "b"):
        with open(tmp_path / run / "out" / "log.csv", newline="") as f:
            logs.append([(r["step"], r["loss"], r["lr"]) for r in csv.DictReader(f)])
    assert logs[0] == logs[1] and len(logs[0]) == 4


def test_a_state_of_another_run_is_refused(tied, scenes, questions, tmp_path):
    start, processor = tied
    _train(copy.deepcopy(start), processor, scenes, questions, tmp_path, _recipe(), stop_after=2)
    with pytest.raises(ValueError, match="holds another run"):
        _train(copy.deepcopy(start), processor, scenes, questions, tmp_path, _recipe(lr=1e-3))
    other_start = copy.deepcopy(start)
    with torch.no_grad():
        other_start.model.multi_modal_projector.linear_1.bias.add_(1.0)
    with pytest.raises(ValueError, match="holds another run"):
        _train(other_start, processor, scenes, questions, tmp_path, _recipe())


# --- small pieces ------------------------------------------------------------------------------------------------

def test_recipe_names_and_folders(monkeypatch, tmp_path):
    with pytest.raises(ValueError, match="warmup"):
        SFTRecipe(steps=10, warmup=10)
    with pytest.raises(ValueError, match="unknown trainable"):
        SFTRecipe(trainable=("projector", "nothing"))
    with pytest.raises(ValueError, match="folder name"):
        SFTRecipe(name="a/b")
    assert sft.start_label("lr2e-3/step-0020") == "lr2e-3-step-0020"
    assert sft.start_label("/some/where/mine.safetensors") == "mine"
    monkeypatch.setenv("MIRLAB_CACHE_DIR", str(tmp_path))
    assert sft.run_dir(SFTRecipe(name="base"), "final") == tmp_path / "sft" / "base-final"


def test_example_order_is_pretrainings_over_the_examples():
    recipe = _recipe(batch_size=4, seed=2)
    stream = [i for step in (1, 2, 3) for i in sft.example_indices(step, recipe, 6)]
    assert sorted(stream[:6]) == list(range(6)) and sorted(stream[6:]) == sorted(set(stream[6:]))
    reference = pretrain.Recipe(name="x", steps=10, batch_size=4, warmup=0, train_scenes=6, seed=2, trajectory=())
    assert stream[:4] == pretrain.batch_indices(1, reference)


def test_cli_arguments_give_the_recipe():
    parser = sft.add_arguments(argparse.ArgumentParser())
    args = parser.parse_args(["--out", "x", "--lr", "2e-4", "--steps", "30", "--start", "lr2e-3/step-0020"])
    recipe = sft.recipe_from_args(args)
    assert recipe == SFTRecipe(lr=2e-4, steps=30) and args.start == "lr2e-3/step-0020"
    assert sft.recipe_from_args(parser.parse_args(["--out", "x", "--turns", "scene"])).turns == "scene"


# --- the embedded model ------------------------------------------------------------------------------------------

def test_embedded_run_saves_reloads_and_answers_the_same(embedded_cache, tmp_path):
    from mirlab.tiny import benchmark

    model, processor = embedded_model("random", cache_dir=embedded_cache)
    train = list(scene_dataset(3, seed=0, split="train"))
    qs = scene_qa.scene_questions([s["metadata"] for s in train], seed=0, split="train")
    recipe = SFTRecipe(name="e", lr=1e-4, steps=2, batch_size=2, warmup=0, train_scenes=3)
    sft.train_sft(model, processor, recipe, "random", out_dir=tmp_path, state_dir=tmp_path, progress=False,
                  data=(qs, _features(model, processor, train)))
    reloaded, _ = sft.load_sft(tmp_path)
    test = list(scene_dataset(2, seed=0, split="test"))
    probe = scene_qa.scene_questions([s["metadata"] for s in test], seed=0, split="test")
    features = _features(model, processor, test)
    ours, _ = benchmark.choice_logliks(model, processor, features, probe)
    again, _ = benchmark.choice_logliks(reloaded, processor, features, probe)
    assert again == ours  # float32 file: the reloaded model scores every choice exactly as the trained one
    assert reloaded.name_or_path.endswith(f"@sft:{tmp_path.name}")


def test_the_study_reuses_a_finished_run_only_for_the_same_recipe_from_the_same_tensors(tied, scenes, questions,
                                                                                      monkeypatch, tmp_path):
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "mir_study", Path(__file__).resolve().parents[1] / "experiments" / "mir_study.py")
    driver = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(driver)
    monkeypatch.setenv("MIRLAB_CACHE_DIR", str(tmp_path))
    model, processor = copy.deepcopy(tied[0]), tied[1]
    untouched = copy.deepcopy(model)
    recipe = _recipe()
    assert driver.identical_run(untouched, recipe) is None  # nothing has run yet
    data = (questions, _features(model, processor, scenes))
    sft.train_sft(model, processor, recipe, "random", progress=False, data=data)
    assert driver.identical_run(untouched, recipe) == sft.run_dir(recipe, "random")
    assert driver.identical_run(untouched, _recipe(lr=1e-3)) is None  # another recipe
    assert driver.identical_run(model, recipe) is None  # other tensors (the fine-tuned ones)
