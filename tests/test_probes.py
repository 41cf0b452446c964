"""Modality-bias probes: closed forms and independent references for the row probes (mirlab.metrics.probes),
the forward-pass probes on every tiny family (mirlab.lvlm.probes), run_probes, `mirlab probe`, and one run
on the embedded model."""
import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import scipy.linalg
import torch
from PIL import Image

from mirlab.lvlm import probes as forward
from mirlab.lvlm.extract import extract_hidden_states, model_inputs, select_rows
from mirlab.lvlm.models import image_token_id, language_model, render_prompt, text_token_ids
from mirlab.metrics import probes
from mirlab.plots import per_layer_table
from mirlab.run import PROBES, run_probes
from cli_workspace import cli_workspace
from tiny_models import FAMILIES, LAYERS, build, single_thread

# PaliGemma's processor builds its labels with np.array(torch tensor), which numpy 2 flags; not ours to fix
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

TEXTS = ["a cat sits on the mat", "the quick brown fox jumps over the lazy dog", "two dogs",
         "a red square and a blue circle at night", "photo of two dogs in the park", "a quick red fox"]


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    with single_thread():
        yield


def cloud(n, d, seed=0, shift=1.0):
    """A Gaussian cloud with a common offset (so directions, hence the modality gap, are not trivial)."""
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, d)) + shift * rng.normal(size=d)


def rotation(d, seed=1):
    q, r = np.linalg.qr(np.random.default_rng(seed).normal(size=(d, d)))
    return q * np.sign(np.diag(r))


# --- independent references (direct formulas, no code shared with mirlab.metrics.probes) ----------------------------

def reference_cka(x, y):
    """HSIC route: CKA = tr(K H L H) / sqrt(tr(K H K H) tr(L H L H)), K = x x^T, L = y y^T, H = I - 11^T/n."""
    n = len(x)
    h = np.eye(n) - np.ones((n, n)) / n
    k, l = h @ (x @ x.T) @ h, h @ (y @ y.T) @ h
    return np.trace(k @ l) / np.sqrt(np.trace(k @ k) * np.trace(l @ l))


def reference_knn(x, y, k):
    """Mutual kNN by brute force: per sample, Python sets of the k most cosine-similar other samples."""
    def neighbours(z, i):
        z = z / np.linalg.norm(z, axis=1, keepdims=True)
        scores = [(-float(z[i] @ z[j]), j) for j in range(len(z)) if j != i]
        return {j for _, j in sorted(scores)[:k]}
    return np.mean([len(neighbours(x, i) & neighbours(y, i)) / k for i in range(len(x))])


def reference_effective_rank(x):
    s = scipy.linalg.svdvals(x - x.mean(axis=0))
    p = s / s.sum()
    p = p[p > 0]
    return np.exp(-np.sum(p * np.log(p)))


def reference_participation_ratio(x):
    eigenvalues = np.linalg.eigvalsh(np.cov(x, rowvar=False))
    return eigenvalues.sum() ** 2 / (eigenvalues ** 2).sum()


# --- closed forms ------------------------------------------------------------------------------------------------------

def test_identical_clouds_have_gap_zero_and_cka_one():
    x = cloud(300, 16)
    gap, cosine = probes.modality_gap(x, x)
    assert gap == pytest.approx(0.0, abs=1e-12)
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    assert cosine == pytest.approx((unit @ unit.T).mean(), rel=1e-12)  # every (i, j) pair, directly
    assert probes.linear_cka(x, x) == pytest.approx(1.0, rel=1e-12)
    assert probes.mutual_knn(x[:50], x[:50], k=5) == 1.0


def test_rotated_copy_has_cka_one_and_a_positive_gap():
    x = cloud(300, 16)
    y = x @ rotation(16)
    gap, cosine = probes.modality_gap(x, y)
    image_mean = (x / np.linalg.norm(x, axis=1, keepdims=True)).mean(axis=0)
    text_mean = (y / np.linalg.norm(y, axis=1, keepdims=True)).mean(axis=0)
    assert gap > 0.1 and gap == pytest.approx(np.linalg.norm(image_mean - text_mean), rel=1e-12)
    assert cosine < 1 - 1e-3
    assert probes.linear_cka(x, y) == pytest.approx(1.0, rel=1e-10)
    assert probes.linear_cka(x, 3.0 * y) == pytest.approx(1.0, rel=1e-10)
    assert probes.mutual_knn(x[:60], y[:60], k=10) == 1.0  # cosine neighbourhoods survive a rotation


def test_shuffled_pairs_give_mutual_knn_near_chance():
    n, k = 120, 10
    x = cloud(n, 12, shift=0.0)
    y = x @ rotation(12)
    rng = np.random.default_rng(3)
    shuffled = [probes.mutual_knn(x, y[rng.permutation(n)], k) for _ in range(40)]
    chance = probes.mutual_knn_chance(k, n)
    assert chance == k / (n - 1)
    # 40 shuffles x 120 samples: the standard error of the mean is about 0.003
    assert np.mean(shuffled) == pytest.approx(chance, abs=0.015)
    aligned = probes.paired_alignment(x, y, k=k, n_shuffles=20)
    assert aligned["mutual_knn"] == 1.0 and aligned["cka"] == pytest.approx(1.0, rel=1e-10)
    assert aligned["mutual_knn_shuffled"] == pytest.approx(chance, abs=0.02)
    assert aligned["cka_shuffled"] < 0.5 and aligned["mutual_knn_chance"] == chance and aligned["knn_k"] == k


def test_norm_ratio_is_invariant_to_a_common_scale():
    image, text = cloud(80, 8, seed=1), 0.2 * cloud(50, 8, seed=2)
    ratio = probes.norm_ratio(image, text)
    assert ratio == pytest.approx(np.linalg.norm(image, axis=1).mean() / np.linalg.norm(text, axis=1).mean(),
                                  rel=1e-12)
    assert probes.norm_ratio(7.5 * image, 7.5 * text) == pytest.approx(ratio, rel=1e-12)
    assert probes.norm_ratio(2.0 * image, text) == pytest.approx(2.0 * ratio, rel=1e-12)


def test_every_row_probe_ignores_a_common_scale_so_the_text_centric_scale_does_not_matter():
    image, text = cloud(60, 8, seed=1), cloud(40, 8, seed=2)
    info = pd.DataFrame({"n_image": [10] * 6, "n_text": [5, 8, 7, 6, 9, 5]})
    plain = probes.layer_probes(image, text, 3, info, k=3)
    scaled = probes.layer_probes(0.01 * image, 0.01 * text, 3, info, k=3)
    assert plain.keys() == scaled.keys()
    for name in plain:
        assert scaled[name] == pytest.approx(plain[name], rel=1e-9), name


def test_effective_rank_and_participation_ratio_of_isotropic_and_rank_r_clouds():
    d = 8
    isotropic = np.random.default_rng(0).normal(size=(40000, d))
    assert probes.effective_rank(isotropic) == pytest.approx(d, rel=0.01)
    assert probes.participation_ratio(isotropic) == pytest.approx(d, rel=0.01)
    # r equal directions exactly: centred orthonormal columns times a common singular value, rotated into R^d
    n, r = 500, 3
    rng = np.random.default_rng(1)
    basis = rng.normal(size=(n, r))
    basis, _ = np.linalg.qr(basis - basis.mean(axis=0))
    exact = 4.0 * basis @ rotation(d)[:r]
    assert probes.effective_rank(exact) == pytest.approx(r, rel=1e-9)
    assert probes.participation_ratio(exact) == pytest.approx(r, rel=1e-9)
    low_rank = rng.normal(size=(5000, r)) @ rng.normal(size=(r, d))  # rank r, unequal directions
    assert 1 < probes.effective_rank(low_rank) <= r + 1e-6
    assert probes.effective_rank(np.ones((5, d))) == 0.0  # identical rows use no direction


@pytest.mark.parametrize("n, d", [(300, 12), (20, 50)])  # both Gram routes: d x d and n x n
def test_rank_and_alignment_match_independent_formulas(n, d):
    x, y = cloud(n, d, seed=4), np.tanh(cloud(n, d + 3, seed=5))
    assert probes.effective_rank(x) == pytest.approx(reference_effective_rank(x), rel=1e-9)
    assert probes.participation_ratio(x) == pytest.approx(reference_participation_ratio(x), rel=1e-9)
    assert probes.linear_cka(x, y) == pytest.approx(reference_cka(x, y), rel=1e-9)
    small_x, small_y = x[:20], y[:20] + 0.5 * x[:20, :1]
    assert probes.mutual_knn(small_x, small_y, 4) == pytest.approx(reference_knn(small_x, small_y, 4), abs=1e-12)


def test_pooling_follows_the_pair_counts():
    rows = np.arange(24, dtype=np.float64).reshape(8, 3)
    pooled = probes.pool_rows(rows, [3, 1, 4])
    np.testing.assert_allclose(pooled, [rows[:3].mean(0), rows[3], rows[4:].mean(0)], rtol=1e-15)
    with pytest.raises(ValueError, match="sum to 7 rows but there are 8"):
        probes.pool_rows(rows, [3, 1, 3])


def test_compute_probes_gives_a_wide_table_the_plots_take_and_a_tidy_form():
    rng = np.random.default_rng(0)
    info = pd.DataFrame({"n_image": [4] * 6, "n_text": [2, 3, 2, 2, 3, 2]})
    layers = ((layer, torch.from_numpy(rng.normal(size=(24, 6))).float(),
               torch.from_numpy(rng.normal(size=(14, 6))).float()) for layer in (2, 5, 9))
    table = probes.compute_probes(layers, info, k=3)
    assert table["layer"].tolist() == [2, 5, 9]
    for column in ("norm_ratio", "modality_gap", "mean_cosine", "image_effective_rank", "text_participation_ratio",
                   "cka", "cka_shuffled", "mutual_knn", "mutual_knn_shuffled", "mutual_knn_chance"):
        assert np.isfinite(table[column]).all(), column
        per_layer_table(table, column)  # what per_layer_figure / LayerExplorer / summary accept
    assert (table["mutual_knn_chance"] == 3 / 5).all() and (table["n_pairs"] == 6).all()
    tidy = probes.tidy_probes(table)
    assert list(tidy.columns) == ["layer", "probe", "value"] and len(tidy) == 3 * (table.shape[1] - 1)
    back = probes.wide_probes(tidy)
    pd.testing.assert_frame_equal(back[table.columns].astype("float64"), table.astype("float64"))
    only_norms = probes.compute_probes([(np.ones((3, 2)), 2 * np.ones((3, 2)))], probes=("norm_ratio",))
    assert only_norms.to_dict("records") == [{"layer": 1, "n_image": 3, "n_text": 3, "norm_ratio": 0.5}]


def test_compute_probes_rejects_repeated_or_no_layers():
    with pytest.raises(ValueError, match="layer 4 appears twice"):
        probes.compute_probes([(4, cloud(5, 3), cloud(5, 3)), (4, cloud(5, 3), cloud(5, 3))], probes=("rank",))
    with pytest.raises(ValueError, match="no layers"):
        probes.compute_probes(iter([]))


def test_row_probe_errors_name_the_problem():
    x = cloud(10, 4)
    with pytest.raises(ValueError, match="layer 7: image rows have width 4 but text rows have width 5"):
        probes.layer_probes(x, cloud(10, 5), layer=7, probes=("modality_gap",))
    with pytest.raises(ValueError, match="needs pairs_info"):
        probes.layer_probes(x, x, probes=("alignment",))
    with pytest.raises(ValueError, match="1 <= k <= n - 2 = 8"):
        probes.mutual_knn(x, x, k=9)
    assert np.isnan(probes.linear_cka(np.ones((5, 3)), x[:5]))  # no variance on one side: undefined
    with pytest.raises(ValueError, match="rows are zero"):
        probes.modality_gap(np.vstack([x, np.zeros(4)]), x)
    with pytest.raises(ValueError, match="row probes must be a non-empty subset"):
        probes.layer_probes(x, x, probes=("fd",))


# --- forward-pass probes on every family ----------------------------------------------------------------------------

def family_pairs(tiny, n=4):
    sizes = [tiny.image_sizes[i % len(tiny.image_sizes)] for i in range(n)]
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in sizes]
    return images, TEXTS[:n]


def reference_attention_share(tiny, images, texts):
    """Per layer and head: the share on image keys, from output_attentions=True, one pair at a time."""
    model, processor = tiny.model, tiny.processor
    sums, queries = np.zeros((LAYERS, model.config.get_text_config().num_attention_heads)), 0
    model.set_attn_implementation("eager")
    try:
        for image, text in zip(images, texts):
            prompt = render_prompt(processor, text)
            inputs = model_inputs(model, processor, [image], [prompt])
            image_rows, text_rows, _ = select_rows(inputs["input_ids"], inputs["attention_mask"],
                                                   image_token_id(model, processor), "caption",
                                                   [text_token_ids(processor.tokenizer, prompt)])
            with torch.inference_mode():
                attentions = model(**inputs, output_attentions=True).attentions
            for layer, weights in enumerate(attentions):
                for q in text_rows[0].nonzero().flatten():
                    sums[layer] += weights[0, :, q][:, image_rows[0]].sum(dim=-1).double().numpy()
            queries += int(text_rows.sum())
    finally:
        model.set_attn_implementation("sdpa")
    return sums / queries


@pytest.mark.parametrize("family", list(FAMILIES))
def test_attention_share_matches_the_attention_maps_and_restores_sdpa(family):
    tiny = build(family)
    images, texts = family_pairs(tiny)
    table = forward.attention_share(tiny.model, tiny.processor, images, texts, head_groups=4, batch_size=3,
                                    progress=False)
    per_head = reference_attention_share(tiny, images, texts)
    assert table["layer"].tolist() == list(range(1, LAYERS + 1))
    assert tiny.model.config.get_text_config()._attn_implementation == "sdpa"
    groups = [c for c in table.columns if c.startswith("attention_share[")]
    assert len(groups) == min(4, per_head.shape[1])
    shares = table[["attention_share", *groups]].to_numpy()
    assert np.isfinite(shares).all() and (shares >= 0).all() and (shares <= 1 + 1e-6).all()
    np.testing.assert_allclose(table["attention_share"], per_head.mean(axis=1), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(table[groups[0]], per_head[:, 0], rtol=1e-4, atol=1e-6)  # 2 heads: one group each


@pytest.mark.parametrize("family", list(FAMILIES))
def test_visual_dependence_is_a_log_likelihood_difference_and_zero_for_the_real_image(family):
    tiny = build(family)
    images, texts = family_pairs(tiny)
    table = forward.visual_dependence(tiny.model, tiny.processor, images, texts, batch_size=3, progress=False)
    same = forward.visual_dependence(tiny.model, tiny.processor, images, texts, blind=lambda image: image,
                                     batch_size=3, progress=False)
    assert (same["visual_dependence"] == 0).all()
    assert table["pair"].tolist() == [0, 1, 2, 3]
    assert np.isfinite(table[["loglik_image", "loglik_blind", "visual_dependence"]].to_numpy()).all()
    assert (table["loglik_image"] < 0).all()
    np.testing.assert_allclose(table["visual_dependence"], table["loglik_image"] - table["loglik_blind"])
    # reference: full logits of one pair at a time, log-softmax at the positions before each text token
    for pair in (0, 3):
        prompt = render_prompt(tiny.processor, texts[pair])
        for image, column in ((images[pair], "loglik_image"), (forward.blank_image(images[pair]), "loglik_blind")):
            inputs = model_inputs(tiny.model, tiny.processor, [image], [prompt])
            _, text_rows, _ = select_rows(inputs["input_ids"], inputs["attention_mask"],
                                          image_token_id(tiny.model, tiny.processor), "caption",
                                          [text_token_ids(tiny.processor.tokenizer, prompt)])
            with torch.inference_mode():
                logp = torch.log_softmax(tiny.model(**inputs).logits[0].double(), dim=-1)
            positions = text_rows[0].nonzero().flatten()
            expected = sum(float(logp[p - 1, inputs["input_ids"][0, p]]) for p in positions)
            assert table[column][pair] == pytest.approx(expected, rel=1e-4, abs=1e-4)
            assert table["n_tokens"][pair] == len(positions)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_logit_lens_tokens_decode_and_the_last_layer_is_the_models_own_prediction(family):
    tiny = build(family)
    images, texts = family_pairs(tiny)
    table = forward.logit_lens(tiny.model, tiny.processor, images, texts, layers=[1, LAYERS], top_k=3, n_tokens=5,
                               batch_size=3, progress=False)
    states = extract_hidden_states(tiny.model, tiny.processor, images, texts, text_span="caption", progress=False)
    n_image = int(states.samples["n_image"].sum())
    assert set(table["layer"]) == {1, LAYERS} and (table["n_rows"] == n_image).all()
    assert (table["count"] <= n_image).all() and ((table["frequency"] > 0) & (table["frequency"] <= 1)).all()
    for token_id, token in zip(table["token_id"], table["token"]):
        assert token == tiny.processor.tokenizer.decode([token_id])
    # the same counts from the stored rows (no forward pass)
    stored = forward.logit_lens_rows(tiny.model, tiny.processor.tokenizer,
                                     ((layer, states.layer(layer)[0]) for layer in (1, LAYERS)), 3, 5)
    pd.testing.assert_frame_equal(stored, table)
    # layer L's lens (head only: hidden_states[L] is already normed) is the model's own top-1 at the image rows
    inputs = model_inputs(tiny.model, tiny.processor, images[:1], [render_prompt(tiny.processor, texts[0])])
    with torch.inference_mode():
        out = tiny.model(**inputs, output_hidden_states=True)
    image_rows = inputs["input_ids"] == image_token_id(tiny.model, tiny.processor)
    top = forward.lens_top_tokens(tiny.model, out.hidden_states[LAYERS][image_rows], LAYERS, top_k=1)
    assert torch.equal(top[:, 0], out.logits[image_rows].argmax(dim=-1))
    # an inner layer goes through the model's final norm first
    inner = out.hidden_states[1][image_rows]
    head = tiny.model.get_output_embeddings()
    with torch.inference_mode():
        expected = head(language_model(tiny.model).norm(inner)).argmax(dim=-1)
    assert torch.equal(forward.lens_top_tokens(tiny.model, inner, 1, top_k=1)[:, 0], expected)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_run_probes_runs_every_probe_on_every_family(family, tmp_path):
    tiny = build(family)
    images, texts = family_pairs(tiny, n=6)
    result = run_probes((tiny.model, tiny.processor), images, texts, eval_num=None, batch_size=4, k=3,
                        out_dir=tmp_path, progress=False)
    table = result.per_layer
    assert table["layer"].tolist() == list(range(1, LAYERS + 1))
    if family == "gemma3":
        # the tiny Gemma3's image features are zero (its multi-modal projection starts at 0): every pair has the
        # same image rows, so CKA is undefined (NaN) and nothing depends on the image
        assert table["cka"].isna().all() and (result.visual_dependence["visual_dependence"] == 0).all()
        table = table.drop(columns=["cka", "cka_shuffled"])
    assert np.isfinite(table.drop(columns="layer").to_numpy(dtype=np.float64)).all()
    assert len(result.visual_dependence) == 6 and len(result.logit_lens) > 0
    assert set(result.tidy["probe"]) >= {"norm_ratio", "modality_gap", "cka", "mutual_knn", "attention_share"}
    for name in ("probes.csv", "probes.json", "visual_dependence.csv", "logit_lens.csv", "norm_ratio.png",
                 "modality_gap.png", "effective_rank.png", "cka.png", "mutual_knn.png", "attention_share.png"):
        assert (tmp_path / name).stat().st_size > 0, name


def test_run_probes_chooses_probes_and_needs_no_extraction_for_forward_ones():
    tiny = build("llava")
    images, texts = family_pairs(tiny)
    result = run_probes((tiny.model, tiny.processor), images, texts, eval_num=None, progress=False,
                        probes=("attention_share",))
    assert "extraction" not in result.meta["seconds"] and result.visual_dependence is None
    assert [c for c in result.per_layer.columns if not c.startswith("attention_share")] == ["layer", "n_queries"]
    assert set(result.figure_table("attention_share")["label"]) == {"all heads", "head 0", "head 1"}
    assert result.figure_table("cka") is None
    with pytest.raises(ValueError, match="probes must be a non-empty subset"):
        run_probes((tiny.model, tiny.processor), images, texts, eval_num=None, probes=("fd",))


# --- the command --------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A saved tiny LLaVA plus folders of 6 images and 6 texts."""
    return cli_workspace(tmp_path_factory.mktemp("probe-cli"), len(TEXTS),
                         {f"{i}.txt": text for i, text in enumerate(TEXTS)})


def test_probe_command_writes_the_tidy_table_and_figures(workspace, tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-m", "mirlab.cli", "probe", "--model", str(workspace / "model"),
                           "--images", str(workspace / "images"), "--texts", str(workspace / "texts"),
                           "--eval-num", "5", "--batch-size", "2", "--knn-k", "2", "--no-progress", "--threads", "1",
                           "--out", str(out)], capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    tidy = pd.read_csv(out / "probes.csv")
    assert list(tidy.columns) == ["layer", "probe", "value"]
    assert set(tidy["layer"]) == set(range(1, LAYERS + 1))
    assert "visual dependence" in done.stdout and "norm_ratio" in done.stdout
    assert json.loads((out / "probes.json").read_text())["meta"]["n_pairs"] == 5
    assert (out / "attention_share.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    bad = subprocess.run([sys.executable, "-m", "mirlab.cli", "probe", "--model", str(workspace / "model"),
                          "--images", str(workspace / "images"), "--texts", str(workspace / "texts"),
                          "--probes", "fd"], capture_output=True, text=True, env=env, timeout=120)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1 and "invalid choice" in bad.stderr


def test_probe_options_are_listed_in_help():
    from mirlab import cli

    parser = cli.build_parser("probe")
    text = parser._subparsers._group_actions[0].choices["probe"].format_help()
    for option in ["--model", "--images", "--texts", "--pairs", "--eval-num", "--probes", "--text-span",
                   "--knn-k", "--shuffles", "--head-groups", "--lens-layers", "--top-k", "--cache", "--out"]:
        assert option in text, option
    assert set(PROBES) <= set(text.replace(",", " ").split())


# --- the embedded model ----------------------------------------------------------------------------------------------

def test_every_probe_on_the_embedded_model(embedded_cache):
    from mirlab.pairs import sample_pairs
    from mirlab.run import load_model

    model, processor = load_model()
    pairs = sample_pairs(8, text="captions")
    result = run_probes((model, processor), [p[0] for p in pairs], [p[1] for p in pairs], eval_num=None,
                        batch_size=4, k=3, lens_layers=[15, 30], lens_max_rows=256, progress=False)
    table = result.per_layer
    assert table["layer"].tolist() == list(range(1, 31))
    assert np.isfinite(table.drop(columns="layer").to_numpy(dtype=np.float64)).all()
    assert ((table["attention_share"] > 0) & (table["attention_share"] < 1)).all()
    assert (table["cka"] > table["cka_shuffled"]).mean() > 0.5  # captions describe their images
    vd = result.visual_dependence
    assert len(vd) == 8 and vd["visual_dependence"].mean() > 0  # the trained projector carries the image
    assert set(result.logit_lens["layer"]) == {15, 30} and (result.logit_lens["n_rows"] == 256).all()
