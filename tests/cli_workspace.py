"""A folder that `mirlab run` and `mirlab probe` can work on: a saved tiny LLaVA, random images, and texts."""
from pathlib import Path

import numpy as np
from PIL import Image

from tiny_models import build

WORDS = "a cat dog fox sits on the mat red blue square circle park night quick brown lazy".split()


def stories(n: int, seed: int) -> dict[str, str]:
    """``n`` CNN/DM-style ``.story`` files (name -> content): 8, 9, ... random words, then a highlight that the
    story reader must leave out."""
    rng = np.random.default_rng(seed)
    return {f"{i}.story": " ".join(rng.choice(WORDS, size=8 + i)) + "\n\n@highlight\n\nnot part of the text\n"
            for i in range(n)}


def cli_workspace(root: Path, n_images: int, texts: dict[str, str], seed: int = 0) -> Path:
    """``root/model``: a tiny LLaVA with its processor; ``root/images``: ``n_images`` random RGB PNGs, image ``i``
    of size (30 + i) x 40; ``root/texts``: the files of ``texts`` (name -> content). Returns ``root``."""
    llava = build("llava")
    llava.model.save_pretrained(root / "model")
    llava.processor.save_pretrained(root / "model")
    rng = np.random.default_rng(seed)
    (root / "images").mkdir()
    (root / "texts").mkdir()
    for i in range(n_images):
        Image.fromarray(rng.integers(0, 256, (30 + i, 40, 3), dtype=np.uint8)).save(root / "images" / f"{i}.png")
    for name, text in texts.items():
        (root / "texts" / name).write_text(text)
    return root
