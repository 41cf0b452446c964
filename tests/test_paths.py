"""mirlab.paths.atomic_write: a file appears whole or not at all, and a failed write loses nothing."""
import multiprocessing
from pathlib import Path

import numpy as np
import pytest

from mirlab.paths import atomic_write


def test_writes_creates_folders_and_replaces(tmp_path):
    target = tmp_path / "a" / "b" / "table.csv"
    assert atomic_write(target, lambda tmp: tmp.write_text("x\n1\n")) == target
    assert target.read_text() == "x\n1\n"
    atomic_write(target, lambda tmp: tmp.write_text("x\n2\n"))
    assert target.read_text() == "x\n2\n"
    assert [p.name for p in target.parent.iterdir()] == ["table.csv"]  # no temporary file left behind


def test_temporary_name_keeps_the_suffix_for_writers_that_go_by_it(tmp_path):
    rows = np.arange(6, dtype=np.float32).reshape(2, 3)
    target = atomic_write(tmp_path / "rows.npy", lambda tmp: np.save(tmp, rows))  # np.save appends .npy otherwise
    np.testing.assert_array_equal(np.load(target), rows)
    assert [p.name for p in tmp_path.iterdir()] == ["rows.npy"]


def test_a_failed_write_keeps_the_old_file_and_removes_the_temporary(tmp_path):
    target = tmp_path / "state.json"
    target.write_text("old")

    def half_then_fail(tmp: Path):
        tmp.write_text("half of the new")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, half_then_fail)
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]


def _write_many(args):
    path, digit = args
    for _ in range(30):
        atomic_write(path, lambda tmp: tmp.write_text(str(digit) * 200_000))


def test_concurrent_writers_leave_one_whole_file(tmp_path):
    target = tmp_path / "shared.txt"
    with multiprocessing.get_context("spawn").Pool(3) as pool:
        pending = pool.map_async(_write_many, [(target, d) for d in range(3)])
        seen = set()
        while not pending.ready():
            if target.exists():
                text = target.read_text()
                seen.add((len(text), len(set(text))))
        pending.get()
    text = target.read_text()
    assert len(text) == 200_000 and len(set(text)) == 1
    assert seen <= {(200_000, 1)}, f"a reader saw a partial or mixed file: {seen}"
    assert [p.name for p in tmp_path.iterdir()] == ["shared.txt"]
