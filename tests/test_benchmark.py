"""Instruction encoding (mirlab.tiny.instruct) and the scene-QA benchmark (mirlab.tiny.benchmark), on tiny random
LLaVAs: every score is checked against a plain Hugging Face forward of the full sequence."""
import argparse
import json

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from mirlab.pairs import scene_qa
from mirlab.tiny import benchmark, instruct, pretrain
from mirlab.tiny.build import CHAT_TEMPLATE
from mirlab.tiny.pretrain import IGNORE

import tiny_models


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    with tiny_models.single_thread():
        yield


@pytest.fixture(scope="module")
def chatml():
    """A tiny LLaVA with the embedded model's chat template (ChatML, no system prompt): 16 image tokens."""
    return tiny_models.chatml_llava(CHAT_TEMPLATE)


@pytest.fixture(scope="module")
def images():
    return [Image.new("RGB", (40, 32), (30 + 70 * i, 200 - 50 * i, 90)) for i in range(3)]


@pytest.fixture(scope="module")
def features(chatml, images):
    model, processor = chatml
    return pretrain.image_features(model, processor, images)


QUESTIONS = [  # questions of different lengths, answers of different token counts, on three scenes
    {"kind": "colour", "question": "What colour is the square?", "answer": "red", "choices": ["red", "blue", "a cat"],
     "scene": 1},
    {"kind": "exists", "question": "Is there a dog?", "answer": "no", "choices": ["yes", "no"], "scene": 0},
    {"kind": "describe", "question": "Describe the image in one sentence.", "answer": "a red square.",
     "choices": ["a blue circle.", "a red square.", "the quick brown fox jumps"], "scene": 2},
    {"kind": "exists", "question": "Is there a red square?", "answer": "yes", "choices": ["yes", "no"], "scene": 1},
]


def _flat(nested):
    return [x for row in nested for x in row]


def _conversation(question, answer):
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]},
            {"role": "assistant", "content": [{"type": "text", "text": answer}]}]


def _reference_loglik(model, processor, question, answer, image=None, text_only=False):
    """log p(answer tokens + <|im_end|> | prompt) from one plain forward of the full sequence, with the target
    positions found from the processor's own tokenization of the prompt (no mirlab encoding involved)."""
    prompt = processor.apply_chat_template(_conversation(question, answer)[:1], tokenize=False,
                                           add_generation_prompt=True)
    full = processor.apply_chat_template(_conversation(question, answer), tokenize=False)
    assert full == prompt + answer + "<|im_end|>\n"
    if text_only:  # the image rows deleted: the same text, no placeholder, no pixels
        ids = processor.tokenizer(full.replace("<image>", ""), return_tensors="pt")["input_ids"]
        start = len(processor.tokenizer(prompt.replace("<image>", ""))["input_ids"])
        inputs = {"input_ids": ids}
    else:
        inputs = processor(images=[image], text=[full], return_tensors="pt")
        start = processor(images=[image], text=[prompt], return_tensors="pt")["input_ids"].shape[1]
    with torch.no_grad():
        logits = model(**inputs).logits[0].float()
    ids = inputs["input_ids"][0]
    end = len(ids) - 1  # the final newline is not a target
    logp = torch.log_softmax(logits[start - 1:end - 1], dim=-1)
    return float(logp.gather(1, ids[start:end, None]).sum())


# --- instruct: the encoding ------------------------------------------------------------------------------------

def test_encoding_is_the_chatml_format_with_labels_on_the_answer_only(chatml, images):
    model, processor = chatml
    questions, answers = ["What colour is the square?", "Is there a dog?"], ["red", "no, there is not"]
    input_ids, attention_mask, labels = instruct.encode_qa(processor, questions, answers)
    tokenizer, n_image = processor.tokenizer, instruct.image_token_count(processor)
    assert n_image == 16
    for row, (q, a) in enumerate(zip(questions, answers)):
        real = input_ids[row][attention_mask[row].bool()]
        assert tokenizer.decode(real) == (f"<|im_start|>user\n{'<image>' * n_image}\n{q}<|im_end|>\n"
                                          f"<|im_start|>assistant\n{a}<|im_end|>\n")
        reference = processor(images=[images[0]], text=[processor.apply_chat_template(_conversation(q, a),
                                                                                       tokenize=False)])
        assert real.tolist() == reference["input_ids"][0]
        targets = labels[row][labels[row] != IGNORE]
        assert tokenizer.decode(targets) == a + "<|im_end|>"
        # targets are one contiguous run that ends on <|im_end|>, followed by the newline and padding only
        where = (labels[row] != IGNORE).nonzero().flatten()
        assert where.tolist() == list(range(int(where[0]), int(where[-1]) + 1))
        assert input_ids[row, where[-1] + 1] == tokenizer("\n", add_special_tokens=False)["input_ids"][0]
    assert not (labels[input_ids == model.config.image_token_id] != IGNORE).any()
    assert (labels[attention_mask == 0] == IGNORE).all()


def test_encoding_reads_the_end_of_turn_from_any_template():
    vicuna = tiny_models.build("llava").processor  # "USER: <image>\n... ASSISTANT: answer</s>"
    assert instruct.end_of_turn(vicuna) == "</s>"
    input_ids, _, labels = instruct.encode_qa(vicuna, ["Is it red?"], ["yes"])
    assert vicuna.tokenizer.decode(labels[0][labels[0] != IGNORE]) == "yes</s>"
    assert vicuna.tokenizer.decode(input_ids[0]).startswith("USER: <image>")


def test_no_image_prompt_is_the_same_tokens_without_the_image_rows(chatml):
    _, processor = chatml
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    with_image = instruct.prompt_ids(processor, "Where is the blue star?")
    without = instruct.prompt_ids(processor, "Where is the blue star?", image=False)
    assert with_image.count(image_id) == 16 and image_id not in without
    assert without == [i for i in with_image if i != image_id]
    assert processor.tokenizer.decode(without) == ("<|im_start|>user\n\nWhere is the blue star?<|im_end|>\n"
                                                   "<|im_start|>assistant\n")


# --- ranking ---------------------------------------------------------------------------------------------------

def test_choice_logliks_equal_a_plain_forward_of_each_full_sequence(chatml, images, features):
    model, processor = chatml
    logliks, tokens = benchmark.choice_logliks(model, processor, features, QUESTIONS, batch_size=3)
    for q, ll, tk in zip(QUESTIONS, logliks, tokens):
        for choice, value, count in zip(q["choices"], ll, tk):
            reference = _reference_loglik(model, processor, q["question"], choice, images[q["scene"]])
            assert value == pytest.approx(reference, abs=2e-5), (q["question"], choice)
            assert count == len(processor.tokenizer(choice + "<|im_end|>", add_special_tokens=False)["input_ids"])
    # batching and sharing of the scene's prefix change nothing
    single, _ = benchmark.choice_logliks(model, processor, features, QUESTIONS, batch_size=1)
    assert _flat(single) == pytest.approx(_flat(logliks), abs=2e-5)


def test_choice_logliks_with_moca_equal_a_plain_forward_with_moca(chatml, images):
    """With MoCa attached (random u, v), the prefix-sharing scorer calibrates the context's image rows exactly as
    MoCa does in a plain forward of each full sequence, and nothing else (questions and answers are text)."""
    import copy

    from mirlab.lvlm.moca import attach

    model, processor = chatml
    model = copy.deepcopy(model)
    handle = attach(model, processor)
    with torch.no_grad():
        generator = torch.Generator().manual_seed(0)
        handle.moca.scale.copy_(1 + 0.3 * torch.randn(handle.moca.scale.shape, generator=generator))
        handle.moca.shift.copy_(0.3 * torch.randn(handle.moca.shift.shape, generator=generator))
    features = pretrain.image_features(model, processor, images)
    logliks, _ = benchmark.choice_logliks(model, processor, features, QUESTIONS, batch_size=3)
    plain, _ = benchmark.choice_logliks(*chatml, pretrain.image_features(*chatml, images), QUESTIONS, batch_size=3)
    assert _flat(logliks) != pytest.approx(_flat(plain), abs=1e-3)  # MoCa does change the scores
    for q, ll in zip(QUESTIONS, logliks):
        for choice, value in zip(q["choices"], ll):
            reference = _reference_loglik(model, processor, q["question"], choice, images[q["scene"]])
            assert value == pytest.approx(reference, abs=2e-5), (q["question"], choice)


def test_ranking_picks_the_highest_scoring_choice(chatml, features):
    model, processor = chatml
    table = benchmark.score_questions(model, processor, features, QUESTIONS)
    assert list(table.columns[:6]) == ["kind", "question", "answer", "predicted", "correct", "chance"]
    for row in table.itertuples():
        best = max(range(len(row.choices)), key=lambda k: row.logliks[k])
        assert row.predicted == row.choices[best]
        truth = row.choices.index(row.answer)
        assert row.correct == all(row.logliks[truth] > v for k, v in enumerate(row.logliks) if k != truth)
        assert row.answer_loglik == row.logliks[truth] and row.chance == 1 / len(row.choices)
    assert (table["mode"] == "image").all()


def test_sum_and_mean_ranking_differ_as_documented():
    # "triangle" split in 3 near-certain-after-the-first tokens vs a 1-token answer: the mean favours the long one
    logliks, tokens = [-2.0, -3.3], [2, 4]
    assert benchmark.rank_choices(logliks, tokens, "sum")[0] == 0
    best, scores = benchmark.rank_choices(logliks, tokens, "mean")
    assert best == 1 and scores.tolist() == pytest.approx([-1.0, -0.825])
    assert benchmark.rank_choices([-1.0, -1.0], [1, 1])[0] == 0  # ties: the first
    with pytest.raises(ValueError, match="rank_by"):
        benchmark.rank_choices(logliks, tokens, "max")


def test_mean_ranking_reaches_the_table(chatml, features):
    model, processor = chatml
    table = benchmark.score_questions(model, processor, features, QUESTIONS, rank_by="mean")
    for row in table.itertuples():
        means = [v / n for v, n in zip(row.logliks, row.tokens)]
        assert row.predicted == row.choices[means.index(max(means))]


# --- blind modes -------------------------------------------------------------------------------------------------

def test_blank_mode_is_a_uniform_grey_picture(chatml, features):
    model, processor = chatml
    blank = benchmark.blank_image()
    assert blank.size == (224, 224) and (np.asarray(blank) == 128).all()
    logliks, _ = benchmark.choice_logliks(model, processor, None, QUESTIONS, blind="blank")  # features unused
    for q, ll in zip(QUESTIONS, logliks):
        for choice, value in zip(q["choices"], ll):
            assert value == pytest.approx(_reference_loglik(model, processor, q["question"], choice, blank), abs=2e-5)
    real, _ = benchmark.choice_logliks(model, processor, features, QUESTIONS)
    assert _flat(real) != pytest.approx(_flat(logliks), abs=1e-4)  # the image matters to this random model


def test_no_image_mode_deletes_the_image_rows(chatml):
    model, processor = chatml
    logliks, _ = benchmark.choice_logliks(model, processor, None, QUESTIONS, blind="no-image", batch_size=2)
    for q, ll in zip(QUESTIONS, logliks):
        for choice, value in zip(q["choices"], ll):
            reference = _reference_loglik(model, processor, q["question"], choice, text_only=True)
            assert value == pytest.approx(reference, abs=2e-5)


def test_bad_inputs_are_named(chatml, features):
    model, processor = chatml
    with pytest.raises(ValueError, match="blind"):
        benchmark.score_questions(model, processor, features, QUESTIONS, blind="dark")
    with pytest.raises(ValueError, match="scene 5"):
        benchmark.score_questions(model, processor, features, [{**QUESTIONS[0], "scene": 5}])
    with pytest.raises(ValueError, match="features"):
        benchmark.score_questions(model, processor, None, QUESTIONS)


# --- free generation ---------------------------------------------------------------------------------------------

def test_greedy_answers_equal_hf_generate(chatml, images, features):
    model, processor = chatml
    generated = benchmark.greedy_tokens(model, processor, features, QUESTIONS, batch_size=3)
    stop = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    for q, tokens in zip(QUESTIONS, generated):
        prompt = processor.apply_chat_template(_conversation(q["question"], "")[:1], tokenize=False,
                                               add_generation_prompt=True)
        inputs = processor(images=[images[q["scene"]]], text=[prompt], return_tensors="pt")
        limit = benchmark.max_new_tokens(processor, q)
        out = model.generate(**inputs, max_new_tokens=limit, do_sample=False, eos_token_id=stop,
                             pad_token_id=processor.tokenizer.pad_token_id)
        reference = out[0, inputs["input_ids"].shape[1]:].tolist()
        if stop in reference:
            reference = reference[:reference.index(stop)]
        assert tokens == reference
        assert limit == max(len(processor.tokenizer(c + "<|im_end|>", add_special_tokens=False)["input_ids"])
                            for c in q["choices"]) + 2


def test_generated_answers_are_scored_by_normalized_exact_match(chatml, features):
    assert benchmark.normalize_answer("  The Red.") == "red"
    assert benchmark.normalize_answer("2!") == "two"
    assert benchmark.normalize_answer("A") == "a"  # a lone article stays
    assert benchmark.normalize_answer("Two small circles, on the left.") == "two small circles on the left"
    model, processor = chatml
    table = benchmark.generate_answers(model, processor, features, QUESTIONS)
    assert len(table) == len(QUESTIONS)
    for row in table.itertuples():
        assert row.correct == (benchmark.normalize_answer(row.generated) == benchmark.normalize_answer(row.answer))


# --- summaries, files, CLI -----------------------------------------------------------------------------------------

def _hand_table():
    return pd.DataFrame({"kind": ["exists"] * 4 + ["colour"] * 2 + ["count"] * 3,
                         "correct": [True, True, True, False, False, True, False, False, True],
                         "chance": [0.5] * 4 + [0.125] * 2 + [0.25] * 3})


def test_summary_per_kind_and_macro_average():
    table = benchmark.summary(_hand_table())
    assert table["kind"].tolist() == ["colour", "count", "exists", "average"]  # scene_qa.KINDS order
    assert table["accuracy"].tolist() == pytest.approx([0.5, 1 / 3, 0.75, (0.5 + 1 / 3 + 0.75) / 3])
    assert table["chance"].tolist() == pytest.approx([0.125, 0.25, 0.5, (0.125 + 0.25 + 0.5) / 3])
    assert table["n"].tolist() == [2, 3, 4, 9]


def test_visual_gain_is_accuracy_minus_blind_accuracy():
    image = _hand_table()
    blank = image.assign(correct=[True, False, False, False, False, False, True, False, True])
    combined = benchmark.combined_summary({"image": image, "blank": blank, "generation": blank})
    gain = combined.set_index("kind")["visual_gain_blank"]
    assert gain["exists"] == pytest.approx(0.75 - 0.25) and gain["count"] == pytest.approx(1 / 3 - 2 / 3)
    assert gain["colour"] == pytest.approx(0.5)
    assert gain["average"] == pytest.approx(combined.set_index("kind").loc["average", "accuracy"]
                                            - (0 + 2 / 3 + 0.25) / 3)
    assert combined["generation_accuracy"].tolist() == pytest.approx(combined["blank_accuracy"].tolist())
    assert "no_image_accuracy" not in combined


def test_outputs_and_cli_arguments(chatml, features, tmp_path):
    model, processor = chatml
    tables = {"image": benchmark.score_questions(model, processor, features, QUESTIONS),
              "no-image": benchmark.score_questions(model, processor, None, QUESTIONS, blind="no-image")}
    tables["summary"] = benchmark.combined_summary(tables)
    written = benchmark.write_outputs(tables, tmp_path, {"checkpoint": "x"})
    assert {p.name for p in written} == {"image.csv", "no-image.csv", "summary.csv", "summary.json", "benchmark.png"}
    back = pd.read_csv(tmp_path / "image.csv")
    assert [json.loads(c) for c in back["choices"]] == [q["choices"] for q in QUESTIONS]
    assert json.loads((tmp_path / "summary.json").read_text())["summary"][-1]["kind"] == "average"
    args = benchmark.add_arguments(argparse.ArgumentParser()).parse_args(["--out", str(tmp_path)])
    assert (args.checkpoint, args.scenes, args.per_kind, args.blind) == ("final", 500, 100, ["blank", "no-image"])
    assert benchmark.main.__doc__.splitlines()[0]  # the CLI help line


def test_benchmark_questions_fit_the_default_scene_count():
    questions = scene_qa.qa_dataset(500, split="test", seed=0, per_kind=100)
    assert len(questions) == 600 and {q["kind"] for q in questions} == set(scene_qa.KINDS)


def test_val_split_also_has_600_balanced_questions_and_train_is_refused(chatml):
    questions = scene_qa.qa_dataset(500, split="val", seed=0, per_kind=100)
    assert len(questions) == 600 and {q["kind"] for q in questions} == set(scene_qa.KINDS)
    model, processor = chatml
    with pytest.raises(ValueError, match="'train'"):
        benchmark.benchmark(model, processor, split="train")
