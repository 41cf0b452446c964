"""`mirlab run` end to end on a tiny LLaVA saved to disk, with generated image and story folders; the lazy
subcommand registry; the per-layer summary and outputs of any metric; `mirlab course`'s lines and long table."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mirlab import cli, compute_mir, extract_hidden_states, folder_pairs, load_model
from mirlab.errors import UserError
from cli_workspace import cli_workspace, stories
from tiny_models import LAYERS, single_thread

@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    with single_thread():
        yield


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A saved tiny LLaVA plus folders of 6 images and 7 CNN/DM-style stories."""
    return cli_workspace(tmp_path_factory.mktemp("cli"), 6, stories(7, seed=0))


def run(workspace, *extra):
    args = ["run", "--model", str(workspace / "model"), "--images", str(workspace / "images"),
            "--texts", str(workspace / "texts"), "--eval-num", "5", "--batch-size", "2", "--no-progress"]
    return cli.main(args + list(extra))


def test_run_writes_json_csv_png_and_matches_the_library(workspace, tmp_path, capsys):
    out = tmp_path / "out"
    assert run(workspace, "--out", str(out), "--cache", str(tmp_path / "cache")) == 0
    printed = capsys.readouterr().out
    result = json.loads((out / "mir.json").read_text())
    table = pd.read_csv(out / "per_layer.csv")
    assert (out / "per_layer.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert table["layer"].tolist() == list(range(1, LAYERS + 1))
    assert result["method"] == "exact" and result["meta"]["n_pairs"] == 5
    assert f"MIR = {result['mir']:.4f}" in printed
    # the same pairs through the library, step by step
    model, processor = load_model(str(workspace / "model"))
    pairs = folder_pairs(workspace / "images", workspace / "texts", n=5, seed=0)
    states = extract_hidden_states(model, processor, pairs.images, pairs.texts, progress=False)
    assert result["mir"] == pytest.approx(compute_mir(states).mir, rel=1e-6)
    assert np.isclose(10 ** result["mir"], table["fd"].sum(), rtol=1e-9)


def test_official_spellings_and_mode(workspace, tmp_path):
    out = tmp_path / "out"
    args = ["run", "--model_path", str(workspace / "model"), "--image_data_path", str(workspace / "images"),
            "--text_data_path", str(workspace / "texts"), "--eval_num", "4", "--mode", "fast", "--out", str(out),
            "--no-progress"]
    assert cli.main(args) == 0
    result = json.loads((out / "mir.json").read_text())
    assert result["method"] == "official-fast" and result["meta"]["n_pairs"] == 4


def test_bad_requests_are_one_line_and_exit_status_2(workspace, capsys):
    """In-process; tests/test_cli_errors.py runs every user error through the real command in a subprocess."""
    assert run(workspace, "--eval-num", "7") == 2
    assert capsys.readouterr().err.splitlines() == [
        f"mirlab run: asked for 7 pairs but {workspace / 'images'} has only 6 images: ask for at most 6 pairs"]
    assert run(workspace, "--mode", "fast", "--method", "exact") == 2
    assert "--mode fast contradicts --method exact" in capsys.readouterr().err
    assert cli.main(["run", "--model", str(workspace / "model"), "--images", str(workspace / "images")]) == 2
    assert "give --images and --texts" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["no-such-command"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and len(err.splitlines()) == 1 and "invalid choice: 'no-such-command'" in err
    with pytest.raises(UserError, match="asked for 7 pairs"):  # --debug: the exception itself, for a traceback
        run(workspace, "--eval-num", "7", "--debug")


def test_library_parameter_names_become_option_names_but_paths_stay():
    assert cli._one_line("x: empty text (pass on_error='skip' to leave such pairs out)") == \
        "x: empty text (pass --skip-bad to leave such pairs out)"
    assert cli._one_line("set max_text_tokens\n to cut texts") == "set --max-text-tokens to cut texts"
    assert cli._one_line("cache_dir /tmp/cache_dir/out_dir is a file") == "--cache /tmp/cache_dir/out_dir is a file"


def test_help_lists_every_option(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["run", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for option in ["--model", "--base-llm", "--images", "--texts", "--pairs", "--eval-num", "--method", "--mode",
                   "--batch-size", "--cache", "--out", "--text-span", "--store-dtype", "--skip-bad", "--seed",
                   "--threads", "--dtype", "--device-map", "--outliers", "--max-text-tokens",
                   "--model_path", "--base_llm", "--text_data_path", "--image_data_path", "--eval_num"]:
        assert option in text, option


def test_other_modules_can_register_subcommands(monkeypatch, capsys):
    monkeypatch.setattr(cli, "COMMANDS", dict(cli.COMMANDS))
    seen = {}

    def add_arguments(parser):
        parser.add_argument("--steps", type=int, default=1)

    def handler(args):
        """Say hello."""
        seen["steps"] = args.steps
        return 3

    cli.register("hello", add_arguments, handler)
    assert cli.main(["hello", "--steps", "5"]) == 3 and seen == {"steps": 5}
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    assert "Say hello." in capsys.readouterr().out


def test_top_level_help_lists_every_subcommand_without_importing_torch():
    code = ("import sys\nfrom mirlab.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit as stop:\n"
            "    assert stop.code == 0\nassert 'torch' not in sys.modules, 'mirlab --help imported torch'")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    for name, command in cli.COMMANDS.items():
        assert name in done.stdout and command.help.split()[0] in done.stdout
    script = Path(sys.executable).parent / "mirlab"  # the console script, where the package is installed
    if script.is_file():
        done = subprocess.run([str(script), "--help"], capture_output=True, text=True)
        assert done.returncode == 0 and "pretrain" in done.stdout


def test_every_registered_subcommand_resolves_and_builds_its_options():
    for name, command in cli.COMMANDS.items():
        assert callable(cli._resolve(command.add_arguments)) and callable(cli._resolve(command.handler)), name
        assert command.help.endswith(".")
        assert any(a.dest != "help" for a in _subparser(cli.build_parser(name), name)._actions)


def _subparser(parser, name):
    return next(a for a in parser._actions if hasattr(a, "choices") and isinstance(a.choices, dict)).choices[name]


def test_summary_and_outputs_work_on_any_per_layer_column(tmp_path):
    from mirlab.run import write_outputs

    table = pd.DataFrame({"layer": [1, 2, 3, 4], "cka": [0.2, 0.9, 0.5, 0.1]})
    text = cli.summary(table, value="cka")
    assert "4 layers, cka per layer 0.1 .. 0.9 (max at layer 2)" in text and "MIR" not in text
    paths = write_outputs(table, tmp_path / "out", value="cka")
    assert set(paths) == {"csv", "png"} and paths["png"].read_bytes()[:4] == b"\x89PNG"
    pd.testing.assert_frame_equal(pd.read_csv(paths["csv"]), table)
    with pytest.raises(ValueError, match="cka"):
        cli.summary(table.drop(columns="cka"), value="cka")


def test_summary_of_a_mir_result_and_another_of_its_columns():
    from mirlab.metrics.mir import MIRResult

    per_layer = pd.DataFrame({"layer": [1, 2, 3], "fd": [4.0, 1.0, 5.0], "scale": [0.5, 0.25, 0.125]})
    result = MIRResult(mir=float(np.log10(10.0)), per_layer=per_layer, method="exact", outliers="replace",
                       meta={"model": "m", "n_pairs": 7})
    assert cli.summary(result).splitlines() == [
        "MIR = 1.0000   (method exact, outliers replace)",
        "model m: 7 pairs, 3 layers, FD per layer 1 .. 5 (max at layer 3)"]
    assert "scale per layer 0.125 .. 0.5 (max at layer 1)" in cli.summary(result, value="scale")


# --- mirlab course: one line per notebook and a long table (on a fake record; the course itself is slow) --------

RECORD = {"notebook": "04_mir", "n_samples": 32, "method": "exact", "n_pairs": 32, "mir": 2.174321,
          "mir_low": 2.15, "mir_high": 2.2, "ok": True, "fd_per_layer": [1.5, 2.5],
          "spearman": {"a": {"rho": 0.5}}, "seconds": 12.345, "figures": 3}


def test_course_line_shows_time_figures_and_the_headline_numbers():
    from mirlab.course import key_numbers, notebook_line

    # mir* first, injected parameters (n_samples) and bookkeeping left out, booleans are not numbers
    assert key_numbers(RECORD, skip={"n_samples"}) == [("mir", 2.174321), ("mir_low", 2.15), ("mir_high", 2.2)]
    assert key_numbers({"notebook": "x", "n_layers": 30, "ratio": 0.5, "flag": False}) == \
        [("n_layers", 30), ("ratio", 0.5)]
    line = notebook_line(RECORD, skip={"n_samples"})
    assert line == "04_mir                      12.3 s   3 figures   mir=2.174  mir_low=2.15  mir_high=2.2"
    assert "\n" not in line


def test_course_long_table_has_one_row_per_recorded_value():
    from mirlab.course import long_table

    table = long_table([RECORD, {"notebook": "01_x", "n_layers": 30}])
    assert list(table.columns) == ["notebook", "key", "value"]
    rows = dict(zip(zip(table["notebook"], table["key"]), table["value"]))
    assert rows[("04_mir", "mir")] == 2.174321 and rows[("04_mir", "fd_per_layer[1]")] == 2.5
    assert rows[("04_mir", "spearman.a.rho")] == 0.5 and rows[("04_mir", "method")] == "exact"
    assert rows[("01_x", "n_layers")] == 30
    assert len(table) == 13  # 12 values of RECORD (the list counts twice, minus "notebook") + 1


def test_course_command_prints_one_line_per_notebook_and_no_kernel_transport_warning(tmp_path):
    import nbformat

    notebook = nbformat.v4.new_notebook(metadata={"kernelspec": {"name": "python3", "language": "python",
                                                                 "display_name": "Python 3"}})
    parameters = nbformat.v4.new_code_cell("results_path = None\nscale = 1.0")
    parameters.metadata["tags"] = ["parameters"]
    notebook.cells = [nbformat.v4.new_markdown_cell("# A tiny course"), parameters, nbformat.v4.new_code_cell(
        "import json\njson.dump({'mir': 1.5 * scale, 'n_pairs': 3, 'curve': [1, 2]}, open(results_path, 'w'))")]
    (tmp_path / "course").mkdir()
    nbformat.write(notebook, tmp_path / "course" / "01_tiny.ipynb")
    done = subprocess.run([sys.executable, "-m", "mirlab.cli", "course", "--notebooks", str(tmp_path / "course"),
                           "--out", str(tmp_path / "out"), "-p", "scale", "2"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    # the kernel-transport warning ("Kernel is running over TCP without encryption") is silenced
    assert "without encryption" not in done.stderr and "transport" not in done.stderr.lower(), done.stderr
    first, *rest = done.stdout.splitlines()
    assert first.startswith("01_tiny ") and first.endswith("0 figures   mir=3  n_pairs=3") and " s " in first
    assert len(rest) == 1 and "results_long.csv" in rest[0]
    long = pd.read_csv(tmp_path / "out" / "results_long.csv")
    values = dict(zip(long["key"], long["value"]))
    assert set(long["notebook"]) == {"01_tiny"} and float(values["curve[1]"]) == 2 and float(values["mir"]) == 3
