"""Questions and answers about synthetic scenes: instruction data and a held-out benchmark.

Every question is asked of one scene (`scenes.scene_dataset`) and answered from its metadata alone, so the
answer is true by construction. Six kinds, each with its closed set of valid answers (`choices`):

    kind      question (examples)                       answer            choices
    colour    What colour is the triangle?               red               the 8 colours of scenes.COLOURS
    shape     What shape are the green objects?          star              the 5 shapes of scenes.SHAPES
    count     How many circles are there?                two               one, two, three, four
    position  Where is the blue square?                  left              left, right, top, bottom, center
    exists    Is there an orange diamond?                no                yes, no
    describe  Describe the image in one sentence.        the scene caption the caption and 3 distractors

When a question may be asked:
- colour: about a shape that occurs in exactly one group of the scene (then all its objects share a colour);
  "is" for one object, "are the <shape>s" for several.
- shape: about a colour that occurs in exactly one group ("What shape is the red object?").
- count: about a shape present in the scene; the answer counts every object of that shape, over both groups.
- position: about a group, named by colour and shape (unique within a scene); answer = its region.
- exists: half yes (a group of the scene), half no; a "no" changes one attribute of a group of the scene --
  its colour or its shape -- into a combination absent from the scene (a hard negative: knowing only the
  colours present, or only the shapes present, does not answer it).
- describe: always; choices = the caption and `scenes.distractor_captions(metadata, 3)` (one colour, shape or
  count word changed each), in a seeded random order.

Balance. `make_questions` draws one question per kind per scene; `qa_dataset` then keeps, per kind, the same
number of questions of every answer: it walks the answers round robin (in vocabulary order) and takes each
answer's next question in scene order, so answer counts differ by at most one and the majority answer is
right only at chance level. (describe answers are all different captions; its balance is that of the
distractor kinds, which `distractor_captions` alternates.)

Chance level of a kind = mean over its questions of 1 / len(choices): the expected accuracy of a guess drawn
uniformly among the valid answers, and, with balanced answers, also that of always giving the same answer.

Splits: `qa_dataset(n, split="train")` for instruction data, `split="test"` for the benchmark. Scenes of
different splits never share a structure (`scenes.split_of`), so no held-out question is about a scene -- not
even a re-drawn one -- that training saw. Everything is seeded: the questions of scene i depend only on
(seed, split, i).
"""
from __future__ import annotations

import numpy as np

from mirlab.pairs.scenes import COLOURS, POSITIONS, SHAPES, SPLITS, distractor_captions, scene_dataset

KINDS = ("colour", "shape", "count", "position", "exists", "describe")
COUNT_ANSWERS = ("one", "two", "three", "four")  # the answer to "how many" for 1..4 objects
CHOICES = {"colour": tuple(COLOURS), "shape": SHAPES, "count": COUNT_ANSWERS, "position": POSITIONS,
           "exists": ("yes", "no")}  # describe: per question
DESCRIBE_PROMPT = "Describe the image in one sentence."
DESCRIBE_DISTRACTORS = 3
QUESTION_STREAM = 1  # spawn-key suffix separating the question stream from the scene's own stream


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _item(kind, question, answer, choices, scene):
    if answer not in choices:
        raise ValueError(f"{kind} answer {answer!r} is not among its choices {choices}")
    return {"kind": kind, "question": question, "answer": answer, "choices": list(choices), "scene": scene}


def candidate_questions(metadata: dict, scene=None) -> dict[str, list[dict]]:
    """Every question of the closed kinds (all but describe) that may be asked of one scene, per kind.

    exists holds its yes questions and every hard-negative no question. `scene` is copied into the items.
    """
    groups = metadata["groups"]
    out = {kind: [] for kind in KINDS if kind != "describe"}
    for shape in SHAPES:
        with_shape = [g for g in groups if g["shape"] == shape]
        total = sum(g["count"] for g in with_shape)
        if total:
            out["count"].append(_item("count", f"How many {shape}s are there?", COUNT_ANSWERS[total - 1],
                                      CHOICES["count"], scene))
        if len(with_shape) == 1:
            g = with_shape[0]
            question = f"What colour is the {shape}?" if total == 1 else f"What colour are the {shape}s?"
            out["colour"].append(_item("colour", question, g["colour"], CHOICES["colour"], scene))
    for colour in COLOURS:
        with_colour = [g for g in groups if g["colour"] == colour]
        if len(with_colour) == 1:
            g = with_colour[0]
            question = (f"What shape is the {colour} object?" if g["count"] == 1
                        else f"What shape are the {colour} objects?")
            out["shape"].append(_item("shape", question, g["shape"], CHOICES["shape"], scene))
    present = {(g["colour"], g["shape"]) for g in groups}
    for g in groups:
        question = (f"Where is the {g['colour']} {g['shape']}?" if g["count"] == 1
                    else f"Where are the {g['colour']} {g['shape']}s?")
        out["position"].append(_item("position", question, g["position"], CHOICES["position"], scene))
        out["exists"].append(_exists(g["colour"], g["shape"], "yes", scene))
    negatives = sorted({(c, g["shape"]) for g in groups for c in COLOURS}
                       | {(g["colour"], s) for g in groups for s in SHAPES})
    out["exists"] += [_exists(c, s, "no", scene) for c, s in negatives if (c, s) not in present]
    return out


def _exists(colour, shape, answer, scene):
    return _item("exists", f"Is there {_article(colour)} {colour} {shape}?", answer, CHOICES["exists"], scene)


def make_questions(metadata: dict, rng, scene=None, kinds=KINDS) -> list[dict]:
    """One question per kind (in `kinds` order) for one scene, drawn with `rng` among the scene's candidates.

    exists: yes or no with probability 1/2 each, then a uniform draw among those. describe: the caption against
    3 distractor captions, in random order. A kind the scene cannot ask (e.g. shape when both groups share a
    colour and there is no other colour) is skipped. Items: {kind, question, answer, choices, scene}.
    """
    rng = np.random.default_rng(rng) if not isinstance(rng, np.random.Generator) else rng
    unknown = set(kinds) - set(KINDS)
    if unknown:
        raise ValueError(f"unknown question kinds {sorted(unknown)}; known: {KINDS}")
    candidates = candidate_questions(metadata, scene)
    out = []
    for kind in kinds:
        if kind == "describe":
            choices = [metadata["caption"], *distractor_captions(metadata, DESCRIBE_DISTRACTORS, rng)]
            order = rng.permutation(len(choices))
            out.append(_item("describe", DESCRIBE_PROMPT, metadata["caption"], [choices[i] for i in order], scene))
            continue
        pool = candidates[kind]
        if kind == "exists":
            answer = "yes" if rng.random() < 0.5 else "no"
            pool = [q for q in pool if q["answer"] == answer]
        if pool:
            out.append(pool[int(rng.integers(len(pool)))])
    return out


def balance(questions: list[dict], per_kind: int | None = None) -> list[dict]:
    """Keep, per kind, equally many questions of every valid answer (round robin, in the given order).

    per_kind=None: as many as the rarest answer allows (that count times the number of answers). Otherwise
    exactly per_kind questions, answer counts differing by at most one; a clear error if an answer runs out.
    describe questions (all answers distinct) are kept in order, up to per_kind. Output: grouped by kind in
    KINDS order, each kind in selection order.
    """
    out = []
    for kind in KINDS:
        items = [q for q in questions if q["kind"] == kind]
        if not items:
            continue
        if kind == "describe":
            out += items if per_kind is None else _take(items, per_kind, kind)
            continue
        by_answer = {a: [q for q in items if q["answer"] == a] for a in CHOICES[kind]}
        rarest = min(len(v) for v in by_answer.values())
        if rarest == 0:
            missing = [a for a, v in by_answer.items() if not v]
            raise ValueError(f"no {kind!r} question has the answer(s) {missing} among these {len(items)}: "
                             f"use more scenes")
        wanted = rarest * len(by_answer) if per_kind is None else per_kind
        if per_kind is not None and -(-per_kind // len(by_answer)) > rarest:
            counts = {a: len(v) for a, v in by_answer.items()}
            raise ValueError(f"{per_kind} balanced {kind!r} questions need {-(-per_kind // len(by_answer))} of "
                             f"each answer, but the scenes give {counts}: use more scenes")
        picked = []
        for j in range(rarest + 1):
            for answer in CHOICES[kind]:
                if len(picked) < wanted and j < len(by_answer[answer]):
                    picked.append(by_answer[answer][j])
        out += picked
    return out


def _take(items, n, kind):
    if len(items) < n:
        raise ValueError(f"asked for {n} {kind!r} questions, the scenes give {len(items)}: use more scenes")
    return items[:n]


def scene_questions(metadata_list: list[dict], seed: int = 0, split: str = "test", kinds=KINDS) -> list[dict]:
    """make_questions for each scene of a list (scene id = its index), each scene with its own seeded stream."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    out = []
    for i, metadata in enumerate(metadata_list):
        stream = np.random.SeedSequence(seed, spawn_key=(SPLITS.index(split), i, QUESTION_STREAM))
        out += make_questions(metadata, np.random.default_rng(stream), scene=i, kinds=kinds)
    return out


def qa_dataset(n_scenes: int, split: str = "test", seed: int = 0, per_kind: int | None = None,
               kinds=KINDS) -> list[dict]:
    """Balanced questions over `scenes.scene_dataset(n_scenes, seed, split)`; item["scene"] indexes that dataset.

    per_kind: questions per kind (None: all that balance allows). Train and test questions never concern the
    same scene structure. Deterministic in (n_scenes, split, seed, per_kind, kinds).
    """
    metadata = [item["metadata"] for item in scene_dataset(n_scenes, seed=seed, split=split)]
    return balance(scene_questions(metadata, seed=seed, split=split, kinds=kinds), per_kind)


def chance_level(questions: list[dict]) -> float:
    """Mean over the questions of 1 / len(choices): accuracy of a uniform guess among the valid answers."""
    if not questions:
        raise ValueError("no questions")
    return float(np.mean([1 / len(q["choices"]) for q in questions]))


def answer_counts(questions: list[dict]) -> dict[str, dict[str, int]]:
    """{kind: {answer: number of questions}} (describe: one entry per distinct caption)."""
    out: dict[str, dict[str, int]] = {}
    for q in questions:
        counts = out.setdefault(q["kind"], {})
        counts[q["answer"]] = counts.get(q["answer"], 0) + 1
    return out
