"""Synthetic captioned scenes: coloured shapes on a grey background, with a caption that states them.

A scene is one or two *groups*; a group is `count` identical objects (same shape, colour and size) placed in
one region of the canvas ("left", "right", "top", "bottom" or "center"). Two groups always sit in opposite
halves (left/right or top/bottom). At most 4 objects per scene; objects never overlap.

    image, caption, meta = make_scene(seed=0)
    caption                  -> 'Two small red circles on the left and a large blue square on the right.'
    meta["objects"]          -> [{'shape': 'circle', 'colour': 'red', 'size': 'small', 'position': 'left',
                                  'center': [x, y], 'radius': r, 'rgb': [...]}, ...]
    describe_short(meta["groups"]) -> 'Red circles and a blue square.'   (colours and shapes only)

Held-out splits are disjoint *by content*, not only by pixels: every scene has a structural key (its groups
without jitter); a hash of the key assigns it to train (80 %), val (10 %) or test (10 %), and a scene is
drawn for a split by resampling until its key belongs there. So no caption content of the test split
(e.g. "a large purple star at the top and two small white circles at the bottom") ever occurs in train.
Each split also has its own random stream (numpy SeedSequence), so item i of a split depends only on
(seed, split, i): `scene_dataset(10, ...)` is a prefix of `scene_dataset(1000, ...)`.

Shapes are drawn 4x oversampled and box-filtered down (anti-aliased). Sizes are relative to the canvas, so
the default 224 px and a direct 112 px rendering look alike: at 112 px a large object spans ~44 px (3 ViT
patches of 14 px) and a small one ~22 px.
"""

import hashlib
import math
import re
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "star", "diamond")
COLOURS = {  # name -> nominal RGB (each object gets a small random jitter around it)
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 225),
    "yellow": (240, 210, 40),
    "purple": (140, 60, 180),
    "orange": (245, 140, 30),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
BACKGROUNDS = {"light grey": 205, "grey": 128, "dark grey": 55}
BACKGROUND_AVOIDS = {"light grey": {"white"}, "grey": set(), "dark grey": {"black"}}  # too little contrast
TEXTURES = ("plain", "noise", "gradient", "stripes")
SIZES = ("small", "large")
POSITIONS = ("left", "right", "top", "bottom", "center")
OPPOSITE = {"left": "right", "right": "left", "top": "bottom", "bottom": "top"}
SPLITS = ("train", "val", "test")
SPLIT_SHARES = {"train": 0.8, "val": 0.1, "test": 0.1}

RADIUS = {"small": 0.085, "large": 0.17}  # fraction of the canvas side, before a +-10 % jitter
EXTENT = 1.15  # every shape fits in a disc of EXTENT * radius around its centre
MAX_COUNT = {"small": 4, "large": 2}  # per group ("small" in a half region: 3, see _max_count)
MAX_OBJECTS = 4
OVERSAMPLE = 4

COUNT_WORDS = {1: "a", 2: "two", 3: "three", 4: "four"}
POSITION_PHRASES = {"left": "on the left", "right": "on the right", "top": "at the top",
                    "bottom": "at the bottom", "center": "in the middle"}
RELATION_PHRASES = {"left": "to the left of", "right": "to the right of", "top": "above", "bottom": "below"}
TEMPLATES_ONE = ("plain", "there", "picture", "background", "fronted")
TEMPLATES_TWO = ("plain", "there", "picture", "comma", "relation")


# ----------------------------------------------------------------------------------------------------------
# structure: which groups a scene has


def _max_count(size, position):
    """Largest count of one group that fits in its region without overlap."""
    if size == "small" and position != "center":
        return 3
    return MAX_COUNT[size]


def _sample_group(rng, position, max_objects):
    size = str(rng.choice(SIZES))
    count = int(rng.integers(1, min(_max_count(size, position), max_objects) + 1))
    return {"shape": str(rng.choice(SHAPES)), "colour": str(rng.choice(list(COLOURS))),
            "size": size, "count": count, "position": position}


def _sample_groups(rng):
    """One group anywhere, or two groups in opposite halves (different shape or colour)."""
    if rng.random() < 0.4:
        return [_sample_group(rng, str(rng.choice(POSITIONS)), MAX_OBJECTS)]
    first = str(rng.choice(("left", "right", "top", "bottom")))
    a = _sample_group(rng, first, MAX_OBJECTS - 1)
    while True:
        b = _sample_group(rng, OPPOSITE[first], MAX_OBJECTS - a["count"])
        if (b["shape"], b["colour"]) != (a["shape"], a["colour"]):
            return [a, b]


def scene_key(groups):
    """Canonical text of a scene's structure (order-free), e.g. 'large red circle x1 @left|...'."""
    parts = sorted(f"{g['size']} {g['colour']} {g['shape']} x{g['count']} @{g['position']}" for g in groups)
    return "|".join(parts)


def split_of(groups):
    """The split ('train'/'val'/'test') a scene structure belongs to, from a stable hash of its key."""
    digest = hashlib.sha256(scene_key(groups).encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    if u < SPLIT_SHARES["test"]:
        return "test"
    if u < SPLIT_SHARES["test"] + SPLIT_SHARES["val"]:
        return "val"
    return "train"


# ----------------------------------------------------------------------------------------------------------
# captions


def _noun_phrase(group):
    """'a large blue square', 'an orange star', 'three small white circles'."""
    count, shape = group["count"], group["shape"]
    words = f"{group['size']} {group['colour']} {shape if count == 1 else shape + 's'}"
    article = COUNT_WORDS[count]
    if count == 1 and words[0] in "aeiou":
        article = "an"
    return f"{article} {words}"


def _capitalize(text):
    return text[0].upper() + text[1:]


def describe(groups, template="plain", background="grey"):
    """The caption of a scene structure under one template (all templates state every attribute)."""
    a = groups[0]
    np_a, pos_a = _noun_phrase(a), POSITION_PHRASES[a["position"]]
    verb = "is" if a["count"] == 1 else "are"
    if len(groups) == 1:
        text = {
            "plain": f"{np_a} {pos_a}",
            "there": f"there {verb} {np_a} {pos_a}",
            "picture": f"a picture of {np_a} {pos_a}",
            "background": f"{np_a} {pos_a} on a {background} background",
            "fronted": f"{pos_a}, {np_a}" if a["position"] != "center" else f"{np_a} {pos_a}",
        }[template]
        return _capitalize(text) + "."
    b = groups[1]
    np_b, pos_b = _noun_phrase(b), POSITION_PHRASES[b["position"]]
    text = {
        "plain": f"{np_a} {pos_a} and {np_b} {pos_b}",
        "there": f"there {verb} {np_a} {pos_a} and {np_b} {pos_b}",
        "picture": f"a picture of {np_a} {pos_a} and {np_b} {pos_b}",
        "comma": f"{np_a} {pos_a}, {np_b} {pos_b}",
        "relation": f"{np_a} {RELATION_PHRASES[a['position']]} {np_b}",
    }[template]
    return _capitalize(text) + "."


def describe_short(groups):
    """The short caption of a scene structure: colour and shape of each group, nothing else.

    No count word, no size, no position: 'A red triangle and blue circles.' A group of one object reads
    'a/an <colour> <shape>', a group of several '<colour> <shape>s' (the plural is the only trace of the count).
    Groups in the order of `groups`. Deterministic: a function of the structure only.
    """
    phrases = []
    for g in groups:
        words = f"{g['colour']} {g['shape']}"
        if g["count"] == 1:
            phrases.append(("an " if words[0] in "aeiou" else "a ") + words)
        else:
            phrases.append(words + "s")
    return _capitalize(" and ".join(phrases)) + "."


# ----------------------------------------------------------------------------------------------------------
# drawing


def _region_cells(position, count, side):
    """Centres and half-sizes (cx, cy, half_w, half_h) of `count` equal cells of a region, in pixels."""
    s, h = side, side / 2
    if position == "center":
        if count == 1:
            return [(h, h, s / 4, s / 4)]
        if count in (2, 3):
            w = s / count
            return [(w * (i + 0.5), h, w / 2, s / 4) for i in range(count)]
        return [(s * fx, s * fy, s / 4, s / 4) for fy in (0.25, 0.75) for fx in (0.25, 0.75)]
    x0, y0, w, hh = {"left": (0, 0, h, s), "right": (h, 0, h, s), "top": (0, 0, s, h), "bottom": (0, h, s, h)}[
        position]
    if position in ("left", "right"):  # stack along y
        step = hh / count
        return [(x0 + w / 2, y0 + step * (i + 0.5), w / 2, step / 2) for i in range(count)]
    step = w / count  # top/bottom: a row along x
    return [(x0 + step * (i + 0.5), y0 + hh / 2, step / 2, hh / 2) for i in range(count)]


def _shape_polygon(shape, cx, cy, r, angle):
    """Vertices of a polygonal shape (angle in radians; pointy shapes point up at angle 0)."""
    if shape == "square":
        radii, n, start = [r * 0.85 * math.sqrt(2)], 4, math.pi / 4
    elif shape == "diamond":
        radii, n, start = [r * 1.12], 4, 0.0
    elif shape == "triangle":
        radii, n, start = [r * 1.12], 3, 0.0
    elif shape == "star":
        radii, n, start = [r * 1.15, r * 0.5], 10, 0.0
    else:
        raise ValueError(f"not a polygonal shape: {shape!r}")
    points = []
    for i in range(n):
        theta = start + angle + 2 * math.pi * i / n
        rad = radii[i % len(radii)]
        points.append((cx + rad * math.sin(theta), cy - rad * math.cos(theta)))
    return points


def _shape_mask(shape, cx, cy, r, angle):
    """Anti-aliased 'L' mask of one shape and its top-left corner on the canvas (drawn oversampled, box-filtered).

    Only the shape's bounding square is drawn, so the cost does not grow with the canvas.
    """
    k, reach = OVERSAMPLE, EXTENT * r + 2
    x0, y0 = int(math.floor(cx - reach)), int(math.floor(cy - reach))
    side = int(math.ceil(2 * reach)) + 1
    lx, ly = cx - x0, cy - y0  # centre in local coordinates
    big = Image.new("L", (side * k, side * k), 0)
    draw = ImageDraw.Draw(big)
    if shape == "circle":
        draw.ellipse([(lx - r) * k, (ly - r) * k, (lx + r) * k, (ly + r) * k], fill=255)
    else:
        draw.polygon([(x * k, y * k) for x, y in _shape_polygon(shape, lx, ly, r, angle)], fill=255)
    return big.resize((side, side), Image.Resampling.BOX), (x0, y0)


def _background(rng, name, texture, side):
    """A grey canvas, plain or lightly textured (noise, gradient or faint stripes), as a uint8 array."""
    canvas = np.full((side, side), float(BACKGROUNDS[name]))
    yy, xx = np.mgrid[0:side, 0:side] / side
    if texture == "noise":
        canvas += rng.normal(0.0, 6.0, size=(side, side))
    elif texture == "gradient":
        theta = rng.uniform(0, 2 * math.pi)
        canvas += 36.0 * ((xx - 0.5) * math.cos(theta) + (yy - 0.5) * math.sin(theta))
    elif texture == "stripes":
        theta, period = rng.uniform(0, math.pi), rng.uniform(0.06, 0.15)
        canvas += 8.0 * np.sin(2 * math.pi * (xx * math.cos(theta) + yy * math.sin(theta)) / period)
    grey = np.clip(np.rint(canvas), 0, 255).astype(np.uint8)
    return np.repeat(grey[:, :, None], 3, axis=2)


def _place_objects(rng, groups, side):
    """Concrete objects (centre, radius, rotation, rgb) for each group, jittered inside their cells."""
    objects = []
    for g in groups:
        for cx, cy, half_w, half_h in _region_cells(g["position"], g["count"], side):
            r = RADIUS[g["size"]] * side * rng.uniform(0.9, 1.1)
            margin = 0.02 * side
            slack_x = max(0.0, half_w - EXTENT * r - margin)
            slack_y = max(0.0, half_h - EXTENT * r - margin)
            jitter = 12 if g["colour"] not in ("white", "black") else 8
            rgb = np.clip(np.array(COLOURS[g["colour"]]) + rng.integers(-jitter, jitter + 1, size=3), 0, 255)
            objects.append({
                "shape": g["shape"], "colour": g["colour"], "size": g["size"], "position": g["position"],
                "center": [round(cx + rng.uniform(-0.5, 0.5) * slack_x, 2),
                           round(cy + rng.uniform(-0.5, 0.5) * slack_y, 2)],
                "radius": round(r, 2),
                "angle": round(float(rng.uniform(-0.2, 0.2)), 4),  # radians, small: a square stays a square
                "rgb": [int(c) for c in rgb],
            })
    return objects


def render(metadata):
    """Draw the image described by a scene's metadata (pure function of the metadata)."""
    side = metadata["image_size"]
    rng = np.random.default_rng(metadata["texture_seed"])
    image = Image.fromarray(_background(rng, metadata["background"], metadata["texture"], side), "RGB")
    for obj in metadata["objects"]:
        (cx, cy), r = obj["center"], obj["radius"]
        mask, corner = _shape_mask(obj["shape"], cx, cy, r, obj["angle"])
        image.paste(tuple(obj["rgb"]), corner + (corner[0] + mask.width, corner[1] + mask.height), mask)
    return image


# ----------------------------------------------------------------------------------------------------------
# public API


def _as_rng(rng_or_seed):
    if isinstance(rng_or_seed, np.random.Generator):
        return rng_or_seed
    if rng_or_seed is None or isinstance(rng_or_seed, (int, np.integer, np.random.SeedSequence)):
        return np.random.default_rng(rng_or_seed)
    raise TypeError(f"expected a numpy Generator, SeedSequence or int seed, got {type(rng_or_seed).__name__}")


def make_scene(rng=None, size=224, split=None):
    """One synthetic scene -> (PIL RGB image of size x size, caption, metadata dict).

    rng: a numpy Generator or an int seed (same seed -> identical pixels and caption).
    split: None (any structure) or 'train'/'val'/'test' (resample until the structure belongs there).
    metadata: JSON-serializable; 'groups' (shape/colour/size/count/position), 'objects' (one per drawn
    object, with pixel 'center' and 'radius'), 'background', 'texture', 'template', 'caption', 'key', 'split'.
    """
    if split is not None and split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS} or None, got {split!r}")
    if size < 56:
        raise ValueError(f"size must be at least 56 px for the shapes to be visible, got {size}")
    rng = _as_rng(rng)
    groups = _sample_groups(rng)
    while split is not None and split_of(groups) != split:
        groups = _sample_groups(rng)
    colours = {g["colour"] for g in groups}
    backgrounds = [b for b in BACKGROUNDS if not colours & BACKGROUND_AVOIDS[b]]
    background = str(rng.choice(backgrounds))
    templates = TEMPLATES_ONE if len(groups) == 1 else TEMPLATES_TWO
    template = str(rng.choice(templates))
    metadata = {
        "image_size": int(size),
        "groups": groups,
        "objects": _place_objects(rng, groups, size),
        "background": background,
        "texture": str(rng.choice(TEXTURES)),
        "texture_seed": int(rng.integers(2**31)),
        "template": template,
        "caption": describe(groups, template, background),
        "key": scene_key(groups),
        "split": split_of(groups),
    }
    return render(metadata), metadata["caption"], metadata


class SceneDataset(Sequence):
    """n scenes of one split, generated lazily: item i depends only on (seed, split, i, size).

    Each item is a dict(image=PIL RGB, caption=str, metadata=dict, split=str, index=int).
    """

    def __init__(self, n, seed=0, split="train", size=224):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        self.n, self.seed, self.split, self.size = int(n), int(seed), split, int(size)

    def __len__(self):
        return self.n

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(self.n))]
        if index < 0:
            index += self.n
        if not 0 <= index < self.n:
            raise IndexError(f"scene index {index} out of range for {self.n} scenes")
        stream = np.random.SeedSequence(self.seed, spawn_key=(SPLITS.index(self.split), index))
        image, caption, metadata = make_scene(np.random.default_rng(stream), size=self.size, split=self.split)
        return {"image": image, "caption": caption, "metadata": metadata, "split": self.split, "index": index}

    def __repr__(self):
        return f"SceneDataset(n={self.n}, seed={self.seed}, split={self.split!r}, size={self.size})"


def scene_dataset(n, seed=0, split="train", size=224):
    """n captioned scenes of a split ('train'/'val'/'test'); splits never share a scene structure."""
    return SceneDataset(n, seed=seed, split=split, size=size)


# ----------------------------------------------------------------------------------------------------------
# evaluation helpers

_SIZE_WORDS = {"small", "large", "big", "tiny"}
_SHAPE_WORDS = {**{s: s for s in SHAPES}, **{s + "s": s for s in SHAPES}}
_COLOUR_WORDS = {**{c: c for c in COLOURS}, "violet": "purple"}


def _words(text):
    return re.findall(r"[a-z]+", text.lower())


def caption_mentions(caption_text, metadata):
    """Score which shapes and colours a (generated) caption mentions against a scene's metadata.

    Returns a dict with the sets found and scores in [0, 1]:
      shape_recall / colour_recall:       fraction of the scene's shapes / colours mentioned
      shape_precision / colour_precision: fraction of mentioned shapes / colours that are in the scene
                                          (0.0 if none is mentioned)
      pair_recall:  fraction of the scene's (colour, shape) groups stated as a bound phrase, i.e. the colour
                    word followed by the shape word, with at most one word between ("red small circle")
      wrong_shapes / wrong_colours: mentioned but absent; all_correct: every shape and colour of the scene
                    mentioned, nothing absent mentioned.
    """
    words = _words(caption_text)
    shapes = {_SHAPE_WORDS[w] for w in words if w in _SHAPE_WORDS}
    colours = {_COLOUR_WORDS[w] for w in words if w in _COLOUR_WORDS}
    pairs = set()
    for i, w in enumerate(words):
        if w in _COLOUR_WORDS:
            for j in (i + 1, i + 2):
                if j < len(words) and words[j] in _SHAPE_WORDS:
                    pairs.add((_COLOUR_WORDS[w], _SHAPE_WORDS[words[j]]))
                    break
                if j < len(words) and words[j] not in _SIZE_WORDS:
                    break
    true_shapes = {o["shape"] for o in metadata["objects"]}
    true_colours = {o["colour"] for o in metadata["objects"]}
    true_pairs = {(g["colour"], g["shape"]) for g in metadata["groups"]}

    def ratio(a, b):
        return len(a) / len(b) if b else 0.0

    return {
        "shapes_mentioned": sorted(shapes),
        "colours_mentioned": sorted(colours),
        "wrong_shapes": sorted(shapes - true_shapes),
        "wrong_colours": sorted(colours - true_colours),
        "shape_recall": ratio(shapes & true_shapes, true_shapes),
        "shape_precision": ratio(shapes & true_shapes, shapes),
        "colour_recall": ratio(colours & true_colours, true_colours),
        "colour_precision": ratio(colours & true_colours, colours),
        "pair_recall": ratio(pairs & true_pairs, true_pairs),
        "all_correct": shapes == true_shapes and colours == true_colours,
    }


def _perturbations(groups):
    """Every one-attribute change of a scene (colour, shape or count of one group) as (kind, groups)."""
    out = []
    for i, g in enumerate(groups):
        others = {(o["shape"], o["colour"]) for j, o in enumerate(groups) if j != i}
        changes = [("colour", {**g, "colour": c}) for c in COLOURS if c != g["colour"]]
        changes += [("shape", {**g, "shape": s}) for s in SHAPES if s != g["shape"]]
        changes += [("count", {**g, "count": n}) for n in COUNT_WORDS if n != g["count"]]
        for kind, new in changes:
            if (new["shape"], new["colour"]) not in others:  # two groups never share shape and colour
                out.append((kind, [new if j == i else o for j, o in enumerate(groups)]))
    return out


def distractor_captions(metadata, k, rng=None):
    """k distinct captions that are wrong for this scene, each changing one colour, shape or count.

    They use the scene's own template (so only attribute words differ from the true caption); the kinds of
    change are taken in turn (colour, shape, count, colour, ...) so a set of distractors is balanced.
    """
    rng = _as_rng(rng)
    true_caption = describe(metadata["groups"], metadata["template"], metadata["background"])
    by_kind = {"colour": [], "shape": [], "count": []}
    seen = {true_caption}
    for kind, groups in _perturbations(metadata["groups"]):
        caption = describe(groups, metadata["template"], metadata["background"])
        if caption not in seen:
            seen.add(caption)
            by_kind[kind].append(caption)
    available = sum(len(v) for v in by_kind.values())
    if k > available:
        raise ValueError(f"asked for {k} distractors, this scene has only {available} distinct ones")
    for captions in by_kind.values():
        rng.shuffle(captions)
    out = []
    while len(out) < k:
        for kind in ("colour", "shape", "count"):
            if by_kind[kind] and len(out) < k:
                out.append(by_kind[kind].pop())
    return out
