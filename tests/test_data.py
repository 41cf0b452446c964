"""Reading user data: images in any mode, CNN/DM stories, folder pairing with a seed, JSONL."""
import json

import numpy as np
import pytest
from PIL import Image

from mirlab.pairs.readers import Pairs, folder_pairs, jsonl_pairs, list_images, load_image, read_story, read_text


def rgb_array(seed=0, size=(6, 5)):
    return np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)


@pytest.mark.parametrize("mode", ["L", "RGBA", "CMYK", "P", "LA", "1", "I;16", "RGB"])
def test_every_mode_loads_as_rgb_from_a_file(tmp_path, mode):
    image = Image.fromarray(rgb_array()).convert(mode)
    path = tmp_path / ("image.tif" if mode in ("CMYK", "I;16") else "image.png")
    image.save(path)
    loaded = load_image(path)
    assert loaded.mode == "RGB" and loaded.size == (5, 6)


def test_transparent_pixels_become_white_not_black():
    rgba = np.zeros((2, 2, 4), dtype=np.uint8)
    rgba[0, 0] = (255, 0, 0, 255)  # one opaque red pixel, the rest fully transparent black
    rgb = np.asarray(load_image(Image.fromarray(rgba, "RGBA")))
    assert tuple(rgb[0, 0]) == (255, 0, 0) and tuple(rgb[1, 1]) == (255, 255, 255)


def test_grayscale_array_and_sixteen_bit_images_are_rescaled_to_rgb():
    gray = np.arange(12, dtype=np.uint8).reshape(3, 4)
    rgb = np.asarray(load_image(gray))
    assert rgb.shape == (3, 4, 3) and (rgb[..., 0] == gray).all() and (rgb[..., 2] == gray).all()
    deep = Image.fromarray(np.array([[0, 1000], [2000, 4000]], dtype=np.uint16))
    assert np.asarray(load_image(deep))[1, 1, 0] == 255


def test_unreadable_images_name_the_file(tmp_path):
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0" + b"\x00" * 20)
    with pytest.raises(ValueError, match="corrupt.jpg"):
        load_image(corrupt)
    truncated = tmp_path / "truncated.png"
    Image.fromarray(rgb_array(size=(64, 64))).save(truncated)
    truncated.write_bytes(truncated.read_bytes()[:200])
    with pytest.raises(ValueError, match="truncated.png"):
        load_image(truncated)
    with pytest.raises(ValueError, match="not found: .*missing.png"):
        load_image(tmp_path / "missing.png")
    with pytest.raises(ValueError, match="uint8"):
        load_image(np.zeros((3, 3), dtype=np.float32))
    with pytest.raises(ValueError, match="int"):
        load_image(42)


def test_story_is_the_text_before_the_first_highlight(tmp_path):
    story = tmp_path / "a.story"
    story.write_text("(CNN) -- First paragraph.\n\nSecond one.\n\n@highlight\n\nA summary\n\n@highlight\n\nMore\n")
    assert read_story(story) == "(CNN) -- First paragraph.\n\nSecond one."
    assert read_text(story) == read_story(story)
    plain = tmp_path / "b.txt"
    plain.write_text("  keep @highlight here  \n")
    assert read_text(plain) == "keep @highlight here"


def make_folders(root, n_images=5, n_texts=6):
    images, texts = root / "images", root / "texts"
    images.mkdir()
    texts.mkdir()
    for i in range(n_images):
        Image.fromarray(rgb_array(i)).save(images / f"img_{i:02d}.png")
    (images / "notes.md").write_text("not an image")
    for i in range(n_texts):
        (texts / f"s_{i:02d}.story").write_text(f"story number {i}\n@highlight\nsummary {i}")
    return images, texts


def test_folder_pairs_are_seeded_sorted_and_reproducible(tmp_path):
    images, texts = make_folders(tmp_path)
    assert [p.name for p in list_images(images)] == [f"img_{i:02d}.png" for i in range(5)]
    first = folder_pairs(images, texts, n=4, seed=0)
    again = folder_pairs(images, texts, n=4, seed=0)
    other = folder_pairs(images, texts, n=4, seed=1)
    assert first.images == again.images and first.texts == again.texts
    assert (first.images, first.texts) != (other.images, other.texts)
    assert len(first) == 4 and len(set(first.images)) == 4
    assert all(t.startswith("story number") and "summary" not in t for t in first.texts)
    assert first.names[0] == f"{first.images[0].name} + s_{first.texts[0].split()[-1].zfill(2)}.story"
    everything = folder_pairs(images, texts, n=None)
    assert len(everything) == 5 and everything.texts[0] == "story number 0"


def test_folder_pairs_fewer_than_requested_names_the_folder(tmp_path):
    images, texts = make_folders(tmp_path)
    with pytest.raises(ValueError, match=r"asked for 6 pairs but .*images has only 5 images"):
        folder_pairs(images, texts, n=6)
    with pytest.raises(ValueError, match="positive"):
        folder_pairs(images, texts, n=0)
    with pytest.raises(ValueError, match="folder not found"):
        folder_pairs(tmp_path / "nope", texts)
    with pytest.raises(ValueError, match="no text files"):
        folder_pairs(images, images)


def test_jsonl_pairs_resolve_relative_paths_and_name_bad_lines(tmp_path):
    Image.fromarray(rgb_array()).save(tmp_path / "a.png")
    lines = [{"image": "a.png", "text": "one"}, {"image": str(tmp_path / "a.png"), "text": "two"}]
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    pairs = jsonl_pairs(path)
    assert pairs.texts == ["one", "two"] and pairs.images == [tmp_path / "a.png"] * 2
    assert pairs.names == ["pairs.jsonl:1", "pairs.jsonl:2"]
    assert len(jsonl_pairs(path, n=1, seed=3)) == 1
    path.write_text(json.dumps(lines[0]) + "\n{broken\n")
    with pytest.raises(ValueError, match="pairs.jsonl:2"):
        jsonl_pairs(path)
    path.write_text(json.dumps({"image": "a.png"}) + "\n")
    with pytest.raises(ValueError, match="pairs.jsonl:1.*'text'"):
        jsonl_pairs(path)


def test_pairs_need_one_text_per_image():
    with pytest.raises(ValueError, match="2 images but 1 texts"):
        Pairs(["a", "b"], ["x"])
