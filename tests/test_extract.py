"""Hidden-state extraction: options, padding, bad pairs, memory, on the tiny random models of tests/tiny_models.py
(the per-family row checks over every family are in test_families.py)."""
import gc
import json
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

import mirlab.lvlm.extract as extract
from mirlab import compute_mir, extract_hidden_states
from mirlab.lvlm.extract import PairError, forward_hidden_states, model_inputs, select_layers, select_rows
from mirlab.lvlm.models import render_prompt
from tiny_models import build, single_thread

# PaliGemma's processor builds its labels with np.array(torch tensor), which numpy 2 flags; not ours to fix
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")

TEXTS = ["a cat sits on the mat", "the quick brown fox jumps over the lazy dog", "two dogs",
         "a red square and a blue circle at night"]


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    with single_thread():
        yield


def random_image(width, height, seed=0):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def family_pairs(tiny, n=4):
    """n pairs cycling through the family's exact-arithmetic image sizes (so row counts differ in a batch)."""
    sizes = [tiny.image_sizes[i % len(tiny.image_sizes)] for i in range(n)]
    return [random_image(w, h, seed=i) for i, (w, h) in enumerate(sizes)], TEXTS[:n], sizes


# --- options ---------------------------------------------------------------------------------------------------

def test_select_layers():
    assert select_layers(4) == [1, 2, 3, 4]
    assert select_layers(4, include_embeddings=True) == [0, 1, 2, 3, 4]
    assert select_layers(4, layers=[-1, 2]) == [2, 4]
    for bad in ([5], [-6], ["1"], [True], []):
        with pytest.raises(ValueError, match="layer"):
            select_layers(4, layers=bad)


def test_layer_zero_is_the_token_embedding_on_text_rows():
    tiny = build("llava")
    images, texts, _ = family_pairs(tiny, n=2)
    states = extract_hidden_states(tiny.model, tiny.processor, images, texts, layers=[0], progress=False)
    prompts = [render_prompt(tiny.processor, t) for t in texts]
    inputs = model_inputs(tiny.model, tiny.processor, images, prompts)
    _, after, _ = select_rows(inputs["input_ids"], inputs["attention_mask"], tiny.model.config.image_token_id)
    expected = tiny.model.get_input_embeddings()(inputs["input_ids"][after])
    _, text = states.layer(0)
    torch.testing.assert_close(text, expected.detach())
    with pytest.raises(ValueError, match="not extracted"):
        states.layer(1)


def test_select_rows_by_hand():
    image_id, pad = 9, 0
    ids = torch.tensor([[5, 9, 9, 7, 3, 4, 8, pad, pad],   # right padded
                        [pad, 5, 9, 9, 9, 7, 3, 4, 8]])    # left padded
    mask = (ids != pad).long()
    image, after, problems = select_rows(ids, mask, image_id, "after_image")
    assert problems == [None, None]
    assert image.sum(1).tolist() == [2, 3]
    assert after[0].nonzero().flatten().tolist() == [3, 4, 5, 6]
    assert after[1].nonzero().flatten().tolist() == [5, 6, 7, 8]
    _, caption, _ = select_rows(ids, mask, image_id, "caption", [[3, 4], [4, 8]])
    assert caption[0].nonzero().flatten().tolist() == [4, 5]
    assert caption[1].nonzero().flatten().tolist() == [7, 8]
    _, _, problems = select_rows(ids, mask, image_id, "caption", [[3, 4], [6, 6]])
    assert problems[0] is None and "not found" in problems[1]
    no_image = torch.tensor([[5, 7, 3]])
    _, _, problems = select_rows(no_image, torch.ones_like(no_image), image_id)
    assert "no image rows" in problems[0]
    image_last = torch.tensor([[5, 9, 9, pad]])
    image, _, problems = select_rows(image_last, (image_last != pad).long(), image_id)
    assert "no text rows" in problems[0] and not image.any()


def test_caption_span_is_a_subset_and_mir_runs_on_both_spans():
    tiny = build("qwen2_vl")
    images, texts, _ = family_pairs(tiny)
    full = extract_hidden_states(tiny.model, tiny.processor, images, texts, progress=False)
    caption = extract_hidden_states(tiny.model, tiny.processor, images, texts, text_span="caption", progress=False)
    assert (caption.samples["n_text"] < full.samples["n_text"]).all()
    assert caption.samples["n_image"].tolist() == full.samples["n_image"].tolist()
    assert np.isfinite(compute_mir(full).mir) and np.isfinite(compute_mir(caption).mir)


def test_max_text_tokens_cuts_texts_and_an_all_whitespace_head_is_an_error():
    tiny = build("llava")
    images, texts, _ = family_pairs(tiny, n=2)
    cut = extract_hidden_states(tiny.model, tiny.processor, images, texts, text_span="caption",
                                max_text_tokens=2, progress=False)
    full = extract_hidden_states(tiny.model, tiny.processor, images, texts, text_span="caption", progress=False)
    # the cut is counted on the text alone; in context a leading-space merge can make it one token shorter
    assert cut.samples["n_text"].isin([1, 2]).all() and (full.samples["n_text"] > 4).all()
    with pytest.raises(PairError, match="pair 1: text truncates to nothing"):
        extract_hidden_states(tiny.model, tiny.processor, images, ["a cat", "\n\n\n \t cat"],
                              max_text_tokens=1, progress=False)


def test_too_long_sequence_names_the_pair(monkeypatch):
    tiny = build("llava")
    images, _, _ = family_pairs(tiny, n=2)
    monkeypatch.setattr(tiny.model.config.text_config, "max_position_embeddings", 30)
    texts = ["a cat", "the quick brown fox jumps over the lazy dog " * 3]
    with pytest.raises(PairError, match="pair 1: .*exceed the model's 30 positions"):
        extract_hidden_states(tiny.model, tiny.processor, images, texts, progress=False)
    with pytest.warns(UserWarning, match="skipped 1 of 2"):
        states = extract_hidden_states(tiny.model, tiny.processor, images, texts, on_error="skip", progress=False)
    assert states.samples["pair"].tolist() == [0]


def test_float16_store_is_close_to_float32_and_half_the_size(tmp_path):
    tiny = build("llava")
    images, texts, _ = family_pairs(tiny)
    full = extract_hidden_states(tiny.model, tiny.processor, images, texts, cache_dir=tmp_path, progress=False)
    half = extract_hidden_states(tiny.model, tiny.processor, images, texts, cache_dir=tmp_path,
                                 store_dtype="float16", progress=False)
    assert full.path != half.path
    for (_, v32, t32), (_, v16, t16) in zip(full, half):
        assert v16.dtype == torch.float32
        torch.testing.assert_close(v16, v32, rtol=2e-3, atol=2e-3)
        torch.testing.assert_close(t16, t32, rtol=2e-3, atol=2e-3)
    shard = next(half.path.glob("layer_001/image_*.npy"))
    assert np.load(shard).dtype == np.float16


def test_float16_store_refuses_values_beyond_its_range():
    import copy

    tiny = build("llava")
    model = copy.deepcopy(tiny.model)
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(1e8)
    images, texts, _ = family_pairs(tiny, n=2)
    with pytest.raises(ValueError, match="layer 0 has text values beyond the float16 range"):
        extract_hidden_states(model, tiny.processor, images, texts, layers=[0], store_dtype="float16",
                              progress=False)


def test_bad_options_are_named():
    tiny = build("llava")
    images, texts, _ = family_pairs(tiny, n=2)
    cases = [(dict(batch_size=0), "batch_size"), (dict(text_span="words"), "text_span"),
             (dict(store_dtype="int8"), "store_dtype"), (dict(on_error="ignore"), "on_error"),
             (dict(max_text_tokens=0), "max_text_tokens")]
    for kwargs, word in cases:
        with pytest.raises(ValueError, match=word):
            extract_hidden_states(tiny.model, tiny.processor, images, texts, progress=False, **kwargs)
    with pytest.raises(ValueError, match="2 images but 1 texts"):
        extract_hidden_states(tiny.model, tiny.processor, images, texts[:1], progress=False)
    with pytest.raises(ValueError, match="no pairs"):
        extract_hidden_states(tiny.model, tiny.processor, [], [], progress=False)


# --- bad inputs ------------------------------------------------------------------------------------------------

def test_bad_pairs_raise_naming_the_item_or_are_skipped(tmp_path):
    tiny = build("llava")
    good = random_image(40, 30)
    corrupt = tmp_path / "broken.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    images = [good, corrupt, good, good]
    texts = ["a cat", "a dog", "   ", "two dogs"]
    with pytest.raises(PairError, match="broken.jpg"):
        extract_hidden_states(tiny.model, tiny.processor, images, texts, progress=False)
    with pytest.raises(PairError, match="pair 0: text contains the image placeholder"):
        extract_hidden_states(tiny.model, tiny.processor, [good], ["look: <image> here"], progress=False)
    with pytest.raises(PairError, match="third: empty text"):
        extract_hidden_states(tiny.model, tiny.processor, [good] * 4, texts, progress=False,
                              names=["first", "second", "third", "fourth"])
    with pytest.warns(UserWarning, match="skipped 2 of 4"):
        states = extract_hidden_states(tiny.model, tiny.processor, images, texts, on_error="skip",
                                       batch_size=2, progress=False)
    assert states.samples["pair"].tolist() == [0, 3]
    assert [s["pair"] for s in states.skipped] == [1, 2]
    clean = extract_hidden_states(tiny.model, tiny.processor, [good, good], ["a cat", "two dogs"],
                                  progress=False)
    for (_, v, t), (_, v_clean, t_clean) in zip(states, clean):
        torch.testing.assert_close(v, v_clean, atol=2e-4, rtol=1e-4)
        torch.testing.assert_close(t, t_clean, atol=2e-4, rtol=1e-4)
    with pytest.raises(PairError, match="no usable pairs"):
        extract_hidden_states(tiny.model, tiny.processor, [corrupt], ["x"], on_error="skip", progress=False)


def test_image_modes_become_rgb_and_give_the_same_rows():
    tiny = build("llava")
    base = random_image(40, 30)
    modes = [base.convert("L"), base.convert("RGBA"), base.convert("CMYK"), base.convert("P"),
             np.asarray(base.convert("L"))]
    states = extract_hidden_states(tiny.model, tiny.processor, modes, ["a cat"] * len(modes), progress=False)
    assert states.samples["n_image"].tolist() == [16] * len(modes)
    for _, image, _ in states:
        assert torch.isfinite(image).all()


# --- cache -----------------------------------------------------------------------------------------------------

class CountingForward:
    """Wraps extract.forward_hidden_states: counts calls, optionally fails on call number ``fail_at``."""

    def __init__(self, fail_at=None):
        self.calls, self.fail_at, self.original = 0, fail_at, forward_hidden_states

    def __call__(self, model, inputs):
        self.calls += 1
        if self.calls == self.fail_at:
            raise KeyboardInterrupt("simulated interruption")
        return self.original(model, inputs)


def test_cache_is_reused_and_keyed_by_model_data_and_options(tmp_path, monkeypatch):
    tiny = build("llava")
    images, texts, _ = family_pairs(tiny)
    counter = CountingForward()
    monkeypatch.setattr(extract, "forward_hidden_states", counter)
    first = extract_hidden_states(tiny.model, tiny.processor, images, texts, batch_size=2, cache_dir=tmp_path,
                                  progress=False)
    assert counter.calls == 2
    second = extract_hidden_states(tiny.model, tiny.processor, images, texts, batch_size=2, cache_dir=tmp_path,
                                   progress=False)
    assert counter.calls == 2 and second.path == first.path
    for (_, a, b), (_, c, d) in zip(first, second):
        assert torch.equal(a, c) and torch.equal(b, d)
    extract_hidden_states(tiny.model, tiny.processor, images, texts[::-1], batch_size=2, cache_dir=tmp_path,
                          progress=False)
    extract_hidden_states(tiny.model, tiny.processor, images, texts, batch_size=2, cache_dir=tmp_path,
                          text_span="caption", progress=False)
    assert counter.calls == 6
    assert len(list(tmp_path.iterdir())) == 3
    meta = json.loads((first.path / "meta.json").read_text())
    assert meta["batch_size"] == 2 and meta["layers"] == [1, 2]


def test_weights_change_the_cache_key(tmp_path):
    tiny = build("llava")
    images, texts, _ = family_pairs(tiny, n=2)
    before = extract_hidden_states(tiny.model, tiny.processor, images, texts, cache_dir=tmp_path, progress=False)
    projector = tiny.model.model.multi_modal_projector.linear_2.bias
    with torch.no_grad():
        projector += 0.5
    try:
        after = extract_hidden_states(tiny.model, tiny.processor, images, texts, cache_dir=tmp_path, progress=False)
    finally:
        with torch.no_grad():
            projector -= 0.5
    assert after.path != before.path
    assert not torch.allclose(before.layer(1)[0], after.layer(1)[0])


def test_interrupted_run_resumes_without_redoing_finished_batches(tmp_path, monkeypatch):
    tiny = build("llava")
    images, texts, _ = family_pairs(tiny)
    reference = extract_hidden_states(tiny.model, tiny.processor, images, texts, batch_size=1, progress=False)
    interrupted = CountingForward(fail_at=3)
    monkeypatch.setattr(extract, "forward_hidden_states", interrupted)
    with pytest.raises(KeyboardInterrupt):
        extract_hidden_states(tiny.model, tiny.processor, images, texts, batch_size=1, cache_dir=tmp_path,
                              progress=False)
    (store,) = tmp_path.iterdir()
    assert not (store / "complete.json").exists()
    assert sorted(p.name for p in (store / "batches").iterdir()) == ["00000.json", "00001.json"]
    # a crash in the middle of writing batch 2 leaves a stray temporary file and a garbage shard
    (store / "layer_001" / ".vision_00002.npy.99.tmp").write_bytes(b"partial")
    (store / "layer_001" / "vision_00002.npy").write_bytes(b"garbage")
    resumed = CountingForward()
    monkeypatch.setattr(extract, "forward_hidden_states", resumed)
    states = extract_hidden_states(tiny.model, tiny.processor, images, texts, batch_size=1, cache_dir=tmp_path,
                                   progress=False)
    assert resumed.calls == 2  # batches 2 and 3 only
    for (_, a, b), (_, c, d) in zip(states, reference):
        torch.testing.assert_close(a, c)
        torch.testing.assert_close(b, d)


def test_iteration_holds_no_reference_to_the_previous_layer():
    """Peak memory ~ one layer: once the consumer drops a layer, nothing else keeps it alive."""
    import weakref

    tiny = build("llava")
    images, texts, _ = family_pairs(tiny, n=2)
    states = extract_hidden_states(tiny.model, tiny.processor, images, texts, progress=False)
    layers = iter(states)
    item = next(layers)
    vision_ref, text_ref = weakref.ref(item[1]), weakref.ref(item[2])
    del item
    assert vision_ref() is None and text_ref() is None
    assert next(layers)[0] == 2


def test_temporary_store_is_deleted_with_the_object():
    tiny = build("llava")
    images, texts, _ = family_pairs(tiny, n=2)
    states = extract_hidden_states(tiny.model, tiny.processor, images, texts, progress=False)
    path = states.path
    assert path.is_dir()
    del states
    gc.collect()
    assert not path.exists()


def test_samples_table_locates_each_pairs_rows():
    tiny = build("qwen2_vl")
    images, texts, _ = family_pairs(tiny)
    states = extract_hidden_states(tiny.model, tiny.processor, images, texts, batch_size=3, progress=False)
    image, text = states.layer(2)
    samples = states.samples
    last = samples.iloc[-1]
    assert last["image_start"] + last["n_image"] == len(image)
    assert last["text_start"] + last["n_text"] == len(text)
    # pair 1 alone gives the rows that the table points at
    alone = extract_hidden_states(tiny.model, tiny.processor, images[1:2], texts[1:2], progress=False)
    row = samples.iloc[1]
    torch.testing.assert_close(image[row.image_start:row.image_start + row.n_image], alone.layer(2)[0],
                               atol=2e-4, rtol=1e-4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert np.isfinite(compute_mir(states).mir)
