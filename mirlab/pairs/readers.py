"""Read user data for MIR: (image, text) pairs from folders or a JSONL file.

Layouts (the official defaults; docs/paper-differences.md, 'Default data'):
    images folder   TextVQA-style: image files (.jpg .jpeg .png .bmp .gif .webp .tif .tiff) directly inside
    texts folder    CNN/DailyMail ``*.story`` files (text = everything before the first ``@highlight`` line),
                    or plain ``*.txt`` files (text = the whole file)
    JSONL           one ``{"image": path, "text": ...}`` object per line; relative paths are relative to the
                    JSONL file's folder

Pairing (docs/paper-differences.md, 'Pairing'): the official script pairs ``os.listdir`` orders (unordered,
no seed). Here file lists are sorted by name, ``n`` images and ``n`` texts are drawn with ``random.Random(seed)``,
and the i-th drawn image is paired with the i-th drawn text: the same folders and seed always give the same pairs.

Folders: only files directly inside are read. Hidden files and the litter archives, file managers and editors
leave behind (``.*`` incl. AppleDouble ``._*`` and ``.DS_Store``, ``__MACOSX``, ``Thumbs.db``, ``desktop.ini``,
Office locks ``~$*``, backups ``*~``) are skipped, as are sub-folders and files of other types; a warning says
how many (``SkippedFilesWarning``).

Text files are decoded the careful way (``decode_text``): UTF-8 (a byte-order mark is dropped), UTF-16/32 only
with a byte-order mark, otherwise Windows-1252 with a warning; NUL bytes without a byte-order mark mean a binary
file (an error). Then ``clean_text``: Unicode NFC, one newline convention, invisible characters removed.
An empty text (or a story with nothing before ``@highlight``) is an error naming the file.

Every problem with the user's files raises ``mirlab.errors.UserError`` (a ValueError) naming the file.
"""
from __future__ import annotations

import codecs
import json
import random
import unicodedata
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from mirlab.errors import UserError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
TEXT_SUFFIXES = (".story", ".txt")
LITTER_NAMES = ("__macosx", "thumbs.db", "ehthumbs.db", "desktop.ini")
ON_ERROR = ("raise", "skip")


class SkippedFilesWarning(UserWarning):
    """A folder reader left some entries out (hidden/system files, sub-folders, other file types)."""


@dataclass
class Pairs:
    """N (image, text) pairs; ``names[i]`` says where pair i came from (used in error messages).

    ``skipped`` lists pairs a reader left out (``{"name", "reason"}``), e.g. ``folder_pairs(on_error="skip")``.
    """
    images: list
    texts: list[str]
    names: list[str] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)

    def __post_init__(self):
        if len(self.images) != len(self.texts):
            raise ValueError(f"{len(self.images)} images but {len(self.texts)} texts: pairs need one of each")
        if not self.names:
            self.names = [f"pair {i}" for i in range(len(self.texts))]

    def __len__(self) -> int:
        return len(self.texts)


def load_image(image) -> Image.Image:
    """An RGB PIL image from a path, a PIL image or an HxW / HxWxC uint8 array.

    Grayscale, RGBA (alpha composited on white), CMYK, palette and 16-bit images become RGB. A missing, empty,
    unreadable or corrupt file raises UserError naming the file.
    """
    if isinstance(image, (str, Path)):
        path = Path(image)
        if not path.is_file():
            raise UserError(f"image file not found: {path}" if not path.exists()
                            else f"image {path} is not a file")
        try:
            if path.stat().st_size == 0:
                raise UserError(f"image file {path} is empty (0 bytes): replace or remove it")
            with Image.open(path) as opened:
                opened.load()
                return to_rgb(opened)
        except UnidentifiedImageError:
            raise UserError(f"cannot read image {path}: not an image format Pillow can decode (corrupt, or not "
                            f"an image): replace or remove it") from None
        except (OSError, SyntaxError, Image.DecompressionBombError) as err:
            reason = getattr(err, "strerror", None) or str(err)
            raise UserError(f"cannot read image {path}: {reason}: replace or remove it") from None
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


# --- text files ----------------------------------------------------------------------------------------------

# byte-order marks, longest first (the UTF-32-LE mark begins with the UTF-16-LE one)
BYTE_ORDER_MARKS = ((codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"), (codecs.BOM_UTF8, "utf-8-sig"),
                    (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16"))
LINE_BREAKS = "\r\v\f\x1c\x1d\x1e\x85\u2028\u2029"  # all become "\n"
KEPT_INVISIBLES = "\n\t\u200c\u200d"  # newline, tab, zero-width (non-)joiner: they change how words render


def decode_text(data: bytes, where: str | Path = "text") -> str:
    """The text in ``data`` (a file's bytes); ``where`` names the file in errors and warnings.

    Policy, in order: a byte-order mark decides (UTF-8, UTF-16, UTF-32; the mark is dropped); NUL bytes without
    a mark mean a binary file (or UTF-16/32 without a mark): UserError; valid UTF-8 is UTF-8; anything else is
    read as Windows-1252 (the usual legacy encoding, a superset of Latin-1's printable characters) with a
    warning, and bytes Windows-1252 leaves undefined (0x81 0x8D 0x8F 0x90 0x9D) are a UserError.
    """
    for mark, encoding in BYTE_ORDER_MARKS:
        if data.startswith(mark):
            try:
                return data.decode(encoding)
            except UnicodeDecodeError as err:
                raise UserError(f"{where}: starts with a {encoding} byte-order mark but is not valid {encoding} "
                                f"({err.reason} at byte {err.start}): save it as UTF-8") from None
    if b"\x00" in data:
        raise UserError(f"{where}: contains NUL bytes, so it is a binary file (or UTF-16/32 text without a "
                        f"byte-order mark), not text: save it as UTF-8 text or remove it")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        utf8_error = err
    try:
        text = data.decode("cp1252")
    except UnicodeDecodeError:
        raise UserError(f"{where}: not UTF-8 ({utf8_error.reason} at byte {utf8_error.start}) and not "
                        f"Windows-1252 either: save it as UTF-8") from None
    warnings.warn(f"{where}: not valid UTF-8 ({utf8_error.reason} at byte {utf8_error.start}); read as "
                  f"Windows-1252 (save it as UTF-8 to be sure)", stacklevel=2)
    return text


def clean_text(text: str) -> str:
    """``text`` as the tokenizer should see it: NFC, one newline convention, nothing invisible, stripped.

    Unicode NFC composes characters (``e`` + combining acute -> ``é``); ``\\r\\n``, ``\\r``, vertical tab,
    form feed, the separators U+001C..U+001E, U+0085, U+2028 and U+2029 become ``\\n``; every other control
    (category Cc), format (Cf: zero-width space, byte-order mark, soft hyphen, bidi marks, word joiner ...) and
    lone-surrogate (Cs) character is removed, except tab and the zero-width (non-)joiner U+200C/U+200D, which
    change how words render (Persian, Indic scripts, emoji sequences). Leading and trailing whitespace is
    stripped.
    """
    text = unicodedata.normalize("NFC", text.replace("\r\n", "\n"))
    kept = []
    for char in text:
        if char in LINE_BREAKS:
            kept.append("\n")
        elif char in KEPT_INVISIBLES or unicodedata.category(char) not in ("Cc", "Cf", "Cs"):
            kept.append(char)
    return "".join(kept).strip()


def _file_text(path: Path) -> str:
    """decode_text + clean_text of a file; an unreadable or 0-byte file is a UserError."""
    try:
        data = path.read_bytes()
    except OSError as err:
        raise UserError(f"cannot read {path}: {err.strerror or err}") from None
    if not data:
        raise UserError(f"{path} is an empty file (0 bytes): fill it in or remove it")
    return clean_text(decode_text(data, path))


def read_story(path: str | Path) -> str:
    """A CNN/DailyMail story: the article text before the first ``@highlight`` line (decoded, cleaned).

    A story with nothing before its first ``@highlight`` is a UserError naming the file.
    """
    path = Path(path)
    lines = []
    for line in _file_text(path).splitlines():
        if line.strip().startswith("@highlight"):
            break
        lines.append(line)
    story = "\n".join(lines).strip()
    if not story:
        raise UserError(f"{path}: no text before the first @highlight line (an empty story): fill it in or "
                        f"remove the file")
    return story


def read_text(path: str | Path) -> str:
    """A text file: ``.story`` files via read_story, anything else whole (decoded, cleaned; see the module).

    Empty, whitespace-only, binary or undecodable files are a UserError naming the file.
    """
    path = Path(path)
    if path.suffix.lower() == ".story":
        return read_story(path)
    text = _file_text(path)
    if not text:
        raise UserError(f"{path}: no text (only whitespace or invisible characters): fill it in or remove it")
    return text


# --- folders -----------------------------------------------------------------------------------------------------

def is_litter(name: str) -> bool:
    """True for hidden files and what archives, file managers and editors leave behind (see the module)."""
    return name.startswith((".", "~$")) or name.endswith("~") or name.lower() in LITTER_NAMES


def _some(names: list[str]) -> str:
    return ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")


def _files(folder: str | Path, suffixes: tuple[str, ...], kind: str) -> list[Path]:
    """The ``kind`` files directly inside ``folder``, sorted; warns (SkippedFilesWarning) about what it skips."""
    folder = Path(folder)
    if not folder.exists():
        raise UserError(f"{kind} folder not found: {folder}")
    if not folder.is_dir():
        raise UserError(f"{folder} is a file, not a folder of {kind} files")
    try:
        entries = sorted(folder.iterdir())
    except OSError as err:
        raise UserError(f"cannot list the {kind} folder {folder}: {err.strerror or err}") from None
    files, litter, folders, other = [], [], [], []
    for entry in entries:
        if is_litter(entry.name):
            litter.append(entry.name)
        elif entry.is_dir():
            folders.append(entry.name)
        elif entry.suffix.lower() in suffixes and entry.is_file():
            files.append(entry)
        else:
            other.append(entry.name)
    parts = [f"{len(names)} {what if len(names) > 1 else one} ({_some(names)})" for names, one, what in
             ((litter, "hidden or system file", "hidden or system files"), (folders, "sub-folder", "sub-folders"),
              (other, "file of another type", "files of other types")) if names]
    skipped = "skipped " + ", ".join(parts) if parts else ""
    if not files:
        raise UserError(f"no {kind} files ({', '.join(suffixes)}) in {folder}" + (f" ({skipped})" if parts else ""))
    if parts:
        warnings.warn(f"{folder}: {skipped}", SkippedFilesWarning, stacklevel=3)
    return files


def list_images(folder: str | Path) -> list[Path]:
    """Image files directly inside ``folder``, sorted by name (hidden files and litter skipped, with a warning)."""
    return _files(folder, IMAGE_SUFFIXES, "image")


def list_texts(folder: str | Path) -> list[Path]:
    """``.story`` / ``.txt`` files directly inside ``folder``, sorted by name (litter skipped, with a warning)."""
    return _files(folder, TEXT_SUFFIXES, "text")


def _draw(items: list, n: int | None, rng: random.Random, what: str, where) -> list:
    if n is None:
        return list(items)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise UserError(f"number of pairs must be a positive int, got {n!r}")
    if n > len(items):
        raise UserError(f"asked for {n} pairs but {where} has only {len(items)} {what}: ask for at most "
                        f"{len(items)} pairs")
    return rng.sample(items, n)


def folder_pairs(image_folder: str | Path, text_folder: str | Path, n: int | None = 100, seed: int = 0,
                 on_error: str = "raise") -> Pairs:
    """``n`` (image path, text) pairs drawn with ``seed`` from an image folder and a text folder.

    n=None takes min(#images, #texts) pairs in sorted order (no sampling). Only the drawn texts are read.
    on_error: "raise" (default): an unusable text file (empty, binary, undecodable, a story with no text) is a
    UserError naming it; "skip": its pair is left out with a warning and listed in ``Pairs.skipped`` (then fewer
    than ``n`` pairs come back). Images are only listed here; they are decoded when the pairs are used.
    """
    if on_error not in ON_ERROR:
        raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
    images, texts = list_images(image_folder), list_texts(text_folder)
    rng = random.Random(seed)
    if n is None:
        count = min(len(images), len(texts))
        images, texts = images[:count], texts[:count]
    else:
        images = _draw(images, n, rng, "images", image_folder)
        texts = _draw(texts, n, rng, "texts", text_folder)
    kept, skipped = [], []
    for image, text_path in zip(images, texts):
        name = f"{image.name} + {text_path.name}"
        try:
            kept.append((image, read_text(text_path), name))
        except UserError as err:
            if on_error == "raise":
                raise UserError(f"{err} (or pass on_error='skip' to leave such pairs out)") from None
            skipped.append({"name": name, "reason": str(err)})
    if skipped:
        message = (f"skipped {len(skipped)} of {len(images)} pairs whose text file is unusable: "
                   + "; ".join(s["reason"] for s in skipped[:3]) + (" ..." if len(skipped) > 3 else ""))
        if not kept:
            raise UserError(f"no usable pairs: {message}")
        warnings.warn(message, stacklevel=2)
    return Pairs([k[0] for k in kept], [k[1] for k in kept], [k[2] for k in kept], skipped)


def jsonl_pairs(path: str | Path, n: int | None = None, seed: int = 0) -> Pairs:
    """Pairs from a JSONL file of ``{"image": ..., "text": ...}`` lines (n=None: all, in file order).

    The file is decoded like a text file (``decode_text``); each text goes through ``clean_text`` (an empty
    text is reported when the pair is used, naming ``file:line``).
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"JSONL file not found: {path}" if not path.exists() else f"{path} is not a file")
    try:
        content = decode_text(path.read_bytes(), path)
    except OSError as err:
        raise UserError(f"cannot read {path}: {err.strerror or err}") from None
    records = []
    for number, line in enumerate(content.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise UserError(f"{path}:{number}: not valid JSON ({err.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get("image"), str) \
                or not isinstance(record.get("text"), str):
            raise UserError(f"{path}:{number}: expected an object with string fields 'image' and 'text'")
        image = Path(record["image"])
        records.append((image if image.is_absolute() else path.parent / image, clean_text(record["text"]), number))
    if not records:
        raise UserError(f"{path}: no records")
    if n is not None:
        records = sorted(_draw(records, n, random.Random(seed), "records", path), key=lambda r: r[2])
    return Pairs([r[0] for r in records], [r[1] for r in records], [f"{path.name}:{r[2]}" for r in records])
