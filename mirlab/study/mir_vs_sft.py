"""Does MIR after pre-training predict the instruction-tuned model? The study's configurations, measures and analysis.

The plan (configurations, measures, the primary test) was fixed in docs/study-plan.md before any study run;
this module is that plan as code, plus the measurements and the pre-registered analysis:

    CONFIGS                  the 13 pre-training configurations (10 + 3 second seeds), each a pretrain.Recipe
    TRAJECTORY               the lr2e-3 checkpoints SFT also starts from (the paper's Fig. 4)
    eval_pairs(text)         the fixed MIR evaluation set: 100 held-out images with prose or their captions
    measure_pretrained(...)  MIR exact + official-fast on both text sides, per-layer norm ratio, retrieval, losses
    measure_probes(...)      the row probes per layer and the visual dependence (secondary, docs/study-plan.md)
    spearman_interval(x, y)  Spearman rho with a percentile bootstrap interval over configurations
    predictor_table(...)     the primary test and the competing predictors (plan, "Analysis" 1-2)
    noise_floor(...)         between-seed differences of the seed pairs (plan, "Analysis" 3)
    axis_table(...)          per-axis directions next to the paper's table (plan, "Analysis" 4)

`experiments/mir_study.py` runs everything resumably and writes the tables under data/study/; notebook 07 reads
them. The paper's numbers quoted in PAPER_AXES are the ones docs/study-plan.md cites (Tables 1, 2, 4, 5).
"""
from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
from scipy import stats

from mirlab.study.probes_vs_mir import complete_points
from mirlab.tiny.pretrain import Recipe

BASE = dict(lr=2e-3, steps=250, batch_size=8, warmup=15, train_scenes=2000, seed=0)


def _recipe(name: str, **changes) -> Recipe:
    """The baseline recipe with `changes`; a data-scale change keeps one epoch (steps = scenes / batch)."""
    fields = {**BASE, **changes}
    if "train_scenes" in changes:
        fields["steps"] = -(-fields["train_scenes"] // fields["batch_size"])
    return Recipe(name=name, **fields)


@dataclasses.dataclass(frozen=True)
class Config:
    """One pre-training configuration of the study: its recipe, the axis it varies and, if it is one of the
    two shipped recipes, the shipped checkpoint name of its last step (None: trained by the study)."""
    number: int
    axis: str
    recipe: Recipe
    shipped: str | None = None

    @property
    def name(self) -> str:
        return self.recipe.name


CONFIGS = (
    Config(1, "baseline", _recipe("lr2e-3"), shipped="lr2e-3/step-0250"),
    Config(2, "learning rate", _recipe("lr2e-4", lr=2e-4), shipped="lr2e-4/step-0250"),
    Config(3, "learning rate", _recipe("lr6e-4", lr=6e-4)),
    Config(4, "learning rate", _recipe("lr6e-3", lr=6e-3)),
    Config(5, "data scale", _recipe("scale500", train_scenes=500)),
    Config(6, "data scale", _recipe("scale1000", train_scenes=1000)),
    Config(7, "data scale", _recipe("scale4000", train_scenes=4000)),
    Config(8, "caption detail", _recipe("short", captions="short")),
    Config(9, "connector", _recipe("linear", connector="linear")),
    Config(10, "MoCa", _recipe("moca", moca=True)),
    Config(11, "seed", _recipe("lr2e-3-s1", seed=1)),
    Config(12, "seed", _recipe("short-s1", captions="short", seed=1)),
    Config(13, "seed", _recipe("moca-s1", moca=True, seed=1)),
)
PRIMARY = tuple(c.name for c in CONFIGS if c.number <= 10)  # the primary test's points (seed-0 runs)
SEED_PAIRS = (("lr2e-3", "lr2e-3-s1"), ("short", "short-s1"), ("moca", "moca-s1"))
TRAJECTORY = ("lr2e-3/step-0000", "lr2e-3/step-0020", "lr2e-3/step-0082")  # + config 1's final (step 250)
AXES = {  # plan, "Analysis" 4: the configurations of each axis in the order the paper's table reads
    "learning rate": ("lr2e-4", "lr6e-4", "lr2e-3", "lr6e-3"),
    "data scale": ("scale500", "scale1000", "lr2e-3", "scale4000"),
    "caption detail": ("short", "lr2e-3"),
    "connector": ("linear", "lr2e-3"),
    "MoCa": ("lr2e-3", "moca"),
}
PAPER_AXES = {  # (table, what the paper reports along the axis, in its words/numbers; docs/study-plan.md)
    "learning rate": ("T2", "lr 3e-3 MIR 3.575 (avg 58.7), 1e-3 3.182 (59.5), 5e-4 2.990 (60.0), 3e-4 2.808 (60.0)"),
    "data scale": ("Figs. 1, 6", "100K -> 1.8M pre-training data: MIR falls, post-SFT score rises"),
    "caption detail": ("T1", "short -> detailed captions: MIR 3.588 -> 3.218, average 63.8 -> 64.4"),
    "connector": ("T4", "Q-Former 3.673 (53.7) vs 2-layer MLP 3.182 (63.9)"),
    "MoCa": ("T5", "LLaVA-1.5 without -> with MoCa: MIR 3.374 -> 3.162, average 59.1 -> 60.6"),
}
N_EVAL = 100
EVAL_SEED = 0
TEXT_SIDES = ("prose", "captions")


def config(name: str) -> Config:
    """The configuration called `name` (a clear error listing the names otherwise)."""
    for c in CONFIGS:
        if c.name == name:
            return c
    raise ValueError(f"no study configuration {name!r}; known: {[c.name for c in CONFIGS]}")


def configs_table() -> pd.DataFrame:
    """The pre-registered configurations as a table (number, name, axis, shipped, recipe fields)."""
    rows = []
    for c in CONFIGS:
        recipe = dataclasses.asdict(c.recipe)
        recipe.pop("trajectory")
        rows.append({"number": c.number, "config": c.name, "axis": c.axis, "shipped": c.shipped or "", **recipe})
    return pd.DataFrame(rows)


# --- measurements after pre-training ------------------------------------------------------------------------

def eval_pairs(text: str, n: int = N_EVAL, seed: int = EVAL_SEED):
    """(images, texts) of the fixed MIR evaluation set: `sample_pairs(n, seed, text)` -- the 15 bundled photos
    and held-out test-split scenes; text="prose" pairs each image with an unrelated passage (the paper's
    default), text="captions" with its own caption. Both sides hold the same images (in a different order)."""
    from mirlab.pairs.samples import sample_pairs

    pairs = sample_pairs(n, seed=seed, text=text)
    return [image for image, _ in pairs], [caption for _, caption in pairs]


def norm_ratio_per_layer(states) -> pd.DataFrame:
    """Per layer: mean image-row norm / mean text-row norm of the raw hidden states (float64 norms)."""
    import torch

    rows = []
    for layer, image, text in states:
        image_norm = torch.linalg.vector_norm(image.double(), dim=1).mean().item()
        text_norm = torch.linalg.vector_norm(text.double(), dim=1).mean().item()
        rows.append({"layer": int(layer), "image_norm": image_norm, "text_norm": text_norm,
                     "norm_ratio": image_norm / text_norm})
    return pd.DataFrame(rows)


def measure_mir(model, processor, batch_size: int = 8, progress: bool = False, n: int = N_EVAL):
    """MIR exact and official-fast on both text sides of the evaluation set (one extraction per side).

    Returns (row: {mir_exact_prose, mir_official_fast_prose, mir_exact_captions, ...}, per-layer table:
    layer, text, fd_exact, fd_official_fast, norm_ratio, image_norm, text_norm)."""
    from mirlab.lvlm.extract import extract_hidden_states
    from mirlab.metrics.mir import compute_mir

    row, tables = {}, []
    for text in TEXT_SIDES:
        images, texts = eval_pairs(text, n)
        states = extract_hidden_states(model, processor, images, texts, batch_size=batch_size, progress=progress)
        exact = compute_mir(states, method="exact")
        fast = compute_mir(states, method="official-fast")
        row[f"mir_exact_{text}"] = exact.mir
        row[f"mir_official_fast_{text}"] = fast.mir
        layers = norm_ratio_per_layer(states)
        layers["fd_exact"] = exact.per_layer["fd"].to_numpy()
        layers["fd_official_fast"] = fast.per_layer["fd"].to_numpy()
        layers.insert(1, "text", text)
        tables.append(layers)
        del states
    return row, pd.concat(tables, ignore_index=True)


def measure_captioning(model, processor, n_scenes: int = 100, seed: int = 0, k: int = 3) -> dict:
    """Retrieval accuracy (true caption vs k one-word distractors) and held-out caption loss on 100 test scenes
    (the detailed captions, whatever the configuration was trained on), as experiments/evaluate_embedded.py."""
    from mirlab.tiny import evaluate, pretrain

    features, _, metadata = pretrain.scene_features(model, processor, n_scenes, seed=seed, split="test")
    summary = evaluate.retrieval_summary(evaluate.caption_retrieval(model, processor, features, metadata, k=k,
                                                                    seed=seed), k=k)
    return {"retrieval_accuracy": summary["retrieval_accuracy"],
            "heldout_caption_loss": summary["heldout_caption_loss"]}


def measure_probes(model, processor, batch_size: int = 8, progress: bool = False, n: int = N_EVAL):
    """The probes beside MIR on the captions side of the evaluation set (pairs, so the alignment probes exist).

    One extraction: every row probe per layer (`metrics.probes.compute_probes`: norm ratio, modality gap and
    mean cosine, effective rank / participation ratio, CKA and mutual kNN with their shuffled baselines); then
    the visual dependence per pair (`lvlm.probes.visual_dependence`, blank image; two more forward passes).
    Returns (row: per-start summary -- layer means of the probes, layer-1 norm ratio, visual dependence mean and
    standard error in nats --, per-layer table: layer and the probe columns)."""
    from mirlab.lvlm.extract import extract_hidden_states
    from mirlab.lvlm.probes import visual_dependence, visual_dependence_summary
    from mirlab.metrics.probes import compute_probes

    images, texts = eval_pairs("captions", n)
    states = extract_hidden_states(model, processor, images, texts, batch_size=batch_size, progress=progress)
    layers = compute_probes(states, pairs_info=states.samples)
    del states
    dependence = visual_dependence_summary(visual_dependence(model, processor, images, texts,
                                                             batch_size=batch_size, progress=progress))
    row = {"norm_ratio_layer1": float(layers.loc[layers["layer"] == 1, "norm_ratio"].iloc[0])}
    for column in PROBE_SUMMARY_COLUMNS:
        row[f"{column}_mean"] = float(layers[column].mean())
    row["visual_dependence"] = dependence["mean"]
    row["visual_dependence_sem"] = dependence["sem"]
    return row, layers


PROBE_SUMMARY_COLUMNS = ("norm_ratio", "modality_gap", "mean_cosine", "image_effective_rank",
                         "text_effective_rank", "cka", "cka_shuffled", "mutual_knn", "mutual_knn_shuffled")


# --- the landed tables ---------------------------------------------------------------------------------------

RESULT_FILES = {"pretrained": "pretrained.csv", "probes": "probes.csv", "benchmark": "benchmark.csv",
                "per_layer": "mir_per_layer.csv", "probes_per_layer": "probes_per_layer.csv",
                "cpu_time": "cpu_time.csv", "sft_recipe_search": "sft_recipe_search.csv"}


def results_dir():
    """data/study/ under the data folder (`paths.data_dir()`): where experiments/mir_study.py writes."""
    from mirlab import paths

    return paths.data_dir() / "study"


def read_result(name: str, folder=None) -> pd.DataFrame:
    """One landed table of the study (RESULT_FILES), empty if it has not landed yet."""
    from pathlib import Path

    if name not in RESULT_FILES:
        raise ValueError(f"name must be one of {tuple(RESULT_FILES)}, got {name!r}")
    path = Path(folder if folder is not None else results_dir()) / RESULT_FILES[name]
    return pd.read_csv(path) if path.is_file() else pd.DataFrame()


def starts_table() -> pd.DataFrame:
    """Every SFT start of the plan in run order: the 13 configurations (start = config name), then the
    trajectory checkpoints of config 1 (axis "trajectory", step from the name; config 1 itself is step 250)."""
    rows = [{"start": c.name, "config": c.name, "number": c.number, "axis": c.axis,
             "step": c.recipe.steps if c.name == "lr2e-3" else None} for c in CONFIGS]
    for name in TRAJECTORY:
        rows.append({"start": name, "config": "lr2e-3", "number": 1, "axis": "trajectory",
                     "step": int(name.rpartition("step-")[2])})
    return pd.DataFrame(rows)


def macro_standard_error(per_kind: pd.DataFrame) -> float:
    """Standard error of a macro average of K per-kind accuracies p_k on n_k questions each:
    sqrt(sum_k p_k (1 - p_k) / n_k) / K (binomial, kinds independent)."""
    p, n = per_kind["accuracy"].to_numpy(float), per_kind["n"].to_numpy(float)
    return float(np.sqrt(np.sum(p * (1 - p) / n)) / len(p))


def load_results(folder=None) -> pd.DataFrame:
    """One row per start (`starts_table`) with every measure that has landed, NaN where not yet:

    pretrained.csv   mir_exact_prose, mir_official_fast_prose, mir_exact_captions, ..., train_loss,
                     retrieval_accuracy, heldout_caption_loss
    probes.csv       norm_ratio_layer1, <probe>_mean, visual_dependence (secondary)
    benchmark.csv    sft_average (macro accuracy over kinds, the post-SFT score), sft_average_se
                     (`macro_standard_error`), sft_blank (blank-image accuracy), sft_visual_gain, and
                     sft_<kind> per question kind
    """
    out = starts_table()
    pretrained = read_result("pretrained", folder)
    if len(pretrained):
        out = out.merge(pretrained.drop(columns=["config", "axis"], errors="ignore"), on="start", how="left")
    probes = read_result("probes", folder)
    if len(probes):
        out = out.merge(probes, on="start", how="left")
    bench = read_result("benchmark", folder)
    if len(bench):
        rows = []
        for start, part in bench.groupby("start", sort=False):
            kinds = part[part["kind"] != "average"]
            average = part[part["kind"] == "average"].iloc[0]
            rows.append({"start": start, "sft_average": float(average["accuracy"]),
                         "sft_average_se": macro_standard_error(kinds),
                         "sft_blank": float(average["blank_accuracy"]),
                         "sft_visual_gain": float(average["visual_gain_blank"]),
                         **{f"sft_{k}": float(a) for k, a in zip(kinds["kind"], kinds["accuracy"])}})
        out = out.merge(pd.DataFrame(rows), on="start", how="left")
    return out


# --- the pre-registered analysis ----------------------------------------------------------------------------

def spearman_interval(x, y, n_boot: int = 10_000, seed: int = 0, confidence: float = 0.95) -> dict:
    """Spearman rho of (x, y) with a percentile bootstrap interval from resampling the points (configurations).

    Points where x or y is NaN are left out (n counts the complete points). Replicates where either resampled
    variable is constant (rho undefined) are dropped and counted. A constant x or y is an error.
    Returns {rho, low, high, n, n_boot_used, p} (p: scipy's two-sided test, for reference only)."""
    x, y = complete_points(x, y)
    n = len(x)
    for name, values in (("x", x), ("y", y)):
        if np.ptp(values) == 0:
            raise ValueError(f"{name} is constant over the {n} complete points: rho is undefined")
    if n_boot < 1 or not 0 < confidence < 1:
        raise ValueError(f"need n_boot >= 1 and 0 < confidence < 1, got {n_boot} and {confidence}")
    result = stats.spearmanr(x, y)
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, n, size=(n_boot, n))
    replicates = []
    for index in draws:
        xs, ys = x[index], y[index]
        if np.ptp(xs) == 0 or np.ptp(ys) == 0:
            continue
        replicates.append(stats.spearmanr(xs, ys).statistic)
    replicates = np.asarray(replicates)
    if len(replicates) == 0:
        raise ValueError(f"all {n_boot} bootstrap replicates were constant in x or y: no interval")
    low, high = np.quantile(replicates, [(1 - confidence) / 2, (1 + confidence) / 2])
    return {"rho": float(result.statistic), "low": float(low), "high": float(high), "n": n,
            "n_boot_used": int(len(replicates)), "p": float(result.pvalue)}


PREDICTORS = ("mir_exact_prose", "mir_official_fast_prose", "mir_exact_captions", "train_loss",
              "heldout_caption_loss", "retrieval_accuracy")


def predictor_table(table: pd.DataFrame, score: str = "sft_average", configs=PRIMARY, n_boot: int = 10_000,
                    seed: int = 0) -> pd.DataFrame:
    """Spearman rho (95 % bootstrap interval) of each predictor with the post-SFT score over `configs`.

    table: one row per configuration (column "config"), with the predictor columns and `score`. The primary
    test is the first row (MIR exact on prose): "reproduces in miniature" iff rho < 0 and high < 0."""
    absent = [c for c in ("config", score) if c not in table]
    if absent or not any(p in table for p in PREDICTORS):
        raise ValueError(f"predictor_table needs the columns 'config', {score!r} and at least one of {PREDICTORS}; "
                         f"the table has {list(table.columns)}")
    rows = table[table["config"].isin(configs)]
    missing = sorted(set(configs) - set(rows["config"]))
    out = []
    for predictor in PREDICTORS:
        if predictor not in rows:
            continue
        result = spearman_interval(rows[predictor], rows[score], n_boot=n_boot, seed=seed)
        out.append({"predictor": predictor, **result, "configs_missing": ", ".join(missing)})
    frame = pd.DataFrame(out)
    frame["excludes_zero"] = (frame["high"] < 0) | (frame["low"] > 0)
    return frame


def noise_floor(table: pd.DataFrame, columns=("mir_exact_prose", "sft_average"), pairs=SEED_PAIRS) -> pd.DataFrame:
    """|difference| between the two seeds of each seed pair, per column, next to the spread (max - min) of the
    same column over the primary configurations."""
    indexed = table.set_index("config")
    rows = []
    for a, b in pairs:
        if a in indexed.index and b in indexed.index:
            rows.append({"pair": f"{a} / {b}",
                         **{f"abs_diff_{c}": abs(float(indexed.at[a, c]) - float(indexed.at[b, c])) for c in columns}})
    primary = indexed.loc[[c for c in PRIMARY if c in indexed.index]]
    rows.append({"pair": "spread over primary configs (max - min)",
                 **{f"abs_diff_{c}": float(primary[c].max() - primary[c].min()) for c in columns}})
    return pd.DataFrame(rows)


def axis_table(table: pd.DataFrame, mir: str = "mir_exact_prose", score: str = "sft_average") -> pd.DataFrame:
    """Per axis, its configurations in order with MIR and the post-SFT score, and the paper's statement."""
    indexed = table.set_index("config")
    rows = []
    for axis, names in AXES.items():
        paper_table, paper_says = PAPER_AXES[axis]
        for position, name in enumerate(names):
            if name not in indexed.index:
                continue
            rows.append({"axis": axis, "position": position, "config": name, mir: float(indexed.at[name, mir]),
                         score: float(indexed.at[name, score]), "paper": paper_table, "paper_reports": paper_says})
    return pd.DataFrame(rows)
