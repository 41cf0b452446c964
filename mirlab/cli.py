"""The ``mirlab`` command: one subcommand per entry of COMMANDS.

    mirlab run --model PATH_OR_ID --images DIR --texts DIR --eval-num 100 --out DIR

Adding a subcommand: write ``add_arguments(parser)`` and ``handler(args) -> int`` (exit code) in your module
and add ``"name": (add_arguments, handler)`` to COMMANDS below (or call ``register`` before ``main``). Keep
heavy imports inside the functions: ``mirlab --help`` should not load torch. The subcommand's help line is
the first line of the handler's docstring.
"""
from __future__ import annotations

import argparse
import sys
from typing import Callable

AddArguments = Callable[[argparse.ArgumentParser], object]
Handler = Callable[[argparse.Namespace], int]

# official --mode values of mir.py -> mirlab methods
MODES = {"fast": "official-fast", "accurate": "official-accurate"}


# --- mirlab run -------------------------------------------------------------------------------------------------

def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``mirlab run``; the official mir.py spellings (``--model_path`` ...) are accepted too."""
    from mirlab.metrics.frechet import METHODS

    data = parser.add_argument_group("model and data")
    data.add_argument("--model", "--model-path", "--model_path", default="mirlab/tiny-llava",
                      help="local folder or Hugging Face id of an image-text-to-text model "
                           "(default: mirlab/tiny-llava, the embedded offline model)")
    data.add_argument("--base-llm", "--base_llm", default=None,
                      help="causal LM whose weights replace the model's language model (for checkpoints that "
                           "trained only the projector)")
    data.add_argument("--images", "--image-data-path", "--image_data_path", default=None,
                      help="folder of images (TextVQA-style)")
    data.add_argument("--texts", "--text-data-path", "--text_data_path", default=None,
                      help="folder of CNN/DailyMail .story files (text before the first @highlight) or .txt files")
    data.add_argument("--pairs", default=None, help='JSONL of {"image": path, "text": ...} (instead of --images/--texts)')
    data.add_argument("--eval-num", "--eval_num", type=int, default=100, help="number of pairs (default 100)")
    data.add_argument("--seed", type=int, default=0, help="which images and texts are drawn and paired (default 0)")

    mir = parser.add_argument_group("MIR")
    mir.add_argument("--method", choices=METHODS, default=None,
                     help="Fréchet distance: exact (default, correct) or the official script's arithmetic")
    mir.add_argument("--mode", choices=sorted(MODES), default=None,
                     help="official mir.py spelling: fast = official-fast, accurate = official-accurate")
    mir.add_argument("--outliers", choices=("replace", "drop", "none"), default="replace",
                     help="3-sigma outlier rows: replace by the median (official, default), drop, or keep")
    mir.add_argument("--text-span", choices=("after_image", "caption"), default="after_image",
                     help="text rows: everything after the image (official, default) or only the text's tokens")
    mir.add_argument("--include-embeddings", action="store_true", help="also use layer 0 (embedding output)")
    mir.add_argument("--max-text-tokens", type=int, default=None, help="cut each text to this many tokens")

    run = parser.add_argument_group("execution")
    run.add_argument("--batch-size", type=int, default=8, help="pairs per forward pass (default 8)")
    run.add_argument("--dtype", default=None, help="model weights dtype, e.g. bfloat16 (default: as loaded)")
    run.add_argument("--device-map", default=None, help='accelerate device map, e.g. "auto"')
    run.add_argument("--cache", default=None, help="keep hidden states here; a rerun reuses / resumes them")
    run.add_argument("--store-dtype", choices=("float32", "float16"), default="float32",
                     help="dtype of cached rows (default float32)")
    run.add_argument("--skip-bad", action="store_true", help="skip unusable pairs (with a warning) instead of failing")
    run.add_argument("--out", default=None, help="write mir.json, per_layer.csv and per_layer.png here")
    run.add_argument("--threads", type=int, default=None,
                     help="torch CPU threads (default: torch's choice; 1 is often fastest on a busy machine)")
    run.add_argument("--no-progress", action="store_true", help="no progress bars")


def run_command(args: argparse.Namespace) -> int:
    """Measure the MIR of a model on (image, text) pairs."""
    from mirlab.run import run_mir

    if args.method is not None and args.mode is not None and MODES[args.mode] != args.method:
        raise SystemExit(f"mirlab run: --mode {args.mode} contradicts --method {args.method}")
    method = args.method or MODES.get(args.mode, "exact")
    if args.threads is not None:
        import torch
        torch.set_num_threads(args.threads)
    if args.pairs is None and (args.images is None or args.texts is None):
        raise SystemExit("mirlab run: give --images and --texts, or --pairs")
    result = run_mir(args.model, args.images, args.texts, pairs_file=args.pairs, eval_num=args.eval_num,
                     seed=args.seed, method=method, outliers=args.outliers, batch_size=args.batch_size,
                     cache_dir=args.cache, out_dir=args.out, base_llm=args.base_llm, dtype=args.dtype,
                     device_map=args.device_map, text_span=args.text_span,
                     include_embeddings=args.include_embeddings, max_text_tokens=args.max_text_tokens,
                     store_dtype=args.store_dtype, on_error="skip" if args.skip_bad else "raise",
                     progress=not args.no_progress)
    print(summary(result))
    if args.out is not None:
        print(f"wrote mir.json, per_layer.csv, per_layer.png to {args.out}")
    return 0


def summary(result) -> str:
    """A few lines: MIR, method, pairs, and the per-layer FD range."""
    fd = result.per_layer["fd"]
    meta = result.meta
    lines = [f"MIR = {result.mir:.4f}   (method {result.method}, outliers {result.outliers})",
             f"model {meta.get('model') or '?'}: {meta.get('n_pairs', '?')} pairs, {len(fd)} layers, "
             f"FD per layer {fd.min():.4g} .. {fd.max():.4g} (max at layer {int(result.per_layer['layer'][fd.idxmax()])})"]
    if meta.get("skipped"):
        lines.append(f"skipped {len(meta['skipped'])} pairs")
    return "\n".join(lines)


# --- the registry ------------------------------------------------------------------------------------------------

def _commands() -> dict[str, tuple[AddArguments, Handler]]:
    from mirlab import course
    from mirlab.tiny import pretrain

    return {
        "run": (add_run_arguments, run_command),
        "course": (course.add_course_arguments, course.course_command),
        "sweep": (course.add_sweep_arguments, course.sweep_command),
        "pretrain": (pretrain.add_arguments, pretrain.main),
    }


COMMANDS: dict[str, tuple[AddArguments, Handler]] = _commands()


def register(name: str, add_arguments: AddArguments, handler: Handler) -> None:
    """Add (or replace) the subcommand ``name``."""
    COMMANDS[name] = (add_arguments, handler)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mirlab", description="Measure and explore the Modality Integration "
                                     "Rate (MIR) of vision-language models.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (add_arguments, handler) in COMMANDS.items():
        doc = (handler.__doc__ or "").strip().splitlines()
        help_line = doc[0] if doc else None
        command = sub.add_parser(name, help=help_line, description=help_line)
        add_arguments(command)
        command.set_defaults(handler=handler)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``mirlab`` console script."""
    args = build_parser().parse_args(argv)
    return int(args.handler(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
