"""Bundled photos with mirlab's captions, prose passages, mixed evaluation pairs, and their provenance."""

import json
import re

import numpy as np
import pytest

from mirlab import paths
from mirlab.pairs import samples

ALLOWED_LICENCES = {"CC0-1.0", "public-domain", "CC-BY-2.0"}
PROVENANCE = paths.data_dir() / "PROVENANCE.md"


@pytest.fixture(scope="module")
def photos():
    return samples.sample_photos()


def test_every_listed_photo_loads_as_rgb_with_captions(photos):
    records = samples.photo_records()
    assert len(photos) == len(records) >= 12
    assert len({p["name"] for p in photos}) == len(photos)
    for photo in photos:
        image = photo["image"]
        assert image.mode == "RGB" and min(image.size) >= 100, photo["name"]
        assert np.asarray(image).std() > 5, photo["name"]  # not a blank image
        assert 5 <= len(photo["captions"]) <= 8 and len(set(photo["captions"])) == len(photo["captions"])


def test_photo_licences_are_redistributable_and_attributed(photos):
    for photo in photos:
        assert photo["licence"] in ALLOWED_LICENCES, photo["name"]
        assert photo["source"]
        if photo["licence"].startswith("CC-BY"):
            assert photo["attribution"] and "CC BY" in photo["attribution"], photo["name"]


def test_photo_captions_are_short_plain_sentences():
    for record in samples.photo_records():
        for caption in record["captions"]:
            assert caption[0].isupper() and caption.endswith("."), caption
            assert 4 <= len(caption.split()) <= 20, caption
            assert caption.isascii(), caption


def test_colour_photos_are_colour_and_grey_ones_grey(photos):
    by_name = {p["name"]: np.asarray(p["image"]).astype(int) for p in photos}
    spread = {name: np.abs(a - a.mean(axis=2, keepdims=True)).mean() for name, a in by_name.items()}
    for name in ("skimage:camera", "skimage:horse", "skimage:brick", "skimage:gravel"):
        assert spread[name] == 0, name  # captions call these black and white / grayscale
    for name in ("skimage:astronaut", "skimage:coffee", "sklearn:flower.jpg", "skimage:retina"):
        assert spread[name] > 10, name  # captions name their colours


def test_load_image_rejects_unknown_references():
    with pytest.raises(ValueError):
        samples.load_bundled_image("flickr:cat.jpg")
    with pytest.raises(ValueError):
        samples.load_bundled_image("skimage:no_such_picture")


def test_prose_passages_are_unique_sentences_of_sensible_length():
    passages = samples.prose_passages()
    assert 100 <= len(passages) <= 200
    assert len(set(passages)) == len(passages)
    for text in passages:
        words = len(text.split())
        sentences = len(re.findall(r"[.!?](\s|$)", text))
        assert 50 <= words <= 150 and 1 <= sentences <= 4, text[:60]
        assert text == " ".join(text.split()) and text.isascii()


def test_sample_pairs_with_captions_is_seeded_and_mixed():
    pairs = samples.sample_pairs(12, seed=5)
    again = samples.sample_pairs(12, seed=5)
    assert len(pairs) == 12
    assert [t for _, t in pairs] == [t for _, t in again]
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for (a, _), (b, _) in zip(pairs, again))
    photo_captions = {c for r in samples.photo_records() for c in r["captions"]}
    n_photo_texts = sum(t in photo_captions for _, t in pairs)
    assert n_photo_texts == 6  # photo_share=0.5; the other 6 are scene captions
    assert [t for _, t in samples.sample_pairs(12, seed=6)] != [t for _, t in pairs]


def test_sample_pairs_with_prose_uses_distinct_passages():
    passages = set(samples.prose_passages())
    pairs = samples.sample_pairs(30, seed=0, text="prose")
    texts = [t for _, t in pairs]
    assert len(set(texts)) == 30 and set(texts) <= passages
    with pytest.raises(ValueError, match="prose"):
        samples.sample_pairs(len(passages) + 1, text="prose")


def test_sample_pairs_scene_only_and_photo_cap():
    scenes_only = samples.sample_pairs(4, seed=0, photo_share=0.0)
    photo_captions = {c for r in samples.photo_records() for c in r["captions"]}
    assert not any(t in photo_captions for _, t in scenes_only)
    photos_only = samples.sample_pairs(20, seed=0, photo_share=1.0)  # only 15 photos: 5 scenes fill up
    assert sum(t in photo_captions for _, t in photos_only) == len(samples.photo_records())
    with pytest.raises(ValueError):
        samples.sample_pairs(3, text="summaries")


def test_provenance_lists_every_bundled_asset():
    text = PROVENANCE.read_text(encoding="utf-8")
    assert "## Bundled data" in text
    for folder in ("captions", "prose"):
        for path in sorted((paths.data_dir() / folder).iterdir()):
            assert f"data/{folder}/{path.name}" in text, path
    assert "data/LICENSES/CC0-1.0.txt" in text and (paths.data_dir() / "LICENSES" / "CC0-1.0.txt").exists()
    for record in samples.photo_records():
        assert f"`{record['image']}`" in text, record["image"]
    for line in (paths.data_dir() / samples.PROSE_FILE).read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        assert row["source"] == "written by the mirlab project" and row["licence"] == "CC0-1.0"
