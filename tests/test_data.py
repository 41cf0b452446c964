"""Reading user data: images in any mode, CNN/DM stories, text encodings and invisible characters, folder litter,
folder pairing with a seed, JSONL."""
import codecs
import json
import warnings

import numpy as np
import pytest
from PIL import Image

from mirlab.errors import UserError
from mirlab.pairs.readers import (Pairs, SkippedFilesWarning, clean_text, decode_text, folder_pairs, is_litter,
                                  jsonl_pairs, list_images, list_texts, load_image, read_story, read_text)


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
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(UserError, match="empty.png is empty"):
        load_image(tmp_path / "empty.png")
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


pytestmark = pytest.mark.filterwarnings("ignore::mirlab.pairs.readers.SkippedFilesWarning")


def test_folder_pairs_are_seeded_sorted_and_reproducible(tmp_path):
    images, texts = make_folders(tmp_path)
    with pytest.warns(SkippedFilesWarning, match=r"skipped 1 file of another type \(notes.md\)"):
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
    assert len(everything) == 5 and everything.texts[0] == "story number 0" and everything.skipped == []


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
    with pytest.raises(UserError, match="is a file, not a folder"):
        folder_pairs(images / "notes.md", texts)


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


# --- text files: encodings, invisible characters, empty and binary files ----------------------------------------

def test_utf8_with_or_without_a_byte_order_mark_and_utf16_with_one_decode_alike():
    text = "Café — naïve 東京"
    for data in (text.encode(), codecs.BOM_UTF8 + text.encode(), text.encode("utf-16"), text.encode("utf-32"),
                 codecs.BOM_UTF16_BE + text.encode("utf-16-be")):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # none of these is a fallback
            assert decode_text(data, "t.txt") == text


def test_windows_1252_is_read_with_a_warning_and_undefined_bytes_are_an_error():
    with pytest.warns(UserWarning, match=r"t.txt: not valid UTF-8 .* read as Windows-1252"):
        assert decode_text("naïve “quotes” €5".encode("cp1252"), "t.txt") == "naïve “quotes” €5"
    with pytest.raises(UserError, match=r"t.txt: not UTF-8 .* and not Windows-1252 either: save it as UTF-8"):
        decode_text(b"caf\x81 \x9d", "t.txt")


def test_nul_bytes_without_a_byte_order_mark_mean_binary():
    with pytest.raises(UserError, match="t.bin: contains NUL bytes, so it is a binary file"):
        decode_text(b"PK\x03\x04\x00\x00", "t.bin")
    with pytest.raises(UserError, match="binary"):  # UTF-16 without its mark cannot be told from binary
        decode_text("text".encode("utf-16-le"), "t.txt")


def test_clean_text_composes_unifies_newlines_and_drops_what_cannot_be_seen():
    raw = ("\ufeff  Cafe\u0301\r\nline\u200b two\rthree\u00ad\x0c"
           "four\u2028five\x07\u202eRTL\u2066\tend\u200d\U0001F469\u200c  \n\u3000")
    assert clean_text(raw) == "Café\nline two\nthree\nfour\nfiveRTL\tend\u200d\U0001F469\u200c"
    assert clean_text("\u200b \ufeff\n\t\u2060") == ""


def test_text_files_are_decoded_cleaned_and_empty_ones_name_the_file(tmp_path):
    bom = tmp_path / "bom.story"
    bom.write_bytes(codecs.BOM_UTF8 + "Zero\u200bwidth\r\n\r\n@highlight\r\nsummary".encode())
    assert read_text(bom) == "Zerowidth"
    wide = tmp_path / "wide.txt"
    wide.write_bytes("caf\u00e9".encode("utf-16"))
    assert read_text(wide) == "café"
    cases = {"zero.txt": (b"", "zero.txt is an empty file"),
             "blank.txt": (" \n\u200b\t\ufeff".encode(), "blank.txt: no text"),
             "head.story": (b"\n \n@highlight\nonly a summary", "head.story: no text before the first @highlight"),
             "binary.story": (b"\x00\x01\x02", "binary.story: contains NUL bytes")}
    for name, (data, message) in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(UserError, match=message.replace("(", r"\(")):
            read_text(tmp_path / name)


# --- folders: litter skipped and counted, unusable texts raised or skipped ---------------------------------------

def test_hidden_files_and_archive_litter_are_skipped_and_counted(tmp_path):
    Image.fromarray(rgb_array()).save(tmp_path / "photo.png")
    litter = [".DS_Store", "._photo.png", ".hidden.png", "Thumbs.db", "desktop.ini", "~$photo.png", "photo.png~"]
    for name in litter:
        (tmp_path / name).write_bytes(b"\x00\x05\x16\x07")
    (tmp_path / "__MACOSX").mkdir()
    (tmp_path / "scans").mkdir()
    (tmp_path / "notes.md").write_text("about")
    assert all(is_litter(name) for name in [*litter, "__MACOSX"]) and not is_litter("photo.png")
    with pytest.warns(SkippedFilesWarning) as caught:
        assert list_images(tmp_path) == [tmp_path / "photo.png"]
    message = str(caught[0].message)
    assert message.startswith(f"{tmp_path}: skipped 8 hidden or system files (.DS_Store, ._photo.png, ")
    assert message.endswith("1 sub-folder (scans), 1 file of another type (notes.md)")
    (tmp_path / "photo.png").unlink()
    with pytest.raises(UserError, match=r"no image files .* \(skipped 8 hidden or system files"):
        list_images(tmp_path)


def test_a_clean_folder_reads_without_warnings(tmp_path):
    images, texts = make_folders(tmp_path)
    (images / "notes.md").unlink()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(list_texts(texts)) == 6 and len(folder_pairs(images, texts, n=3)) == 3


def test_an_unusable_text_file_is_raised_or_skipped_by_name(tmp_path):
    images, texts = make_folders(tmp_path)
    (texts / "s_02.story").write_bytes(b"\x00binary")
    with pytest.raises(UserError, match=r"s_02.story: contains NUL bytes.*\(or pass on_error='skip'"):
        folder_pairs(images, texts, n=None)
    with pytest.warns(UserWarning, match="skipped 1 of 5 pairs whose text file is unusable: .*s_02.story"):
        pairs = folder_pairs(images, texts, n=None, on_error="skip")
    assert len(pairs) == 4 and pairs.skipped[0]["name"] == "img_02.png + s_02.story"
    assert "img_02.png" not in [p.name for p in pairs.images] and "story number 2" not in pairs.texts
    for i in range(6):
        (texts / f"s_{i:02d}.story").write_bytes(b"")
    with pytest.raises(UserError, match="no usable pairs: skipped 5 of 5"):
        folder_pairs(images, texts, n=None, on_error="skip")


def test_jsonl_with_a_byte_order_mark_and_invisible_characters(tmp_path):
    Image.fromarray(rgb_array()).save(tmp_path / "a.png")
    path = tmp_path / "pairs.jsonl"
    path.write_bytes(codecs.BOM_UTF8 + json.dumps({"image": "a.png", "text": "a\u200b cat\r\n"}).encode())
    assert jsonl_pairs(path).texts == ["a cat"]
