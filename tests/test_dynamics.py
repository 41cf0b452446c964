"""mirlab.study.dynamics: pair subsets give the MIR of those pairs, correlations and summaries, the shipped tables."""
import numpy as np
import pandas as pd
import pytest
import torch

from mirlab import compute_mir
from mirlab.study import dynamics


class PairStates:
    """In-memory stand-in for HiddenStates: per-pair row blocks, iterated (layer, image, text)."""

    def __init__(self, n_pairs=12, d=5, n_layers=3, seed=0):
        rng = np.random.default_rng(seed)
        self.n_image = rng.integers(6, 10, n_pairs)
        self.n_text = rng.integers(3, 7, n_pairs)
        self.blocks = [[(rng.standard_normal((nv, d)) + k, rng.standard_normal((nt, d)))
                        for nv, nt in zip(self.n_image, self.n_text)] for k in range(n_layers)]

    @property
    def samples(self):
        return pd.DataFrame({"pair": range(len(self.n_image)), "n_image": self.n_image, "n_text": self.n_text})

    def __iter__(self):
        for k, blocks in enumerate(self.blocks, start=1):
            yield (k, torch.from_numpy(np.concatenate([v for v, _ in blocks])).float(),
                   torch.from_numpy(np.concatenate([t for _, t in blocks])).float())

    def only(self, pairs):
        """The layers of the given pairs, built directly from their blocks (what a fresh extraction gives)."""
        for k, blocks in enumerate(self.blocks, start=1):
            yield (k, torch.from_numpy(np.concatenate([blocks[p][0] for p in pairs])).float(),
                   torch.from_numpy(np.concatenate([blocks[p][1] for p in pairs])).float())


def test_pair_subset_is_seeded_sorted_and_without_replacement():
    a = dynamics.pair_subset(120, 20, seed=3)
    assert len(a) == len(set(a)) == 20 and (np.diff(a) > 0).all() and a.max() < 120
    np.testing.assert_array_equal(a, dynamics.pair_subset(120, 20, seed=3))
    assert not np.array_equal(a, dynamics.pair_subset(120, 20, seed=4))
    np.testing.assert_array_equal(dynamics.pair_subset(7, 7, seed=0), np.arange(7))
    with pytest.raises(ValueError, match="n_pairs"):
        dynamics.pair_subset(10, 11, seed=0)


def test_subset_layers_gives_the_mir_of_those_pairs():
    states = PairStates()
    pairs = [1, 4, 5, 9, 11]
    via_subset = compute_mir(dynamics.subset_layers(states, pairs))
    direct = compute_mir(states.only(pairs))
    assert via_subset.mir == pytest.approx(direct.mir, rel=1e-12)
    assert list(via_subset.per_layer["n_image"]) == [int(states.n_image[pairs].sum())] * 3
    everything = compute_mir(dynamics.subset_layers(states, range(12)))
    assert everything.mir == pytest.approx(compute_mir(states).mir, rel=1e-12)
    with pytest.raises(ValueError, match="pair positions"):
        list(dynamics.subset_layers(states, [0, 12]))


def test_spearman_table_per_scope():
    table = pd.DataFrame({"recipe": ["a"] * 4 + ["b"] * 4,
                          "mir_exact": [4, 3, 2, 1, 8, 7, 6, 5],
                          "mir_official_fast": [1, 2, 3, 4, 5, 6, 7, 8],
                          "retrieval_accuracy": [0.1, 0.2, 0.3, 0.4, 0.1, 0.2, 0.3, 0.4],
                          "heldout_caption_loss": [4, 3, 2, np.nan, 4, 3, 2, 1]})
    rho = dynamics.spearman_table(table)
    assert set(rho["scope"]) == {"all", "a", "b"} and len(rho) == 12
    got = rho.set_index(["scope", "x", "y"])
    assert got.loc[("a", "mir_exact", "retrieval_accuracy"), "rho"] == pytest.approx(-1)
    assert got.loc[("b", "mir_official_fast", "retrieval_accuracy"), "rho"] == pytest.approx(1)
    assert got.loc[("a", "mir_exact", "heldout_caption_loss"), "n"] == 3  # the NaN row is left out
    assert got.loc[("all", "mir_exact", "retrieval_accuracy"), "n"] == 8
    only_all = dynamics.spearman_table(table.iloc[:2], by=None)
    assert set(only_all["scope"]) == {"all"} and only_all["rho"].isna().all()  # n < 3: undefined


def test_robustness_summary_mean_and_std_per_text_and_n():
    table = pd.DataFrame({"text": ["captions"] * 3 + ["prose"] * 2, "n_pairs": [5, 5, 10, 5, 5],
                          "seed": [0, 1, 0, 0, 1], "mir": [1.0, 2.0, 1.5, 3.0, 3.0]})
    summary = dynamics.robustness_summary(table).set_index(["text", "n_pairs"])
    assert summary.loc[("captions", 5), "mean"] == 1.5
    assert summary.loc[("captions", 5), "std"] == pytest.approx(np.std([1.0, 2.0], ddof=1))
    assert summary.loc[("prose", 5), "mean ± std"] == "3.000 ± 0.000"
    assert summary.loc[("captions", 10), "seeds"] == 1
    with pytest.raises(ValueError, match="lacks columns"):
        dynamics.robustness_summary(table.drop(columns="seed"))


def write_projector(path, value, metadata=None):
    """A small safetensors file standing in for a projector checkpoint (only its tensors identify it)."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"linear_1.weight": torch.full((3, 2), float(value), dtype=torch.float16),
               "linear_1.bias": torch.zeros(3, dtype=torch.float16)}, str(path), metadata=metadata)


def test_distinct_checkpoints_groups_identical_tensors_whatever_the_metadata(tmp_path, monkeypatch):
    folder = tmp_path / "projector"
    write_projector(folder / "final.safetensors", 1.0, {"recipe": "r"})
    write_projector(folder / "r" / "step-0000.safetensors", 2.0, {"recipe": "r"})
    write_projector(folder / "r" / "step-0010.safetensors", 1.0, {"recipe": "other name, same tensors"})
    monkeypatch.setenv("MIRLAB_DATA_DIR", str(tmp_path))
    assert (folder / "final.safetensors").read_bytes() != (folder / "r" / "step-0010.safetensors").read_bytes()
    groups = dynamics.distinct_checkpoints(["final", "r/step-0000", "r/step-0010"])
    assert groups == {"final": ["final", "r/step-0010"], "r/step-0000": ["r/step-0000"]}
    with pytest.raises(FileNotFoundError, match="mir_vs_pretraining.py"):
        dynamics.load_table("mir")
    with pytest.raises(ValueError, match="name must be"):
        dynamics.load_table("nope")


def test_shipped_tables_cover_every_checkpoint():
    from mirlab.tiny import embedded_checkpoints

    try:
        mir, robust = dynamics.load_table("mir"), dynamics.load_table("robustness")
    except FileNotFoundError:
        pytest.skip("the MIR tables are not shipped in this checkout")
    assert list(mir.columns) == dynamics.MIR_COLUMNS
    assert sorted(mir["checkpoint"]) == sorted(embedded_checkpoints())
    assert mir["n_pairs"].nunique() == 1 and mir[["mir_exact", "mir_official_fast"]].notna().all().all()
    # identical bytes -> identical numbers
    both = mir.set_index("checkpoint")
    assert both.loc["final", "mir_exact"] == both.loc["lr2e-3/step-0250", "mir_exact"]
    assert both.loc["lr2e-3/step-0000", "mir_exact"] == both.loc["lr2e-4/step-0000", "mir_exact"]
    assert list(robust.columns) == dynamics.ROBUSTNESS_COLUMNS
    assert not robust.duplicated(["text", "n_pairs", "seed"]).any() and robust["mir"].notna().all()


def test_checkpoint_correlations_count_identical_projectors_once(tmp_path, monkeypatch):
    folder = tmp_path / "projector"
    for number, recipe in enumerate(("a", "b")):
        write_projector(folder / recipe / "step-0000.safetensors", 0.0, {"recipe": recipe})  # shared init
        for step in (1, 2, 3):
            write_projector(folder / recipe / f"step-000{step}.safetensors", 10 * number + step)
    write_projector(folder / "final.safetensors", 3.0)  # = a/step-0003
    monkeypatch.setenv("MIRLAB_DATA_DIR", str(tmp_path))
    rows = [("final", "a", 3)] + [(f"{r}/step-000{s}", r, s) for r in ("a", "b") for s in range(4)]
    table = pd.DataFrame(rows, columns=["checkpoint", "recipe", "step"])
    table["mir_exact"] = 2.0 - 0.1 * table["step"] - 0.05 * (table["recipe"] == "b") * table["step"]
    table["mir_official_fast"] = table["mir_exact"] + 0.05
    table["retrieval_accuracy"] = 0.2 + 0.1 * table["step"]
    table["heldout_caption_loss"] = 3.0 - 0.5 * table["step"]
    rho = dynamics.checkpoint_correlations(table).set_index(["scope", "x", "y"])
    assert rho.loc[("all", "mir_exact", "retrieval_accuracy"), "n"] == 7      # 9 rows, 7 distinct projectors
    assert rho.loc[("all_rows", "mir_exact", "retrieval_accuracy"), "n"] == 9
    assert rho.loc[("a", "mir_exact", "retrieval_accuracy"), "n"] == 4         # final left out
    assert rho.loc[("b", "mir_exact", "retrieval_accuracy"), "rho"] == pytest.approx(-1)
    assert rho.loc[("b", "mir_exact", "heldout_caption_loss"), "rho"] == pytest.approx(1)
