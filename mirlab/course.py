"""Run the course notebooks with papermill and collect what each one records.

Every notebook has a cell tagged ``parameters`` (papermill injects values after it) and a parameter
``results_path``: when set, the notebook writes its key numbers there as JSON. This module runs
notebooks headless and turns those JSON files into tidy tables:

    run_course(out_dir)                      -> every notebook once, default parameters
    sweep(notebook, grid={"seed": [0, 1]})   -> one notebook over a parameter grid
    long_table(records)                      -> one row per recorded number (notebook, key, value)

``mirlab course`` prints one line per notebook as it finishes (``notebook_line``: wall time, figures, up to
three headline numbers).

Three helpers the notebooks call, so that a class runs them as a course (docs/teaching.md):

    use_threads(1)                 -> torch and the BLAS/OpenMP pools of numpy/scipy on one thread
    hidden_state_cache("shared")   -> the on-disk hidden-state cache that notebooks 02, 04 and 05 share
    check_answer("1.2", answer, expected, rel=0.05)  -> an exercise's check (raises on a wrong answer)
"""
from __future__ import annotations

import itertools
import json
import math
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import pandas as pd

NOTEBOOK_DIR = Path(__file__).resolve().parent.parent / "notebooks"
# the kernel's own log stops at errors: its "Kernel is running over TCP without encryption" warning (ipykernel's
# IPKernelApp, printed on every start; the kernel only listens on localhost) would otherwise fill the terminal
KERNEL_ARGUMENTS = ["--IPKernelApp.log_level=ERROR"]


SHARED_CACHE = "shared"


def use_threads(threads: int | None) -> None:
    """Run torch and the BLAS/OpenMP libraries behind numpy and scipy on ``threads`` threads (None: leave them).

    On a machine that is busy with other work, threads that wait for each other spin and steal each other's
    cores: on 2 busy cores a float64 ``eigvalsh`` of a 576 x 576 covariance took 4.5 s with torch's default 2
    threads and 35 ms with one. One thread is the course default; ``None`` uses the machine's defaults.
    numpy and scipy.linalg are imported first: a BLAS library loaded after the limit is set would keep its
    default (scipy ships its own OpenBLAS, loaded only when scipy.linalg is imported).
    """
    if threads is None:
        return
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads must be a positive integer or None, got {threads!r}")
    import numpy  # noqa: F401  (load every BLAS the metrics use, so that the limit reaches them)
    import scipy.linalg  # noqa: F401
    import torch
    from threadpoolctl import threadpool_limits  # a dependency of scikit-learn, which mirlab requires

    torch.set_num_threads(threads)
    threadpool_limits(limits=threads)  # called, not entered: the limit stays for the rest of the session


def hidden_state_cache(cache_dir: str | Path | None) -> Path | None:
    """The ``cache_dir`` a course notebook passes to ``extract_hidden_states``.

    ``"shared"`` (the notebooks' default) -> ``<mirlab cache root>/course/mirlab-<version>`` (the root is
    ``paths.cache_dir()``: $MIRLAB_CACHE_DIR or ~/.cache/mirlab), one folder for notebooks 02, 04 and 05, so the
    pairs they share are extracted once. Sharing is safe: every store sits under a key that hashes the model's
    config and sampled weights, the processor, the pairs' image bytes and texts, and the extraction options
    (``extract_hidden_states``), so other settings get a store of their own; the version folder keeps stores of
    different mirlab releases apart. ``None`` -> None (a temporary folder, deleted after use); any other value
    is the folder to use.
    """
    if cache_dir is None:
        return None
    if str(cache_dir) == SHARED_CACHE:
        from mirlab import __version__
        from mirlab.paths import cache_dir as cache_root

        return cache_root() / "course" / f"mirlab-{__version__}"
    return Path(cache_dir).expanduser()


def _agrees(answer, expected, rel: float, abs_: float) -> bool:
    if isinstance(expected, Mapping):
        return (isinstance(answer, Mapping) and set(answer) == set(expected)
                and all(_agrees(answer[k], expected[k], rel, abs_) for k in expected))
    if isinstance(expected, (list, tuple)):
        return (isinstance(answer, (list, tuple)) and len(answer) == len(expected)
                and all(_agrees(a, e, rel, abs_) for a, e in zip(answer, expected)))
    if isinstance(expected, str):
        return isinstance(answer, str) and answer.strip().lower() == expected.strip().lower()
    if isinstance(expected, bool) or isinstance(answer, bool):
        return isinstance(answer, bool) and isinstance(expected, bool) and answer == expected
    if isinstance(answer, str):  # "3" is not the number 3
        return False
    try:
        answer, expected = float(answer), float(expected)
    except (TypeError, ValueError):
        return answer == expected
    return math.isfinite(answer) and abs(answer - expected) <= max(rel * abs(expected), abs_)


def check_answer(exercise: str, answer, expected, *, rel: float = 0.0, abs: float = 0.0) -> None:
    """An exercise's check: compare ``answer`` with ``expected`` (computed independently in the check cell).

    Numbers agree when ``|answer - expected| <= max(rel * |expected|, abs)`` (exact by default); lists, tuples
    and dicts are compared entry by entry with the same rule; strings ignoring case and surrounding spaces (a
    string never equals a number); booleans only with booleans. A right answer prints
    ``exercise <name>: correct``; a wrong one raises AssertionError naming the exercise (the expected value is
    not shown: it is the solution). ``answer=None`` prints ``exercise <name>: not answered yet``, so a student
    copy whose solution cells were removed still runs to the end.
    """
    if answer is None:
        print(f"exercise {exercise}: not answered yet")
        return
    if not _agrees(answer, expected, rel, abs):
        raise AssertionError(f"exercise {exercise}: {answer!r} is not right yet, try again")
    print(f"exercise {exercise}: correct")


def course_notebooks(notebook_dir: str | Path = NOTEBOOK_DIR) -> list[Path]:
    """The course notebooks in reading order (``01_*.ipynb``, ``02_*.ipynb``, ...)."""
    notebook_dir = Path(notebook_dir)
    if not notebook_dir.is_dir():
        raise FileNotFoundError(
            f"no notebook folder at {notebook_dir}: the course ships in the source tree "
            "(clone the repository; notebooks are not part of the wheel)"
        )
    return sorted(p for p in notebook_dir.glob("[0-9][0-9]_*.ipynb"))


def executed_path(notebook: str | Path, out_dir: str | Path, tag: str | None = None) -> Path:
    """Where run_notebook writes the executed copy: ``out_dir/notebooks/<stem>[-<tag>].ipynb``."""
    stem = Path(notebook).stem
    return Path(out_dir) / "notebooks" / (f"{stem}.ipynb" if tag is None else f"{stem}-{tag}.ipynb")


def run_notebook(
    notebook: str | Path,
    out_dir: str | Path,
    parameters: Mapping[str, Any] | None = None,
    tag: str | None = None,
    kernel_name: str = "python3",
    progress: bool = False,
) -> dict:
    """Execute one notebook with papermill; return the results it recorded (plus the run's parameters).

    The executed copy goes to ``out_dir/notebooks/<stem>[-<tag>].ipynb`` and the recorded results to
    ``out_dir/results/<stem>[-<tag>].json``.
    """
    import papermill

    notebook, out_dir = Path(notebook), Path(out_dir)
    if not notebook.is_file():
        raise FileNotFoundError(f"notebook not found: {notebook}")
    executed = executed_path(notebook, out_dir, tag)
    results_path = out_dir / "results" / f"{executed.stem}.json"
    executed.parent.mkdir(parents=True, exist_ok=True)
    results_path.parent.mkdir(parents=True, exist_ok=True)
    params = dict(parameters or {})
    params["results_path"] = str(results_path.resolve())
    papermill.execute_notebook(
        str(notebook), str(executed), parameters=params, kernel_name=kernel_name,
        cwd=str(notebook.parent), progress_bar=progress, extra_arguments=KERNEL_ARGUMENTS,
    )
    if not results_path.is_file():
        raise RuntimeError(f"{notebook.name} ran but recorded no results at {results_path}")
    recorded = json.loads(results_path.read_text())
    return {"notebook": notebook.stem, **{k: v for k, v in params.items() if k != "results_path"},
            **recorded}


def export_figures(executed: str | Path, figures_dir: str | Path) -> list[Path]:
    """Write every PNG output of an executed notebook to ``figures_dir/<stem>-<k>.png`` (k = 1, 2, ... in order).

    Returns the written paths. This is how ``mirlab course`` turns the notebooks' figures into files.
    """
    import base64

    import nbformat

    executed, figures_dir = Path(executed), Path(figures_dir)
    notebook = nbformat.read(executed, as_version=4)
    pngs = [output["data"]["image/png"] for cell in notebook.cells if cell.cell_type == "code"
            for output in cell.get("outputs", []) if "image/png" in output.get("data", {})]
    figures_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for k, png in enumerate(pngs, start=1):
        path = figures_dir / f"{executed.stem}-{k}.png"
        path.write_bytes(base64.b64decode(png if isinstance(png, str) else "".join(png)))
        paths.append(path)
    return paths


def _scalar_columns(row: Mapping[str, Any]) -> dict:
    """Keep the scalar entries of a results record (lists and tables stay in the JSON files)."""
    return {k: v for k, v in row.items() if isinstance(v, (str, int, float, bool)) or v is None}


def sweep(
    notebook: str | Path,
    out_dir: str | Path,
    parameters: Mapping[str, Any] | None = None,
    grid: Mapping[str, Iterable[Any]] | None = None,
    progress: bool = True,
) -> pd.DataFrame:
    """Run ``notebook`` once per point of the Cartesian ``grid`` (fixed ``parameters`` everywhere).

    Returns a tidy DataFrame, one row per run (grid values + the scalar results the notebook recorded),
    also written to ``out_dir/sweep.csv``.
    """
    from tqdm.auto import tqdm

    grid = {k: list(v) for k, v in (grid or {}).items()}
    points = [dict(zip(grid, values)) for values in itertools.product(*grid.values())] or [{}]
    rows = []
    for point in tqdm(points, desc=f"sweep {Path(notebook).stem}", disable=not progress):
        tag = "-".join(f"{k}={v}" for k, v in point.items()).replace("/", "_") or None
        record = run_notebook(notebook, out_dir, {**(parameters or {}), **point}, tag=tag)
        rows.append(_scalar_columns(record))
    table = pd.DataFrame(rows)
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    table.to_csv(Path(out_dir) / "sweep.csv", index=False)
    return table


def run_course(
    out_dir: str | Path,
    parameters: Mapping[str, Any] | None = None,
    notebook_dir: str | Path = NOTEBOOK_DIR,
    progress: bool = True,
    report: Callable[[dict], object] | None = None,
) -> pd.DataFrame:
    """Execute every course notebook; write executed copies, their figures and the results tables.

    Layout of ``out_dir``: ``notebooks/`` (executed copies), ``results/`` (each notebook's recorded JSON),
    ``figures/`` (every figure as ``<notebook>-<k>.png``), ``results.json`` (every record), ``results.csv`` (one
    row per notebook, its scalar results) and ``results_long.csv`` (``long_table``: one row per number).
    Each record also holds ``seconds`` (the notebook's wall time) and ``figures`` (how many it drew).

    ``parameters`` are injected into every notebook (papermill ignores names a notebook doesn't declare).
    ``report(record)`` is called after each notebook (``mirlab course`` prints ``notebook_line(record)``).
    """
    from tqdm.auto import tqdm

    out_dir = Path(out_dir)
    records = []
    for notebook in tqdm(course_notebooks(notebook_dir), desc="course", disable=not progress):
        start = time.perf_counter()
        record = run_notebook(notebook, out_dir, parameters)
        record["seconds"] = round(time.perf_counter() - start, 3)
        record["figures"] = len(export_figures(executed_path(notebook, out_dir), out_dir / "figures"))
        records.append(record)
        if report is not None:
            report(record)
    (out_dir / "results.json").write_text(json.dumps(records, indent=2, default=str))
    table = pd.DataFrame([_scalar_columns(r) for r in records])
    table.to_csv(out_dir / "results.csv", index=False)
    long_table(records).to_csv(out_dir / "results_long.csv", index=False)
    return table


def _flatten(value, key: str):
    """(dotted key, scalar) pairs of a nested record: ``{"a": {"b": [1, 2]}}`` -> ``a.b[0]``, ``a.b[1]``."""
    if isinstance(value, Mapping):
        for k, v in value.items():
            yield from _flatten(v, f"{key}.{k}" if key else str(k))
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            yield from _flatten(v, f"{key}[{i}]")
    else:
        yield key, value


def long_table(records: Iterable[Mapping[str, Any]]) -> pd.DataFrame:
    """One row per recorded value: columns ``notebook``, ``key``, ``value`` (nested entries flattened).

    Lists become ``key[i]`` and dicts ``key.sub``, so per-layer curves are rows too: filter on ``key`` and
    pivot as needed. Values keep their JSON type (numbers, strings, booleans, None).
    """
    rows = [{"notebook": record["notebook"], "key": key, "value": value}
            for record in records for key, value in _flatten({k: v for k, v in record.items() if k != "notebook"}, "")]
    return pd.DataFrame(rows, columns=["notebook", "key", "value"])


def key_numbers(record: Mapping[str, Any], skip: Iterable[str] = (), count: int = 3) -> list[tuple[str, float]]:
    """Up to ``count`` headline numbers of a record: its top-level numeric entries, ``mir*`` keys first, else in
    recorded order; ``skip`` names entries to leave out (injected parameters, bookkeeping)."""
    skip = {"notebook", "seconds", "figures", *skip}
    numbers = [(k, v) for k, v in record.items()
               if k not in skip and isinstance(v, (int, float)) and not isinstance(v, bool)]
    numbers.sort(key=lambda item: not item[0].lower().startswith("mir"))  # stable: keeps recorded order
    return numbers[:count]


def _number(value) -> str:
    if isinstance(value, int):
        return str(value)
    return "nan" if math.isnan(value) else f"{value:.4g}"


def notebook_line(record: Mapping[str, Any], skip: Iterable[str] = (), width: int = 24) -> str:
    """One line for a notebook run: name, wall time, figures, and its key numbers, e.g.
    ``04_mir                    12.3 s   3 figures   mir=2.174  mir_low=2.151  mir_high=2.2``."""
    numbers = "  ".join(f"{k}={_number(v)}" for k, v in key_numbers(record, skip))
    seconds = record.get("seconds")
    time_text = f"{seconds:7.1f} s" if isinstance(seconds, (int, float)) else " " * 9
    figures = record.get("figures")
    figure_text = f"{figures} figure{'' if figures == 1 else 's'}" if figures is not None else ""
    return f"{record['notebook']:<{width}} {time_text}   {figure_text:<10}  {numbers}".rstrip()


# --- the `mirlab course` and `mirlab sweep` subcommands -------------------------------------------------

def _value(text: str):
    """A command-line value typed as YAML would read it: 16 -> int, 0.5 -> float, final -> str, null -> None."""
    import yaml

    return yaml.safe_load(text)


def _parameters(pairs) -> dict:
    return {key: _value(value) for key, value in (pairs or [])}


def _grid(items) -> dict:
    grid = {}
    for item in items or []:
        key, sep, values = item.partition("=")
        if not sep or not key or not values:
            raise SystemExit(f"--grid expects key=v1,v2,... got {item!r}")
        grid[key] = [_value(v) for v in values.split(",")]
    return grid


def add_course_arguments(parser) -> None:
    parser.add_argument("--out", default="out", help="output folder (default: out)")
    parser.add_argument("-p", "--parameter", nargs=2, action="append", metavar=("NAME", "VALUE"),
                        help="inject a parameter into every notebook (repeatable), e.g. -p n_samples 32")
    parser.add_argument("--notebooks", default=str(NOTEBOOK_DIR), help="folder of the course notebooks")


def course_command(args) -> int:
    """Run every course notebook headless; write executed notebooks and a results table."""
    parameters = _parameters(args.parameter)
    run_course(args.out, parameters, args.notebooks, progress=False,
               report=lambda record: print(notebook_line(record, skip=parameters), flush=True))
    print(f"wrote {args.out}/notebooks/*.ipynb, {args.out}/figures/*.png, {args.out}/results.csv, "
          f"{args.out}/results_long.csv and {args.out}/results.json")
    return 0


def add_sweep_arguments(parser) -> None:
    parser.add_argument("notebook", help="path of the notebook to run")
    parser.add_argument("-p", "--parameter", nargs=2, action="append", metavar=("NAME", "VALUE"),
                        help="a fixed parameter for every run (repeatable)")
    parser.add_argument("--grid", action="append", metavar="NAME=V1,V2",
                        help="a swept parameter (repeatable; runs the Cartesian product)")
    parser.add_argument("--out", default="out/sweep", help="output folder (default: out/sweep)")


def sweep_command(args) -> int:
    """Run one notebook over a parameter grid and collect its recorded results into sweep.csv."""
    table = sweep(args.notebook, args.out, _parameters(args.parameter), _grid(args.grid))
    print(table.to_string(index=False))
    print(f"wrote {args.out}/sweep.csv")
    return 0
