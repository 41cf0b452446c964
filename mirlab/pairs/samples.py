"""Bundled sample data: real photos with captions written by mirlab, prose passages, and mixed MIR pairs.

- `sample_photos()`: 15 public-domain / CC0 / CC-BY images that ship inside the scikit-image and
  scikit-learn wheels (loaded from there at run time; mirlab ships only their captions, in
  data/captions/photos.jsonl). Licences and attributions are in each record and in data/PROVENANCE.md.
- `prose_passages()`: 120 short English passages written by mirlab (data/prose/passages.jsonl, CC0) that play
  the role of the CNN/DailyMail stories in the paper: text unrelated to the image it is paired with.
- `sample_pairs(n, seed, text=...)`: n (image, text) pairs for a MIR evaluation, mixing the photos with
  synthetic scenes from `mirlab.pairs.scenes` (held-out 'test' split by default).
"""

import json
from pathlib import Path

import numpy as np
from PIL import Image

from mirlab import paths
from mirlab.pairs.scenes import SceneDataset

PHOTOS_FILE = Path("captions") / "photos.jsonl"  # relative to mirlab.paths.data_dir()
PROSE_FILE = Path("prose") / "passages.jsonl"
TEXT_KINDS = ("captions", "prose")


def _read_jsonl(path):
    if not path.exists():
        raise FileNotFoundError(f"bundled data file missing: {path} (mirlab's data/ folder must sit beside "
                                f"the mirlab package, as in a source checkout or an editable install)")
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _to_rgb(array):
    """A scikit-image/scikit-learn array (bool, grey or RGB, uint8) as a PIL RGB image."""
    array = np.asarray(array)
    if array.dtype == bool:
        array = array.astype(np.uint8) * 255
    if array.dtype != np.uint8:
        raise ValueError(f"expected a uint8 or bool image array, got {array.dtype}")
    return Image.fromarray(array).convert("RGB")


def load_bundled_image(ref):
    """Load a bundled image by reference: 'skimage:<function name>' or 'sklearn:<file name>'."""
    package, _, name = ref.partition(":")
    if package == "skimage":
        import skimage.data

        loader = getattr(skimage.data, name, None)
        if loader is None:
            raise ValueError(f"scikit-image has no sample image {name!r}")
        return _to_rgb(loader())
    if package == "sklearn":
        from sklearn.datasets import load_sample_image

        return _to_rgb(load_sample_image(name))
    raise ValueError(f"image reference must start with 'skimage:' or 'sklearn:', got {ref!r}")


def photo_records():
    """The caption records of data/captions/photos.jsonl (no images loaded)."""
    return _read_jsonl(paths.data_dir() / PHOTOS_FILE)


def sample_photos():
    """Every bundled photo: list of dict(image=PIL RGB, captions=[...], name, licence, source, attribution)."""
    photos = []
    for record in photo_records():
        photos.append({
            "image": load_bundled_image(record["image"]),
            "captions": list(record["captions"]),
            "name": record["image"],
            "licence": record["licence"],
            "source": record["source"],
            "attribution": record.get("attribution"),
        })
    return photos


def prose_passages():
    """The bundled prose passages (list of str), in file order."""
    return [row["text"] for row in _read_jsonl(paths.data_dir() / PROSE_FILE)]


def sample_pairs(n, seed=0, text="captions", photo_share=0.5, scene_split="test", scene_size=224):
    """n (PIL image, text) pairs for a MIR evaluation, in a seeded shuffled order.

    Images: round(n * photo_share) distinct bundled photos (at most all 15), the rest synthetic scenes of
    `scene_split` (default the held-out 'test' split, so they are never training scenes).
    text='captions': each image with one of its own captions (a photo's caption picked at random).
    text='prose': each image with a different prose passage (unrelated text, like CNN/DM stories in the
    paper); n may not exceed the number of passages.
    """
    if text not in TEXT_KINDS:
        raise ValueError(f"text must be one of {TEXT_KINDS}, got {text!r}")
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if not 0.0 <= photo_share <= 1.0:
        raise ValueError(f"photo_share must be in [0, 1], got {photo_share}")
    rng = np.random.default_rng(seed)
    records = photo_records()
    n_photos = min(len(records), int(round(n * photo_share)))
    items = []  # (image, own caption)
    for i in rng.permutation(len(records))[:n_photos]:
        record = records[i]
        items.append((load_bundled_image(record["image"]), str(rng.choice(record["captions"]))))
    for scene in SceneDataset(n - n_photos, seed=seed, split=scene_split, size=scene_size):
        items.append((scene["image"], scene["caption"]))
    if text == "prose":
        passages = prose_passages()
        if n > len(passages):
            raise ValueError(f"text='prose' needs n <= {len(passages)} (one distinct passage per image), got {n}")
        chosen = rng.choice(len(passages), size=n, replace=False)
        items = [(image, passages[j]) for (image, _), j in zip(items, chosen)]
    return [items[i] for i in rng.permutation(len(items))]
