"""Benchmark: mirlab's hidden-state extraction vs the official-style loop vs a bare forward pass.

    python benchmarks/bench_extract.py                  # tiny random LLaVA, N=32, batch 4: about 2 min
    python benchmarks/bench_extract.py --n 100 --layers 8 --hidden 256 --batch-size 4 --threads 1
    python benchmarks/bench_extract.py --model embedded --n 32 --batch-size 8   # the embedded real model

Models: ``--model tiny`` (default) is a random-weight LLaVA-1.5 built locally (CLIP 336 px / patch 14 -> 576
image tokens, LLM with ``--layers`` decoder layers of width ``--hidden``, vocabulary 32000), so the shapes are
LLaVA's but a forward pass costs milliseconds, not seconds; pairs are random images and random-word texts
(seeded). ``--model embedded`` is mirlab's embedded tiny LLaVA (DINOv2-small + trained projector +
SmolLM2-135M: 64 image tokens, 30 layers of width 576, vocabulary 49153) on the bundled sample pairs with prose
passages as the text side (``mirlab.sample_pairs(n, text="prose")``), the CNN/DailyMail-like setting of the paper.

Variants, each measured in its own subprocess (honest peak RSS) on the same model and pairs:
    official  the official mir.py loop: batch 1, generate(max_new_tokens=1, output_hidden_states=True,
              output_attentions=True), image and text rows of every layer kept in RAM until the end
    mirlab    extract_hidden_states(batch_size=--batch-size) into a temporary store, then every layer read
              back once (as compute_mir does)
    bare      model(**inputs) at the same batch size, outputs dropped (it computes the 32000-way logits of
              every position, which extraction does not need)
    bare-last the same with logits_to_keep=1 (only the last position's logits): the true floor

Reported: tokens/s (non-pad tokens through the LLM, counted outside the timed region, per second of wall
time, processor included), peak RSS of
the whole process and the peak growth during the workload (VmHWM is reset after the model is built).
Targets: mirlab >= 3x official tokens/s, <= 1/4 of its peak RSS, and within 1.3x of bare.
"""
from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ("official", "mirlab", "bare", "bare-last")
WORDS = ("a the cat dog fox red blue square circle park night quick brown lazy sits on over jumps two photo of "
         "and in at with near small large green tree house river city street car man woman child").split()


def rss_kib(field: str = "VmRSS") -> int:
    """Current (VmRSS) or peak (VmHWM) resident set size of this process, in KiB (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak_rss() -> None:
    """Reset VmHWM to the current RSS (Linux >= 4.0), so the peak measures only what follows."""
    Path("/proc/self/clear_refs").write_text("5")


def build(args):
    """The model of ``--model``: a random LLaVA-1.5-shaped model (576 image tokens) or the embedded model."""
    if args.model == "embedded":
        import mirlab

        model, processor = mirlab.tiny.embedded_model("final")
        return model.eval(), processor
    return build_tiny(args)


def build_tiny(args):
    """A random LLaVA-1.5-shaped model (576 image tokens) with a tiny offline tokenizer."""
    import torch
    from transformers import (CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration,
                              LlavaProcessor)
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

    sys.path.insert(0, str(ROOT / "tests"))
    from tiny_models import VICUNA, chat_template, tiny_tokenizer

    tokenizer = tiny_tokenizer(["<image>"], named={"image_token": "<image>"})
    image_processor = LlavaImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=14,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1,
                               chat_template=chat_template(**VICUNA))
    vision = CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                              image_size=336, patch_size=14)
    text = LlamaConfig(vocab_size=32000, hidden_size=args.hidden, intermediate_size=4 * args.hidden,
                       num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=4,
                       pad_token_id=tokenizer.pad_token_id, max_position_embeddings=2048)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=tokenizer.image_token_id,
                         vision_feature_select_strategy="default", vision_feature_layer=-2)
    torch.manual_seed(0)
    return LlavaForConditionalGeneration(config).eval(), processor


def make_pairs(n: int, seed: int = 0, model: str = "tiny"):
    if model == "embedded":
        import mirlab

        pairs = mirlab.sample_pairs(n, seed=seed, text="prose")
        return [p[0] for p in pairs], [p[1] for p in pairs]
    from PIL import Image

    rng = np.random.default_rng(seed)
    images = [Image.fromarray(rng.integers(0, 256, (300 + 7 * i % 80, 400, 3), dtype=np.uint8)) for i in range(n)]
    texts = [" ".join(rng.choice(WORDS, size=int(rng.integers(30, 60)))) for _ in range(n)]
    return images, texts


def official_style(model, processor, images, texts, args):
    """Batch 1, generate with hidden states and attention maps, every layer's rows kept (as mir.py does)."""
    import torch
    from mirlab.lvlm.models import render_prompt

    image_id = model.config.image_token_id
    model.set_attn_implementation("eager")  # attention maps need eager attention
    n_layers = model.config.get_text_config().num_hidden_layers
    vision_rows = [[] for _ in range(n_layers)]
    text_rows = [[] for _ in range(n_layers)]
    for image, text in zip(images, texts):
        inputs = processor(images=image, text=render_prompt(processor, text).text, return_tensors="pt")
        with torch.inference_mode():
            out = model.generate(**inputs, max_new_tokens=1, do_sample=False, output_hidden_states=True,
                                 output_attentions=True, return_dict_in_generate=True,
                                 pad_token_id=processor.tokenizer.pad_token_id or 0)
        ids = inputs["input_ids"][0]
        image_positions = (ids == image_id).nonzero().flatten()
        start, end = int(image_positions[0]), int(image_positions[-1]) + 1
        for k, states in enumerate(out.hidden_states[0][1:]):  # skip the embeddings, as mir.py does
            vision_rows[k].append(states[0, start:end].clone())
            text_rows[k].append(states[0, end:].clone())
        del out
    return vision_rows, text_rows


def mirlab_extract(model, processor, images, texts, args):
    from mirlab.lvlm.extract import extract_hidden_states

    states = extract_hidden_states(model, processor, images, texts, batch_size=args.batch_size, progress=False)
    for _, vision, text in states:
        del vision, text
    return states


def bare_forward(model, processor, images, texts, args, **extra):
    import torch
    from mirlab.lvlm.extract import model_inputs
    from mirlab.lvlm.models import render_prompt

    for start in range(0, len(texts), args.batch_size):
        batch = slice(start, start + args.batch_size)
        inputs = model_inputs(model, processor, images[batch], [render_prompt(processor, t) for t in texts[batch]])
        with torch.inference_mode():
            model(**inputs, **extra)


def bare_last(model, processor, images, texts, args):
    bare_forward(model, processor, images, texts, args, logits_to_keep=1)


def count_tokens(processor, images, texts) -> int:
    """Non-pad tokens the LLM sees over all pairs (same prompts for every variant)."""
    from mirlab.lvlm.models import render_prompt

    return sum(int(processor(images=image, text=render_prompt(processor, text).text,
                             return_tensors="pt")["attention_mask"].sum()) for image, text in zip(images, texts))


def measure(variant: str, args) -> dict:
    """Run one variant in this process; return its timing and memory."""
    import torch

    torch.set_num_threads(args.threads)
    model, processor = build(args)
    images, texts = make_pairs(args.n, model=args.model)
    run = {"official": official_style, "mirlab": mirlab_extract, "bare": bare_forward, "bare-last": bare_last}[variant]
    run(model, processor, images[:2], texts[:2], args)  # warm-up (lazy inits, allocator)
    gc.collect()
    before = rss_kib()
    reset_peak_rss()
    start = time.perf_counter()
    kept = run(model, processor, images, texts, args)  # what the variant holds stays alive until the peak is read
    seconds = time.perf_counter() - start
    peak = rss_kib("VmHWM")
    del kept
    tokens = count_tokens(processor, images, texts)
    return {"variant": variant, "tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds,
            "peak_rss_mib": peak / 1024, "peak_growth_mib": (peak - before) / 1024}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("tiny", "embedded"), default="tiny",
                        help="tiny random LLaVA-1.5 shapes (default) or the embedded real model")
    parser.add_argument("--n", type=int, default=32, help="pairs")
    parser.add_argument("--layers", type=int, default=8, help="LLM decoder layers")
    parser.add_argument("--hidden", type=int, default=256, help="LLM hidden size")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (same for every variant)")
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)  # internal: child process
    args = parser.parse_args(argv)
    if args.variant:
        print(json.dumps(measure(args.variant, args)))
        return 0
    results = {}
    for variant in VARIANTS:
        child = [sys.executable, __file__, "--variant", variant, "--model", args.model, "--n", str(args.n), "--layers", str(args.layers),
                 "--hidden", str(args.hidden), "--batch-size", str(args.batch_size), "--threads", str(args.threads)]
        done = subprocess.run(child, capture_output=True, text=True, cwd=ROOT)
        if done.returncode != 0:
            print(done.stderr, file=sys.stderr)
            return 1
        results[variant] = json.loads(done.stdout.strip().splitlines()[-1])
    shape = ("embedded tiny LLaVA (final): 64 image tokens, 30 layers x 576, prose texts" if args.model == "embedded"
             else f"tiny random LLaVA: 576 image tokens, {args.layers} layers x {args.hidden}")
    print(f"{shape}, N={args.n}, batch {args.batch_size}, {args.threads} torch thread(s)")
    print(f"{'variant':10s} {'tokens':>7s} {'seconds':>8s} {'tokens/s':>9s} {'peak RSS MiB':>13s} {'growth MiB':>11s}")
    for r in results.values():
        print(f"{r['variant']:10s} {r['tokens']:7d} {r['seconds']:8.2f} {r['tokens_per_s']:9.0f} "
              f"{r['peak_rss_mib']:13.0f} {r['peak_growth_mib']:11.0f}")
    official, mirlab, bare, floor = (results[v] for v in VARIANTS)
    speed = mirlab["tokens_per_s"] / official["tokens_per_s"]
    memory = mirlab["peak_rss_mib"] / official["peak_rss_mib"]
    growth = mirlab["peak_growth_mib"] / max(official["peak_growth_mib"], 1e-9)
    overhead = bare["tokens_per_s"] / mirlab["tokens_per_s"]
    floor_overhead = floor["tokens_per_s"] / mirlab["tokens_per_s"]
    print(f"mirlab vs official: {speed:.2f}x tokens/s (target >= 3), peak RSS {memory:.2f}x, "
          f"peak growth {growth:.2f}x (target <= 0.25)")
    print(f"bare vs mirlab: bare is {overhead:.2f}x as fast (target <= 1.3); "
          f"bare-last is {floor_overhead:.2f}x as fast")
    return 0


if __name__ == "__main__":
    sys.exit(main())
