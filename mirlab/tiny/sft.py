"""LLaVA stage 2 in miniature: instruction tuning (SFT) of the embedded model on questions about scenes.

Data: `mirlab.pairs.scene_qa.qa_dataset(train_scenes, "train", seed)`, one question per kind per scene (all six
kinds mixed, answers balanced per kind), each written as one chat turn by `instruct.encode_qa`:

    <|im_start|>user\\n<image>\\n{question}<|im_end|>\\n<|im_start|>assistant\\n{answer}<|im_end|>\\n
    \\______________________________ prompt (never a target) __________________________/\\_ targets _/

or, with turns="scene", all questions of a scene as one conversation (the image in the first user turn only,
each answer a target), as LLaVA-1.5 groups the short questions about one image: the 64 image rows then run
once per scene instead of once per question.

Trained: the language model (every decoder weight, the norms and the token embeddings; SmolLM2's lm_head is
tied to the embeddings, so it trains through them and is stored once), the projector, and MoCa when the model
has one attached (`model.moca`) -- what the paper's SFT unfreezes. The vision tower stays frozen. The loss is the
mean next-token cross-entropy over the answer tokens of the batch (`pretrain.caption_loss` on the instruction
labels; equal to Hugging Face's causal-LM loss on the same batch, tested):

    loss = - (1 / #answer tokens) * sum_{b, t answer} log p(x_{b,t} | x_{b,<t}, image_b)

Everything else is pre-training's machinery (`mirlab.tiny.pretrain`): cached vision features (the tower is frozen),
AdamW, linear warmup then cosine decay (`pretrain.learning_rate`), the data order of `pretrain.batch_indices`
(seeded permutations of the examples, one per epoch), the model in eval mode (no dropout) with gradients on.

Files, all under the user cache (`mirlab.paths.cache_dir()/"sft"/<recipe>-<start>/`, never in git):
- state.safetensors: resumable state (`mirlab.tiny.resume`, never unpickled) every `checkpoint_every` steps (fp32 trainable tensors, AdamW moments, step, RNG,
  recipe, start); `train_sft` resumes from it and continues exactly as if it had not stopped;
- log.csv: step, loss, lr, seconds (per step);
- final.safetensors: the fine-tuned parts (`trainable.save_state`, float32, about 540 MB) with the recipe and
  the start; `load_sft` rebuilds the model from it. Not float16: storing the LLM in float16 moved the
  log-likelihoods of the 600 benchmark questions by up to 0.02 and turned one answer (a near tie) around,
  0.405 -> 0.403 average, so the file keeps float32 and a reload reproduces the benchmark exactly.

`mirlab sft --start final --out DIR` trains (or resumes) one run and then scores it with the scene-QA benchmark
(`mirlab.tiny.benchmark`), writing the benchmark's tables and figure, the training log and sft.json to DIR.
"""
from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import os
import shutil
import time
import types
from pathlib import Path

import numpy as np
import torch

from mirlab import paths
from mirlab.tiny import instruct, pretrain, resume, trainable
from mirlab.tiny.pretrain import IGNORE

LANGUAGE_MODEL, PROJECTOR, LM_HEAD, MOCA = "language_model", "projector", "lm_head", "moca"
trainable.register(LANGUAGE_MODEL, lambda model: model.model.language_model)  # decoder + token embeddings
trainable.register(LM_HEAD, lambda model: model.lm_head)  # trained only when not tied to the embeddings

STATE_FILE = "state.safetensors"
LOG_FILE = "log.csv"
FINAL_FILE = "final.safetensors"
WEIGHTS_DTYPE = torch.float32  # of final.safetensors; float16 changed a benchmark answer (see the docstring)
RUNS_FOLDER = "sft"  # under paths.cache_dir()
TURNS = ("single", "scene")


@dataclasses.dataclass(frozen=True)
class SFTRecipe:
    """Everything that determines an SFT run besides its start (equal recipes and starts give equal weights)."""
    name: str = "sft"
    lr: float = 1e-4
    steps: int = 150
    batch_size: int = 8
    warmup: int = 10
    weight_decay: float = 0.0
    seed: int = 0  # training scenes, their questions and the data order
    train_scenes: int = 500  # instruction data: qa_dataset(train_scenes, "train", seed)
    trainable: tuple[str, ...] = (LANGUAGE_MODEL, PROJECTOR)  # + lm_head if untied, + moca if attached
    checkpoint_every: int = 25  # resumable state (about 1.6 GB for the embedded model)
    turns: str = "single"  # "single": one question per example; "scene": a scene's questions, one conversation

    def __post_init__(self):
        object.__setattr__(self, "trainable", tuple(self.trainable))
        if self.steps < 1 or self.batch_size < 1 or self.train_scenes < 1 or self.checkpoint_every < 1:
            raise ValueError(f"steps, batch_size, train_scenes and checkpoint_every must be positive: {self}")
        if not 0 <= self.warmup < self.steps:
            raise ValueError(f"warmup must be in [0, steps): {self.warmup} vs {self.steps}")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if not self.name or "/" in self.name or self.name.startswith("."):
            raise ValueError(f"recipe name must be a plain folder name, got {self.name!r}")
        unknown = [n for n in self.trainable if n not in trainable.REGISTRY]
        if unknown or not self.trainable:
            raise ValueError(f"unknown trainable state names {unknown}; known: {sorted(trainable.REGISTRY)}")
        if self.turns not in TURNS:
            raise ValueError(f"turns must be one of {TURNS}, got {self.turns!r}")


def tied_head(model) -> bool:
    """True when lm_head's weight is the input embedding matrix itself (SmolLM2, the embedded model)."""
    return model.lm_head.weight is model.get_input_embeddings().weight


def trained_names(model, recipe: SFTRecipe) -> list[str]:
    """The state names this run trains: recipe.trainable, plus "lm_head" when the language model trains and the
    head is a separate matrix, plus "moca" when MoCa is attached to the model."""
    names = list(recipe.trainable)
    if LANGUAGE_MODEL in names and LM_HEAD not in names and not tied_head(model):
        names.append(LM_HEAD)
    if getattr(model, MOCA, None) is not None and MOCA not in names:
        names.append(MOCA)
    return names


def start_label(start: str) -> str:
    """A folder-name form of the start checkpoint: 'lr2e-3/step-0020' -> 'lr2e-3-step-0020'; a path -> its stem."""
    path = Path(start)
    if path.suffix == ".safetensors":
        return path.stem
    label = str(start).strip("/").replace("/", "-")
    if not label or label.startswith("."):
        raise ValueError(f"start must be a checkpoint name or a .safetensors file, got {start!r}")
    return label


def run_dir(recipe: SFTRecipe, start: str) -> Path:
    """`paths.cache_dir()/sft/<recipe name>-<start label>`: state, log and fine-tuned weights of one run."""
    return paths.cache_dir() / RUNS_FOLDER / f"{recipe.name}-{start_label(start)}"


def state_digest(model, names) -> str:
    """sha256 (16 hex digits) of the named parts' tensors (names sorted, raw float32 bytes)."""
    digest = hashlib.sha256()
    for key, tensor in sorted(trainable.named_state(model, names).items()):
        digest.update(key.encode())
        digest.update(tensor.detach().to(torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


# --- data and loss -------------------------------------------------------------------------------------------

def training_data(model, processor, recipe: SFTRecipe, progress: bool = False):
    """(questions, features): qa_dataset(train_scenes, "train", seed) and the vision features of its scenes
    (`pretrain.scene_features`, cached); question["scene"] indexes features."""
    from mirlab.pairs.scene_qa import qa_dataset

    questions = qa_dataset(recipe.train_scenes, split="train", seed=recipe.seed)
    features, _, _ = pretrain.scene_features(model, processor, recipe.train_scenes, seed=recipe.seed,
                                             split="train", progress=progress)
    return questions, features


def conversations(questions, recipe: SFTRecipe) -> list[list[dict]]:
    """The training examples, each a list of questions asked in one conversation about one scene.

    turns "single": every question alone, in qa_dataset's order. turns "scene": every question of a scene in one
    conversation (LLaVA-1.5 groups the short VQA questions of an image so), scenes in index order, the questions
    of scene i in the order of permutation numpy default_rng([seed, i]) -- so each kind also comes first.
    """
    if recipe.turns == "single":
        return [[q] for q in questions]
    by_scene: dict[int, list[dict]] = {}
    for q in questions:
        by_scene.setdefault(int(q["scene"]), []).append(q)
    out = []
    for scene in sorted(by_scene):
        asked = by_scene[scene]
        order = np.random.default_rng([recipe.seed, scene]).permutation(len(asked))
        out.append([asked[i] for i in order])
    return out


def example_indices(step: int, recipe: SFTRecipe, n_examples: int) -> list[int]:
    """Indices of the examples of update `step` (1-based): pre-training's order (`pretrain.batch_indices`,
    seeded permutations, one per epoch) over the n_examples instruction examples."""
    order = types.SimpleNamespace(train_scenes=n_examples, batch_size=recipe.batch_size, seed=recipe.seed)
    return pretrain.batch_indices(step, order)


def conversation_ids(processor, turns: list[tuple[str, str]]) -> tuple[list[int], list[int]]:
    """(ids, labels) of a conversation of (question, answer) turns, the image in the first user turn only.

    Turn k adds what the chat template writes between the previous answer's end and the assistant header of
    turn k (IGNORE), then the answer and its end-of-turn token (targets), then the rest of the end of turn
    (IGNORE). A single turn gives exactly `instruct.encode_qa`'s row; the text is the template's (checked).
    """
    tokenizer = processor.tokenizer
    messages, ids, labels, written = [], [], [], ""
    for k, (question, answer) in enumerate(turns):
        messages.append(instruct.user_message(question, image=k == 0))
        prompt = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        if not prompt.startswith(written):
            raise ValueError("the chat template rewrites earlier turns when a turn is added: cannot encode "
                             "multi-turn conversations with it")
        head = (instruct.prompt_ids(processor, question) if k == 0
                else tokenizer(prompt[len(written):], add_special_tokens=False)["input_ids"])
        body, rest = instruct.answer_ids(processor, answer)
        ids += head + body + rest
        labels += [IGNORE] * len(head) + body + [IGNORE] * len(rest)
        messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
        written = processor.apply_chat_template(messages, tokenize=False)
        if written != prompt + answer + instruct.end_of_turn(processor):
            raise ValueError(f"the chat template does not write turn {k + 1} as prompt + answer + end of turn")
    return ids, labels


def encode_conversations(processor, examples: list[list[dict]]):
    """(input_ids, attention_mask, labels), right-padded, one conversation (list of questions) per row."""
    rows = [conversation_ids(processor, [(q["question"], q["answer"]) for q in example]) for example in examples]
    length = max(len(ids) for ids, _ in rows)
    pad = processor.tokenizer.pad_token_id
    input_ids = torch.tensor([ids + [pad] * (length - len(ids)) for ids, _ in rows])
    attention_mask = torch.tensor([[1] * len(ids) + [0] * (length - len(ids)) for ids, _ in rows])
    labels = torch.tensor([lab + [IGNORE] * (length - len(lab)) for _, lab in rows])
    return input_ids, attention_mask, labels


def encode_batch(processor, features, examples):
    """(features of each example's scene, input_ids, attention_mask, labels) for a list of examples, each a
    question dict or a list of questions about one scene (a conversation). Single questions: `instruct.encode_qa`."""
    examples = [e if isinstance(e, list) else [e] for e in examples]
    scenes = [{int(q["scene"]) for q in e} for e in examples]
    if any(len(s) != 1 for s in scenes):
        raise ValueError("every question of a conversation must be about the same scene")
    if all(len(e) == 1 for e in examples):
        tensors = instruct.encode_qa(processor, [e[0]["question"] for e in examples],
                                     [e[0]["answer"] for e in examples])
    else:
        tensors = encode_conversations(processor, examples)
    return (features[[s.pop() for s in scenes]], *tensors)


def answer_loss(model, features, input_ids, attention_mask, labels) -> torch.Tensor:
    """Mean cross-entropy over the answer tokens: `pretrain.caption_loss` (which names MoCa's image rows when
    MoCa is attached) on the instruction labels."""
    return pretrain.caption_loss(model, features, input_ids, attention_mask, labels)


# --- state ---------------------------------------------------------------------------------------------------

def _save_state(path: Path, model, optimizer, step: int, recipe: SFTRecipe, start: dict, names):
    """The resumable state (`mirlab.tiny.resume`: safetensors + JSON, never unpickled)."""
    resume.save(path, trainable.named_state(model, names), optimizer,
                {"step": step, "recipe": dataclasses.asdict(recipe), "start": start, "names": list(names)})


def _load_state(path: Path, model, optimizer, recipe: SFTRecipe, start: dict, names) -> int:
    tensors, meta = resume.load(path, restore_rng=False)
    saved = {k: tuple(v) if isinstance(v, list) else v for k, v in meta["recipe"].items()}
    if saved != dataclasses.asdict(recipe) or meta["start"] != start or meta["names"] != list(names):
        raise ValueError(f"{path} holds another run:\n  saved {saved}, start {meta['start']}, parts "
                         f"{meta['names']}\n  asked {dataclasses.asdict(recipe)}, start {start}, parts {names}\n"
                         f"delete {path.parent} to start over, or use another recipe name")
    trainable.assign_state(model, tensors, names, source=str(path))
    resume.load(path, optimizer)  # optimizer moments and the RNG, once the run is known to match
    return meta["step"]


def _record(recipe: SFTRecipe, start: dict, names, step: int, loss: float | None) -> dict:
    """What final.safetensors stores as its recipe: the SFT recipe, the start, the parts, the last loss."""
    return {"stage": "sft", "recipe": dataclasses.asdict(recipe), "start": start, "names": list(names),
            "steps_done": step, "final_loss": loss, "weights_dtype": str(WEIGHTS_DTYPE).removeprefix("torch.")}


def save_final(model, out_dir, record: dict) -> Path:
    """out_dir/final.safetensors: the trained parts in WEIGHTS_DTYPE (MoCa always float32), with `record`."""
    dtypes = {name: torch.float32 if name == MOCA else WEIGHTS_DTYPE for name in record["names"]}
    return trainable.save_state(model, record["names"], Path(out_dir) / FINAL_FILE, recipe=record, dtype=dtypes)


# --- training ------------------------------------------------------------------------------------------------

def train_sft(model, processor, recipe: SFTRecipe, start: str, out_dir=None, state_dir=None, progress: bool = True,
              stop_after: int | None = None, data=None) -> int:
    """Instruction-tune `model` in place (LLM + projector [+ MoCa]); resume from the state in `state_dir` if any.

    start: the pre-training checkpoint the model was loaded with (a shipped name such as "final", "random",
    "lr2e-3/step-0020", or a file): recorded, with a digest of the trained parts as they are now, in the state,
    the log folder and final.safetensors. out_dir: log.csv and the final weights (default `run_dir`);
    state_dir: state.safetensors (default `run_dir`). stop_after: stop (with a saved state) once this update index is
    reached, to simulate an interruption. data: (questions, features) instead of `training_data(...)`.
    Returns the step reached; final.safetensors is written when the run completes.
    """
    from tqdm.auto import tqdm

    default = run_dir(recipe, start)
    out_dir = Path(out_dir) if out_dir is not None else default
    state_path = Path(state_dir if state_dir is not None else default) / STATE_FILE
    log_path = out_dir / LOG_FILE
    questions, features = data if data is not None else training_data(model, processor, recipe, progress)
    if not questions:
        raise ValueError("no training questions")
    top = max(int(q["scene"]) for q in questions)
    if top >= len(features):
        raise ValueError(f"a question is about scene {top} but the features hold {len(features)} scenes")

    examples = conversations(questions, recipe)
    names = trained_names(model, recipe)
    start_info = {"checkpoint": str(start), "digest": state_digest(model, names)}
    model.eval()
    trainable.freeze_all_but(model, names)
    params = [p for p in model.parameters() if p.requires_grad]  # a tied matrix appears once
    optimizer = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=recipe.weight_decay)
    step = _load_state(state_path, model, optimizer, recipe, start_info, names) if state_path.is_file() else 0
    pretrain.restart_log(log_path, step)
    last = recipe.steps if stop_after is None else min(stop_after, recipe.steps)

    bar = tqdm(total=recipe.steps, initial=step, desc=f"sft {recipe.name} from {start}", disable=not progress)
    loss = None
    while step < last:
        step += 1
        began = time.perf_counter()
        lr = pretrain.learning_rate(step, recipe)
        batch = [examples[i] for i in example_indices(step, recipe, len(examples))]
        loss = answer_loss(model, *encode_batch(processor, features, batch))
        pretrain.update(optimizer, loss, lr)
        seconds = time.perf_counter() - began
        pretrain.log_step(log_path, step, loss.item(), lr, seconds)
        if step % recipe.checkpoint_every == 0 or step == last:
            _save_state(state_path, model, optimizer, step, recipe, start_info, names)
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{lr:.1e}", s_per_step=f"{seconds:.1f}")
    bar.close()
    for p in params:
        p.requires_grad_(False)
    if step == recipe.steps:
        final_loss = loss.item() if loss is not None else _last_logged_loss(log_path)
        save_final(model, out_dir, _record(recipe, start_info, names, step, final_loss))
    return step


def _last_logged_loss(log_path: Path) -> float | None:
    with open(log_path, newline="") as f:
        rows = list(csv.DictReader(f))
    return float(rows[-1]["loss"]) if rows else None


def read_log(folder) -> "pandas.DataFrame":  # noqa: F821
    """log.csv of an SFT run folder as a DataFrame (step, loss, lr, seconds)."""
    import pandas as pd

    return pd.read_csv(Path(folder) / LOG_FILE)


# --- loading -------------------------------------------------------------------------------------------------

def load_sft(path, cache_dir=None):
    """(model, processor) of a fine-tuned run: the embedded model with its final.safetensors loaded
    (`build.embedded_model` of the file, which also sets the connector kind and attaches MoCa when the file holds
    one). `path`: a run folder or its final.safetensors."""
    from mirlab.tiny.build import MODEL_NAME, embedded_model

    path = Path(path)
    file = path / FINAL_FILE if path.is_dir() else path
    if trainable.read_state(file)[2].get("stage") != "sft":
        raise ValueError(f"{file} is not an SFT result (its recipe has no stage 'sft')")
    model, processor = embedded_model(file, cache_dir=cache_dir)
    model.name_or_path = model.config.name_or_path = f"{MODEL_NAME}@sft:{file.parent.name}"
    return model.eval(), processor


def fine_tuned(start: str, recipe: SFTRecipe, progress: bool = True):
    """(model, processor) after SFT with `recipe` from the pre-training checkpoint `start`: the finished run of
    `run_dir(recipe, start)` if its weights exist, else trained (or resumed from its state) first; the resumable
    state is deleted once the run is complete."""
    from mirlab.tiny.build import embedded_model

    folder = run_dir(recipe, start)
    if not (folder / FINAL_FILE).is_file():
        model, processor = embedded_model(start)
        train_sft(model, processor, recipe, start, progress=progress)
        (folder / STATE_FILE).unlink(missing_ok=True)
    return load_sft(folder)


# --- `mirlab sft` ----------------------------------------------------------------------------------------------

def add_arguments(parser):
    """Options of `mirlab sft` (defaults = the SFTRecipe fields and the benchmark's defaults)."""
    defaults = SFTRecipe()
    parser.add_argument("--start", default="final",
                        help="pre-training checkpoint to start from: a shipped name (final, random, "
                             "lr2e-3/step-0020, ...) or a checkpoint .safetensors file")
    parser.add_argument("--out", required=True, help="folder for the benchmark tables, figure, log.csv, sft.json")
    parser.add_argument("--name", default=defaults.name, help="recipe name (the run folder is <name>-<start>)")
    parser.add_argument("--lr", type=float, default=defaults.lr, help="peak learning rate (AdamW)")
    parser.add_argument("--steps", type=int, default=defaults.steps, help="optimizer updates")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--warmup", type=int, default=defaults.warmup, help="linear warmup steps, then cosine")
    parser.add_argument("--weight-decay", type=float, default=defaults.weight_decay)
    parser.add_argument("--seed", type=int, default=defaults.seed, help="training scenes, questions and order")
    parser.add_argument("--train-scenes", type=int, default=defaults.train_scenes,
                        help="training scenes (split 'train'); one question per kind per scene, balanced")
    parser.add_argument("--checkpoint-every", type=int, default=defaults.checkpoint_every,
                        help="save the resumable state every K steps")
    parser.add_argument("--turns", choices=TURNS, default=defaults.turns,
                        help="single: one question per example; scene: all questions of a scene in one conversation")
    parser.add_argument("--state-dir", default=None, help="resumable state folder (default: the run folder)")
    parser.add_argument("--scenes", type=int, default=500, help="benchmark: held-out scenes to draw from")
    parser.add_argument("--per-kind", type=int, default=100, help="benchmark: balanced questions per kind")
    parser.add_argument("--no-generation", action="store_true", help="benchmark: skip the free-generation view")
    parser.add_argument("--no-benchmark", action="store_true", help="train only")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def recipe_from_args(args) -> SFTRecipe:
    return SFTRecipe(name=args.name, lr=args.lr, steps=args.steps, batch_size=args.batch_size, warmup=args.warmup,
                     weight_decay=args.weight_decay, seed=args.seed, train_scenes=args.train_scenes,
                     checkpoint_every=args.checkpoint_every, turns=args.turns)


def main(args) -> int:
    """Instruction-tune the embedded model from a pre-training checkpoint (LLaVA stage 2), then benchmark it."""
    import pandas as pd

    from mirlab.tiny import benchmark
    from mirlab.tiny.build import embedded_model

    if args.threads:
        torch.set_num_threads(args.threads)
    recipe = recipe_from_args(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    folder = run_dir(recipe, args.start)
    progress = not args.no_progress

    began = time.perf_counter()
    model, processor = embedded_model(args.start)
    step = train_sft(model, processor, recipe, args.start, state_dir=args.state_dir, progress=progress)
    train_seconds = time.perf_counter() - began
    log = read_log(folder)
    shutil.copyfile(folder / LOG_FILE, out / LOG_FILE)
    info = {"recipe": dataclasses.asdict(recipe), "start": args.start, "run_dir": str(folder),
            "steps_done": step, "threads": torch.get_num_threads(),
            "seconds_per_step": round(float(log["seconds"].mean()), 3),
            "sft_seconds_logged": round(float(log["seconds"].sum()), 1),
            "sft_wall_seconds_this_call": round(train_seconds, 1)}
    print(f"sft {recipe.name} from {args.start}: step {step}/{recipe.steps}, "
          f"{info['seconds_per_step']:.2f} s/step, weights in {folder}")
    if not args.no_benchmark and step == recipe.steps:
        del model
        began = time.perf_counter()
        model, processor = load_sft(folder)
        tables = benchmark.benchmark(model, processor, n_scenes=args.scenes, per_kind=args.per_kind,
                                     generation=not args.no_generation, progress=progress)
        info["benchmark_seconds"] = round(time.perf_counter() - began, 1)
        meta = {"checkpoint": f"sft:{folder.name}", "start": args.start, "scenes": args.scenes,
                "per_kind": args.per_kind, "seconds": info["benchmark_seconds"], "threads": torch.get_num_threads(),
                "title": f"scene QA after SFT ({recipe.name}) from {args.start}"}
        benchmark.write_outputs(tables, out, meta)
        with pd.option_context("display.width", 160, "display.max_columns", 20):
            print(tables["summary"].round(3).to_string(index=False))
    (out / "sft.json").write_text(json.dumps(info, indent=2))
    print(f"wrote {', '.join(sorted(p.name for p in out.iterdir()))} to {out}")
    return 0
