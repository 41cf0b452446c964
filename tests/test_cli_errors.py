"""`mirlab run` as a new user meets it: each input mistake is one line on stderr and exit status 2, never a
traceback, and an existing hidden-state cache is left exactly as it was (same files, same bytes).

Every test runs the real command in a subprocess (``python -m mirlab.cli``) on a tiny LLaVA saved to disk and
folders of 3 images and 3 CNN/DM stories; a bad file replaces image or story number 2 (with --eval-num 3 every
file is drawn). A failing run costs ~3 s (the import of torch), a successful one ~5 s.
"""
import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from cli_workspace import WORDS, cli_workspace, stories

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
WARNING = "mirlab run: warning: "


def mirlab(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mirlab.cli", *map(str, args)], capture_output=True, text=True,
                          env=ENV, timeout=timeout)


def snapshot(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder``, by relative path."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def errors_and_warnings(done: subprocess.CompletedProcess) -> tuple[list[str], list[str]]:
    """(the stderr lines that are not warnings, the warning lines)."""
    lines = done.stderr.splitlines()
    warned = [line for line in lines if line.startswith(WARNING)]
    return [line for line in lines if line not in warned], warned


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A saved tiny LLaVA, 3 images, 3 stories, and a finished hidden-state cache of them (`cache`)."""
    root = cli_workspace(tmp_path_factory.mktemp("cli-errors"), 3, stories(3, seed=1), seed=1)
    done = mirlab(*command(root), "--cache", root / "cache")
    assert done.returncode == 0, done.stderr
    (root / "mir.txt").write_text(done.stdout.splitlines()[0])  # "MIR = ..." of the clean folders
    return root


def command(root: Path, images=None, texts=None) -> list:
    return ["run", "--model", root / "model", "--images", images or root / "images", "--texts", texts or root / "texts",
            "--eval-num", "3", "--batch-size", "2", "--no-progress"]


def folders(workspace: Path, tmp_path: Path, image=None, text=None) -> tuple[Path, Path]:
    """Copies of the clean folders; ``image`` / ``text`` = (file name, bytes) replaces file number 2."""
    images, texts = shutil.copytree(workspace / "images", tmp_path / "images"), \
        shutil.copytree(workspace / "texts", tmp_path / "texts")
    for folder, replacement, old in ((images, image, "2.png"), (texts, text, "2.story")):
        if replacement is not None:
            (folder / old).unlink()
            (folder / replacement[0]).write_bytes(replacement[1])
    return images, texts


def run_against_cache(workspace: Path, *args) -> subprocess.CompletedProcess:
    """``mirlab run --cache <the workspace's finished cache> ...`` (a later ``--cache`` in ``args`` wins);
    asserts the cache is unchanged afterwards."""
    before = snapshot(workspace / "cache")
    done = mirlab(args[0], "--cache", workspace / "cache", *args[1:])
    assert snapshot(workspace / "cache") == before, f"the run changed the existing cache:\n{done.stderr}"
    return done


def assert_one_line_error(done: subprocess.CompletedProcess, *fragments: str) -> str:
    errors, _ = errors_and_warnings(done)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr and len(errors) == 1, done.stderr
    assert errors[0].startswith("mirlab run: "), errors[0]
    for fragment in fragments:
        assert fragment in errors[0], (fragment, errors[0])
    return errors[0]


BAD_FILES = {  # case: (image or text replacement, what the one line must say)
    "corrupt image": ({"image": ("2.png", b"\x89PNG\r\n\x1a\n" + b"\x00 not really a png" * 8)},
                      ["2.png", "cannot read image", "replace or remove it", "--skip-bad"]),
    "empty image": ({"image": ("2.png", b"")}, ["2.png", "is empty (0 bytes)", "--skip-bad"]),
    "empty text file": ({"text": ("2.story", b"")}, ["2.story", "empty file (0 bytes)", "--skip-bad"]),
    "whitespace and invisible characters only": ({"text": ("2.txt", " \n\t\u200b\ufeff\u00ad \r\n".encode())},
                                                 ["2.txt", "no text (only whitespace or invisible", "--skip-bad"]),
    "binary text file": ({"text": ("2.story", b"PK\x03\x04\x14\x00\x00\x00\x08\x00 zip bytes")},
                         ["2.story", "NUL bytes", "binary file", "save it as UTF-8", "--skip-bad"]),
    "undecodable text file": ({"text": ("2.story", b"caf\x81 au lait \x9d")},
                              ["2.story", "not UTF-8", "not Windows-1252", "save it as UTF-8", "--skip-bad"]),
    "story with no text before @highlight": ({"text": ("2.story", b"\n\n@highlight\n\nonly a summary\n")},
                                              ["2.story", "no text before the first @highlight", "--skip-bad"]),
}


@pytest.mark.parametrize("case", BAD_FILES, ids=lambda case: case.replace(" ", "-"))
def test_an_unusable_file_is_one_line_naming_it(workspace, tmp_path, case):
    replacement, fragments = BAD_FILES[case]
    images, texts = folders(workspace, tmp_path, **replacement)
    done = run_against_cache(workspace, *command(workspace, images, texts))
    assert_one_line_error(done, *fragments)


def test_skip_bad_leaves_the_pair_out_with_a_one_line_warning(workspace, tmp_path):
    images, texts = folders(workspace, tmp_path, text=("2.story", b"\x00\x01\x02"))
    done = mirlab(*command(workspace, images, texts), "--skip-bad", "--cache", tmp_path / "cache")
    errors, warnings = errors_and_warnings(done)
    assert done.returncode == 0 and errors == [], done.stderr
    assert len(warnings) == 1 and "skipped 1 of 3 pairs" in warnings[0] and "2.story" in warnings[0]
    assert ": 2 pairs," in done.stdout and "skipped 1 pairs" in done.stdout


def option_cases(workspace: Path, tmp_path: Path) -> dict:
    """case: (extra arguments or a full command, what the one line must say)."""
    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder")
    litter_only = tmp_path / "litter-only"
    litter_only.mkdir()
    (litter_only / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (litter_only / "Thumbs.db").write_bytes(b"\xd0\xcf\x11\xe0")
    cases = {
        "missing image folder": (command(workspace, images=tmp_path / "nope"),
                                 ["image folder not found", str(tmp_path / "nope")]),
        "text folder with only litter": (command(workspace, texts=litter_only),
                                         ["no text files", "skipped 2 hidden or system files"]),
        "image folder is a file": (command(workspace, images=a_file), [str(a_file), "is a file, not a folder"]),
        "eval-num 0": (command(workspace) + ["--eval-num", "0"], ["--eval-num", "expected a positive integer"]),
        "eval-num larger than the data": (command(workspace) + ["--eval-num", "4"],
                                          ["asked for 4 pairs", "has only 3 images", "at most 3"]),
        "cache is a file": (command(workspace) + ["--cache", a_file], ["--cache", "is a file, not a folder"]),
        "out is a file": (command(workspace) + ["--out", a_file], ["--out", "is a file, not a folder"]),
        "out below a file": (command(workspace) + ["--out", a_file / "out"],
                             ["--out", "cannot be created", "is a file"]),
        "model folder missing": (["run", "--model", tmp_path / "no-model"] + command(workspace)[3:],
                                 ["--model", "no such folder", "Hugging Face id"]),
        "mode contradicts method": (command(workspace) + ["--mode", "fast", "--method", "exact"], ["contradicts"]),
        "no texts": (command(workspace)[:5] + ["--eval-num", "3"], ["give --images and --texts"]),
    }
    if Path("/proc/self").is_dir():  # mkdir fails in /proc even for root, where permission bits do not
        cases["out cannot be written"] = (command(workspace) + ["--out", "/proc/mirlab-out"],
                                          ["--out /proc/mirlab-out cannot be written"])
    return cases


OPTION_CASES = ["missing image folder", "text folder with only litter", "image folder is a file", "eval-num 0",
                "eval-num larger than the data", "cache is a file", "out is a file", "out below a file",
                "out cannot be written", "model folder missing", "mode contradicts method", "no texts"]


@pytest.mark.parametrize("case", OPTION_CASES, ids=lambda case: case.replace(" ", "-"))
def test_a_bad_folder_or_option_is_one_line_before_the_model_loads(workspace, tmp_path, case):
    cases = option_cases(workspace, tmp_path)
    if case not in cases:
        pytest.skip("no /proc on this system")
    args, fragments = cases[case]
    done = run_against_cache(workspace, *args)
    assert_one_line_error(done, *fragments)


def test_debug_shows_the_traceback(workspace):
    done = run_against_cache(workspace, *command(workspace), "--eval-num", "4", "--debug")
    assert done.returncode == 1 and "Traceback (most recent call last)" in done.stderr
    assert "UserError: asked for 4 pairs" in done.stderr


def long_story(words: int = 1500) -> bytes:
    return (" ".join(np.random.default_rng(2).choice(WORDS, size=words)) + "\n\n@highlight\n\nsummary\n").encode()


def test_a_text_longer_than_the_context_is_an_error_naming_it(workspace, tmp_path):
    images, texts = folders(workspace, tmp_path, text=("2.story", long_story()))
    done = run_against_cache(workspace, *command(workspace, images, texts))
    assert_one_line_error(done, "2.story", "exceed the model's 512 positions", "--max-text-tokens")


def test_max_text_tokens_cuts_a_long_text_with_a_warning_naming_it(workspace, tmp_path):
    images, texts = folders(workspace, tmp_path, text=("2.story", long_story()))
    done = mirlab(*command(workspace, images, texts), "--max-text-tokens", "200", "--cache", tmp_path / "cache")
    errors, warnings = errors_and_warnings(done)
    assert done.returncode == 0 and errors == [], done.stderr
    assert len(warnings) == 1 and "--max-text-tokens=200 cut 1 of 3 texts" in warnings[0], warnings
    assert "2.story" in warnings[0] and "MIR = " in done.stdout


def test_hidden_files_and_archive_litter_are_skipped_and_counted(workspace, tmp_path):
    images, texts = folders(workspace, tmp_path)
    (images / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (images / "._0.png").write_bytes(b"\x00\x05\x16\x07 AppleDouble")  # macOS resource fork: not a PNG
    (images / "__MACOSX").mkdir()
    (images / "__MACOSX" / "._1.png").write_bytes(b"\x00\x05\x16\x07")
    (images / "Thumbs.db").write_bytes(b"\xd0\xcf\x11\xe0")
    (images / "desktop.ini").write_text("[.ShellClassInfo]\n")
    (texts / "~$0.story").write_bytes(b"\x00lock")
    (texts / "1.story~").write_text("an editor backup\n")
    (texts / "README.md").write_text("where the stories come from\n")
    done = mirlab(*command(workspace, images, texts), "--cache", tmp_path / "cache")
    errors, warnings = errors_and_warnings(done)
    assert done.returncode == 0 and errors == [], done.stderr
    assert any(str(images) in w and "skipped 5 hidden or system files" in w for w in warnings), warnings
    text_note = "skipped 2 hidden or system files (1.story~, ~$0.story), 1 file of another type (README.md)"
    assert any(str(texts) in w and text_note in w for w in warnings), warnings
    assert done.stdout.splitlines()[0] == (workspace / "mir.txt").read_text()  # the same pairs as without litter


# the real command, with the forward pass of the second batch made slow so Ctrl-C surely lands mid-run; the file
# named by SLEEPING_MARKER appears when that pass starts sleeping, so the test's Ctrl-C lands inside the sleep
# however loaded the machine is (not somewhere between batch 0 landing on disk and the sleep)
SLOW_SECOND_BATCH = """
import os, pathlib, sys, time
import mirlab.lvlm.extract as extract
forward, calls = extract.forward_hidden_states, []
def slow_second_batch(model, inputs):
    calls.append(1)
    if len(calls) == 2:
        pathlib.Path(os.environ["SLEEPING_MARKER"]).touch()
        time.sleep(120)
    return forward(model, inputs)
extract.forward_hidden_states = slow_second_batch
from mirlab.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_ctrl_c_is_one_line_and_keeps_a_cache_that_a_rerun_resumes(workspace, tmp_path):
    cache = tmp_path / "cache"
    args = [str(a) for a in command(workspace)] + ["--cache", str(cache)]
    sleeping = tmp_path / "sleeping"
    # a shell without job control starts background jobs with SIGINT ignored, and Python then installs no
    # KeyboardInterrupt handler: the child gets the disposition of an interactive terminal's process whatever ran us
    process = subprocess.Popen([sys.executable, "-c", SLOW_SECOND_BATCH, *args],
                               env={**ENV, "SLEEPING_MARKER": str(sleeping)}, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 90
    while not sleeping.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert process.poll() is None, "the run ended before the second batch"
    assert list(cache.glob("*/batches/00000.json")), "the second batch started before the first was on disk"
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    assert stderr.splitlines() == [f"mirlab run: interrupted; hidden-state cache kept at {cache} "
                                   f"(rerun the same command to resume)"]
    store = next(cache.iterdir())
    assert (store / "batches" / "00000.json").is_file() and not (store / "batches" / "00001.json").exists()
    assert not (store / "complete.json").exists()
    first_batch = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in store.rglob("*_00000.npy")}
    assert len(first_batch) == 4  # 2 layers x (image, text)

    done = mirlab(*args)
    assert done.returncode == 0, done.stderr
    assert (store / "complete.json").is_file() and (store / "batches" / "00001.json").is_file()
    assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in store.rglob("*_00000.npy")} == first_batch
    assert done.stdout.splitlines()[0] == (workspace / "mir.txt").read_text()
