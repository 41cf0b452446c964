"""Where mirlab reads and writes files: the one place that looks at the ``MIRLAB_*`` environment variables.

    data_dir()    shipped assets (captions, prose, trained projector checkpoints, result tables):
                  $MIRLAB_DATA_DIR, else ``data/`` beside the package (a source checkout or editable install)
    cache_dir()   things mirlab builds or trains on your machine (the embedded model, feature caches,
                  training state, fine-tuned weights): $MIRLAB_CACHE_DIR, else ``~/.cache/mirlab``

    atomic_write() write a file all at once (temporary sibling, then rename)

Both folders are read at call time, so a test (or a notebook) can point them elsewhere with ``os.environ``.
This module imports nothing else of mirlab: every wing may use it.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

DATA_ENV = "MIRLAB_DATA_DIR"
CACHE_ENV = "MIRLAB_CACHE_DIR"
REPOSITORY_DATA = Path(__file__).resolve().parent.parent / "data"


def data_dir() -> Path:
    """mirlab's data folder: $MIRLAB_DATA_DIR if set, else the repository's ``data/``."""
    return Path(os.environ.get(DATA_ENV) or REPOSITORY_DATA).expanduser()


def cache_dir(override: str | os.PathLike | None = None) -> Path:
    """mirlab's cache root: ``override`` if given, else $MIRLAB_CACHE_DIR, else ``~/.cache/mirlab``."""
    return Path(override or os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "mirlab").expanduser()


def scratch_dir(*parts: str) -> Path:
    """A folder under the cache root (created), e.g. ``scratch_dir("train")`` for training state."""
    path = cache_dir().joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path


def atomic_write(path: str | os.PathLike, write: Callable[[Path], object]) -> Path:
    """Create or replace ``path`` all at once: ``write(tmp)`` writes a temporary sibling, then ``os.replace``.

    A reader sees the old file or the whole new one, never half of it. The temporary name carries the process id
    (concurrent writers of the same file never share one) and keeps ``path``'s suffix, for writers that go by it
    (``numpy.save`` appends ``.npy`` otherwise). If ``write`` raises, the temporary file is removed, ``path`` is
    left as it was and the error propagates. Returns ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp{path.suffix}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
