"""Resume states are safetensors + JSON: exact round trip of tensors, AdamW state and RNG; nothing unpickled."""
import pathlib
import pickle

import pytest
import torch

from mirlab.tiny import resume

ROOT = pathlib.Path(__file__).resolve().parent.parent


def trained_optimizer(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.8, 0.95), weight_decay=0.1)
    for _ in range(3):
        loss = model(torch.randn(5, 4)).pow(2).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model, optimizer


def test_round_trip_continues_exactly_like_an_uninterrupted_run(tmp_path):
    model, optimizer = trained_optimizer()
    path = resume.save(tmp_path / "state.safetensors", dict(model.state_dict()), optimizer,
                       {"step": 3, "recipe": {"lr": 1e-2, "betas": [0.8, 0.95]}})

    fresh, fresh_optimizer = trained_optimizer(seed=1)  # other weights and moments, to be overwritten
    tensors, meta = resume.load(path, fresh_optimizer)
    fresh.load_state_dict(tensors)
    assert meta == {"step": 3, "recipe": {"lr": 1e-2, "betas": [0.8, 0.95]}}
    # one more step on the same batch gives identical weights in both runs
    torch.manual_seed(7)
    batch = torch.randn(5, 4)
    for m, opt in ((model, optimizer), (fresh, fresh_optimizer)):
        loss = m(batch).pow(2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    for (name, a), b in zip(model.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), name


def test_rng_state_is_restored(tmp_path):
    model, optimizer = trained_optimizer()
    torch.manual_seed(5)
    path = resume.save(tmp_path / "s.safetensors", {}, optimizer, {})
    after_save = torch.rand(3)
    torch.manual_seed(99)
    resume.load(path)
    assert torch.equal(torch.rand(3), after_save)


def test_a_pickle_or_foreign_file_is_refused_by_name(tmp_path):
    bad = tmp_path / "state.safetensors"
    bad.write_bytes(pickle.dumps({"step": 1}))
    with pytest.raises(Exception):
        resume.load(bad)
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(bad), metadata={"format": "something-else"})
    with pytest.raises(ValueError, match="state.safetensors is not a mirlab resume state"):
        resume.load(bad)


def test_no_module_unpickles_files():
    offenders = [str(p.relative_to(ROOT)) for p in (ROOT / "mirlab").rglob("*.py")
                 if "torch.load(" in p.read_text() or "pickle.load" in p.read_text()]
    assert offenders == []
