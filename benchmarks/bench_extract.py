"""Benchmark: mirlab's hidden-state extraction vs the official-style loop vs a bare forward pass.

    python benchmarks/bench_extract.py --model random:tiny --n 8                 # seconds, CPU
    python benchmarks/bench_extract.py --model random:llava-1.5-7b --device cuda --dtype bfloat16 --n 64
    python benchmarks/bench_extract.py --model random:qwen2.5-vl-7b --device cuda --dtype bfloat16 --n 64
    python benchmarks/bench_extract.py --model embedded --n 32 --batch-size 8   # the embedded real model
    python benchmarks/bench_extract.py --model tiny --n 100 --layers 8 --hidden 256   # LLaVA shapes, tiny LLM

Models: ``random:<shape>`` is a random-weight model with the architecture and size of a released LVLM, built from
its config (benchmarks/shapes.py: llava-1.5-7b, qwen2.5-vl-7b, and CPU-sized ``tiny`` / ``tiny-qwen2.5-vl``),
created directly on ``--device`` in ``--dtype``. ``tiny`` is a random LLaVA-1.5 (576 image tokens) whose LLM has
``--layers`` layers of width ``--hidden``; ``embedded`` is mirlab's embedded tiny LLaVA on the bundled sample
pairs with prose passages. Pairs are random images of varied sizes and random-word texts (seeded).

Variants, each measured in its own subprocess (honest peak RSS and device memory) on the same model and pairs:
    official  the official mir.py loop: batch 1, generate(max_new_tokens=1, output_hidden_states=True,
              output_attentions=True), eager attention, image and text rows of every layer kept on the model's
              device until the end
    mirlab    extract_hidden_states(batch_size=--batch-size, store_dtype=--store-dtype) into a temporary store,
              then every layer read back once; with --with-mir the read-back is compute_mir on --device
              (mirlab.metrics.frechet_torch.on_device: the statistics on the GPU), i.e. extraction + MIR
    bare      model(**inputs) at the same batch size, outputs dropped (it computes the logits of every position)
    bare-last the same with logits_to_keep=1 (only the last position's logits): the floor

Reported per variant: tokens/s (non-pad tokens through the LLM, counted outside the timed region, per second of
wall time, processor included), peak RSS of the process and its growth during the workload (VmHWM is reset after
the model is built), and peak device memory (torch.cuda.max_memory_allocated; 0 on a CPU). Ratios against the
official loop measured in the same run. Targets (issue 13, one GPU): mirlab >= 3x the official loop's tokens/s,
<= 1/4 of its peak memory, within 1.3x of the bare forward. ``--json PATH`` also writes the numbers.
"""
from __future__ import annotations

import argparse
import gc
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
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
    """The model of ``--model`` on ``--device`` in ``--dtype``, with its processor."""
    if args.model.startswith("random:"):
        import shapes

        return shapes.build(args.model.partition(":")[2], device=args.device, dtype=args.dtype)
    import torch

    if args.model == "embedded":
        import mirlab

        model, processor = mirlab.tiny.embedded_model("final")
    else:
        model, processor = build_tiny(args)
    return model.to(device=args.device, dtype=getattr(torch, args.dtype)).eval(), processor


def build_tiny(args):
    """A random LLaVA-1.5-shaped model (576 image tokens) whose LLM has --layers layers of width --hidden."""
    import torch
    from transformers import (CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration,
                              LlavaProcessor)
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

    from shapes import VICUNA, chat_template, tiny_tokenizer

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


def _on_model(model, batch) -> dict:
    """Processor output on the model's device, floating tensors in its dtype."""
    dtype = next(model.parameters()).dtype
    return {name: (value.to(model.device, dtype) if value.is_floating_point() else value.to(model.device))
            for name, value in batch.items() if hasattr(value, "to")}


def official_style(model, processor, images, texts, args):
    """Batch 1, generate with hidden states and attention maps, every layer's rows kept (as mir.py does)."""
    import torch
    from mirlab.lvlm.models import image_token_id, render_prompt

    image_id = image_token_id(model, processor)
    model.set_attn_implementation("eager")  # attention maps need eager attention
    n_layers = model.config.get_text_config().num_hidden_layers
    image_rows = [[] for _ in range(n_layers)]
    text_rows = [[] for _ in range(n_layers)]
    for image, text in zip(images, texts):
        inputs = _on_model(model, processor(images=image, text=render_prompt(processor, text).text,
                                            return_tensors="pt"))
        with torch.inference_mode():
            out = model.generate(**inputs, max_new_tokens=1, do_sample=False, output_hidden_states=True,
                                 output_attentions=True, return_dict_in_generate=True,
                                 pad_token_id=processor.tokenizer.pad_token_id or 0)
        ids = inputs["input_ids"][0]
        image_positions = (ids == image_id).nonzero().flatten()
        start, end = int(image_positions[0]), int(image_positions[-1]) + 1
        for k, states in enumerate(out.hidden_states[0][1:]):  # skip the embeddings, as mir.py does
            image_rows[k].append(states[0, start:end].clone())
            text_rows[k].append(states[0, end:].clone())
        del out
    return image_rows, text_rows


def mirlab_extract(model, processor, images, texts, args):
    from mirlab.lvlm.extract import extract_hidden_states

    states = extract_hidden_states(model, processor, images, texts, batch_size=args.batch_size,
                                   store_dtype=args.store_dtype, progress=False)
    if args.with_mir:
        from mirlab.metrics.frechet_torch import on_device
        from mirlab.metrics.mir import compute_mir

        return states, compute_mir(on_device(states, args.device))
    for _, image, text in states:
        del image, text
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


def _synchronize(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measure(variant: str, args) -> dict:
    """Run one variant in this process; return its timing and memory."""
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = args.device.startswith("cuda")
    model, processor = build(args)
    images, texts = make_pairs(args.n, model=args.model)
    run = {"official": official_style, "mirlab": mirlab_extract, "bare": bare_forward, "bare-last": bare_last}[variant]
    run(model, processor, images[:2], texts[:2], args)  # warm-up (lazy inits, allocator, kernels)
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    resident = torch.cuda.memory_allocated() if cuda else 0
    before = rss_kib()
    reset_peak_rss()
    _synchronize(args.device)
    start = time.perf_counter()
    kept = run(model, processor, images, texts, args)  # what the variant holds stays alive until the peak is read
    _synchronize(args.device)
    seconds = time.perf_counter() - start
    peak = rss_kib("VmHWM")
    device_peak = torch.cuda.max_memory_allocated() if cuda else 0
    mir = float(kept[1].mir) if variant == "mirlab" and args.with_mir else None
    del kept
    tokens = count_tokens(processor, images, texts)
    return {"variant": variant, "tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds,
            "peak_rss_mib": peak / 1024, "peak_growth_mib": (peak - before) / 1024,
            "device_peak_mib": device_peak / 2 ** 20, "device_growth_mib": (device_peak - resident) / 2 ** 20,
            "mir": mir}


def child_command(variant: str, args) -> list[str]:
    options = ["--model", args.model, "--n", str(args.n), "--layers", str(args.layers), "--hidden", str(args.hidden),
               "--batch-size", str(args.batch_size), "--device", args.device, "--dtype", args.dtype,
               "--store-dtype", args.store_dtype, "--threads", str(args.threads)]
    return [sys.executable, __file__, "--variant", variant, *options] + (["--with-mir"] if args.with_mir else [])


def describe(args) -> str:
    if args.model == "embedded":
        return "embedded tiny LLaVA (final): 64 image tokens, 30 layers x 576, prose texts"
    if args.model == "tiny":
        return f"tiny random LLaVA: 576 image tokens, {args.layers} layers x {args.hidden}"
    return f"random-weight {args.model.partition(':')[2]} (benchmarks/shapes.py)"


def report(results: dict, args) -> list[str]:
    """The table and the ratios against the official loop and the bare forward (same run)."""
    lines = [f"{describe(args)}, N={args.n}, batch {args.batch_size}, {args.device} {args.dtype}, "
             f"store {args.store_dtype}{', with MIR' if args.with_mir else ''}, "
             f"{args.threads or 'default'} torch thread(s)",
             f"{'variant':10s} {'tokens':>7s} {'seconds':>8s} {'tokens/s':>9s} {'peak RSS MiB':>13s} "
             f"{'growth MiB':>11s} {'device peak MiB':>16s}"]
    for r in results.values():
        lines.append(f"{r['variant']:10s} {r['tokens']:7d} {r['seconds']:8.2f} {r['tokens_per_s']:9.0f} "
                     f"{r['peak_rss_mib']:13.0f} {r['peak_growth_mib']:11.0f} {r['device_peak_mib']:16.0f}")
    official, mirlab, bare, floor = (results.get(v) for v in VARIANTS)
    if official and mirlab:
        speed = mirlab["tokens_per_s"] / official["tokens_per_s"]
        memory = ("device peak", mirlab["device_peak_mib"] / max(official["device_peak_mib"], 1e-9)) \
            if args.device.startswith("cuda") else \
            ("peak RSS growth", mirlab["peak_growth_mib"] / max(official["peak_growth_mib"], 1e-9))
        lines.append(f"mirlab vs official: {speed:.2f}x tokens/s (target >= 3), {memory[0]} {memory[1]:.2f}x "
                     f"(target <= 0.25), peak RSS {mirlab['peak_rss_mib'] / official['peak_rss_mib']:.2f}x")
    if mirlab and bare and floor:
        lines.append(f"bare vs mirlab: bare is {bare['tokens_per_s'] / mirlab['tokens_per_s']:.2f}x as fast "
                     f"(target <= 1.3); bare-last is {floor['tokens_per_s'] / mirlab['tokens_per_s']:.2f}x as fast")
    if mirlab and mirlab["mir"] is not None:
        lines.append(f"mirlab extraction + MIR on {args.device}: {mirlab['seconds']:.1f} s for N={args.n} "
                     f"(MIR = {mirlab['mir']:.4f})")
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny",
                        help="random:<shape> (benchmarks/shapes.py), tiny (default) or embedded")
    parser.add_argument("--n", type=int, default=32, help="pairs")
    parser.add_argument("--layers", type=int, default=8, help="--model tiny: LLM decoder layers")
    parser.add_argument("--hidden", type=int, default=256, help="--model tiny: LLM hidden size")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--dtype", default="float32", help="model dtype, e.g. bfloat16 on a GPU (default float32)")
    parser.add_argument("--store-dtype", choices=("float32", "float16"), default="float32",
                        help="mirlab's row store (float16 halves the disk)")
    parser.add_argument("--with-mir", action="store_true", help="mirlab variant: extraction + MIR on --device")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (same for every variant; 0: "
                                                               "torch's default)")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--json", default=None, help="also write the results (and the report lines) here")
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)  # internal: child process
    args = parser.parse_args(argv)
    if not (args.model in ("tiny", "embedded") or args.model.startswith("random:")):
        parser.error(f"--model {args.model!r}: give random:<shape>, tiny or embedded")
    if args.variant:
        print(json.dumps(measure(args.variant, args)))
        return 0
    results = {}
    for variant in args.variants:
        done = subprocess.run(child_command(variant, args), capture_output=True, text=True, cwd=ROOT)
        if done.returncode != 0:
            print(done.stderr, file=sys.stderr)
            return 1
        results[variant] = json.loads(done.stdout.strip().splitlines()[-1])
    lines = report(results, args)
    print("\n".join(lines))
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "machine": platform.node(),
                                               "results": results, "report": lines}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
