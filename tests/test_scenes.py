"""Synthetic captioned scenes: determinism, disjoint splits, captions that match the pixels, distractors."""

import math
import re

import numpy as np
import pytest
from scipy import ndimage

from mirlab.pairs import scenes
from mirlab.pairs.scenes import (COLOURS, POSITIONS, SHAPES, caption_mentions, describe, describe_short,
                           distractor_captions, make_scene, scene_dataset, split_of)

N_CHECK = 60  # scenes whose pixels are checked against their metadata


def _foreground_components(image, metadata, threshold=50, min_pixels=20):
    """Connected blobs of pixels that differ clearly from the scene's nominal background grey."""
    pixels = np.asarray(image).astype(int)
    grey = scenes.BACKGROUNDS[metadata["background"]]
    mask = np.abs(pixels - grey).max(axis=2) > threshold
    labels, n = ndimage.label(mask)
    sizes = ndimage.sum(mask, labels, range(1, n + 1))
    return labels, [i + 1 for i, s in enumerate(sizes) if s >= min_pixels]


def _nearest_colour_name(rgb):
    return min(COLOURS, key=lambda name: sum((a - b) ** 2 for a, b in zip(COLOURS[name], map(int, rgb))))


# --- determinism and splits -----------------------------------------------------------------------------


def test_same_seed_gives_identical_pixels_and_caption():
    image_a, caption_a, meta_a = make_scene(123)
    image_b, caption_b, meta_b = make_scene(np.random.default_rng(123))
    assert np.array_equal(np.asarray(image_a), np.asarray(image_b))
    assert caption_a == caption_b and meta_a == meta_b


def test_different_seeds_give_different_scenes():
    captions = {make_scene(seed)[1] for seed in range(20)}
    assert len(captions) > 15


def test_dataset_is_deterministic_and_prefix_stable():
    small, large = scene_dataset(5, seed=3, split="val"), scene_dataset(40, seed=3, split="val")
    for a, b in zip(small, large[:5]):
        assert a["caption"] == b["caption"]
        assert np.array_equal(np.asarray(a["image"]), np.asarray(b["image"]))
    assert scene_dataset(5, seed=4, split="val")[0]["caption"] != small[0]["caption"] or \
        scene_dataset(5, seed=4, split="val")[1]["caption"] != small[1]["caption"]


def test_splits_never_share_a_scene_structure():
    keys = {}
    for split in scenes.SPLITS:
        items = scene_dataset(150, seed=0, split=split)
        assert all(item["metadata"]["split"] == split == split_of(item["metadata"]["groups"]) for item in items)
        keys[split] = {item["metadata"]["key"] for item in items}
    assert not keys["train"] & keys["val"]
    assert not keys["train"] & keys["test"]
    assert not keys["val"] & keys["test"]
    assert len(keys["test"]) > 100  # the held-out split is not a handful of repeated scenes


def test_split_assignment_covers_all_splits_in_roughly_the_planned_shares():
    rng = np.random.default_rng(0)
    counts = {s: 0 for s in scenes.SPLITS}
    for _ in range(3000):
        counts[split_of(scenes._sample_groups(rng))] += 1
    assert 0.7 < counts["train"] / 3000 < 0.9
    assert counts["val"] > 150 and counts["test"] > 150


def test_dataset_indexing_and_errors():
    data = scene_dataset(3, seed=1, split="test")
    assert len(data) == 3 and data[-1]["index"] == 2
    with pytest.raises(IndexError):
        data[3]
    with pytest.raises(ValueError):
        scene_dataset(3, split="dev")
    with pytest.raises(ValueError):
        make_scene(0, split="holdout")


# --- captions match what is drawn -----------------------------------------------------------------------


@pytest.mark.parametrize("size", [224, 112])
def test_pixels_match_metadata(size):
    """Object count, colour at each centre, region and shape area all agree with the metadata."""
    expected_area = {"circle": math.pi, "square": 4 * 0.85**2, "diamond": 2 * 1.12**2,
                     "triangle": 3 * math.sqrt(3) / 4 * 1.12**2, "star": 5 * 1.15 * 0.5 * math.sin(math.pi / 5)}
    for seed in range(N_CHECK):
        image, caption, meta = make_scene(seed, size=size)
        assert image.size == (size, size) and image.mode == "RGB"
        pixels = np.asarray(image)
        labels, components = _foreground_components(image, meta)
        assert len(components) == len(meta["objects"]) == sum(g["count"] for g in meta["groups"]), caption
        for obj in meta["objects"]:
            x, y = obj["center"]
            assert _nearest_colour_name(pixels[int(y), int(x)]) == obj["colour"], (caption, obj)
            half = size / 2
            inside = {"left": x < half, "right": x > half, "top": y < half, "bottom": y > half,
                      "center": abs(x - half) < half * 0.75 and abs(y - half) < half * 0.75}
            assert inside[obj["position"]], (caption, obj)
            area = (labels == labels[int(y), int(x)]).sum()
            ratio = area / obj["radius"] ** 2
            assert abs(ratio - expected_area[obj["shape"]]) < 0.2 * expected_area[obj["shape"]], (caption, obj)


def test_large_objects_are_larger_and_visible_at_112px():
    for seed in range(N_CHECK):
        _, _, meta = make_scene(seed, size=112)
        for obj in meta["objects"]:
            limits = (8, 11) if obj["size"] == "small" else (15, 21)  # radius in px at 112 px
            assert limits[0] <= obj["radius"] <= limits[1], obj


def test_caption_states_every_group():
    for seed in range(200):
        _, caption, meta = make_scene(seed)
        words = caption.lower().rstrip(".").replace(",", "").split()
        assert len(words) <= 18, caption
        score = caption_mentions(caption, meta)
        assert score["all_correct"] and score["pair_recall"] == 1.0, caption
        for g in meta["groups"]:
            assert g["size"] in words
            count_word = scenes.COUNT_WORDS[g["count"]]
            assert (count_word in words) or (g["count"] == 1 and "an" in words), caption
        if len(meta["groups"]) == 1 and meta["groups"][0]["count"] > 1:
            assert meta["groups"][0]["shape"] + "s" in words


def test_describe_templates():
    one = [{"shape": "star", "colour": "orange", "size": "large", "count": 1, "position": "left"}]
    assert describe(one, "plain") == "A large orange star on the left."
    assert describe(one, "there") == "There is a large orange star on the left."
    two = [{"shape": "circle", "colour": "red", "size": "small", "count": 2, "position": "top"},
           {"shape": "square", "colour": "blue", "size": "large", "count": 1, "position": "bottom"}]
    assert describe(two, "plain") == "Two small red circles at the top and a large blue square at the bottom."
    assert describe(two, "there").startswith("There are two small red circles")
    assert describe(two, "relation") == "Two small red circles above a large blue square."


def test_short_captions_state_colours_and_shapes_and_nothing_else():
    one = [{"shape": "star", "colour": "orange", "size": "large", "count": 1, "position": "left"}]
    assert describe_short(one) == "An orange star."
    two = [{"shape": "triangle", "colour": "red", "size": "small", "count": 1, "position": "top"},
           {"shape": "circle", "colour": "blue", "size": "large", "count": 3, "position": "bottom"}]
    assert describe_short(two) == "A red triangle and blue circles."
    absent = set(scenes.COUNT_WORDS.values()) - {"a"} | set(scenes.SIZES) | {"left", "right", "top", "bottom",
                                                                          "middle", "center", "on", "at", "in"}
    for item in scene_dataset(200, seed=0, split="train"):
        meta = item["metadata"]
        short = describe_short(meta["groups"])
        assert short == describe_short([dict(g) for g in meta["groups"]])  # a function of the structure
        score = caption_mentions(short, meta)  # true for the scene: every shape and colour, bound, nothing else
        assert score["all_correct"] and score["pair_recall"] == 1.0, short
        words = re.findall(r"[a-z]+", short.lower())
        assert not set(words) & absent, short  # no count, size or position
        assert short[0].isupper() and short.endswith(".") and "  " not in short
        for g in meta["groups"]:
            noun = g["shape"] + ("s" if g["count"] > 1 else "")
            assert f"{g['colour']} {noun}" in short.lower(), short


def test_every_attribute_value_occurs():
    seen = {"shape": set(), "colour": set(), "position": set(), "count": set()}
    for item in scene_dataset(300, seed=0, split="train"):
        for g in item["metadata"]["groups"]:
            for key in seen:
                seen[key].add(g[key])
    assert seen["shape"] == set(SHAPES) and seen["colour"] == set(COLOURS)
    assert seen["position"] == set(POSITIONS) and seen["count"] == {1, 2, 3, 4}


# --- evaluation helpers ---------------------------------------------------------------------------------

META = {
    "groups": [{"shape": "circle", "colour": "red", "size": "small", "count": 2, "position": "left"},
               {"shape": "square", "colour": "blue", "size": "large", "count": 1, "position": "right"}],
    "objects": [{"shape": "circle", "colour": "red"}, {"shape": "circle", "colour": "red"},
                {"shape": "square", "colour": "blue"}],
    "template": "plain", "background": "grey",
}


def test_caption_mentions_perfect_caption():
    score = caption_mentions("Two small red circles on the left and a large blue square.", META)
    assert score["all_correct"] and score["pair_recall"] == 1.0
    assert score["shape_recall"] == score["colour_recall"] == 1.0
    assert score["shape_precision"] == score["colour_precision"] == 1.0


def test_caption_mentions_partial_and_wrong():
    score = caption_mentions("A green circle.", META)
    assert score["shape_recall"] == 0.5 and score["shape_precision"] == 1.0
    assert score["colour_recall"] == 0.0 and score["colour_precision"] == 0.0
    assert score["wrong_colours"] == ["green"] and not score["all_correct"]

    swapped = caption_mentions("A blue circle and a red square.", META)  # right words, wrong binding
    assert swapped["shape_recall"] == swapped["colour_recall"] == 1.0
    assert swapped["pair_recall"] == 0.0


def test_caption_mentions_empty_and_case():
    empty = caption_mentions("", META)
    assert empty["shape_recall"] == empty["shape_precision"] == 0.0 and not empty["all_correct"]
    loud = caption_mentions("RED CIRCLES, Blue Squares", META)
    assert loud["all_correct"] and loud["pair_recall"] == 1.0


def _noun_phrases(caption):
    """The (count, size, colour, shape) phrases of a generated caption, e.g. ('two', 'small', 'red', 'circle')."""
    found = re.findall(r"\b(a|an|two|three|four) (small|large) (\w+) (\w+)", caption.lower())
    return [("a" if n == "an" else n, size, colour, shape.rstrip("s")) for n, size, colour, shape in found]


def test_distractors_change_exactly_one_attribute():
    kinds = {"count": 0, "colour": 0, "shape": 0}
    for seed in range(40):
        _, caption, meta = make_scene(seed)
        distractors = distractor_captions(meta, 6, rng=seed)
        assert len(distractors) == len(set(distractors)) == 6
        assert caption not in distractors
        true_phrases = _noun_phrases(caption)
        assert len(true_phrases) == len(meta["groups"])
        for text in distractors:
            phrases = _noun_phrases(text)
            assert len(phrases) == len(true_phrases), text
            changed = [(i, k) for i, (p, q) in enumerate(zip(true_phrases, phrases)) for k in range(4) if p[k] != q[k]]
            assert len(changed) == 1, (caption, text)  # one word of one group differs: wrong for this scene
            kinds[("count", "size", "colour", "shape")[changed[0][1]]] += 1
        assert distractors == distractor_captions(meta, 6, rng=seed)  # seeded
    assert min(kinds.values()) >= 70  # balanced: 240 distractors, about a third of each kind


def test_distractors_too_many_raises():
    with pytest.raises(ValueError, match="distinct"):
        distractor_captions(META, 1000, rng=0)
