"""Read user data for MIR: (image, text) pairs from folders or a JSONL file.

Layouts (DESIGN.md §1, the official defaults):
    images folder   TextVQA-style: image files (.jpg .jpeg .png .bmp .gif .webp .tif .tiff) directly inside
    texts folder    CNN/DailyMail ``*.story`` files (text = everything before the first ``@highlight`` line),
                    or plain ``*.txt`` files (text = the whole file)
    JSONL           one ``{"image": path, "text": ...}`` object per line; relative paths are relative to the
                    JSONL file's folder

Pairing: the official script pairs ``os.listdir`` orders (unordered, no seed). Here file lists are sorted by
name, ``n`` images and ``n`` texts are drawn with ``random.Random(seed)``, and the i-th drawn image is paired
with the i-th drawn text: the same folders and seed always give the same pairs.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
TEXT_SUFFIXES = (".story", ".txt")


@dataclass
class Pairs:
    """N (image, text) pairs; ``names[i]`` says where pair i came from (used in error messages)."""
    images: list
    texts: list[str]
    names: list[str] = field(default_factory=list)

    def __post_init__(self):
        if len(self.images) != len(self.texts):
            raise ValueError(f"{len(self.images)} images but {len(self.texts)} texts: pairs need one of each")
        if not self.names:
            self.names = [f"pair {i}" for i in range(len(self.texts))]

    def __len__(self) -> int:
        return len(self.texts)


def load_image(image) -> Image.Image:
    """An RGB PIL image from a path, a PIL image or an HxW / HxWxC uint8 array.

    Grayscale, RGBA (alpha composited on white), CMYK, palette and 16-bit images become RGB. An unreadable
    or corrupt file raises ValueError naming the file.
    """
    if isinstance(image, (str, Path)):
        path = Path(image)
        if not path.is_file():
            raise ValueError(f"image file not found: {path}")
        try:
            with Image.open(path) as opened:
                opened.load()
                return to_rgb(opened)
        except (UnidentifiedImageError, OSError, SyntaxError) as err:
            raise ValueError(f"cannot read image {path}: {err}") from None
    if isinstance(image, np.ndarray):
        if image.ndim not in (2, 3) or image.dtype != np.uint8:
            raise ValueError(f"image array must be HxW or HxWxC uint8, got shape {image.shape} {image.dtype}")
        return to_rgb(Image.fromarray(image))
    if isinstance(image, Image.Image):
        return to_rgb(image)
    raise ValueError(f"an image must be a path, a PIL image or a uint8 array, got {type(image).__name__}")


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB copy of a PIL image; transparent pixels are composited on white (not black)."""
    if image.mode == "RGB":
        return image.copy()
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16/32-bit grayscale: rescale to 8 bits
        array = np.asarray(image, dtype=np.float64)
        high = array.max() or 1.0
        return Image.fromarray((array / high * 255).round().astype(np.uint8)).convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def read_story(path: str | Path) -> str:
    """A CNN/DailyMail story: the article text before the first ``@highlight`` line, stripped."""
    lines = []
    for line in Path(path).read_text(encoding="utf-8", errors="replace").splitlines():
        if line.strip().startswith("@highlight"):
            break
        lines.append(line)
    return "\n".join(lines).strip()


def read_text(path: str | Path) -> str:
    """A text file: ``.story`` files via read_story, anything else whole (stripped)."""
    path = Path(path)
    if path.suffix.lower() == ".story":
        return read_story(path)
    return path.read_text(encoding="utf-8", errors="replace").strip()


def _files(folder: str | Path, suffixes: tuple[str, ...], kind: str) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"{kind} folder not found: {folder}")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in suffixes)
    if not files:
        raise ValueError(f"no {kind} files ({', '.join(suffixes)}) in {folder}")
    return files


def list_images(folder: str | Path) -> list[Path]:
    """Image files directly inside ``folder``, sorted by name."""
    return _files(folder, IMAGE_SUFFIXES, "image")


def list_texts(folder: str | Path) -> list[Path]:
    """``.story`` / ``.txt`` files directly inside ``folder``, sorted by name."""
    return _files(folder, TEXT_SUFFIXES, "text")


def _draw(items: list, n: int | None, rng: random.Random, what: str, where) -> list:
    if n is None:
        return list(items)
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"number of pairs must be a positive int, got {n!r}")
    if n > len(items):
        raise ValueError(f"asked for {n} pairs but {where} has only {len(items)} {what}")
    return rng.sample(items, n)


def folder_pairs(image_folder: str | Path, text_folder: str | Path, n: int | None = 100, seed: int = 0) -> Pairs:
    """``n`` (image path, text) pairs drawn with ``seed`` from an image folder and a text folder.

    n=None takes min(#images, #texts) pairs in sorted order (no sampling).
    """
    images, texts = list_images(image_folder), list_texts(text_folder)
    rng = random.Random(seed)
    if n is None:
        count = min(len(images), len(texts))
        images, texts = images[:count], texts[:count]
    else:
        images = _draw(images, n, rng, "images", image_folder)
        texts = _draw(texts, n, rng, "texts", text_folder)
    names = [f"{image.name} + {text.name}" for image, text in zip(images, texts)]
    return Pairs(list(images), [read_text(t) for t in texts], names)


def jsonl_pairs(path: str | Path, n: int | None = None, seed: int = 0) -> Pairs:
    """Pairs from a JSONL file of ``{"image": ..., "text": ...}`` lines (n=None: all, in file order)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"JSONL file not found: {path}")
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{number}: not valid JSON ({err.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get("image"), str) \
                or not isinstance(record.get("text"), str):
            raise ValueError(f"{path}:{number}: expected an object with string fields 'image' and 'text'")
        image = Path(record["image"])
        records.append((image if image.is_absolute() else path.parent / image, record["text"], number))
    if not records:
        raise ValueError(f"{path}: no records")
    if n is not None:
        records = sorted(_draw(records, n, random.Random(seed), "records", path), key=lambda r: r[2])
    return Pairs([r[0] for r in records], [r[1] for r in records], [f"{path.name}:{r[2]}" for r in records])
