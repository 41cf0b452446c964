"""Trainable state (mirlab.tiny.trainable) on a tiny random LLaVA, and the shipped projector files it reads."""
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tiny_models import build

from mirlab.tiny import pretrain, trainable
from mirlab.tiny.build import checkpoint_path, embedded_checkpoints, load_projector, projector_shapes, save_projector
from mirlab.tiny.trainable import (assign_state, freeze_all_but, load_state, read_state, save_state, state_shapes,
                                   trainable_modules)

RECIPE = {"name": "r", "lr": 2e-3, "steps": 250, "trajectory": (0, 5, 20), "nested": {"seed": 0, "note": "é"}}


@pytest.fixture
def model():
    return build("llava").model


@pytest.fixture
def with_head(monkeypatch):
    """A second trainable part, registered the way a new one would be (one line), for this test only."""
    monkeypatch.setitem(trainable.REGISTRY, "head", lambda m: m.lm_head)


def projector_state(model):
    return {k: v.clone() for k, v in model.model.multi_modal_projector.state_dict().items()}


def scramble(model, names=("projector",)):
    with torch.no_grad():
        for module in trainable_modules(model, names).values():
            for p in module.parameters():
                p.normal_()


def test_modules_are_found_through_the_registry(model, with_head):
    modules = trainable_modules(model, ["projector", "head"])
    assert list(modules) == ["projector", "head"]
    assert modules["projector"] is model.model.multi_modal_projector and modules["head"] is model.lm_head
    assert trainable_modules(model, "projector")["projector"] is model.model.multi_modal_projector
    own = model.model.multi_modal_projector.state_dict()
    assert state_shapes(model, ["projector"]) == {f"projector.{k}": tuple(v.shape) for k, v in own.items()}


def test_unknown_or_absent_parts_are_named(model):
    with pytest.raises(ValueError, match=r"unknown state names \['lora'\]; known: \[.*'moca', 'projector'.*\]"):
        trainable_modules(model, ["projector", "lora"])
    with pytest.raises(ValueError, match="LlavaForConditionalGeneration has no 'moca' part"):
        trainable_modules(model, ["projector", "moca"])  # registered, but only there while MoCa is attached
    with pytest.raises(ValueError, match="repeat"):
        trainable_modules(model, ["projector", "projector"])
    with pytest.raises(ValueError, match="no state names"):
        trainable_modules(model, [])
    with pytest.raises(ValueError, match="Linear has no 'projector' part"):
        trainable_modules(torch.nn.Linear(2, 2), ["projector"])
    with pytest.raises(ValueError, match="plain identifier"):
        trainable.register("a.b", lambda m: m)


def test_freezing_leaves_exactly_the_named_parameters_trainable(model, with_head):
    count = freeze_all_but(model, ["projector"])
    projector = {id(p) for p in model.model.multi_modal_projector.parameters()}
    for name, p in model.named_parameters():
        assert p.requires_grad == (id(p) in projector), name
    assert count == sum(p.numel() for p in model.model.multi_modal_projector.parameters()) > 0
    # a second call with other names moves the trainable set, it does not add to it
    count = freeze_all_but(model, ["head"])
    assert count == model.lm_head.weight.numel()
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["lm_head.weight"]
    # pretrain's wrapper: the projector's parameters, in module order (what the optimizer state is keyed on)
    params = pretrain.freeze_all_but_projector(model)
    assert [id(p) for p in params] == [id(p) for p in model.model.multi_modal_projector.parameters()]


def test_float32_round_trip_is_bit_exact_and_keeps_the_recipe(model, tmp_path):
    before = projector_state(model)
    path = save_state(model, ["projector"], tmp_path / "sub" / "state.safetensors", RECIPE, dtype=torch.float32)
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        keys = sorted(f.keys())
    assert meta["format"] == "mirlab-trainable-v1" and json.loads(meta["names"]) == ["projector"]
    assert keys == sorted(f"projector.{k}" for k in before)
    scramble(model)
    assert not torch.equal(model.model.multi_modal_projector.linear_1.weight, before["linear_1.weight"])
    recipe = load_state(model, path)
    assert recipe == {**RECIPE, "trajectory": [0, 5, 20]}  # JSON gives tuples back as lists
    for k, v in model.model.multi_modal_projector.state_dict().items():
        assert v.dtype == torch.float32 and torch.equal(v, before[k]), k


def test_default_float16_file_is_cast_back_to_the_model_dtype(model, tmp_path):
    before = projector_state(model)
    path = save_state(model, "projector", tmp_path / "state.safetensors", {})
    assert {t.dtype for t in load_file(str(path)).values()} == {torch.float16}
    scramble(model)
    assert load_state(model, path, names=["projector"]) == {}
    for k, v in model.model.multi_modal_projector.state_dict().items():
        assert v.dtype == torch.float32 and torch.equal(v, before[k].half().float()), k


def test_moca_is_a_part_and_keeps_float32_in_a_file_with_a_float16_projector(model, tmp_path):
    from mirlab.lvlm.moca import attach

    handle = attach(model)
    assert trainable_modules(model, ["moca"])["moca"] is model.moca
    with torch.no_grad():
        model.moca.scale.add_(torch.linspace(1e-4, 3e-4, model.moca.scale.numel()).view_as(model.moca.scale))
    scale, projector = model.moca.scale.detach().clone(), projector_state(model)
    path = save_state(model, ["projector", "moca"], tmp_path / "m.safetensors", {},
                      dtype={"projector": torch.float16, "moca": torch.float32})
    assert {k: v.dtype for k, v in load_file(str(path)).items()} == {
        **{f"projector.{k}": torch.float16 for k in projector}, "moca.scale": torch.float32,
        "moca.shift": torch.float32}
    assert not torch.equal(scale.half().float(), scale)  # what float16 would have lost
    scramble(model, ["projector", "moca"])
    load_state(model, path, names=["moca", "projector"])
    assert torch.equal(model.moca.scale, scale) and torch.equal(model.moca.shift, torch.zeros_like(scale))
    assert torch.equal(model.model.multi_modal_projector.linear_1.weight, projector["linear_1.weight"].half().float())
    # dtype=None keeps every dtype; a name left out of the dict keeps its own
    kept = save_state(model, ["projector", "moca"], tmp_path / "k.safetensors", {}, dtype=None)
    assert {t.dtype for t in load_file(str(kept)).values()} == {torch.float32}
    mixed = save_state(model, ["projector", "moca"], tmp_path / "x.safetensors", {},
                       dtype={"projector": torch.bfloat16})
    assert load_file(str(mixed))["moca.shift"].dtype == torch.float32
    assert load_file(str(mixed))["projector.linear_2.bias"].dtype == torch.bfloat16
    with pytest.raises(ValueError, match=r"dtype names parts that are not saved: \['moca'\]"):
        save_state(model, ["projector"], tmp_path / "y.safetensors", {}, dtype={"moca": torch.float32})
    with pytest.raises(ValueError, match="floating torch dtype or None, got torch.int8 for 'moca'"):
        save_state(model, ["moca"], tmp_path / "y.safetensors", {}, dtype={"moca": torch.int8})
    handle.remove()


def test_several_parts_in_one_file(model, with_head, tmp_path):
    before = {**projector_state(model), "lm_head.weight": model.lm_head.weight.detach().clone()}
    path = save_state(model, ["projector", "head"], tmp_path / "two.safetensors", RECIPE, dtype=torch.float32)
    scramble(model, ["projector", "head"])
    load_state(model, path, names=["head", "projector"])  # order of the names does not matter
    assert torch.equal(model.lm_head.weight, before["lm_head.weight"])
    assert torch.equal(model.model.multi_modal_projector.linear_2.bias, before["linear_2.bias"])
    with pytest.raises(ValueError, match=r"two.safetensors holds the state \['projector', 'head'\], "
                                         r"not \['projector'\]"):
        load_state(model, path, names=["projector"])


def test_mismatched_files_are_refused_naming_the_file(model, tmp_path):
    good = save_state(model, ["projector"], tmp_path / "good.safetensors", {}, dtype=torch.float32)
    tensors = load_file(str(good))
    meta = {"format": "mirlab-trainable-v1", "names": '["projector"]', "recipe": "{}"}

    wrong = dict(tensors, **{"projector.linear_1.weight": torch.zeros(3, 5)})
    save_file(wrong, str(tmp_path / "shape.safetensors"), metadata=meta)
    with pytest.raises(ValueError, match=r"shape.safetensors does not fit .*wrong shape: projector.linear_1.weight "
                                         r"\(3, 5\) \(model"):
        load_state(model, tmp_path / "shape.safetensors")

    partial = {k: v for k, v in tensors.items() if k != "projector.linear_2.bias"}
    partial["projector.extra"] = torch.zeros(1)
    save_file(partial, str(tmp_path / "names.safetensors"), metadata=meta)
    with pytest.raises(ValueError, match=r"names.safetensors .*missing: projector.linear_2.bias; "
                                         r"unexpected: projector.extra"):
        load_state(model, tmp_path / "names.safetensors")

    save_file(tensors, str(tmp_path / "bare.safetensors"))
    with pytest.raises(ValueError, match="bare.safetensors is not a mirlab state file: format None"):
        load_state(model, tmp_path / "bare.safetensors")
    with pytest.raises(ValueError, match="not a projector for this model: .*bare.safetensors"):
        load_projector(model, tmp_path / "bare.safetensors")
    with pytest.raises(FileNotFoundError, match="no state file"):
        load_state(model, tmp_path / "absent.safetensors")
    with pytest.raises(ValueError, match="not JSON-serializable"):
        save_state(model, ["projector"], tmp_path / "x.safetensors", {"dtype": torch.float16})
    with pytest.raises(ValueError, match="floating torch dtype"):
        save_state(model, ["projector"], tmp_path / "x.safetensors", {}, dtype=torch.int8)


def test_projector_files_are_trainable_states_of_one_part(model, tmp_path):
    before = projector_state(model)
    path = save_projector(model, tmp_path / "step-0005.safetensors", {"recipe": "lr2e-3", "step": 5})
    assert sorted(load_file(str(path))) == sorted(before)  # the shipped format: no prefix
    tensors, names, recipe = read_state(path)
    assert names == ["projector"] and recipe == {"recipe": "lr2e-3", "step": "5"}
    assert sorted(tensors) == sorted(f"projector.{k}" for k in before)
    scramble(model)
    load_projector(model, path)
    assert torch.equal(model.model.multi_modal_projector.linear_1.weight, before["linear_1.weight"].half().float())
    # and a trainable-state file holding the projector loads through load_projector as well
    state = save_state(model, ["projector"], tmp_path / "state.safetensors", {}, dtype=torch.float32)
    scramble(model)
    load_projector(model, state)
    assert torch.equal(model.model.multi_modal_projector.linear_1.weight, before["linear_1.weight"].half().float())


class Shell(torch.nn.Module):
    """Where the registry looks for "projector" (.model.multi_modal_projector), with the embedded model's shapes;
    the embedded model itself takes ~40 s to build (its own tests load the shipped files into it)."""

    def __init__(self):
        super().__init__()
        self.model = torch.nn.Module()
        self.model.multi_modal_projector = torch.nn.Module()
        self.model.multi_modal_projector.linear_1 = torch.nn.Linear(384, 576)
        self.model.multi_modal_projector.linear_2 = torch.nn.Linear(576, 576)


SHIPPED = embedded_checkpoints()


@pytest.mark.skipif(not SHIPPED, reason="no trained projector shipped in data/projector")
@pytest.mark.parametrize("name", [n for n in SHIPPED if n == "final" or n.endswith("step-0250")])
def test_shipped_projector_checkpoints_still_load(name):
    path = checkpoint_path(name)
    shell = Shell()
    assert projector_shapes(shell) == projector_shapes()
    raw = load_file(str(path))
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    assert meta["format"] == "mirlab-projector-v1"
    recipe = load_state(shell, path, names=["projector"])
    assert recipe == {k: v for k, v in meta.items() if k != "format"}
    for k, v in shell.model.multi_modal_projector.state_dict().items():
        assert v.dtype == torch.float32 and torch.equal(v, raw[k].float()), k
    load_projector(Shell(), path)


def test_pretrain_state_holds_the_trainable_state(model, tmp_path):
    from mirlab.tiny import resume

    recipe = pretrain.Recipe(name="r", steps=10, warmup=0, train_scenes=4, trajectory=())
    params = pretrain.freeze_all_but_projector(model)
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    before = projector_state(model)
    path = tmp_path / pretrain.STATE_FILE
    pretrain._save_state(path, model, optimizer, 7, recipe)
    assert sorted(resume.load(path, restore_rng=False)[0]) == sorted(f"projector.{k}" for k in before)
    scramble(model)
    assert pretrain._load_state(path, model, optimizer, recipe) == 7
    for k, v in model.model.multi_modal_projector.state_dict().items():
        assert torch.equal(v, before[k]), k
    with pytest.raises(ValueError, match="state.safetensors does not fit"):
        assign_state(model, {"projector.linear_1.weight": torch.zeros(1)}, ["projector"], source=str(path))