"""Notebooks as programs: papermill runs them with injected parameters and we check what they record.

(nbval separately re-executes every committed notebook and compares its outputs; see tests/conftest.py.)
"""
import json
import os
from pathlib import Path

import nbformat
import pytest

from mirlab.course import course_notebooks, run_notebook, sweep

NOTEBOOKS = course_notebooks()


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_parameters_cell_comes_first_after_the_title(path):
    nb = nbformat.read(path, as_version=4)
    assert nb.cells[0].cell_type == "markdown" and nb.cells[0].source.startswith("# ")
    first_code = next(c for c in nb.cells if c.cell_type == "code")
    assert "parameters" in first_code.metadata.get("tags", []), f"{path.name}: first code cell is not tagged"
    assert "results_path" in first_code.source, f"{path.name}: no results_path parameter"
    assert nb.cells.index(first_code) == 1


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_with_outputs_and_without_volatile_metadata(path):
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.get("execution_count") for c in code), f"{path.name}: not executed in order"
    assert any(o.get("output_type") == "display_data" and "image/png" in o.get("data", {})
               for c in code for o in c.outputs), f"{path.name}: no figure committed"
    for c in code:
        assert "execution" not in c.metadata, f"{path.name}: volatile execution timestamps committed"
        assert not any(o.get("output_type") == "error" for o in c.outputs)


@pytest.mark.slow  # papermill runs a notebook
def test_frechet_notebook_with_injected_parameters(tmp_path):
    import mirlab

    notebook = Path(mirlab.course.NOTEBOOK_DIR) / "03_frechet_distance.ipynb"
    record = run_notebook(notebook, tmp_path, {"seed": 3, "d": 24, "n_layers": 6}, tag="small")
    executed = nbformat.read(tmp_path / "notebooks" / "03_frechet_distance-small.ipynb", as_version=4)
    injected = [c for c in executed.cells if "injected-parameters" in c.metadata.get("tags", [])]
    assert len(injected) == 1 and "d = 24" in injected[0].source
    saved = json.loads((tmp_path / "results" / "03_frechet_distance-small.json").read_text())
    assert record["seed"] == 3 and record["d"] == 24
    # the from-scratch derivation and mirlab agree; the defect shows up in the recorded numbers
    assert saved["fd_by_hand"] == pytest.approx(saved["fd_mirlab"], rel=1e-9)
    assert saved["mir_official_fast"] > saved["mir_exact"]
    assert saved["fast_rel_error_last_layer"] > saved["fast_rel_error_first_layer"] > 0


@pytest.mark.slow  # papermill runs a notebook
def test_sweep_collects_one_tidy_row_per_grid_point(tmp_path):
    import mirlab

    notebook = Path(mirlab.course.NOTEBOOK_DIR) / "03_frechet_distance.ipynb"
    table = sweep(notebook, tmp_path, {"d": 16, "n_layers": 4}, grid={"seed": [0, 1]}, progress=False)
    assert list(table["seed"]) == [0, 1]
    assert (tmp_path / "sweep.csv").is_file()
    assert table["fd_mirlab"].nunique() == 2  # a different seed draws different clouds


@pytest.mark.slow  # papermill runs a notebook
def test_sweep_command_line(tmp_path, capsys):
    from mirlab.cli import main
    import mirlab

    notebook = Path(mirlab.course.NOTEBOOK_DIR) / "03_frechet_distance.ipynb"
    code = main(["sweep", str(notebook), "-p", "d", "12", "-p", "n_layers", "3", "--grid", "n_image=40,80",
                 "--out", str(tmp_path)])
    assert code == 0
    table = __import__("pandas").read_csv(tmp_path / "sweep.csv")
    assert list(table["n_image"]) == [40, 80] and (table["d"] == 12).all()
    assert "sweep.csv" in capsys.readouterr().out


def test_grid_and_parameter_values_are_typed():
    from mirlab.course import _grid, _parameters

    assert _parameters([("n", "16"), ("lr", "0.5"), ("ckpt", "final"), ("x", "null")]) == \
        {"n": 16, "lr": 0.5, "ckpt": "final", "x": None}
    assert _grid(["seed=0,1,2", "method=exact,official-fast"]) == \
        {"seed": [0, 1, 2], "method": ["exact", "official-fast"]}
    with pytest.raises(SystemExit, match="key=v1"):
        _grid(["seed"])


@pytest.mark.slow  # papermill runs a notebook
def test_mir_notebook_records_what_compute_mir_gives_on_the_same_cached_states(tmp_path, embedded_cache):
    import numpy as np

    import mirlab

    notebook = Path(mirlab.course.NOTEBOOK_DIR) / "04_mir.ipynb"
    cache = tmp_path / "cache"
    parameters = {"n_samples": 6, "batch_size": 3, "layers": [1, 2, 15, 30], "n_boot": 8, "seed": 5,
                  "cache_dir": str(cache), "parity_methods": ["official-fast"], "threads": 1}
    record = run_notebook(notebook, tmp_path, parameters, tag="small")
    assert record["n_pairs"] == 6 and record["n_boot"] == 8
    # reopen the notebook's cached hidden states without the model and recompute MIR independently of the run
    states = mirlab.HiddenStates(record["hidden_states_path"])
    assert states.layers == [1, 2, 15, 30]
    exact = mirlab.compute_mir(states)
    # the official fast mode iterates in float32: its last digits depend on the BLAS thread count, so it is
    # recomputed on the notebook's one thread (parameter `threads`, default 1)
    import torch
    from threadpoolctl import threadpool_limits

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with threadpool_limits(limits=1):
            fast = mirlab.compute_mir(states, method="official-fast")
    finally:
        torch.set_num_threads(before)
    assert record["mir"] == pytest.approx(exact.mir, rel=1e-12)
    assert record["mir_official_fast"] == pytest.approx(fast.mir, rel=1e-12)
    np.testing.assert_allclose(record["fd_per_layer"], exact.per_layer.fd, rtol=1e-12)
    assert record["mir_low"] <= record["mir_high"] and record["mir_basic_low"] <= record["mir_basic_high"]


@pytest.mark.slow  # papermill runs a notebook
def test_layer_explorer_notebook_with_injected_layers(tmp_path, embedded_cache):
    import mirlab

    notebook = Path(mirlab.course.NOTEBOOK_DIR) / "05_layer_explorer.ipynb"
    record = run_notebook(notebook, tmp_path, {"n_samples": 4, "layers": [2, 9, 20], "show_layers": [9, 20],
                                               "max_points": 100}, tag="small")
    assert record["show_layers"] == [9, 20] and len(record["fd_at_shown_layers"]) == 2
    assert all(v > 0 for v in record["fd_at_shown_layers"] + record["norm_ratio_at_shown_layers"])


@pytest.mark.slow  # papermill runs a notebook
def test_course_writes_executed_notebooks_figures_and_a_results_table(tmp_path):
    import base64
    import shutil

    import pandas as pd

    import mirlab
    from mirlab.course import run_course

    course = tmp_path / "course"
    course.mkdir()
    shutil.copy(Path(mirlab.course.NOTEBOOK_DIR) / "03_frechet_distance.ipynb", course)
    table = run_course(tmp_path / "out", {"d": 12, "n_layers": 3, "seed": 1}, notebook_dir=course, progress=False)
    executed = nbformat.read(tmp_path / "out" / "notebooks" / "03_frechet_distance.ipynb", as_version=4)
    pngs = [o["data"]["image/png"] for c in executed.cells if c.cell_type == "code" for o in c.outputs
            if "image/png" in o.get("data", {})]
    figures = sorted((tmp_path / "out" / "figures").glob("*.png"), key=lambda p: int(p.stem.rsplit("-", 1)[1]))
    assert len(pngs) > 0 and len(figures) == len(pngs)
    assert figures[0].read_bytes() == base64.b64decode(pngs[0]) and figures[0].read_bytes()[:4] == b"\x89PNG"
    saved = pd.read_csv(tmp_path / "out" / "results.csv")
    assert list(saved["notebook"]) == ["03_frechet_distance"] and saved["d"].iloc[0] == 12
    assert table["figures"].iloc[0] == len(pngs)


# --- the course as a course: recaps, exercises whose checks fail on wrong answers, classroom helpers --------

def exercise_cells(path) -> dict:
    """{label: (answer cell, solution cell, check cell)} of a notebook's exercises, e.g. {"2.1": (...)}."""
    import re

    cells = nbformat.read(path, as_version=4).cells
    found = {}
    for i, cell in enumerate(cells):
        heading = re.match(r"\*\*Exercise ([\d.]+)\.\*\*", cell.source) if cell.cell_type == "markdown" else None
        if heading:
            found[heading.group(1)] = tuple(cells[i + 1:i + 4])
    return found


def run_check(path, label, answers: dict) -> None:
    """Execute one exercise's check cell alone (no notebook run) with `answers` as the student's variables."""
    import numpy as np

    from mirlab.course import check_answer

    _, _, check = exercise_cells(path)[label]
    exec(compile(check.source, f"{Path(path).name}: check of exercise {label}", "exec"),
         {"np": np, "check_answer": check_answer, **answers})


def notebook(stem: str) -> Path:
    return next(p for p in NOTEBOOKS if p.stem.startswith(stem))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_every_notebook_ends_with_a_recap_and_two_to_four_checked_exercises(path):
    nb = nbformat.read(path, as_version=4)
    recap = [i for i, c in enumerate(nb.cells) if c.cell_type == "markdown" and "## Recap" in c.source]
    exercises = exercise_cells(path)
    assert recap and 2 <= len(exercises) <= 4, f"{path.name}: recap {bool(recap)}, {len(exercises)} exercises"
    first = min(i for i, c in enumerate(nb.cells) if c.cell_type == "markdown" and c.source.startswith("**Exercise"))
    assert recap[0] < first
    for label, (answer, solution, check) in exercises.items():
        assert [c.metadata.get("tags") for c in (answer, solution, check)] == [["answer"], ["solution"], ["check"]]
        assert "None" in answer.source, f"{path.name} {label}: the student's cell should start unanswered"
        assert f'check_answer("{label}' in check.source, f"{path.name} {label}: the check does not check"
        assert any("correct" in o.get("text", "") for o in check.outputs), f"{path.name} {label}: check not passed"


def test_an_exercise_check_fails_on_a_wrong_answer_and_passes_on_the_right_one(capsys):
    # notebook 02, exercise 2.1 (the 3σ rule with many long rows), its check cell run on its own
    right = {"flagged": {5: 5, 20: 0}, "largest_caught": 12}
    run_check(notebook("02_"), "2.1", right)
    assert capsys.readouterr().out.splitlines() == ["exercise 2.1: correct", "exercise 2.1 (largest): correct"]
    with pytest.raises(AssertionError, match=r"exercise 2\.1: \{5: 5, 20: 20\} is not right"):
        run_check(notebook("02_"), "2.1", {**right, "flagged": {5: 5, 20: 20}})  # "the rule catches them all"
    with pytest.raises(AssertionError, match=r"exercise 2\.1 \(largest\)"):
        run_check(notebook("02_"), "2.1", {**right, "largest_caught": 20})
    # notebook 03, exercise 3.1 (a 1-D FD): the variances' difference instead of the standard deviations'
    run_check(notebook("03_"), "3.1", {"fd_exercise": 8})
    with pytest.raises(AssertionError, match="exercise 3.1"):
        run_check(notebook("03_"), "3.1", {"fd_exercise": 4 + (9 - 1) ** 2})
    # notebook 06, exercise 6.3 (the image-blind level): 1/4 is the tempting wrong answer
    run_check(notebook("06_"), "6.3", {"blind_accuracy": 0.125})
    with pytest.raises(AssertionError, match="exercise 6.3"):
        run_check(notebook("06_"), "6.3", {"blind_accuracy": 0.25})


def test_a_student_copy_without_solution_cells_runs_and_reports_unanswered(capsys):
    answer, _, _ = exercise_cells(notebook("03_"))["3.1"]
    student = {}
    exec(answer.source, student)  # the student's cell as committed: the answer is None
    run_check(notebook("03_"), "3.1", student)
    assert capsys.readouterr().out.strip() == "exercise 3.1: not answered yet"


def test_check_answer_compares_numbers_with_tolerance_and_containers_entry_by_entry(capsys):
    from mirlab.course import check_answer

    check_answer("a", 1.04, 1.0, rel=0.05)
    check_answer("b", [1, 2.0], (1.0, 2.0))
    check_answer("c", {"x": 3}, {"x": 3.0})
    check_answer("d", " Falls", "falls")
    check_answer("e", True, True)
    assert capsys.readouterr().out.count("correct") == 5
    for answer, expected, tolerance in [(1.06, 1.0, {"rel": 0.05}), (1.0 + 1e-9, 1.0, {}), ([1, 2], [1, 2, 3], {}),
                                        ({"x": 3}, {"y": 3}, {}), ("rises", "falls", {}), (1, True, {}),
                                        (float("nan"), 1.0, {"abs": 1.0}), ("3", 3, {})]:
        with pytest.raises(AssertionError, match="exercise z"):
            check_answer("z", answer, expected, **tolerance)


def test_hidden_state_cache_is_shared_under_the_cache_root_and_versioned(monkeypatch, tmp_path):
    from mirlab import __version__
    from mirlab.course import hidden_state_cache

    monkeypatch.setenv("MIRLAB_CACHE_DIR", str(tmp_path))
    assert hidden_state_cache("shared") == tmp_path / "course" / f"mirlab-{__version__}"
    assert hidden_state_cache(None) is None
    assert hidden_state_cache(tmp_path / "mine") == tmp_path / "mine"
    for stem in ("02_", "04_", "05_"):  # the three notebooks that extract the same pairs share it by default
        parameters = nbformat.read(notebook(stem), as_version=4).cells[1].source
        assert 'cache_dir = "shared"' in parameters and "threads = 1 " in parameters


# the pools' default without any limit is 2 threads (not the 1 that the test runner's OMP_NUM_THREADS may set), so
# "[1]" below is the limit's doing
BLAS_DEFAULT_TWO = {**{k: v for k, v in os.environ.items()
                       if k not in ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "OMP_NUM_THREADS")},
                    "OMP_NUM_THREADS": "2"}


def threads_after(setup: str) -> tuple[int, int, str]:
    """Run `setup` in a fresh interpreter (so no limit leaks into other tests), then import scipy.linalg (its own
    OpenBLAS, loaded lazily as the metrics do) and report torch's threads, the number of OpenBLAS pools and the
    sorted set of every pool's thread count."""
    import subprocess
    import sys

    code = (f"import torch\nfrom threadpoolctl import threadpool_info\n{setup}\nimport scipy.linalg\n"
            "pools = threadpool_info()\n"
            "print(torch.get_num_threads(), sum(p['internal_api'] == 'openblas' for p in pools),"
            " sorted({p['num_threads'] for p in pools}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env=BLAS_DEFAULT_TWO).stdout
    torch_threads, openblas_pools, limits = out.split(maxsplit=2)
    return int(torch_threads), int(openblas_pools), limits.strip()


def test_use_threads_limits_torch_and_blas_and_refuses_nonsense():
    from mirlab.course import use_threads

    use_threads(None)  # leaves the machine's defaults
    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(ValueError, match="threads"):
            use_threads(bad)
    torch_threads, openblas_pools, limits = threads_after("from mirlab.course import use_threads\nuse_threads(1)")
    assert torch_threads == 1 and openblas_pools >= 2 and limits == "[1]"


def test_cli_threads_option_limits_torch_and_blas_too():
    """`mirlab run/probe --threads N` goes through the same use_threads: scipy's own OpenBLAS is limited as well."""
    torch_threads, openblas_pools, limits = threads_after(
        "from mirlab import cli\n"
        "args = cli.build_parser('run').parse_args(['run', '--model', 'tiny', '--threads', '1', '--no-progress'])\n"
        "cli.apply_execution_options(args)")
    assert torch_threads == 1 and openblas_pools >= 2 and limits == "[1]"
