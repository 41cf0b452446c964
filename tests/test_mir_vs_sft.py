"""mirlab.study.mir_vs_sft and experiments/mir_study.py: the configurations are the ones docs/study-plan.md fixes
(read from the plan's own text), the analysis functions give the answers computed here independently on small
hand-built tables, the measurements agree with compute_mir / compute_probes / numpy on an independent extraction,
and the driver plans and refuses SFT without its recipe -- run against a temporary data folder, never data/study/.
"""
import dataclasses
import inspect
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats

from mirlab.study import mir_vs_sft as study
from mirlab.tiny import build, pretrain

ROOT = Path(__file__).resolve().parents[1]
PLAN = (ROOT / "docs" / "study-plan.md").read_text()
PAPER_NOTES = (ROOT / "docs" / "paper-differences.md").read_text()
DRIVER = ROOT / "experiments" / "mir_study.py"
RECIPE_FIELDS = [f.name for f in dataclasses.fields(pretrain.Recipe) if f.name != "trajectory"]


# --- the plan's text, parsed -------------------------------------------------------------------------------------

def plan_table() -> pd.DataFrame:
    """The configuration table of docs/study-plan.md: number, name, axis, change, anchor."""
    lines = PLAN.split("## Pre-training configurations")[1].splitlines()
    rows = [line for line in lines if re.match(r"\|\s*\d+\s*\|", line)]
    cells = [[c.strip() for c in row.strip().strip("|").split("|")] for row in rows]
    return pd.DataFrame([{"number": int(c[0]), "name": c[1].strip("`"), "axis": c[2], "change": c[3],
                          "anchor": c[4]} for c in cells])


def plan_baseline() -> dict:
    """The baseline recipe's fields, read from the plan's bullet list."""
    text = PLAN.split("The baseline is the shipped recipe")[1].split("Each configuration")[0]
    number = r"([0-9.e-]+)"

    def find(pattern):
        return re.search(pattern, text).group(1)

    assert "- detailed captions;" in text and "- 2-layer MLP connector;" in text and "- no MoCa;" in text
    return {"lr": float(find(rf"lr {number}")), "warmup": int(find(r"(\d+) warm-up steps")),
            "batch_size": int(find(r"batch (\d+)")), "train_scenes": int(find(r"(\d+) training scenes")),
            "steps": int(find(r"one epoch \((\d+) steps\)")), "seed": int(find(r"seed (\d+)")),
            "captions": "detailed", "connector": "mlp", "moca": False}


def expected_fields(row, table) -> dict:
    """The recipe fields a configuration should have: the baseline with the change its table row names."""
    fields = dict(plan_baseline())
    change = row["change"]
    if row["axis"] == "learning rate":
        fields["lr"] = float(re.match(r"lr ([0-9.e-]+)", change).group(1))
    elif row["axis"] == "data scale":
        scenes, steps = re.match(r"(\d+) scenes, one epoch \((\d+) steps\)", change).groups()
        fields["train_scenes"], fields["steps"] = int(scenes), int(steps)
    elif row["axis"] == "caption detail":
        assert change.startswith("short captions")
        fields["captions"] = "short"
    elif row["axis"] == "connector":
        assert change.startswith("one linear layer")
        fields["connector"] = "linear"
    elif row["axis"] == "MoCa":
        fields["moca"] = True
    elif row["axis"] == "seed":
        partner, seed = re.match(r"`?([\w.-]+)`? with seed (\d+)", change).groups()
        partner = "lr2e-3" if partner == "baseline" else partner
        fields = expected_fields(table.set_index("name").loc[partner].rename(None), table)
        fields["seed"] = int(seed)
    return fields


def plan_number_list(label: str) -> list[int]:
    """Analysis 4's configuration numbers of one axis ("lr: 2, 3, 1, 4;" or "captions: 8 vs 1;")."""
    text = re.search(rf"- {label}: ([\d, vs]+?)[;.]?\n", PLAN).group(1)
    return [int(n) for n in re.findall(r"\d+", text)]


def by_number() -> dict:
    return {c.number: c for c in study.CONFIGS}


# --- configurations ------------------------------------------------------------------------------------------------

def test_configs_are_the_plans_table():
    table = plan_table()
    assert len(table) == 13 and list(table["number"]) == list(range(1, 14))
    assert [c.number for c in study.CONFIGS] == list(range(1, 14))
    names = [c.name for c in study.CONFIGS]
    assert len(set(names)) == len(names)
    for config, (_, row) in zip(study.CONFIGS, table.iterrows()):
        assert (config.number, config.name, config.axis) == (row["number"], row["name"], row["axis"])
        recipe = dataclasses.asdict(config.recipe)
        expected = expected_fields(row, table)
        assert {k: recipe[k] for k in expected} == expected, config.name
        assert recipe["weight_decay"] == 0.0  # AdamW without decay, like the shipped recipes
        assert (config.shipped is not None) == ("(shipped)" in row["change"]), config.name
        assert study.config(config.name) is config
    with pytest.raises(ValueError, match="no study configuration 'lr1'.*lr2e-3"):
        study.config("lr1")


def test_data_scale_keeps_one_epoch():
    for config in study.CONFIGS:
        recipe = config.recipe
        assert recipe.steps == int(np.ceil(recipe.train_scenes / recipe.batch_size)), config.name


def test_shipped_recipes_are_the_shipped_runs():
    """Configs 1 and 2 are the shipped runs: same recipe as data/projector/recipes.json, last step shipped."""
    import json

    shipped = {r["name"]: r for r in json.loads((build.projector_dir() / "recipes.json").read_text())["recipes"]}
    marked = [c for c in study.CONFIGS if c.shipped is not None]
    assert [c.name for c in marked] == ["lr2e-3", "lr2e-4"]
    for config in marked:
        record = dict(shipped[config.name])
        record["trajectory"] = tuple(record["trajectory"])
        assert pretrain.Recipe(**record) == config.recipe
        assert config.shipped == f"{config.name}/step-{config.recipe.steps:04d}"
        assert build.checkpoint_path(config.shipped).is_file()


def test_every_recipe_can_be_pretrained_and_resumed():
    """pretrain.run needs a valid Recipe whose trajectory ends at its last step (the driver copies that file);
    a resumed run rebuilds the recipe from its saved fields (pretrain._saved_recipe)."""
    for config in study.CONFIGS:
        recipe = config.recipe
        assert recipe.steps in recipe.trajectory and 0 in recipe.trajectory, config.name
        assert 0 <= recipe.warmup < recipe.steps
        assert pretrain.Recipe(**dataclasses.asdict(recipe)) == recipe
        assert re.fullmatch(r"[\w.-]+", recipe.name) and recipe.name != "final"


def test_seed_pairs_differ_only_in_seed():
    pairs = re.search(r"seed pairs \(([\d/, ]+)\)", PLAN).group(1)
    numbers = [tuple(int(n) for n in pair.split("/")) for pair in pairs.split(", ")]
    configs = by_number()
    assert study.SEED_PAIRS == tuple((configs[a].name, configs[b].name) for a, b in numbers)
    assert len(study.SEED_PAIRS) == 3
    for a, b in study.SEED_PAIRS:
        first, second = study.config(a).recipe, study.config(b).recipe
        assert first.seed != second.seed
        assert dataclasses.replace(first, name=second.name, seed=second.seed) == second


def test_primary_configs_axes_and_trajectory_follow_the_plan():
    primary = re.search(r"over configurations (\d+)–(\d+) \(seed-0 runs\)", PLAN).groups()
    configs = by_number()
    assert study.PRIMARY == tuple(configs[n].name for n in range(int(primary[0]), int(primary[1]) + 1))
    assert all(study.config(name).recipe.seed == 0 for name in study.PRIMARY)
    for axis, label in [("learning rate", "lr"), ("data scale", "scale")]:  # ordered lists
        assert study.AXES[axis] == tuple(configs[n].name for n in plan_number_list(label))
    for axis, label in [("caption detail", "captions"), ("connector", "connector"), ("MoCa", "MoCa")]:  # "a vs b"
        assert set(study.AXES[axis]) == {configs[n].name for n in plan_number_list(label)}
    for axis, names in study.AXES.items():  # every axis lists its own configurations and the baseline
        assert {c.name for c in study.CONFIGS if c.axis == axis} | {"lr2e-3"} == set(names)

    found = re.search(r"steps 0 \(random init\), (\d+), (\d+)\s+and (\d+)\. Step (\d+) is configuration 1", PLAN)
    steps = [0] + [int(s) for s in found.groups()[:3]]
    assert found.group(4) == found.group(3)
    assert len(steps) == 4 and steps == sorted(steps)
    assert study.TRAJECTORY == tuple(f"lr2e-3/step-{s:04d}" for s in steps[:-1])
    assert study.config("lr2e-3").shipped == f"lr2e-3/step-{steps[-1]:04d}"
    for name in study.TRAJECTORY:
        assert build.checkpoint_path(name).is_file()


def test_measurement_and_analysis_settings_follow_the_plan():
    assert study.N_EVAL == int(re.search(r"N = (\d+) held-out", PLAN).group(1))
    assert len(study.eval_pairs.__defaults__) == 2 and study.eval_pairs.__defaults__ == (study.N_EVAL, 0)
    from mirlab.pairs.samples import prose_passages
    assert len(prose_passages()) >= study.N_EVAL  # the prose side needs one distinct passage per image
    candidates = int(re.search(r"Caption-retrieval accuracy \((\d+) candidates\)", PLAN).group(1))
    assert inspect.signature(study.measure_captioning).parameters["k"].default == candidates - 1
    replicates = int(re.search(r"([\d ]+) replicates, seed", PLAN).group(1).replace(" ", ""))
    confidence = float(re.search(r"A (\d+) % percentile bootstrap", PLAN).group(1)) / 100
    for function in (study.spearman_interval, study.predictor_table):
        parameters = inspect.signature(function).parameters
        assert parameters["n_boot"].default == replicates and parameters["seed"].default == 0
    assert inspect.signature(study.spearman_interval).parameters["confidence"].default == confidence
    assert study.PREDICTORS[0] == "mir_exact_prose"  # the primary test is the first row


def test_configs_table_lists_every_recipe():
    table = study.configs_table()
    assert list(table.columns) == ["number", "config", "axis", "shipped"] + RECIPE_FIELDS
    assert len(table) == 13 and table["config"].is_unique
    for config, row in zip(study.CONFIGS, table.itertuples(index=False)):
        recipe = dataclasses.asdict(config.recipe)
        assert (row.number, row.config, row.axis, row.shipped) == (config.number, config.name, config.axis,
                                                                    config.shipped or "")
        assert all(getattr(row, k) == recipe[k] for k in RECIPE_FIELDS)


def paper_pairs(says: str) -> list[tuple[float, float]]:
    """(MIR, post-SFT average) pairs a PAPER_AXES statement quotes, in its order."""
    pairs = [(float(m), float(a)) for m, a in re.findall(r"(\d\.\d{3}) \((\d+\.\d)\)", says)]
    arrow = re.search(r"MIR (\d\.\d{3}) -> (\d\.\d{3}), average (\d+\.\d) -> (\d+\.\d)", says)
    if arrow:
        m1, m2, a1, a2 = map(float, arrow.groups())
        pairs = [(m1, a1), (m2, a2)]
    return pairs


def test_paper_axes_quote_the_plans_tables():
    anchors = plan_table().set_index("axis")["anchor"]
    for axis, (table, says) in study.PAPER_AXES.items():
        assert axis in study.AXES
        assert table in PLAN and all(anchor.startswith(table) for anchor in anchors[[axis]]), (axis, table)
        pairs = paper_pairs(says)
        assert len(pairs) >= 2 or axis == "data scale"
        # the plan's claim: in each table lower MIR goes with a higher (or equal) post-SFT average
        ordered = sorted(pairs)
        assert all(a1 >= a2 for (_, a1), (_, a2) in zip(ordered, ordered[1:])), axis
    moca = re.search(r"Paper T5: (\d\.\d+) → (\d\.\d+)", PLAN).groups()
    assert paper_pairs(study.PAPER_AXES["MoCa"][1])[0][0] == float(moca[0])
    assert paper_pairs(study.PAPER_AXES["MoCa"][1])[1][0] == float(moca[1])
    # docs/paper-differences.md: "The same nominal baseline appears as 3.182 in T2 and T4 and as 3.374 in T5-T7"
    baseline = re.search(r"appears as (\d\.\d+) in T2 and T4 and as (\d\.\d+)\s+in T5", PAPER_NOTES).groups()
    for axis in ("learning rate", "connector"):
        assert float(baseline[0]) in [m for m, _ in paper_pairs(study.PAPER_AXES[axis][1])]
    assert float(baseline[1]) == float(moca[0])


# --- spearman_interval ---------------------------------------------------------------------------------------------

def noisy_monotone(n, seed=0):
    rng = np.random.default_rng(seed)
    x = np.linspace(0, 1, n)
    return x, x + rng.normal(0, 0.3, n)


def test_spearman_rho_is_scipys_and_inside_its_interval():
    rng = np.random.default_rng(1)
    x = rng.normal(size=12).round(1)  # ties on purpose
    y = x + rng.normal(size=12)
    result = study.spearman_interval(x, y, n_boot=2000, seed=3)
    reference = stats.spearmanr(x, y)
    assert result["rho"] == pytest.approx(reference.statistic, abs=1e-12)
    assert result["p"] == pytest.approx(reference.pvalue, rel=1e-9)
    assert -1 <= result["low"] <= result["rho"] <= result["high"] <= 1
    assert result["n"] == 12 and result["n_boot_used"] <= 2000
    assert study.spearman_interval(x, -y, n_boot=10)["rho"] == pytest.approx(-reference.statistic)


def test_spearman_interval_is_seeded():
    x, y = noisy_monotone(10)
    first = study.spearman_interval(x, y, n_boot=1000, seed=5)
    assert study.spearman_interval(x, y, n_boot=1000, seed=5) == first
    other = study.spearman_interval(x, y, n_boot=1000, seed=6)
    assert other["rho"] == first["rho"] and (other["low"], other["high"]) != (first["low"], first["high"])


def test_spearman_interval_narrows_with_more_points():
    widths = []
    for n in (8, 30, 120):
        result = study.spearman_interval(*noisy_monotone(n), n_boot=1000)
        widths.append(result["high"] - result["low"])
    assert widths[0] > widths[1] > widths[2] > 0


def test_perfect_monotone_relation_gives_a_point_interval():
    x = np.arange(7.0)
    result = study.spearman_interval(x, np.exp(-x), n_boot=500)
    assert result["rho"] == pytest.approx(-1)
    assert result["low"] == pytest.approx(-1) and result["high"] == pytest.approx(-1)


def test_constant_resamples_are_dropped_and_counted():
    """x = (1, 1, 2), y = (1, 2, 3): a resample is constant in x iff it draws only points {0, 1} (8/27) or only
    point 2 (1/27); every resample constant in y is among those. So 2/3 of the replicates are used."""
    n_boot = 2700
    result = study.spearman_interval([1, 1, 2], [1, 2, 3], n_boot=n_boot, seed=0)
    sd = np.sqrt(n_boot * (2 / 3) * (1 / 3))
    assert abs(result["n_boot_used"] - n_boot * 2 / 3) < 5 * sd
    assert result["rho"] == pytest.approx(stats.spearmanr([1, 1, 2], [1, 2, 3]).statistic)
    distinct = study.spearman_interval([1, 2, 3], [1, 2, 3], n_boot=n_boot, seed=0)
    assert abs(distinct["n_boot_used"] - n_boot * 8 / 9) < 5 * np.sqrt(n_boot * (8 / 9) * (1 / 9))


def test_spearman_interval_rejects_bad_inputs_and_drops_incomplete_points():
    with pytest.raises(ValueError, match="equal length"):
        study.spearman_interval([1, 2, 3], [1, 2])
    with pytest.raises(ValueError, match="1-D"):
        study.spearman_interval(np.ones((3, 2)), np.ones((3, 2)))
    with pytest.raises(ValueError, match="needs at least 3 complete points, got 2"):
        study.spearman_interval([1, 2], [2, 1])
    with pytest.raises(ValueError, match="needs at least 3 complete points, got 2"):
        study.spearman_interval([1, 2, np.nan, 4], [1, np.nan, 3, 5])
    x, y = [1, 2, np.nan, 4, 5], [2, 1, 3, np.nan, 4]  # a NaN in either variable drops the point
    result = study.spearman_interval(x, y, n_boot=200)
    assert result["n"] == 3 and result["rho"] == pytest.approx(stats.spearmanr([1, 2, 5], [2, 1, 4]).statistic)


def test_constant_variable_and_bad_settings_give_clear_errors():
    with pytest.raises(ValueError, match="x is constant over the 4"):
        study.spearman_interval([2.0, 2.0, 2.0, 2.0], [1, 2, 3, 4], n_boot=100)
    with pytest.raises(ValueError, match="y is constant"):
        study.spearman_interval([1, 2, 3, 4], [0.5, 0.5, 0.5, 0.5], n_boot=100)
    with pytest.raises(ValueError, match="n_boot"):
        study.spearman_interval([1, 2, 3, 4], [1, 3, 2, 4], n_boot=0)
    with pytest.raises(ValueError, match="confidence"):
        study.spearman_interval([1, 2, 3, 4], [1, 3, 2, 4], confidence=95)


def test_predictor_table_names_missing_columns():
    with pytest.raises(ValueError, match="'sft_average'"):
        study.predictor_table(pd.DataFrame({"config": ["a"], "mir_exact_prose": [1.0]}))
    with pytest.raises(ValueError, match="at least one of"):
        study.predictor_table(pd.DataFrame({"config": ["a"], "sft_average": [1.0]}))


# --- predictor_table / noise_floor / axis_table ---------------------------------------------------------------------

def analysis_table() -> pd.DataFrame:
    """One row per configuration with a score that MIR predicts perfectly on the primary configs; the seed
    runs get values that would spoil every primary rank correlation if they were used."""
    names = [c.name for c in study.CONFIGS]
    score = np.linspace(0.5, 0.8, len(study.PRIMARY))
    shuffled = np.array([3, 0, 7, 1, 9, 4, 2, 8, 6, 5], dtype=np.float64)
    table = pd.DataFrame({"config": study.PRIMARY, "sft_average": score,
                          "mir_exact_prose": 5 - 2 * score,  # strictly decreasing in the score: rho = -1
                          "mir_official_fast_prose": score ** 2,  # increasing: rho = +1
                          "mir_exact_captions": shuffled,
                          "train_loss": np.r_[np.nan, 1 - score[1:]],  # one missing value
                          "retrieval_accuracy": score})
    seeds = pd.DataFrame({"config": [n for n in names if n not in study.PRIMARY], "sft_average": [0.0] * 3,
                          "mir_exact_prose": [0.0] * 3, "mir_official_fast_prose": [9.0] * 3,
                          "mir_exact_captions": [0.0] * 3, "train_loss": [9.0] * 3,
                          "retrieval_accuracy": [9.0] * 3})
    return pd.concat([table, seeds], ignore_index=True)


def test_predictor_table_on_a_known_table():
    table = analysis_table()
    result = study.predictor_table(table, n_boot=300).set_index("predictor")
    assert list(result.index) == ["mir_exact_prose", "mir_official_fast_prose", "mir_exact_captions",
                                  "train_loss", "retrieval_accuracy"]  # heldout_caption_loss: no column
    assert result.loc["mir_exact_prose", "rho"] == pytest.approx(-1)
    assert result.loc["mir_exact_prose", "high"] == pytest.approx(-1) and result.loc["mir_exact_prose", "excludes_zero"]
    assert result.loc["mir_official_fast_prose", "rho"] == pytest.approx(1)
    assert result.loc["train_loss", "rho"] == pytest.approx(-1) and result.loc["train_loss", "n"] == 9
    ranks = np.array([3, 0, 7, 1, 9, 4, 2, 8, 6, 5]) + 1.0  # no ties: rho = 1 - 6 sum d^2 / (n (n^2 - 1))
    d = ranks - np.arange(1, 11)
    by_hand = 1 - 6 * (d ** 2).sum() / (10 * 99)
    assert result.loc["mir_exact_captions", "rho"] == pytest.approx(by_hand)
    assert not result.loc["mir_exact_captions", "excludes_zero"]  # |rho| = 0.08 on 10 points
    assert (result["n"].drop("train_loss") == 10).all() and (result["configs_missing"] == "").all()

    partial = study.predictor_table(table[table["config"] != "linear"], n_boot=100)
    assert (partial["configs_missing"] == "linear").all() and (partial["n"] <= 9).all()


def test_noise_floor_gives_the_seed_differences_and_the_primary_spread():
    table = analysis_table()
    values = {"lr2e-3": (1.0, 0.50), "lr2e-3-s1": (1.25, 0.40), "short": (2.0, 0.3), "short-s1": (1.5, 0.3),
              "moca": (3.0, 0.7), "moca-s1": (3.125, 0.75)}
    for name, (mir, score) in values.items():
        table.loc[table["config"] == name, ["mir_exact_prose", "sft_average"]] = mir, score
    floor = study.noise_floor(table)
    assert list(floor["pair"]) == ["lr2e-3 / lr2e-3-s1", "short / short-s1", "moca / moca-s1",
                                   "spread over primary configs (max - min)"]
    np.testing.assert_allclose(floor["abs_diff_mir_exact_prose"][:3], [0.25, 0.5, 0.125])
    np.testing.assert_allclose(floor["abs_diff_sft_average"][:3], [0.1, 0.0, 0.05], atol=1e-12)
    primary = table[table["config"].isin(study.PRIMARY)]  # the seed runs stay out of the spread
    assert floor["abs_diff_mir_exact_prose"].iloc[3] == pytest.approx(np.ptp(primary["mir_exact_prose"]))
    assert floor["abs_diff_sft_average"].iloc[3] == pytest.approx(np.ptp(primary["sft_average"]))

    without = study.noise_floor(table[table["config"] != "moca-s1"], columns=("mir_exact_prose",))
    assert list(without.columns) == ["pair", "abs_diff_mir_exact_prose"] and len(without) == 3


def test_axis_table_lists_each_axis_in_order_with_the_paper():
    table = analysis_table()
    result = study.axis_table(table)
    assert len(result) == sum(len(names) for names in study.AXES.values())
    indexed = table.set_index("config")
    for axis, names in study.AXES.items():
        rows = result[result["axis"] == axis]
        assert list(rows["config"]) == list(names) and list(rows["position"]) == list(range(len(names)))
        np.testing.assert_array_equal(rows["mir_exact_prose"], indexed.loc[list(names), "mir_exact_prose"])
        np.testing.assert_array_equal(rows["sft_average"], indexed.loc[list(names), "sft_average"])
        assert set(rows["paper"]) == {study.PAPER_AXES[axis][0]}
        assert set(rows["paper_reports"]) == {study.PAPER_AXES[axis][1]}
    partial = study.axis_table(table[table["config"] != "lr6e-3"])
    lr = partial[partial["axis"] == "learning rate"]
    assert list(lr["config"]) == ["lr2e-4", "lr6e-4", "lr2e-3"] and list(lr["position"]) == [0, 1, 2]


# --- measurements on the embedded model (n = 4 pairs) ----------------------------------------------------------------

N_PAIRS = 4


def digest(image) -> str:
    import hashlib

    array = np.asarray(image.convert("RGB"))
    return hashlib.sha256(repr(array.shape).encode() + array.tobytes()).hexdigest()


def test_eval_pairs_share_images_and_are_sample_pairs():
    from mirlab.pairs.samples import sample_pairs

    prose_images, prose = study.eval_pairs("prose", N_PAIRS)
    caption_images, captions = study.eval_pairs("captions", N_PAIRS)
    assert len(prose) == len(captions) == N_PAIRS and len(set(prose)) == N_PAIRS
    # the same images on both sides (MIR pools the rows, so their order does not matter; it differs: the prose
    # side draws its passages from the same generator before the final shuffle)
    assert sorted(map(digest, prose_images)) == sorted(map(digest, caption_images))
    reference = sample_pairs(N_PAIRS, seed=0, text="captions")
    assert captions == [text for _, text in reference] and set(prose).isdisjoint(captions)


@pytest.fixture(scope="module")
def measured(embedded_cache):
    """measure_mir and measure_probes of the shipped final projector on 4 pairs, and an independent
    extraction of the same pairs per text side."""
    from mirlab.lvlm.extract import extract_hidden_states

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model, processor = build.embedded_model("final", cache_dir=embedded_cache)
        mir_row, mir_layers = study.measure_mir(model, processor, n=N_PAIRS)
        probe_row, probe_layers = study.measure_probes(model, processor, n=N_PAIRS)
        states = {text: extract_hidden_states(model, processor, *study.eval_pairs(text, N_PAIRS), progress=False)
                  for text in study.TEXT_SIDES}
        yield {"model": model, "processor": processor, "mir_row": mir_row, "mir_layers": mir_layers,
               "probe_row": probe_row, "probe_layers": probe_layers, "states": states}
    finally:
        torch.set_num_threads(threads)


def test_measure_mir_columns_are_present_and_finite(measured):
    row, layers = measured["mir_row"], measured["mir_layers"]
    assert set(row) == {f"mir_{m}_{t}" for m in ("exact", "official_fast") for t in study.TEXT_SIDES}
    assert all(np.isfinite(v) for v in row.values())
    assert list(layers.columns) == ["layer", "text", "image_norm", "text_norm", "norm_ratio", "fd_exact",
                                    "fd_official_fast"]
    n_layers = measured["model"].config.text_config.num_hidden_layers
    for text in study.TEXT_SIDES:
        assert list(layers.loc[layers["text"] == text, "layer"]) == list(range(1, n_layers + 1))
    assert np.isfinite(layers.drop(columns="text").to_numpy(dtype=np.float64)).all()
    assert (layers[["image_norm", "text_norm", "fd_exact"]] > 0).all().all()


def test_measure_mir_is_compute_mir_on_the_same_pairs(measured):
    from mirlab.metrics.mir import compute_mir

    layers = measured["mir_layers"]
    for text, states in measured["states"].items():
        exact = compute_mir(states, method="exact")
        assert measured["mir_row"][f"mir_exact_{text}"] == pytest.approx(exact.mir, rel=1e-10)
        np.testing.assert_allclose(layers.loc[layers["text"] == text, "fd_exact"], exact.per_layer["fd"], rtol=1e-10)
    fast = compute_mir(measured["states"]["captions"], method="official-fast")  # one side: 3 s of float32 sqrtm
    assert measured["mir_row"]["mir_official_fast_captions"] == pytest.approx(fast.mir, rel=1e-6)
    np.testing.assert_allclose(layers.loc[layers["text"] == "captions", "fd_official_fast"], fast.per_layer["fd"],
                               rtol=1e-5)


def test_norm_ratio_per_layer_is_the_float64_ratio_of_mean_norms(measured):
    layers = measured["mir_layers"]
    for text, states in measured["states"].items():
        side = layers[layers["text"] == text].set_index("layer")
        for layer, image, text_rows in states:
            image_norm = np.linalg.norm(image.numpy().astype(np.float64), axis=1).mean()
            text_norm = np.linalg.norm(text_rows.numpy().astype(np.float64), axis=1).mean()
            assert side.at[layer, "image_norm"] == pytest.approx(image_norm, rel=1e-12)
            assert side.at[layer, "text_norm"] == pytest.approx(text_norm, rel=1e-12)
            assert side.at[layer, "norm_ratio"] == pytest.approx(image_norm / text_norm, rel=1e-12)


def test_measure_probes_is_compute_probes_on_the_same_rows(measured):
    from mirlab.metrics.probes import compute_probes

    states = measured["states"]["captions"]
    reference = compute_probes(states, pairs_info=states.samples)
    pd.testing.assert_frame_equal(measured["probe_layers"], reference, rtol=1e-10)
    row, layers = measured["probe_row"], measured["probe_layers"]
    assert set(row) == ({"norm_ratio_layer1", "visual_dependence", "visual_dependence_sem"}
                        | {f"{c}_mean" for c in study.PROBE_SUMMARY_COLUMNS})
    assert all(np.isfinite(v) for v in row.values())
    for column in study.PROBE_SUMMARY_COLUMNS:
        assert row[f"{column}_mean"] == pytest.approx(layers[column].to_numpy(np.float64).mean(), rel=1e-12)
    # the layer-1 norm ratio is the one measure_mir reports for the captions side
    mir_layers = measured["mir_layers"]
    first = mir_layers[(mir_layers["text"] == "captions") & (mir_layers["layer"] == 1)]["norm_ratio"].item()
    assert row["norm_ratio_layer1"] == pytest.approx(first, rel=1e-12)


def test_measure_probes_visual_dependence_is_mean_and_standard_error(measured):
    from mirlab.lvlm.probes import visual_dependence

    images, texts = study.eval_pairs("captions", N_PAIRS)
    gaps = visual_dependence(measured["model"], measured["processor"], images, texts,
                             progress=False)["visual_dependence"].to_numpy(np.float64)
    row = measured["probe_row"]
    assert row["visual_dependence"] == pytest.approx(gaps.mean(), rel=1e-9, abs=1e-9)
    assert row["visual_dependence_sem"] == pytest.approx(gaps.std(ddof=1) / np.sqrt(N_PAIRS), rel=1e-9)


# --- the driver, as a subprocess on a temporary data folder -----------------------------------------------------------

@pytest.fixture
def data_dir(tmp_path):
    """A data folder with the shipped read-only pieces linked in and an empty study/: the real data/study/ is
    in use by a running study and must never be written by a test."""
    data = tmp_path / "data"
    data.mkdir()
    for name in ("projector", "captions", "prose"):
        (data / name).symlink_to(ROOT / "data" / name, target_is_directory=True)
    (data / "study").mkdir()
    return data


def run_driver(data: Path, *args) -> subprocess.CompletedProcess:
    env = {**os.environ, "MIRLAB_DATA_DIR": str(data), "MIRLAB_CACHE_DIR": str(data.parent / "cache"),
           "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(DRIVER), *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)


def test_driver_plan_lists_every_start_and_stage(data_dir):
    study_dir = data_dir / "study"
    (study_dir / "checkpoints").mkdir()
    (study_dir / "checkpoints" / "lr6e-4.safetensors").write_bytes(b"")  # pre-trained
    pd.DataFrame({"start": ["lr6e-4", "lr2e-4"]}).to_csv(study_dir / "pretrained.csv", index=False)  # measured
    before = sorted(p.relative_to(data_dir) for p in study_dir.rglob("*"))

    done = run_driver(data_dir, "--plan")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    stages = ["pretrain", "measure", "probes", "sft", "benchmark"]
    assert lines[0].split() == ["start"] + stages
    plan = {line.split()[0]: line.split()[1:] for line in lines[1:]}
    assert list(plan) == [c.name for c in study.CONFIGS] + list(study.TRAJECTORY)
    for start, flags in plan.items():
        shipped = start in study.TRAJECTORY or study.config(start).shipped is not None
        expected = [shipped or start == "lr6e-4", start in ("lr6e-4", "lr2e-4"), False, False, False]
        assert flags == [str(flag) for flag in expected], start
    assert sorted(p.relative_to(data_dir) for p in study_dir.rglob("*")) == before  # --plan writes nothing


def test_driver_refuses_sft_without_the_recipe_file(data_dir):
    done = run_driver(data_dir, "--stages", "sft")
    assert done.returncode != 0
    assert str(data_dir / "study" / "sft_recipe.json") in done.stderr + done.stdout
    assert list((data_dir / "study").iterdir()) == []  # refused before writing anything


def test_benchmark_script_refuses_sft_models_without_the_recipe_file(data_dir):
    env = {**os.environ, "MIRLAB_DATA_DIR": str(data_dir), "MIRLAB_CACHE_DIR": str(data_dir.parent / "cache"),
           "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, str(ROOT / "experiments" / "benchmark_sft.py"), "--only", "SFT from final"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert str(data_dir / "study" / "sft_recipe.json") in done.stderr + done.stdout
    assert not (data_dir / "sft").exists()


def _search_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("sft_recipe_search",
                                                  ROOT / "experiments" / "sft_recipe_search.py")
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(ROOT / "experiments"))
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(ROOT / "experiments"))
    return module


def test_recipe_search_picks_the_best_val_average_and_breaks_ties_towards_the_cheaper_candidate():
    search = _search_module()
    names = list(search.CANDIDATES)

    def table(averages):
        return pd.DataFrame({"candidate": names, "kind": "average", "accuracy": averages})

    assert search.select(table([0.40, 0.47, 0.49])) == names[2]
    assert search.select(table([0.40, 0.486, 0.49])) == names[1]  # within the tie margin of the best: cheaper wins
    assert search.select(table([0.49, 0.49, 0.49])) == names[0]
    with pytest.raises(SystemExit, match="not scored yet"):
        search.select(table([0.4, 0.5, 0.6]).iloc[:2])


def test_parallel_drivers_lose_no_table_rows(data_dir):
    """Two drivers with disjoint --only lists update the same tables: the lock keeps every row of every writer,
    and concurrent whole-table writes never collide on a shared temporary file."""
    writer = (
        "import importlib.util, sys, pandas as pd\n"
        f"spec = importlib.util.spec_from_file_location('mir_study', {str(DRIVER)!r})\n"
        "driver = importlib.util.module_from_spec(spec); spec.loader.exec_module(driver)\n"
        "tag = sys.argv[1]\n"
        "for i in range(25):\n"
        "    name = f'{tag}-{i}'\n"
        "    driver.append_rows(driver.OUT / 'pretrained.csv', pd.DataFrame([{'start': name, 'mir': i}]), 'start', name)\n"
        "    driver.record_time('measure', name, 1.0, 1.0, 1)\n"
        "    driver.write_csv(pd.DataFrame([{'writer': tag, 'i': i}]), driver.OUT / 'configs.csv')\n"
    )
    env = {**os.environ, "MIRLAB_DATA_DIR": str(data_dir), "MIRLAB_CACHE_DIR": str(data_dir.parent / "cache"),
           "OMP_NUM_THREADS": "1"}
    writers = [subprocess.Popen([sys.executable, "-c", writer, tag], cwd=ROOT, env=env, stderr=subprocess.PIPE,
                                text=True) for tag in "abcd"]
    for process in writers:
        assert process.wait(timeout=120) == 0, process.stderr.read()
    expected = {f"{tag}-{i}" for tag in "abcd" for i in range(25)}
    assert set(pd.read_csv(data_dir / "study" / "pretrained.csv")["start"]) == expected
    times = pd.read_csv(data_dir / "study" / "cpu_time.csv")
    assert len(times) == 100 and set(times["start"]) == expected
    # write_csv itself (configs.csv is rewritten by every driver at start-up) never collides on its temporary file
    assert len(pd.read_csv(data_dir / "study" / "configs.csv")) == 1


CLOCKED = (
    "import importlib.util, sys, time\n"
    f"spec = importlib.util.spec_from_file_location('mir_study', {str(DRIVER)!r})\n"
    "driver = importlib.util.module_from_spec(spec); spec.loader.exec_module(driver)\n"
    "with driver.stage_clock('sft', 'lr2e-3', 1, every=0.1):\n"
    "    end = time.process_time() + float(sys.argv[1])\n"
    "    while time.process_time() < end:\n"
    "        pass\n"
    "    print('busy done', flush=True)\n"
    "    time.sleep(float(sys.argv[2]))\n"
)


def _clocked(data_dir: Path, busy: float, idle: float) -> subprocess.Popen:
    env = {**os.environ, "MIRLAB_DATA_DIR": str(data_dir), "MIRLAB_CACHE_DIR": str(data_dir.parent / "cache"),
           "OMP_NUM_THREADS": "1"}
    # SIGINT at its default disposition even where the test runner's shell ignores it (nohup ... &)
    return subprocess.Popen([sys.executable, "-c", CLOCKED, str(busy), str(idle)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def test_stage_clock_records_a_finished_stage_once(data_dir):
    process = _clocked(data_dir, busy=0.6, idle=0.3)
    assert process.wait(timeout=120) == 0, process.stderr.read()
    times = pd.read_csv(data_dir / "study" / "cpu_time.csv")
    assert len(times) == 1, times  # the heartbeats rewrote one row, they did not add rows
    row = times.iloc[0]
    assert (row.stage, row.start, row.status, row.threads) == ("sft", "lr2e-3", "done", 1)
    assert 0.6 <= row.cpu_s < 5 and row.wall_s >= 0.9


def test_stage_clock_leaves_the_cpu_time_of_a_killed_process(data_dir):
    """SIGKILL runs no Python code: what is left is the last heartbeat, at most `every` seconds old."""
    process = _clocked(data_dir, busy=0.8, idle=60)
    assert process.stdout.readline().strip() == "busy done"
    time.sleep(0.5)  # a few heartbeats after the busy part
    process.kill()
    process.wait(timeout=30)
    times = pd.read_csv(data_dir / "study" / "cpu_time.csv")
    assert len(times) == 1, times
    row = times.iloc[0]
    assert row.status == "stopped" and row.cpu_s >= 0.8 and row.wall_s >= 0.8


def test_stage_clock_marks_an_interrupted_stage_stopped(data_dir):
    process = _clocked(data_dir, busy=0.3, idle=60)
    assert process.stdout.readline().strip() == "busy done"
    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=30) != 0
    assert "KeyboardInterrupt" in process.stderr.read()
    times = pd.read_csv(data_dir / "study" / "cpu_time.csv")
    assert list(times.status) == ["stopped"] and times.cpu_s.iloc[0] >= 0.3
