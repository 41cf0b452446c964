"""Models that ship their own modelling code: refused unless trust_remote_code=True / --trust-remote-code.

The model folder is a saved tiny LLaVA whose config names, through ``auto_map``, a config class and a model class
in two small Python files written here (subclasses of transformers' LLaVA: "the usual conventions"). Loading it
imports those files, so the test points transformers' module cache at a temporary folder."""
import json

import pytest
import torch

import transformers.dynamic_module_utils as dynamic_modules
from mirlab import cli, extract_hidden_states
from mirlab.errors import UserError
from mirlab.lvlm.models import load_pretrained
from test_extract import family_pairs
from tiny_models import LAYERS, build, single_thread

CONFIGURATION = '''
from transformers import LlavaConfig


class TinyRemoteConfig(LlavaConfig):
    model_type = "tinyremote"
'''

MODELING = '''
from transformers import LlavaForConditionalGeneration
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_tinyremote import TinyRemoteConfig


class TinyRemoteForConditionalGeneration(LlavaForConditionalGeneration):
    config_class = TinyRemoteConfig


class NoHiddenStatesForConditionalGeneration(LlavaForConditionalGeneration):
    """Off the conventions: its forward returns the logits only, whatever it is asked for."""
    config_class = TinyRemoteConfig

    def forward(self, *args, **kwargs):
        kwargs["output_hidden_states"] = False
        return CausalLMOutputWithPast(logits=super().forward(*args, **kwargs).logits)
'''


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    with single_thread():
        yield


@pytest.fixture(autouse=True, scope="module")
def module_cache(tmp_path_factory):
    """Dynamic modules go to a temporary folder, not ~/.cache/huggingface/modules."""
    cache = tmp_path_factory.mktemp("hf_modules")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(dynamic_modules, "HF_MODULES_CACHE", str(cache))
        patch.syspath_prepend(str(cache))
        yield cache


def remote_folder(root, model_class="TinyRemoteForConditionalGeneration"):
    """A saved tiny LLaVA turned into a model with its own code (config.json's auto_map names the files)."""
    llava = build("llava")
    folder = root / f"{root.name}-{model_class}"  # transformers names the imported module after the folder
    llava.model.save_pretrained(folder)
    llava.processor.save_pretrained(folder)
    (folder / "configuration_tinyremote.py").write_text(CONFIGURATION)
    (folder / "modeling_tinyremote.py").write_text(MODELING)
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="tinyremote", architectures=[model_class],
                  auto_map={"AutoConfig": "configuration_tinyremote.TinyRemoteConfig",
                            "AutoModelForImageTextToText": f"modeling_tinyremote.{model_class}"})
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_remote_code_is_refused_by_default_and_the_message_says_what_the_flag_allows(tmp_path, module_cache):
    folder = remote_folder(tmp_path)
    with pytest.raises(UserError, match=r"ships its own modelling code \(auto_map: \['AutoConfig', "
                                        r"'AutoModelForImageTextToText'\]\).*trust_remote_code=True.*Python"):
        load_pretrained(str(folder))
    assert not list(module_cache.rglob("*tinyremote*"))  # nothing of the folder's code was copied or imported


def test_trusted_remote_code_that_follows_the_conventions_extracts_like_the_original(tmp_path):
    folder = remote_folder(tmp_path)
    model, processor = load_pretrained(str(folder), trust_remote_code=True)
    assert type(model).__name__ == "TinyRemoteForConditionalGeneration"
    assert type(model).__module__.startswith("transformers_modules.")  # the folder's own file
    llava = build("llava")
    images, texts, _ = family_pairs(llava, n=2)
    remote = extract_hidden_states(model, processor, images, texts, progress=False)
    original = extract_hidden_states(llava.model, llava.processor, images, texts, progress=False)
    assert remote.layers == list(range(1, LAYERS + 1))
    for (_, a, b), (_, c, d) in zip(remote, original):
        torch.testing.assert_close(a, c)
        torch.testing.assert_close(b, d)


def test_trusted_remote_code_off_the_conventions_fails_naming_what_is_missing(tmp_path):
    folder = remote_folder(tmp_path, "NoHiddenStatesForConditionalGeneration")
    model, processor = load_pretrained(str(folder), trust_remote_code=True)
    images, texts, _ = family_pairs(build("llava"), n=2)
    with pytest.raises(ValueError, match=r"returned no decoder hidden states \(CausalLMOutputWithPast has neither "
                                         r"`hidden_states`"):
        extract_hidden_states(model, processor, images, texts, progress=False)


def test_the_command_line_flag(tmp_path, capsys):
    folder = remote_folder(tmp_path)
    pairs = tmp_path / "pairs.jsonl"
    images, texts, _ = family_pairs(build("llava"), n=2)
    for i, image in enumerate(images):
        image.save(tmp_path / f"{i}.png")
    pairs.write_text("".join(json.dumps({"image": str(tmp_path / f"{i}.png"), "text": t}) + "\n"
                             for i, t in enumerate(texts)))
    args = ["run", "--model", str(folder), "--pairs", str(pairs), "--eval-num", "2", "--no-progress"]
    capsys.readouterr()  # the progress bar of save_pretrained
    assert cli.main(args) == cli.USAGE_ERROR
    error = capsys.readouterr().err
    assert "ships its own modelling code" in error and "unless you pass --trust-remote-code" in error
    assert len(error.strip().splitlines()) == 1
    assert cli.main(args + ["--trust-remote-code"]) == 0
    assert "MIR = " in capsys.readouterr().out
    for command in ("run", "probe"):
        with pytest.raises(SystemExit):
            cli.main([command, "--help"])
        help_text = " ".join(capsys.readouterr().out.split())
        assert "--trust-remote-code let transformers run the Python" in help_text
        assert "only for sources you trust (default: refuse such models)" in help_text
