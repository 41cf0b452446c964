"""mirlab.study.probes_vs_mir: summaries of a per-layer table, exact permutation Spearman, the post-SFT join."""
import itertools
import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from mirlab.study import probes_vs_mir as pvm


def per_layer_table():
    """Two checkpoints x three layers with hand-picked values."""
    return pd.DataFrame({
        "checkpoint": ["a"] * 3 + ["b"] * 3,
        "layer": [1, 2, 3] * 2,
        "fd": [6.0, 3.0, 1.0, 50.0, 30.0, 20.0],
        "norm_ratio": [2.0, 1.0, 0.5, 40.0, 4.0, 1.0],
        "cka": [0.1, 0.2, 0.3, 0.4, 0.5, 0.6],
        "mutual_knn_chance": [0.25] * 6,
    })


def test_summarize_gives_mir_layer_means_and_the_first_layer_ratio():
    summary = pvm.summarize(per_layer_table()).set_index("checkpoint")
    assert summary.loc["a", "mir"] == pytest.approx(1.0)  # log10(6 + 3 + 1)
    assert summary.loc["b", "mir"] == pytest.approx(2.0)  # log10(100)
    assert summary.loc["b", "norm_ratio_mean"] == pytest.approx(15.0)
    assert summary.loc["b", "norm_ratio_layer1"] == 40.0 and summary.loc["a", "norm_ratio_layer1"] == 2.0
    assert summary.loc["a", "cka_mean"] == pytest.approx(0.2)
    assert summary.loc["a", "mutual_knn_chance"] == 0.25 and list(summary["n_layers"]) == [3, 3]
    assert "modality_gap_mean" not in summary  # only the probes the table has
    with pytest.raises(ValueError, match="lacks columns"):
        pvm.summarize(per_layer_table().drop(columns="fd"))
    with pytest.raises(ValueError, match="layer appears twice"):
        pvm.summarize(pd.concat([per_layer_table(), per_layer_table().iloc[:1]]))


def brute_force_p(x, y):
    """|rho| of every re-pairing of y, against the observed one (an independent loop over scipy's spearmanr)."""
    observed = abs(stats.spearmanr(x, y).statistic)
    values = [abs(stats.spearmanr(x, np.asarray(y)[list(order)]).statistic)
              for order in itertools.permutations(range(len(y)))]
    return np.mean(np.asarray(values) >= observed - 1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_spearman_permutation_is_exact_for_few_points(seed):
    rng = np.random.default_rng(seed)
    x, y = rng.standard_normal(5), rng.standard_normal(5)
    result = pvm.spearman_permutation(x, y)
    assert result["rho"] == pytest.approx(stats.spearmanr(x, y).statistic, abs=1e-12)
    assert result["p"] == pytest.approx(brute_force_p(x, y), abs=1e-12) and result["exact"] and result["n"] == 5
    # scipy's own exact pairings test (two-sided: twice the smaller tail; the null is symmetric, so the same)
    def rank_correlation(a, b, axis):  # Spearman rho along `axis`, vectorised over scipy's batches of pairings
        ra, rb = stats.rankdata(a, axis=axis), stats.rankdata(b, axis=axis)
        ra, rb = ra - ra.mean(axis=axis, keepdims=True), rb - rb.mean(axis=axis, keepdims=True)
        return (ra * rb).sum(axis=axis) / np.sqrt((ra ** 2).sum(axis=axis) * (rb ** 2).sum(axis=axis))

    scipy_p = stats.permutation_test((x, y), rank_correlation, vectorized=True, permutation_type="pairings",
                                     n_resamples=np.inf).pvalue
    assert result["p"] == pytest.approx(scipy_p, abs=1e-12)


def test_a_perfect_rank_agreement_of_five_points_has_p_two_in_120():
    result = pvm.spearman_permutation([1, 2, 3, 4, 5], [10, 20, 25, 80, 81])
    assert result["rho"] == pytest.approx(1.0) and result["p"] == pytest.approx(2 / 120)
    assert pvm.smallest_p(5) == pytest.approx(2 / 120) and pvm.smallest_p(4) == pytest.approx(1 / 12)
    reversed_ = pvm.spearman_permutation([1, 2, 3, 4, 5], [5, 4, 3, 2, 1])
    assert reversed_["rho"] == pytest.approx(-1.0) and reversed_["p"] == pytest.approx(2 / 120)


def test_spearman_permutation_with_ties_missing_values_and_many_points():
    x, y = [1.0, 2.0, 2.0, 3.0, np.nan, 4.0], [1.0, 3.0, 2.0, 2.0, 7.0, 5.0]
    result = pvm.spearman_permutation(x, y)
    assert result["n"] == 5  # the pair with a NaN is left out
    kept = [0, 1, 2, 3, 5]
    assert result["rho"] == pytest.approx(stats.spearmanr(np.take(x, kept), np.take(y, kept)).statistic)
    assert result["p"] == pytest.approx(brute_force_p(np.take(x, kept), np.take(y, kept)))
    constant = pvm.spearman_permutation([1, 1, 1], [1, 2, 3])
    assert math.isnan(constant["rho"]) and math.isnan(constant["p"])
    # above EXACT_UP_TO points the p-value is sampled; for an unrelated pair it is far from 0, for a monotone one
    # it is the smallest a sampled p can be
    rng = np.random.default_rng(3)
    a = rng.standard_normal(30)
    sampled = pvm.spearman_permutation(a, rng.standard_normal(30), n_permutations=2000)
    assert not sampled["exact"] and sampled["p"] > 0.05
    assert pvm.spearman_permutation(a, a ** 3, n_permutations=999)["p"] == pytest.approx(1 / 1000)
    with pytest.raises(ValueError, match="at least 3"):
        pvm.spearman_permutation([1, 2, np.nan], [1, 2, 3])
    with pytest.raises(ValueError, match="equal length"):
        pvm.spearman_permutation([1, 2, 3], [1, 2])


def test_correlation_table_has_every_pair_once():
    summary = pd.DataFrame({"mir": [1.0, 2.0, 3.0, 4.0], "gap": [4.0, 3.0, 2.0, 1.0], "cka": [1.0, 3.0, 2.0, 4.0]})
    table = pvm.correlation_table(summary, ["mir", "gap", "cka"])
    assert list(zip(table.x, table.y)) == [("mir", "gap"), ("mir", "cka"), ("gap", "cka")]
    assert table.rho.tolist() == pytest.approx([-1.0, 0.8, -0.8])
    assert table.p.iloc[0] == pytest.approx(2 / 24) and (table.n == 4).all()
    with pytest.raises(ValueError, match="lacks columns"):
        pvm.correlation_table(summary, ["mir", "nope"])


def test_layer_agreement_ranks_checkpoints_within_each_layer():
    table = pd.DataFrame({"checkpoint": list("abc") * 2, "layer": [1, 1, 1, 2, 2, 2],
                          "fd": [1.0, 2.0, 3.0, 3.0, 2.0, 1.0],
                          "gap": [0.1, 0.2, 0.3, 0.1, 0.2, 0.3],
                          "flat": [1.0, 1.0, 1.0, 0.5, 0.7, 0.6]})
    agreement = pvm.layer_agreement(table, ["gap", "flat"]).set_index(["layer", "probe"])
    assert agreement.loc[(1, "gap"), "rho"] == pytest.approx(1.0)
    assert agreement.loc[(2, "gap"), "rho"] == pytest.approx(-1.0)  # same probe, FD ranks reversed at layer 2
    assert math.isnan(agreement.loc[(1, "flat"), "rho"])  # constant over checkpoints: undefined
    assert agreement.loc[(2, "flat"), "rho"] == pytest.approx(stats.spearmanr([3, 2, 1], [0.5, 0.7, 0.6]).statistic)


def test_study_start_maps_shipped_checkpoints_to_the_study_starts():
    assert pvm.study_start("lr2e-3/step-0250") == "lr2e-3"
    assert pvm.study_start("lr2e-4/step-0250") == "lr2e-4"
    assert pvm.study_start("lr2e-3/step-0020") == "lr2e-3/step-0020"
    assert pvm.study_start("lr2e-4/step-0020") is None and pvm.study_start("final") is None


def write_study(folder, benchmarked):
    starts = ["lr2e-3", "lr2e-4", "lr2e-3/step-0000", "lr2e-3/step-0020", "lr2e-3/step-0082"]
    pd.DataFrame({"start": starts, "config": ["c"] * 5, "mir_exact_prose": [1.8, 1.3, 1.2, 1.4, 1.6],
                  "retrieval_accuracy": [0.5, 0.35, 0.18, 0.2, 0.3]}).to_csv(folder / "pretrained.csv", index=False)
    pd.DataFrame([{"start": s, "layer": k, "text": text, "norm_ratio": (i + 1) * k * (2 if text == "prose" else 1)}
                  for i, s in enumerate(starts) for k in (1, 2) for text in ("prose", "captions")]
                 ).to_csv(folder / "mir_per_layer.csv", index=False)
    pd.DataFrame({"start": starts, "visual_dependence": [9.0, 9.8, 0.9, 7.0, 8.2],
                  "visual_dependence_sem": [0.5, 0.4, 0.3, 0.6, 0.2]}).to_csv(folder / "probes.csv", index=False)
    scores = {"lr2e-3": 0.6, "lr2e-4": 0.5, "lr2e-3/step-0000": 0.4, "lr2e-3/step-0020": 0.45,
              "lr2e-3/step-0082": 0.55}
    rows = [{"start": s, "kind": kind, "accuracy": scores[s] + (0.0 if kind == "average" else 0.1), "chance": 0.3}
            for s in starts[:benchmarked] for kind in ("colour", "average")]
    if rows:
        pd.DataFrame(rows).to_csv(folder / "benchmark.csv", index=False)
    return scores


def test_post_sft_table_joins_the_study_tables_and_live_probes(tmp_path):
    scores = write_study(tmp_path, benchmarked=5)
    live = pd.DataFrame({"checkpoint": ["lr2e-3/step-0250", "lr2e-4/step-0020"], "mir": [1.7, 1.2],
                         "cka_mean": [0.3, 0.1]})
    table = pvm.post_sft_table(tmp_path, live=live).set_index("start")
    assert table.columns[0] == "sft_average" and len(table) == 5
    assert table["sft_average"].to_dict() == pytest.approx(scores)  # the "average" row, not a kind's
    assert table.loc["lr2e-4", "norm_ratio_mean_prose"] == pytest.approx(2 * 1.5 * 2)
    assert table.loc["lr2e-4", "norm_ratio_layer1_captions"] == pytest.approx(2.0)
    assert table.loc["lr2e-3", "live_mir"] == 1.7 and table["live_cka_mean"].notna().sum() == 1  # step 20 of lr2e-4 is no start
    correlations = pvm.post_sft_correlations(table.reset_index()).set_index("measure")
    expected = pvm.spearman_permutation(table["mir_exact_prose"], table["sft_average"])
    assert correlations.loc["mir_exact_prose", "rho"] == pytest.approx(expected["rho"])
    assert correlations.loc["mir_exact_prose", "n"] == 5 and "live_mir" not in correlations.index  # 1 start only
    assert "visual_dependence" in correlations.index
    assert "visual_dependence_sem" in table and "visual_dependence_sem" not in correlations.index  # an error bar


def test_post_sft_correlations_refuse_to_estimate_from_too_few_starts(tmp_path):
    write_study(tmp_path, benchmarked=3)
    table = pvm.post_sft_table(tmp_path)
    assert table["sft_average"].notna().sum() == 3
    assert pvm.post_sft_correlations(table).empty  # 3 < 4 starts with both: no row at all
    assert len(pvm.post_sft_correlations(table, min_starts=3)) > 0
    with pytest.raises(ValueError, match="min_starts"):
        pvm.post_sft_correlations(table, min_starts=2)
    empty = tmp_path / "empty"
    empty.mkdir()
    nothing = pvm.post_sft_table(empty)
    assert list(nothing.columns) == ["start", "sft_average"] and nothing.empty
