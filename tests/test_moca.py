"""MoCa (mirlab.lvlm.moca) on the tiny random models of every family mirlab extracts from (tests/tiny_models.py,
tests/tiny_models_more.py, tests/tiny_models_fusion.py; Mllama, refused for extraction, is refused by attach too:
tests/test_families.py).

References are independent of the module: the image rows are recomputed here as ``input_ids == image id`` on
non-pad positions, the transform ``u ⊙ h + v`` is written out by hand, and a layer's raw output (before MoCa)
is read by a hook of the test's own that runs before MoCa's.
"""
import contextlib
import copy
import warnings
from types import SimpleNamespace

import pytest
import torch

from mirlab import extract_hidden_states
from mirlab.lvlm.extract import forward_hidden_states, model_inputs
from mirlab.lvlm.models import render_prompt, same_size_batches
from mirlab.lvlm.moca import FORMAT, MoCa, attach, decoder_layers
from test_extract import family_pairs
from test_families import BUILDERS, build
from tiny_models import LAYERS, single_thread

FAMILIES = list(BUILDERS)  # every family mirlab extracts from

# PaliGemma's processor builds its labels with np.array(torch tensor), which numpy 2 flags; not ours to fix
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    with single_thread():
        yield


@contextlib.contextmanager
def attached(tiny, **kwargs):
    """MoCa attached to the (shared, cached) tiny model; removed and requires_grad restored afterwards."""
    grads = {name: p.requires_grad for name, p in tiny.model.named_parameters()}
    handle = attach(tiny.model, tiny.processor, **kwargs)
    try:
        yield handle
    finally:
        handle.remove()
        for name, p in tiny.model.named_parameters():
            p.requires_grad_(grads[name])
            p.grad = None


def randomize(moca, seed=1):
    """u ~ N(1, 0.5), v ~ N(0, 0.5): far enough from the identity that every calibrated row changes."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        moca.scale.copy_(1 + 0.5 * torch.randn(moca.scale.shape, generator=generator))
        moca.shift.copy_(0.5 * torch.randn(moca.shift.shape, generator=generator))


def batch(tiny, padding_side="right"):
    """A padded batch of two pairs with different image sizes and text lengths, as extraction builds it."""
    images, texts, _ = family_pairs(tiny, n=2)
    tokenizer = tiny.processor.tokenizer
    side, tokenizer.padding_side = tokenizer.padding_side, padding_side
    try:
        inputs = model_inputs(tiny.model, tiny.processor, images, [render_prompt(tiny.processor, t) for t in texts])
    finally:
        tokenizer.padding_side = side
    assert (inputs["attention_mask"] == 0).any(), "the batch should be padded"
    return inputs


def image_rows(tiny, inputs):
    """(B, T) bool: positions holding the image token id, pad positions excluded (the reference rule)."""
    return (inputs["input_ids"] == tiny.model.config.image_token_id) & (inputs["attention_mask"] == 1)


def forward(model, inputs):
    """(hidden_states, logits) of a no-cache forward; BLIP-2 / InstructBLIP keep the decoder's hidden states in
    ``language_model_outputs``."""
    with torch.no_grad():
        output = model(**inputs, output_hidden_states=True, use_cache=False, return_dict=True)
    hidden = getattr(output, "hidden_states", None)
    if hidden is None:
        hidden = output.language_model_outputs.hidden_states
    return SimpleNamespace(hidden_states=hidden, logits=output.logits)


@contextlib.contextmanager
def layer_outputs(tiny, prepend):
    """{layer number: output of that decoder layer}, read before MoCa (prepend=True) or after it."""
    seen, hooks = {}, []
    for number, layer in enumerate(decoder_layers(tiny.model), start=1):
        def hook(module, args, output, number=number):
            seen[number] = (output[0] if isinstance(output, tuple) else output).detach().clone()
        hooks.append(layer.register_forward_hook(hook, prepend=prepend))
    try:
        yield seen
    finally:
        for hook in hooks:
            hook.remove()


# --- every family ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("padding_side", ["right", "left"])
@pytest.mark.parametrize("family", FAMILIES)
def test_at_initialisation_hidden_states_and_logits_are_bit_identical(family, padding_side):
    tiny = build(family)
    inputs = batch(tiny, padding_side)
    plain = forward(tiny.model, inputs)
    with attached(tiny) as handle:
        hidden_size = tiny.model.config.get_text_config().hidden_size
        assert handle.moca.scale.shape == handle.moca.shift.shape == (LAYERS, hidden_size)
        calibrated = forward(tiny.model, inputs)
    assert len(calibrated.hidden_states) == len(plain.hidden_states) == LAYERS + 1
    for ours, theirs in zip(calibrated.hidden_states, plain.hidden_states):
        assert torch.equal(ours, theirs)
    assert torch.equal(calibrated.logits, plain.logits)


@pytest.mark.parametrize("family", FAMILIES)
def test_random_moca_transforms_exactly_the_image_rows_of_every_layer(family):
    """With random u, v, at every decoder layer l: image rows of the output = u_l ⊙ (raw output) + v_l, all other
    rows = raw output, and hidden_states[l] (l < L) is that calibrated output.

    Against the model without MoCa (what is mathematically true): layer 1 reads the same embeddings, so its raw
    output is the plain model's hidden_states[1] and the calibrated hidden_states[1] is u_1 ⊙ h + v_1 on its image
    rows, equal elsewhere; rows before a sample's first image row never attend to an image row (causal), so they
    equal the plain model's at every layer (for PaliGemma, whose image comes first, there are no such rows); the
    text rows after the image do attend to the calibrated rows and change by the last layer.
    """
    tiny = build(family)
    inputs = batch(tiny)
    plain = forward(tiny.model, inputs)  # also installs transformers' output-capturing hooks before MoCa's
    image = image_rows(tiny, inputs)
    valid = inputs["attention_mask"] == 1
    with attached(tiny) as handle:
        randomize(handle.moca)
        u, v = handle.moca.scale.detach(), handle.moca.shift.detach()
        with layer_outputs(tiny, prepend=True) as raw, layer_outputs(tiny, prepend=False) as out:
            calibrated = forward(tiny.model, inputs)
    for layer in range(1, LAYERS + 1):
        expected = raw[layer].clone()
        expected[image] = raw[layer][image] * u[layer - 1] + v[layer - 1]
        assert torch.equal(out[layer], expected), f"layer {layer}"
        if layer < LAYERS:
            assert torch.equal(calibrated.hidden_states[layer], out[layer])
    first = plain.hidden_states[1]
    assert torch.equal(raw[1], first)
    assert torch.equal(calibrated.hidden_states[1][image], first[image] * u[0] + v[0])
    assert torch.equal(calibrated.hidden_states[1][~image], first[~image])
    before = torch.zeros_like(image)
    for b in range(image.shape[0]):
        before[b, :int(image[b].nonzero().min())] = True
    before &= valid
    after = valid & ~image & ~before
    for layer in range(1, LAYERS + 1):
        torch.testing.assert_close(calibrated.hidden_states[layer][before], plain.hidden_states[layer][before],
                                   rtol=0, atol=1e-6)
    last = LAYERS
    assert not torch.allclose(calibrated.hidden_states[last][after], plain.hidden_states[last][after], atol=1e-3)
    assert not torch.allclose(calibrated.logits, plain.logits, atol=1e-3)


@pytest.mark.parametrize("family", FAMILIES)
def test_gradients_reach_scale_and_shift_and_nothing_frozen(family):
    tiny = build(family)
    inputs = batch(tiny)
    valid = inputs["attention_mask"] == 1
    with attached(tiny) as handle:
        randomize(handle.moca)
        for p in tiny.model.parameters():
            p.requires_grad_(False)
        for p in handle.parameters():
            p.requires_grad_(True)
        logits = tiny.model(**inputs, use_cache=False).logits
        # every position's logits, image positions included: the last layer's image rows only reach the logits of
        # image positions (a loss on text positions alone gives u_L, v_L no gradient)
        loss = logits[valid].float().pow(2).mean()
        loss.backward()
        moca = handle.moca
        for name, p in tiny.model.named_parameters():
            if p is not moca.scale and p is not moca.shift:
                assert p.grad is None, name
        for grad in (moca.scale.grad, moca.shift.grad):
            assert grad is not None and torch.isfinite(grad).all()
            assert (grad.abs().sum(dim=1) > 0).all()  # every layer's row gets a gradient


def calibrated_image_rows(tiny, images, texts):
    """{layer: image rows (float32) of the pairs, in pair order}, from the forward passes extraction runs: one over
    the batch, or one per image size for a model whose image codes depend on the padded batch (Emu3,
    same_size_batches); each pass is an outermost call, so MoCa finds its image rows in that pass's input_ids."""
    groups = {}
    for i, image in enumerate(images):
        groups.setdefault(image.size if same_size_batches(tiny.model) else None, []).append(i)
    rows = {}
    for group in groups.values():
        inputs = model_inputs(tiny.model, tiny.processor, [images[i] for i in group],
                              [render_prompt(tiny.processor, texts[i]) for i in group])
        image = image_rows(tiny, inputs)
        for layer, states in enumerate(forward_hidden_states(tiny.model, inputs)):
            rows.setdefault(layer, []).extend(zip(group, states[image].float().split(image.sum(dim=1).tolist())))
    return {layer: torch.cat([r for _, r in sorted(parts, key=lambda part: part[0])]) for layer, parts in rows.items()}


@pytest.mark.parametrize("family", FAMILIES)
def test_extraction_with_moca_returns_the_calibrated_rows(family, tmp_path):
    tiny = build(family)
    images, texts, _ = family_pairs(tiny, n=2)
    options = dict(batch_size=2, progress=False, cache_dir=tmp_path)
    plain = extract_hidden_states(tiny.model, tiny.processor, images, texts, **options)
    with attached(tiny) as handle:
        at_init = extract_hidden_states(tiny.model, tiny.processor, images, texts, **options)
        randomize(handle.moca)
        states = extract_hidden_states(tiny.model, tiny.processor, images, texts, **options)
        expected = calibrated_image_rows(tiny, images, texts)
    assert len({plain.path, at_init.path, states.path}) == 3  # MoCa and its values are part of the cache key
    for layer, image_states, _ in states:
        assert torch.equal(image_states, expected[layer])
        assert torch.equal(at_init.layer(layer)[0], plain.layer(layer)[0])
        assert not torch.allclose(image_states, plain.layer(layer)[0], atol=1e-3)


def image_in_reach(tiny, inputs):
    """Whether the last prompt position of every sample can be influenced by an image row. Not so when every
    layer is sliding-window (the tiny Gemma3: 2 layers, window 8): information then travels at most
    L * (window - 1) positions forward, and the template puts the image further back than that."""
    config = tiny.model.config.get_text_config()
    types = getattr(config, "layer_types", None) or []
    if not types or any(kind != "sliding_attention" for kind in types):
        return True
    reach = len(types) * (config.sliding_window - 1)
    image = image_rows(tiny, inputs)
    last = [int(inputs["attention_mask"][b].nonzero().max()) - int(image[b].nonzero().max())
            for b in range(image.shape[0])]
    return min(last) <= reach


def whole_sequence_scores(model, inputs, sequences, suppressed):
    """What greedy generation of ``sequences`` scores at each new token, from one no-cache forward of the whole
    sequence: the logits of the position before each new token (suppressed tokens at -inf), with the position
    ids transformers' generate gives (prompt: cumsum(attention_mask) - 1, pads 0; new tokens: the last prompt
    position + 1, + 2, ...; with right padding the last prompt position is a pad's 0)."""
    prompt = inputs["attention_mask"]
    new = sequences.shape[1] - prompt.shape[1]
    positions = (prompt.cumsum(dim=1) - 1).masked_fill(prompt == 0, 0)
    positions = torch.cat([positions, positions[:, -1:] + torch.arange(1, new + 1)], dim=1)
    whole = {**inputs, "input_ids": sequences, "position_ids": positions,
             "attention_mask": torch.cat([prompt, torch.ones_like(prompt[:, :new])], dim=1)}
    logits = forward(model, whole).logits[:, -new - 1:-1].transpose(0, 1)
    logits[..., suppressed] = -float("inf")
    return SimpleNamespace(sequences=sequences, scores=logits.unbind(0))


@pytest.mark.parametrize("padding_side", ["left", "right"])
@pytest.mark.parametrize("family", FAMILIES)
def test_generate_with_a_kv_cache(family, padding_side):
    """Greedy generation: MoCa at initialisation generates what the plain model does; with random u, v the cached
    run (prefill, then steps whose input_ids are one new text token) gives the scores of an uncached run that
    re-reads the whole sequence each step.

    Generated tokens are text: the tokenizer's added tokens (image token, image markers) are suppressed. A generated
    marker is embedded differently with and without a cache by transformers itself (Ovis2 gives its indicator
    tokens visual embeddings only in a pass that has pixel_values, i.e. the prefill). BLIP-2 and InstructBLIP hand
    their language model the prompt as embeddings, and transformers then keeps the cache whatever use_cache says:
    their reference is one no-cache forward of the whole generated sequence (MoCa finds the prompt's image rows
    through model.generate's input_ids)."""
    tiny = build(family)
    inputs = batch(tiny, padding_side)
    tokenizer = tiny.processor.tokenizer
    added = sorted(tokenizer.added_tokens_decoder)
    settings = dict(max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id, suppress_tokens=added,
                    eos_token_id=None, return_dict_in_generate=True, output_scores=True)

    def generate(**extra):
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # right padding for a decoder-only model: asked for here
            return tiny.model.generate(**inputs, **settings, **extra)
    plain = generate()
    with attached(tiny) as handle:
        at_init = generate()
        randomize(handle.moca)
        cached = generate(use_cache=True)
        uncached = generate(use_cache=False)
        if uncached.cache is not None:  # the cache was kept: re-read the whole sequence in one forward instead
            uncached = whole_sequence_scores(tiny.model, inputs, cached.sequences, added)
    assert torch.equal(at_init.sequences, plain.sequences)
    assert torch.equal(cached.sequences, uncached.sequences)
    if image_in_reach(tiny, inputs):
        assert not torch.equal(torch.stack(cached.scores), torch.stack(plain.scores))
    else:  # no generated token can attend to an image row, calibrated or not
        assert torch.equal(torch.stack(cached.scores), torch.stack(plain.scores))
    torch.testing.assert_close(torch.stack(cached.scores), torch.stack(uncached.scores), atol=1e-4, rtol=1e-4)


# --- one family is enough -------------------------------------------------------------------------------------

def test_only_the_chosen_layers_are_calibrated():
    tiny = build("llava")
    inputs = batch(tiny)
    plain = forward(tiny.model, inputs)
    image = image_rows(tiny, inputs)
    with attached(tiny, layers=[-1]) as handle:
        assert handle.moca.layers == [LAYERS] and handle.moca.scale.shape[0] == 1
        randomize(handle.moca)
        with layer_outputs(tiny, prepend=True) as raw, layer_outputs(tiny, prepend=False) as out:
            calibrated = forward(tiny.model, inputs)
        u, v = handle.moca.scale[0].detach(), handle.moca.shift[0].detach()
    for layer in range(1, LAYERS):
        assert torch.equal(calibrated.hidden_states[layer], plain.hidden_states[layer])
    assert torch.equal(out[LAYERS][image], raw[LAYERS][image] * u + v)
    for bad in ([0], [LAYERS + 1]):
        with pytest.raises(ValueError, match="layer"):
            attach(tiny.model, layers=bad)
    assert not hasattr(tiny.model, "moca")


def test_a_bfloat16_model_keeps_its_dtype():
    """MoCa's float32 parameters are cast to the hidden states' dtype: outputs stay bfloat16, the identity at
    initialisation stays exact, and random u, v act as their bfloat16 roundings."""
    tiny = build("llava")
    model = copy.deepcopy(tiny.model).to(torch.bfloat16)
    inputs = batch(tiny)
    inputs["pixel_values"] = inputs["pixel_values"].to(torch.bfloat16)
    image = image_rows(tiny, inputs)
    plain = forward(model, inputs)
    handle = attach(model)
    assert handle.moca.scale.dtype == torch.float32
    at_init = forward(model, inputs)
    randomize(handle.moca)
    with layer_outputs(SimpleNamespace(model=model), prepend=True) as raw:
        calibrated = forward(model, inputs)
    u, v = (t[0].detach().to(torch.bfloat16) for t in (handle.moca.scale, handle.moca.shift))
    assert calibrated.hidden_states[1].dtype == torch.bfloat16
    assert torch.equal(at_init.logits, plain.logits)
    assert torch.equal(calibrated.hidden_states[1][image], raw[1][image] * u + v)


def test_remove_restores_the_model_bit_for_bit():
    tiny = build("llava")
    inputs = batch(tiny)
    blocks = decoder_layers(tiny.model)
    plain = forward(tiny.model, inputs)  # the first forward installs transformers' output-capturing hooks
    hooks_before = [len(b._forward_hooks) for b in blocks] + [len(tiny.model._forward_pre_hooks)]
    names = [name for name, _ in tiny.model.named_parameters()]
    with attached(tiny) as handle:
        assert tiny.model.moca is handle.moca
        assert {"moca.scale", "moca.shift"} <= set(dict(tiny.model.named_parameters()))
        randomize(handle.moca)
        with pytest.raises(ValueError, match="already has"):
            attach(tiny.model)
    assert not hasattr(tiny.model, "moca") and not handle.attached and "generate" not in vars(tiny.model)
    assert [name for name, _ in tiny.model.named_parameters()] == names
    assert [len(b._forward_hooks) for b in blocks] + [len(tiny.model._forward_pre_hooks)] == hooks_before
    again = forward(tiny.model, inputs)
    for ours, theirs in zip(again.hidden_states, plain.hidden_states):
        assert torch.equal(ours, theirs)
    assert torch.equal(again.logits, plain.logits)
    handle.remove()  # a second remove is harmless

    def theirs(*args, **kwargs):  # an instance generate set by someone else: wrapped while attached, then restored
        return "theirs"
    tiny.model.generate = theirs
    try:
        with attached(tiny):
            assert tiny.model.generate is not theirs and tiny.model.generate() == "theirs"
        assert tiny.model.generate is theirs
    finally:
        del tiny.model.generate


def test_save_and_load_round_trip_and_errors_name_the_file(tmp_path):
    tiny = build("llava")
    inputs = batch(tiny)
    path = tmp_path / "moca.safetensors"
    with attached(tiny) as handle:
        randomize(handle.moca)
        handle.save(path)
        expected = forward(tiny.model, inputs)
        scale = handle.moca.scale.detach().clone()
    from safetensors import safe_open
    with safe_open(str(path), "pt") as f:
        assert f.metadata() == {"format": FORMAT, "layers": "[1, 2]", "hidden_size": "32"}
        assert set(f.keys()) == {"scale", "shift"}
    with attached(tiny) as handle:
        handle.load(path)
        assert torch.equal(handle.moca.scale, scale)
        loaded = forward(tiny.model, inputs)
    assert torch.equal(loaded.logits, expected.logits)
    with attached(tiny, moca=MoCa.from_file(path)):
        assert torch.equal(forward(tiny.model, inputs).logits, expected.logits)

    other_layers, other_size = tmp_path / "layer1.safetensors", tmp_path / "wide.safetensors"
    MoCa([1], 32).save(other_layers)
    MoCa([1, 2], 16).save(other_size)
    with attached(tiny) as handle:
        for wrong in (other_layers, other_size):
            with pytest.raises(ValueError, match=wrong.name):
                handle.load(wrong)
        with pytest.raises(FileNotFoundError, match="missing.safetensors"):
            handle.load(tmp_path / "missing.safetensors")
        from safetensors.torch import save_file
        save_file({"scale": torch.ones(2, 32)}, str(tmp_path / "other.safetensors"), metadata={"format": "x"})
        with pytest.raises(ValueError, match="other.safetensors"):
            handle.load(tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match="hidden size 16"):
        attach(tiny.model, moca=MoCa.from_file(other_size))
    assert not hasattr(tiny.model, "moca")


def test_a_direct_language_model_call_needs_its_image_rows():
    """A training loop that embeds the inputs itself calls the language model with inputs_embeds only: MoCa
    refuses to guess the rows, and with ``image_rows`` it gives what the full forward gives."""
    tiny = build("llava")
    inputs = batch(tiny)
    decoder = tiny.model.model.language_model
    seen = {}
    hook = decoder.register_forward_pre_hook(
        lambda module, args, kwargs: seen.update(embeds=kwargs["inputs_embeds"].detach()), with_kwargs=True)
    with attached(tiny) as handle:
        randomize(handle.moca)
        try:
            full = forward(tiny.model, inputs)
        finally:
            hook.remove()
        direct = dict(inputs_embeds=seen["embeds"], attention_mask=inputs["attention_mask"])
        with torch.no_grad():
            with pytest.raises(RuntimeError, match="image_rows"):
                decoder(**direct)
            with handle.image_rows(image_rows(tiny, inputs)):
                hidden = decoder(**direct).last_hidden_state
    assert torch.equal(hidden, full.hidden_states[-1])


def test_gradient_checkpointing_gives_the_same_gradients():
    """Checkpointed layers run again during backward. transformers 5 checkpoints a layer's forward (hooks stay
    outside); older versions checkpointed the whole call, MoCa's hook included, re-run after the model's forward
    returned: a layer called again then must calibrate the same rows (the last part of this test)."""
    tiny = build("llava")
    inputs = batch(tiny)
    valid = inputs["attention_mask"] == 1
    grads = []
    with attached(tiny) as handle:
        randomize(handle.moca)
        for p in tiny.model.parameters():
            p.requires_grad_(False)
        for checkpointing in (False, True):
            for p in handle.parameters():
                p.requires_grad_(True)
                p.grad = None
            if checkpointing:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", FutureWarning)  # renamed activation_checkpointing_* in 5.x
                    tiny.model.gradient_checkpointing_enable()
                tiny.model.train()
            try:
                logits = tiny.model(**inputs, use_cache=False).logits
                logits[valid].float().pow(2).mean().backward()
            finally:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", FutureWarning)
                    tiny.model.gradient_checkpointing_disable()
                tiny.model.eval()
            grads.append((handle.moca.scale.grad.clone(), handle.moca.shift.grad.clone()))

        layer = decoder_layers(tiny.model)[0]
        call = {}
        hook = layer.register_forward_pre_hook(lambda module, args, kwargs: call.update(args=args, kwargs=kwargs),
                                               with_kwargs=True)
        try:
            with layer_outputs(tiny, prepend=False) as out:
                forward(tiny.model, inputs)
        finally:
            hook.remove()
        with torch.no_grad():
            again = layer(*call["args"], **call["kwargs"])  # after the model's forward returned
        assert torch.equal(again[0] if isinstance(again, tuple) else again, out[1])
    for plain, checkpointed in zip(*grads):
        torch.testing.assert_close(checkpointed, plain, rtol=1e-5, atol=1e-7)
