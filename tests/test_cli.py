"""`mirlab run` end to end on a tiny LLaVA saved to disk, with generated image and story folders."""
import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from mirlab import cli, compute_mir, extract_hidden_states, folder_pairs, load_model
from tiny_models import LAYERS, build, single_thread

WORDS = "a cat dog fox sits on the mat red blue square circle park night quick brown lazy".split()


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    with single_thread():
        yield


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A saved tiny LLaVA plus folders of 6 images and 7 CNN/DM-style stories."""
    root = tmp_path_factory.mktemp("cli")
    llava = build("llava")
    llava.model.save_pretrained(root / "model")
    llava.processor.save_pretrained(root / "model")
    rng = np.random.default_rng(0)
    (root / "images").mkdir()
    (root / "texts").mkdir()
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, (30 + i, 40, 3), dtype=np.uint8)).save(root / "images" / f"{i}.png")
    for i in range(7):
        words = " ".join(rng.choice(WORDS, size=8 + i))
        (root / "texts" / f"{i}.story").write_text(f"{words}\n\n@highlight\n\nnot part of the text\n")
    return root


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
    with pytest.raises(SystemExit, match="contradicts"):
        run(workspace, "--mode", "fast", "--method", "exact")


def test_bad_requests_fail_clearly(workspace, capsys):
    with pytest.raises(ValueError, match="asked for 7 pairs but .*images has only 6 images"):
        run(workspace, "--eval-num", "7")
    with pytest.raises(SystemExit, match="--images and --texts"):
        cli.main(["run", "--model", str(workspace / "model"), "--images", str(workspace / "images")])
    with pytest.raises(SystemExit):
        cli.main(["no-such-command"])
    assert "invalid choice" in capsys.readouterr().err


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
