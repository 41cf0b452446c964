"""The ``mirlab`` command: one subcommand per entry of COMMANDS.

    mirlab run --model PATH_OR_ID --images DIR --texts DIR --eval-num 100 --out DIR
    mirlab probe --model PATH_OR_ID --pairs captions.jsonl --eval-num 64 --out DIR

The registry is lazy: COMMANDS maps a name to its help line and two ``"module:function"`` strings, and a
subcommand's module is imported only when that subcommand is parsed, so ``mirlab --help`` lists every
subcommand without importing torch. Adding a subcommand: write ``add_arguments(parser)`` and
``handler(args) -> int`` (the exit status) in your module and add a ``Command`` to COMMANDS (or call
``register`` with the functions themselves before ``main``).

Errors: a mistake in the user's input (mirlab.errors.UserError, and the ValueError / OSError the library
raises for bad inputs) is printed as one line ``mirlab <command>: <message>`` on stderr, exit status 2;
``--debug`` shows the traceback instead. Option errors are one line too. Ctrl-C prints one line, keeps the
hidden-state cache (a rerun resumes it) and exits with 130. Warnings are printed as one line each.
"""
from __future__ import annotations

import argparse
import importlib
import re
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

AddArguments = Callable[[argparse.ArgumentParser], object]
Handler = Callable[[argparse.Namespace], int]

# official --mode values of mir.py -> mirlab methods
MODES = {"fast": "official-fast", "accurate": "official-accurate"}

# library parameter spellings in error messages -> the options a command-line user types
OPTION_WORDS = {"on_error='skip'": "--skip-bad", "max_text_tokens": "--max-text-tokens", "cache_dir": "--cache",
                "out_dir": "--out", "trust_remote_code=True": "--trust-remote-code"}

USAGE_ERROR = 2
INTERRUPTED = 130


@dataclass(frozen=True)
class Command:
    """A subcommand: its help line and its two functions, each a function or a ``"module:function"`` string."""
    help: str
    add_arguments: str | AddArguments
    handler: str | Handler


def _resolve(target):
    """The function named by ``"module:function"`` (imported now), or ``target`` itself if it is callable."""
    if callable(target):
        return target
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


def positive_int(text: str) -> int:
    """argparse type: an int >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


# --- mirlab run -------------------------------------------------------------------------------------------------

def add_model_and_data_arguments(parser: argparse.ArgumentParser) -> None:
    """The model and data options every command that runs a model on pairs takes (``run``, ``probe``)."""
    data = parser.add_argument_group("model and data")
    data.add_argument("--model", "--model-path", "--model_path", default="mirlab/tiny-llava",
                      help="local folder or Hugging Face id of an image-text-to-text model "
                           "(default: mirlab/tiny-llava, the embedded offline model)")
    data.add_argument("--base-llm", "--base_llm", default=None,
                      help="causal LM whose weights replace the model's language model (for checkpoints that "
                           "trained only the projector)")
    data.add_argument("--trust-remote-code", action="store_true",
                      help="let transformers run the Python modelling/processing files the model folder or Hub "
                           "repository ships (its config's auto_map: MiniCPM-V, Phi-3.5-vision, original InternVL), "
                           "with your permissions; only for sources you trust (default: refuse such models)")
    data.add_argument("--images", "--image-data-path", "--image_data_path", default=None,
                      help="folder of images (TextVQA-style); hidden and system files are skipped")
    data.add_argument("--texts", "--text-data-path", "--text_data_path", default=None,
                      help="folder of CNN/DailyMail .story files (text before the first @highlight) or .txt files "
                           "(UTF-8; see mirlab.pairs.readers for other encodings)")
    data.add_argument("--pairs", default=None,
                      help='JSONL of {"image": path, "text": ...} (instead of --images/--texts)')
    data.add_argument("--eval-num", "--eval_num", type=positive_int, default=100,
                      help="number of pairs (default 100)")
    data.add_argument("--seed", type=int, default=0, help="which images and texts are drawn and paired (default 0)")


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``mirlab run``; the official mir.py spellings (``--model_path`` ...) are accepted too."""
    from mirlab.metrics.frechet import METHODS

    add_model_and_data_arguments(parser)
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
    mir.add_argument("--max-text-tokens", type=positive_int, default=None,
                     help="cut each text to this many tokens, with a warning naming the texts cut (default: keep "
                          "texts whole; a pair too long for the model's context is then an error, or skipped "
                          "with --skip-bad)")
    add_execution_arguments(parser, "write mir.json, per_layer.csv and per_layer.png here")


def add_execution_arguments(parser: argparse.ArgumentParser, out_help: str) -> None:
    """The execution options of ``run`` and ``probe`` (batching, dtype, cache, --out, threads, progress)."""
    run = parser.add_argument_group("execution")
    run.add_argument("--batch-size", type=positive_int, default=8, help="pairs per forward pass (default 8)")
    run.add_argument("--dtype", default=None, help="model weights dtype, e.g. bfloat16 (default: as loaded)")
    run.add_argument("--device-map", default=None, help='accelerate device map, e.g. "auto"')
    run.add_argument("--cache", default=None,
                     help="keep hidden states here; a rerun (also after Ctrl-C or an error) reuses / resumes them")
    run.add_argument("--store-dtype", choices=("float32", "float16"), default="float32",
                     help="dtype of cached rows (default float32)")
    run.add_argument("--skip-bad", action="store_true",
                     help="skip unusable pairs (unreadable image or text, too long ...) with a warning instead of "
                          "failing")
    run.add_argument("--out", default=None, help=out_help)
    run.add_argument("--threads", type=positive_int, default=None,
                     help="CPU threads of torch and of numpy/scipy's BLAS (default: their choice; 1 is often "
                          "fastest on a busy machine)")
    run.add_argument("--no-progress", action="store_true", help="no progress bars")


def run_command(args: argparse.Namespace) -> int:
    """Measure the MIR of a model on (image, text) pairs."""
    from mirlab.errors import UserError
    from mirlab.run import run_mir  # checks --cache / --out before loading the model

    if args.method is not None and args.mode is not None and MODES[args.mode] != args.method:
        raise UserError(f"--mode {args.mode} contradicts --method {args.method}: give one of them")
    method = args.method or MODES.get(args.mode, "exact")
    check_model_and_data(args)
    apply_execution_options(args)
    result = run_mir(args.model, args.images, args.texts, pairs_file=args.pairs, eval_num=args.eval_num,
                     seed=args.seed, method=method, outliers=args.outliers, batch_size=args.batch_size,
                     cache_dir=args.cache, out_dir=args.out, base_llm=args.base_llm, dtype=args.dtype,
                     device_map=args.device_map, text_span=args.text_span,
                     include_embeddings=args.include_embeddings, max_text_tokens=args.max_text_tokens,
                     store_dtype=args.store_dtype, on_error="skip" if args.skip_bad else "raise",
                     progress=not args.no_progress, trust_remote_code=args.trust_remote_code)
    print(summary(result))
    if args.out is not None:
        print(f"wrote mir.json, per_layer.csv, per_layer.png to {args.out}")
    return 0


def check_model_and_data(args: argparse.Namespace) -> None:
    """UserError unless the data options name pairs and a path-like --model / --base-llm exists."""
    from mirlab.errors import UserError

    if args.pairs is None and (args.images is None or args.texts is None):
        raise UserError("give --images and --texts (two folders), or --pairs (a JSONL file)")
    for model, option in ((args.model, "--model"), (args.base_llm, "--base-llm")):
        if model is not None and model.startswith(("/", "./", "../", "~")) and not Path(model).expanduser().exists():
            raise UserError(f"{option} {model}: no such folder (give a local model folder or a Hugging Face id)")


def apply_execution_options(args: argparse.Namespace) -> None:
    """--threads (torch and the BLAS/OpenMP pools of numpy/scipy) and --no-progress (also "Loading weights")."""
    if args.threads is not None:
        from mirlab.course import use_threads
        use_threads(args.threads)
    if args.no_progress:
        from transformers.utils import logging as transformers_logging
        transformers_logging.disable_progress_bar()


def summary(result, value: str = "fd") -> str:
    """A few lines: the headline (MIR, method), pairs, and the range of the per-layer ``value`` column.

    result: a MIRResult, any object with a ``per_layer`` DataFrame (and optionally ``meta``), or the DataFrame.
    """
    from mirlab.plots import per_layer_table

    table = per_layer_table(result, value, what="summary")
    column = table[value]
    meta = getattr(result, "meta", {}) or {}
    lines = []
    if hasattr(result, "mir"):
        lines.append(f"MIR = {result.mir:.4f}   (method {result.method}, outliers {result.outliers})")
    lines.append(f"model {meta.get('model') or '?'}: {meta.get('n_pairs', '?')} pairs, {len(column)} layers, "
                 f"{'FD' if value == 'fd' else value} per layer {column.min():.4g} .. {column.max():.4g} "
                 f"(max at layer {int(table['layer'][column.idxmax()])})")
    if meta.get("skipped"):
        lines.append(f"skipped {len(meta['skipped'])} pairs")
    return "\n".join(lines)


# --- mirlab probe -----------------------------------------------------------------------------------------------

def _int_list(text: str) -> list[int]:
    """argparse type: comma-separated ints, e.g. "8,16,30"."""
    try:
        return [int(word) for word in text.split(",") if word.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def add_probe_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``mirlab probe``: the model and data options of ``run``, which probes, and their settings."""
    from mirlab.run import PROBES

    add_model_and_data_arguments(parser)
    probes = parser.add_argument_group("probes")
    probes.add_argument("--probes", nargs="+", choices=PROBES, default=list(PROBES), metavar="PROBE",
                        help=f"which probes (default all): {', '.join(PROBES)}")
    probes.add_argument("--text-span", choices=("after_image", "caption"), default="caption",
                        help="text rows: only the text's tokens (default) or everything after the image")
    probes.add_argument("--include-embeddings", action="store_true", help="also use layer 0 (embedding output)")
    probes.add_argument("--max-text-tokens", type=positive_int, default=None,
                        help="cut each text to this many tokens (default: keep texts whole)")
    probes.add_argument("--knn-k", type=positive_int, default=10,
                        help="neighbours of the mutual kNN alignment (default 10; at most pairs - 2)")
    probes.add_argument("--shuffles", type=positive_int, default=10,
                        help="random re-pairings of the shuffled-pairs baseline (default 10)")
    probes.add_argument("--head-groups", type=positive_int, default=4,
                        help="groups of contiguous heads for the attention share (default 4)")
    probes.add_argument("--lens-layers", type=_int_list, default=None,
                        help="decoder layers of the logit lens, e.g. 8,16,30 (default: 4 evenly spaced, the last "
                             "included)")
    probes.add_argument("--top-k", type=positive_int, default=5, help="logit lens: tokens per image row (default 5)")
    probes.add_argument("--lens-max-rows", type=positive_int, default=None,
                        help="logit lens: a random subset of this many image rows per layer (default: all)")
    add_execution_arguments(parser, "write probes.csv (layer, probe, value), one PNG per probe, "
                                    "visual_dependence.csv, logit_lens.csv and probes.json here")


def probe_command(args: argparse.Namespace) -> int:
    """Modality-bias probes of a model on (image, text) pairs: norm ratio, modality gap, ranks, paired
    alignment, visual dependence, attention share, logit lens."""
    from mirlab.run import run_probes  # checks --cache / --out before loading the model

    check_model_and_data(args)
    apply_execution_options(args)
    result = run_probes(args.model, args.images, args.texts, pairs_file=args.pairs, eval_num=args.eval_num,
                        seed=args.seed, probes=tuple(args.probes), batch_size=args.batch_size,
                        cache_dir=args.cache, out_dir=args.out, base_llm=args.base_llm, dtype=args.dtype,
                        device_map=args.device_map, text_span=args.text_span,
                        include_embeddings=args.include_embeddings, max_text_tokens=args.max_text_tokens,
                        store_dtype=args.store_dtype, on_error="skip" if args.skip_bad else "raise",
                        k=args.knn_k, n_shuffles=args.shuffles, head_groups=args.head_groups,
                        lens_layers=args.lens_layers, top_k=args.top_k, lens_max_rows=args.lens_max_rows,
                        progress=not args.no_progress, trust_remote_code=args.trust_remote_code)
    print(result.summary())
    if args.out is not None:
        print(f"wrote probes.csv and the probe figures to {args.out}")
    return 0


# --- the registry ------------------------------------------------------------------------------------------------

COMMANDS: dict[str, Command] = {
    "run": Command("Measure the MIR of a model on (image, text) pairs.",
                   "mirlab.cli:add_run_arguments", "mirlab.cli:run_command"),
    "probe": Command("Modality-bias probes beside MIR: norm ratio, modality gap, ranks, paired alignment, visual "
                     "dependence, attention share, logit lens.", "mirlab.cli:add_probe_arguments",
                     "mirlab.cli:probe_command"),
    "course": Command("Run every course notebook headless; write executed notebooks and a results table.",
                      "mirlab.course:add_course_arguments", "mirlab.course:course_command"),
    "sweep": Command("Run one notebook over a parameter grid and collect its recorded results into sweep.csv.",
                     "mirlab.course:add_sweep_arguments", "mirlab.course:sweep_command"),
    "pretrain": Command("Pre-train the embedded model's projector (LLaVA stage 1); an interrupted run resumes.",
                        "mirlab.tiny.pretrain:add_arguments", "mirlab.tiny.pretrain:main"),
    "sft": Command("Instruction-tune the embedded model (LLaVA stage 2), then score it on the scene-QA benchmark.",
                   "mirlab.tiny.sft:add_arguments", "mirlab.tiny.sft:main"),
    "benchmark": Command("Score the embedded model on held-out scene questions, with blind baselines.",
                         "mirlab.tiny.benchmark:add_arguments", "mirlab.tiny.benchmark:main"),
}


def register(name: str, add_arguments: AddArguments | str, handler: Handler | str, help: str | None = None) -> None:
    """Add (or replace) the subcommand ``name``; ``help`` defaults to the first line of the handler's docstring."""
    if help is None:
        doc = (getattr(handler, "__doc__", None) or "").strip().splitlines()
        help = doc[0] if doc else ""
    COMMANDS[name] = Command(help, add_arguments, handler)


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line: ``prog: message (see prog --help)``, exit status 2."""

    def error(self, message):
        self.exit(USAGE_ERROR, f"{self.prog}: {message} (see {self.prog} --help)\n")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The ``mirlab`` parser; only subcommand ``command`` gets its options (importing its module)."""
    parser = _Parser(prog="mirlab", description="Measure and explore the Modality Integration Rate (MIR) of "
                     "vision-language models.")
    parser.add_argument("--debug", action="store_true", help="on an error, show the full traceback")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, spec in COMMANDS.items():
        child = sub.add_parser(name, help=spec.help, description=spec.help)
        child.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                           help="on an error, show the full traceback")
        if name == command:
            _resolve(spec.add_arguments)(child)
    return parser


def _command_name(argv: list[str]) -> str | None:
    """The subcommand in ``argv``: its first word that is not an option (the top level's options take no value)."""
    return next((word for word in argv if not word.startswith("-")), None)


def _one_line(message: str) -> str:
    """``message`` on one line, with the library's parameter names spelled as command-line options."""
    text = " ".join(str(message).split())
    for word, option in OPTION_WORDS.items():
        text = re.sub(rf"(?<![\w/\\.-]){re.escape(word)}(?![\w/\\-])", option, text)
    return text


def _error_message(err: BaseException) -> str:
    if isinstance(err, OSError) and err.filename is not None and err.strerror:
        return f"{err.filename}: {err.strerror}"
    return str(err) or type(err).__name__


def _cache_note(args: argparse.Namespace) -> str:
    """What an interrupted run leaves behind: ``mirlab run`` keeps every finished batch in ``--cache``."""
    if getattr(args, "cache", None):
        return f"; hidden-state cache kept at {args.cache} (rerun the same command to resume)"
    if args.command in ("run", "probe"):
        return " (with --cache DIR a rerun resumes where it stopped)"
    return ""


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``mirlab`` console script; returns the exit status (see the module docstring)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    command = _command_name(argv)
    args = build_parser(command if command in COMMANDS else None).parse_args(argv)
    prog = f"mirlab {args.command}"
    handler = _resolve(COMMANDS[args.command].handler)
    with warnings.catch_warnings():
        if not args.debug:
            warnings.showwarning = lambda message, category, *_, **__: print(
                f"{prog}: warning: {_one_line(message)}", file=sys.stderr)
        try:
            return int(handler(args) or 0)
        except KeyboardInterrupt:
            if args.debug:
                raise
            print(f"{prog}: interrupted{_cache_note(args)}", file=sys.stderr)
            return INTERRUPTED
        except (ValueError, OSError) as err:  # UserError is a ValueError
            if args.debug:
                raise
            print(f"{prog}: {_one_line(_error_message(err))}", file=sys.stderr)
            return USAGE_ERROR


if __name__ == "__main__":
    sys.exit(main())
