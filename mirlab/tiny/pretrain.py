"""LLaVA stage-1 pre-training of the embedded model's projector (vision tower and LLM frozen).

Each training example is one synthetic scene (`mirlab.pairs.scenes`, split "train") in the embedded model's chat
format, with no instruction text (the same prompt MIR is measured with: the user turn is the image only):

    <|im_start|>user\\n<image>\\n<|im_end|>\\n<|im_start|>assistant\\n{caption}<|im_end|>\\n
    \\___________________ prompt (never a target) __________________/\\_ targets _/

The loss is the next-token cross-entropy averaged over the target tokens of the batch, i.e. the caption's
tokens and the closing `<|im_end|>` (so the model learns to stop); the final newline is not a target:

    loss = - (1 / #targets) * sum_{b, t target} log p(x_{b,t} | x_{b,<t}, image_b)

Only `multi_modal_projector` receives gradients, and MoCa's scales and shifts when the recipe has MoCa. The
recipe's axes beyond the optimisation (paper Tables 1, 4, 5):

    connector  "mlp" (LLaVA's 2-layer GELU MLP, 384 -> 576 -> 576) or "linear" (one Linear 384 -> 576)
    moca       MoCa (`mirlab.lvlm.moca`) on all 30 decoder layers, u = 1 and v = 0 at step 0, trained with the
               projector at the same learning rate
    captions   "detailed" (the scene's caption: counts, sizes, colours, shapes, positions) or "short"
               (`scenes.describe_short`: colours and shapes only), of the same scenes

`prepare(model, processor, recipe)` puts the recipe's step-0 model in place (seeded connector init, fresh MoCa).

Fast path. The vision tower is frozen, so its output for an image never changes: `vision_features` computes it
once per image (last ViT block, CLS dropped -- what LLaVA feeds its projector for this config) and training runs
`projector -> scatter into the token embeddings -> LLM -> lm_head on the target rows only`. A test checks this
gives the same loss as the plain `LlavaForConditionalGeneration(**inputs, labels=...)` forward. The LLM call gets
no input_ids, so with MoCa it names the image rows itself (`build.moca_rows`).

Schedule: AdamW, linear warmup over `warmup` steps to `lr`, then cosine decay to 0 at `steps`:

    lr(s) = lr * s / warmup                                             for s <= warmup
    lr(s) = lr * 0.5 * (1 + cos(pi * (s - warmup) / (steps - warmup)))  afterwards   (s = 1-based update index)

Data order: update s uses samples (s-1)*B .. s*B-1 of an endless stream made of seeded permutations of the
training set, one per epoch (permutation e = numpy default_rng([seed, e])), so the order needs no saved state.

Two kinds of checkpoints:
- trajectory: fp16 projector safetensors at chosen steps (step 0 = the random init), shipped in
  `data/projector/<recipe>/step-XXXX.safetensors`, plus `log.csv` (step, loss, lr, seconds) next to them. A
  recipe with the default axes writes the shipped projector format (`build.save_projector`); any other recipe a
  trainable-state file (`trainable.save_state`, names ["projector"] or ["projector", "moca"], MoCa in float32,
  the full recipe, step and loss as its recipe). `build.embedded_model(path)` loads either kind;
- resumable state every `checkpoint_every` steps in a scratch folder outside git
  (`<cache root>/train/<recipe>/state.safetensors`, `mirlab.tiny.resume`: fp32 trainable state, optimizer,
  step, RNG, recipe; safetensors + JSON, never unpickled). `train` resumes from it,
  and an interrupted run continues exactly as if it had not stopped.
"""
from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from PIL import Image

from mirlab import paths
from mirlab.tiny import resume
from mirlab.tiny.build import CONNECTORS, attach_moca, connector_kind, moca_rows, remove_moca, set_connector
from mirlab.tiny.trainable import assign_state, freeze_all_but, named_state, save_state

IGNORE = -100  # label of a position that is not a target
STATE_FILE = "state.safetensors"
LOG_FIELDS = ("step", "loss", "lr", "seconds")
TRAINED = ("projector",)  # the trainable-state names this stage trains (mirlab.tiny.trainable); + "moca" with MoCa
CAPTIONS = ("detailed", "short")  # Recipe.captions
FILE_DTYPES = {"projector": torch.float16, "moca": torch.float32}  # trajectory files (float16 rounds u ~ 1)


@dataclasses.dataclass(frozen=True)
class Recipe:
    """Everything that determines a training run (two runs with equal recipes give identical weights)."""
    name: str
    lr: float = 2e-3  # defaults: the shipped recipe "lr2e-3" (experiments/train_embedded.py)
    steps: int = 250
    batch_size: int = 8
    warmup: int = 15
    weight_decay: float = 0.0
    train_scenes: int = 2000  # size of the training set (scene_dataset(train_scenes, seed, "train"))
    seed: int = 0  # scenes and data order; the projector init is the embedded model's seeded one
    checkpoint_every: int = 10  # resumable state, scratch folder
    trajectory: tuple[int, ...] | None = None  # steps saved as fp16 checkpoints; None: trajectory_steps(steps, 8)
    # axes added later; their defaults are what every recipe before them did
    connector: str = "mlp"  # "mlp" (LLaVA's 2-layer GELU MLP) or "linear" (build.set_connector)
    moca: bool = False  # MoCa on all decoder layers, trained with the projector (same lr)
    captions: str = "detailed"  # "detailed" (the scene's caption) or "short" (scenes.describe_short)

    def __post_init__(self):
        if self.trajectory is None:
            object.__setattr__(self, "trajectory", trajectory_steps(self.steps, 8))
        object.__setattr__(self, "trajectory", tuple(self.trajectory))
        if self.steps < 1 or self.batch_size < 1 or self.train_scenes < 1:
            raise ValueError(f"steps, batch_size and train_scenes must be positive: {self}")
        if not 0 <= self.warmup < self.steps:
            raise ValueError(f"warmup must be in [0, steps): {self.warmup} vs {self.steps}")
        bad = [s for s in self.trajectory if not 0 <= s <= self.steps]
        if bad:
            raise ValueError(f"trajectory steps {bad} outside [0, {self.steps}]")
        if not self.name or "/" in self.name or self.name == "final":
            raise ValueError(f"recipe name must be a plain folder name other than 'final', got {self.name!r}")
        if self.connector not in CONNECTORS:
            raise ValueError(f"connector must be one of {CONNECTORS}, got {self.connector!r}")
        if not isinstance(self.moca, bool):
            raise ValueError(f"moca must be True or False, got {self.moca!r}")
        if self.captions not in CAPTIONS:
            raise ValueError(f"captions must be one of {CAPTIONS}, got {self.captions!r}")

    @property
    def trained(self) -> tuple[str, ...]:
        """The trainable-state names this recipe trains: ("projector",), plus "moca" with MoCa."""
        return TRAINED + (("moca",) if self.moca else ())

    @property
    def default_axes(self) -> bool:
        """Whether connector, moca and captions hold their defaults (a recipe as they were before those axes)."""
        return (self.connector, self.moca, self.captions) == ("mlp", False, "detailed")


def trajectory_steps(steps: int, n: int = 8) -> tuple[int, ...]:
    """n checkpoint steps from 0 to `steps`, denser early (where the loss moves fastest):
    0, then n-1 steps spaced evenly in sqrt(step)."""
    points = {round(steps * (i / (n - 1)) ** 2) for i in range(n)}
    return tuple(sorted(points))


def learning_rate(step: int, recipe: Recipe) -> float:
    """Learning rate of update `step` (1-based): linear warmup, then cosine decay to 0 at recipe.steps."""
    if recipe.warmup and step <= recipe.warmup:
        return recipe.lr * step / recipe.warmup
    progress = (step - recipe.warmup) / (recipe.steps - recipe.warmup)
    return recipe.lr * 0.5 * (1 + math.cos(math.pi * progress))


def batch_indices(step: int, recipe: Recipe) -> list[int]:
    """Training-set indices of the batch of update `step` (1-based), from per-epoch seeded permutations."""
    n, out = recipe.train_scenes, []
    for g in range((step - 1) * recipe.batch_size, step * recipe.batch_size):
        epoch, position = divmod(g, n)
        out.append(int(np.random.default_rng([recipe.seed, epoch]).permutation(n)[position]))
    return out


# --- inputs --------------------------------------------------------------------------------------------------

def prompt_ids(processor) -> list[int]:
    """Token ids of the prompt: the chat template with the image as the whole user turn, then the assistant
    header (the image placeholder already expanded to the model's image tokens)."""
    messages = [{"role": "user", "content": [{"type": "image"}]}]
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    size = processor.image_processor.crop_size
    blank = Image.new("RGB", (size["width"], size["height"]))  # only its token count matters
    return processor(images=[blank], text=[text])["input_ids"][0]


def encode_captions(processor, captions: list[str]):
    """(input_ids, attention_mask, labels), right-padded, for `prompt + caption + <|im_end|>\\n` per caption.

    labels = input_ids on the target tokens (caption and <|im_end|>), IGNORE elsewhere (prompt, final newline,
    padding). The ids equal what the processor gives for the chat-templated text (tested).
    """
    tokenizer = processor.tokenizer
    prompt = prompt_ids(processor)
    end = tokenizer("<|im_end|>", add_special_tokens=False)["input_ids"]
    newline = tokenizer("\n", add_special_tokens=False)["input_ids"]
    rows, targets = [], []
    for caption in captions:
        body = tokenizer(caption, add_special_tokens=False)["input_ids"] + end
        rows.append(prompt + body + newline)
        targets.append([IGNORE] * len(prompt) + body + [IGNORE] * len(newline))
    return pad_right(rows, targets, tokenizer.pad_token_id)


def pad_right(rows: list[list[int]], targets: list[list[int]], pad_id: int):
    """(input_ids, attention_mask, labels) of a batch of token rows, right-padded to the longest: ``pad_id`` in
    input_ids, 0 in attention_mask and IGNORE in labels on the padding; ``targets[i]`` is row i's labels."""
    length = max(len(r) for r in rows)
    input_ids = torch.tensor([r + [pad_id] * (length - len(r)) for r in rows])
    attention_mask = torch.tensor([[1] * len(r) + [0] * (length - len(r)) for r in rows])
    labels = torch.tensor([t + [IGNORE] * (length - len(t)) for t in targets])
    return input_ids, attention_mask, labels


# --- the fast path ---------------------------------------------------------------------------------------------

@torch.no_grad()
def vision_features(model, pixel_values: torch.Tensor) -> torch.Tensor:
    """The frozen input of the projector for a batch of images: (B, 3, H, W) -> (B, n_image_tokens, d_vision).

    = vision_tower hidden_states[config.vision_feature_layer], minus the CLS row when the select strategy is
    "default" -- what `LlavaModel.get_image_features` feeds `multi_modal_projector` (single-layer configs).
    """
    config = model.config
    layer, strategy = config.vision_feature_layer, config.vision_feature_select_strategy
    if not isinstance(layer, int):
        raise NotImplementedError(f"multi-layer vision features (vision_feature_layer={layer}) are not supported")
    out = model.model.vision_tower(pixel_values.to(model.dtype), output_hidden_states=True, return_dict=True)
    features = out.hidden_states[layer]
    return features[:, 1:] if strategy == "default" else features


def embed_inputs(model, features: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Token embeddings with the image-token rows replaced by projector(features), in reading order."""
    embeds = model.get_input_embeddings()(input_ids)
    image_rows = input_ids == model.config.image_token_id
    projected = model.model.multi_modal_projector(features).to(embeds.dtype)
    if int(image_rows.sum()) != projected.shape[0] * projected.shape[1]:
        raise ValueError(f"{int(image_rows.sum())} image tokens in the batch but {projected.shape[0]} x "
                         f"{projected.shape[1]} image features")
    return embeds.masked_scatter(image_rows.unsqueeze(-1), projected)


def target_logprobs(model, features, input_ids, attention_mask, labels) -> torch.Tensor:
    """log p(target token | everything before it, image) per position: (B, T-1), 0 where not a target.

    Row b, column t holds log p(labels[b, t+1] | input_ids[b, :t+1]); only target rows go through lm_head.
    """
    embeds = embed_inputs(model, features, input_ids)
    with moca_rows(model, input_ids):  # MoCa (if any) calibrates the image rows
        hidden = model.model.language_model(inputs_embeds=embeds, attention_mask=attention_mask).last_hidden_state
    targets = labels[:, 1:]
    is_target = targets != IGNORE
    logits = model.lm_head(hidden[:, :-1][is_target]).float()
    picked = torch.log_softmax(logits, dim=-1).gather(1, targets[is_target].unsqueeze(1)).squeeze(1)
    return torch.zeros(targets.shape, dtype=picked.dtype).masked_scatter(is_target, picked)


def caption_loss(model, features, input_ids, attention_mask, labels) -> torch.Tensor:
    """Mean next-token cross-entropy over all target tokens of the batch (HF's causal-LM loss, same tokens)."""
    logprobs = target_logprobs(model, features, input_ids, attention_mask, labels)
    return -logprobs.sum() / (labels[:, 1:] != IGNORE).sum()


def freeze_all_but_projector(model, names=TRAINED):
    """requires_grad only on the named parts (`trainable.freeze_all_but(model, names)`; default the projector);
    eval mode (no dropout anywhere). Returns the trainable parameters, in module order (projector, then MoCa)."""
    model.eval()
    freeze_all_but(model, names)
    return [p for p in model.parameters() if p.requires_grad]


def prepare(model, processor, recipe: Recipe):
    """Put `recipe`'s step-0 model in place: a freshly seeded connector of recipe.connector (`set_connector`,
    the embedded model's PROJECTOR_SEED), and a fresh MoCa (u = 1, v = 0) if recipe.moca, none otherwise.
    Returns the model."""
    remove_moca(model)
    set_connector(model, recipe.connector)
    if recipe.moca:
        attach_moca(model, processor)
    return model


def check_model(model, recipe: Recipe):
    """Raise a ValueError unless `model` has recipe's connector, and MoCa exactly when the recipe has it."""
    kind, has_moca = connector_kind(model), getattr(model, "moca", None) is not None
    if kind != recipe.connector or has_moca != recipe.moca:
        raise ValueError(f"recipe {recipe.name} trains a {recipe.connector} connector "
                         f"{'with' if recipe.moca else 'without'} MoCa; the model has a {kind} connector "
                         f"{'with' if has_moca else 'without'} MoCa: call pretrain.prepare(model, processor, recipe)")


# --- data -----------------------------------------------------------------------------------------------------

def scratch_dir() -> Path:
    """Scratch folder for training state and feature caches: `mirlab.paths.scratch_dir("train")`."""
    return paths.scratch_dir("train")


def image_features(model, processor, images, batch_size: int = 32, progress: bool = False) -> torch.Tensor:
    """vision_features of a list of PIL images, in batches: (N, n_image_tokens, d_vision) float32."""
    from tqdm.auto import tqdm

    chunks = []
    for start in tqdm(range(0, len(images), batch_size), desc="vision features", disable=not progress):
        pixels = processor.image_processor(images[start:start + batch_size], return_tensors="pt")["pixel_values"]
        chunks.append(vision_features(model, pixels).float())
    return torch.cat(chunks)


def scene_captions(metadata: list[dict], captions: str = "detailed") -> list[str]:
    """The captions of scenes (their metadata) in a recipe's caption style: "detailed" = the scene's own
    caption, "short" = `scenes.describe_short` of its groups."""
    from mirlab.pairs.scenes import describe_short

    if captions == "detailed":
        return [m["caption"] for m in metadata]
    if captions == "short":
        return [describe_short(m["groups"]) for m in metadata]
    raise ValueError(f"captions must be one of {CAPTIONS}, got {captions!r}")


def scene_features(model, processor, n: int, seed: int = 0, split: str = "train", cache: bool = True,
                   progress: bool = False, captions: str = "detailed"):
    """(features (n, tokens, d_vision), captions, metadata list) of scene_dataset(n, seed, split).

    captions: the caption style (`scene_captions`); the scenes and features are the same for every style.
    With cache=True the features are stored in scratch_dir() keyed by the scene set and the vision weights.
    """
    from mirlab.pairs.scenes import scene_dataset

    dataset = scene_dataset(n, seed=seed, split=split)
    scenes = list(dataset)  # each item is rendered on access: render once
    metadata = [s["metadata"] for s in scenes]
    styled = scene_captions(metadata, captions)
    detailed = [s["caption"] for s in scenes]  # the key the feature cache always had, whatever the style
    tower = model.model.vision_tower.embeddings.patch_embeddings.projection.weight
    key = json.dumps({"n": n, "seed": seed, "split": split, "size": dataset.size, "captions": detailed,
                      "processor": processor.image_processor.to_dict(), "layer": model.config.vision_feature_layer,
                      "weights": float(tower.detach().double().sum())}, sort_keys=True, default=str)
    path = scratch_dir() / f"features-{split}-{n}-{hashlib.sha256(key.encode()).hexdigest()[:12]}.safetensors"
    if cache and path.is_file():
        return load_file(str(path))["features"], styled, metadata
    features = image_features(model, processor, [s["image"] for s in scenes], progress=progress)
    if cache:
        paths.atomic_write(path, lambda tmp: save_file({"features": features.contiguous()}, str(tmp)))
    return features, styled, metadata


# --- training ------------------------------------------------------------------------------------------------

def _save_state(path: Path, model, optimizer, step: int, recipe: Recipe):
    """The resumable state (`mirlab.tiny.resume`: safetensors + JSON): trained tensors, optimizer, RNG, step, recipe."""
    resume.save(path, named_state(model, recipe.trained), optimizer,
                {"step": step, "recipe": dataclasses.asdict(recipe)})


def _load_state(path: Path, model, optimizer, recipe: Recipe) -> int:
    tensors, meta = resume.load(path, restore_rng=False)
    if _saved_recipe(meta["recipe"]) != recipe:
        raise ValueError(f"{path} holds a run of a different recipe:\n  saved {meta['recipe']}\n  asked {recipe}\n"
                         f"delete {path.parent} to start over, or use another recipe name")
    assign_state(model, tensors, recipe.trained, source=str(path))
    resume.load(path, optimizer)  # optimizer moments and the RNG, once the recipe is known to match
    return meta["step"]


def _saved_recipe(saved: dict) -> Recipe | None:
    """The Recipe a state file records (None if it is not one). A field it lacks takes its default: a state
    saved before connector, moca and captions existed is a recipe with their defaults, and still resumes."""
    try:
        return Recipe(**saved)
    except (TypeError, ValueError):
        return None


def update(optimizer: torch.optim.Optimizer, loss: torch.Tensor, lr: float) -> None:
    """One optimizer step on ``loss`` at learning rate ``lr``: set lr, zero the gradients, back-propagate, step."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def log_step(path: Path, step: int, loss: float, lr: float, seconds: float) -> None:
    """Append one row (step, loss, lr, seconds) to a training log that `restart_log` started."""
    with open(path, "a", newline="") as f:
        csv.writer(f).writerow([step, f"{loss:.6f}", f"{lr:.6g}", f"{seconds:.3f}"])


def restart_log(path: Path, step: int):
    """Keep the log rows up to `step` (the resumed step), dropping rows of work that was lost."""
    rows = []
    if step > 0 and path.is_file():
        with open(path, newline="") as f:
            rows = [r for r in csv.DictReader(f) if int(r["step"]) <= step]
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=LOG_FIELDS)
        writer.writeheader()
        writer.writerows(rows)


def _save_trajectory(model, out_dir: Path, recipe: Recipe, step: int, loss: float | None):
    """Write `<out_dir>/<recipe>/step-XXXX.safetensors`: the shipped projector format for a recipe with the
    default axes (as before they existed), else a trainable-state file of recipe.trained with the whole recipe."""
    from mirlab.tiny.build import save_projector

    path = out_dir / recipe.name / f"step-{step:04d}.safetensors"
    if recipe.default_axes:
        meta = {"recipe": recipe.name, "step": step, "lr": recipe.lr, "steps": recipe.steps,
                "batch_size": recipe.batch_size, "train_scenes": recipe.train_scenes, "seed": recipe.seed,
                "train_loss": "" if loss is None else f"{loss:.5f}"}
        save_projector(model, path, meta)
        return
    record = {**dataclasses.asdict(recipe), "recipe": recipe.name, "step": step,
              "train_loss": None if loss is None else round(loss, 5)}
    save_state(model, recipe.trained, path, record, dtype={n: FILE_DTYPES[n] for n in recipe.trained})


def train(model, recipe: Recipe, features: torch.Tensor, captions: list[str], processor, out_dir=None,
          state_dir=None, stop_after: int | None = None, progress: bool = True) -> int:
    """Train model's projector (and MoCa) in place following `recipe`; resume from `state_dir` if a state is there.

    model: with recipe's connector and MoCa (`prepare`, which also resets them to step 0; a saved state wins).
    features/captions: the training set (features from `scene_features` with captions=recipe.captions,
    len == recipe.train_scenes).
    out_dir: where `<recipe>/step-XXXX.safetensors` and `<recipe>/log.csv` go (default data/projector).
    state_dir: resumable state (default scratch_dir()/<recipe>). stop_after: stop (with a saved state) once this
    update index is reached -- to simulate an interruption. Returns the step reached.
    """
    from tqdm.auto import tqdm

    from mirlab.tiny.build import projector_dir

    if len(features) != recipe.train_scenes or len(captions) != recipe.train_scenes:
        raise ValueError(f"recipe {recipe.name} wants {recipe.train_scenes} training scenes, got "
                         f"{len(features)} features and {len(captions)} captions")
    out_dir = Path(out_dir) if out_dir is not None else projector_dir()
    state_path = Path(state_dir if state_dir is not None else scratch_dir() / recipe.name) / STATE_FILE
    log_path = out_dir / recipe.name / "log.csv"

    check_model(model, recipe)
    params = freeze_all_but_projector(model, recipe.trained)
    optimizer = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=recipe.weight_decay)
    step = _load_state(state_path, model, optimizer, recipe) if state_path.is_file() else 0
    restart_log(log_path, step)
    if step == 0 and 0 in recipe.trajectory:
        _save_trajectory(model, out_dir, recipe, 0, None)
    last = recipe.steps if stop_after is None else min(stop_after, recipe.steps)

    bar = tqdm(total=recipe.steps, initial=step, desc=recipe.name, disable=not progress)
    while step < last:
        step += 1
        start = time.perf_counter()
        lr = learning_rate(step, recipe)
        index = batch_indices(step, recipe)
        input_ids, attention_mask, labels = encode_captions(processor, [captions[i] for i in index])
        loss = caption_loss(model, features[index], input_ids, attention_mask, labels)
        update(optimizer, loss, lr)
        log_step(log_path, step, loss.item(), lr, time.perf_counter() - start)
        if step in recipe.trajectory:
            _save_trajectory(model, out_dir, recipe, step, loss.item())
        if step % recipe.checkpoint_every == 0 or step == last:
            _save_state(state_path, model, optimizer, step, recipe)
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{lr:.2e}")
    bar.close()
    for p in params:
        p.requires_grad_(False)
    return step


def read_log(recipe_dir) -> "pandas.DataFrame":  # noqa: F821
    """The training log of a recipe folder (data/projector/<recipe>/log.csv) as a DataFrame."""
    import pandas as pd

    return pd.read_csv(Path(recipe_dir) / "log.csv")


# --- `mirlab pretrain` -----------------------------------------------------------------------------------------

def add_arguments(parser):
    """Options of `mirlab pretrain` (defaults = the recipe fields)."""
    defaults = Recipe(name="x")
    parser.add_argument("--recipe", required=True, help="run name: folder under --out and under the scratch dir")
    parser.add_argument("--lr", type=float, default=defaults.lr, help="peak learning rate (AdamW)")
    parser.add_argument("--steps", type=int, default=defaults.steps, help="optimizer updates")
    parser.add_argument("--batch-size", type=int, default=defaults.batch_size)
    parser.add_argument("--warmup", type=int, default=defaults.warmup, help="linear warmup steps, then cosine")
    parser.add_argument("--weight-decay", type=float, default=defaults.weight_decay)
    parser.add_argument("--train-scenes", type=int, default=defaults.train_scenes,
                        help="synthetic training scenes (split 'train')")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="scenes and data order")
    parser.add_argument("--checkpoint-every", type=int, default=defaults.checkpoint_every,
                        help="save the resumable state every K steps")
    parser.add_argument("--connector", choices=CONNECTORS, default=defaults.connector,
                        help="projector: LLaVA's 2-layer GELU MLP or one linear layer")
    parser.add_argument("--moca", action="store_true", help="train MoCa (all decoder layers) with the projector")
    parser.add_argument("--captions", choices=CAPTIONS, default=defaults.captions,
                        help="training captions: the detailed scene captions or short ones (colours and shapes)")
    parser.add_argument("--trajectory", type=int, default=8,
                        help="number of shipped fp16 checkpoints, step 0 and the last step included")
    parser.add_argument("--out", default=None, help="checkpoint folder (default: data/projector)")
    parser.add_argument("--state-dir", default=None, help="resumable state folder (default: scratch dir/<recipe>)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (default: torch's; 1 is faster on a busy shared machine)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def recipe_from_args(args) -> Recipe:
    return Recipe(name=args.recipe, lr=args.lr, steps=args.steps, batch_size=args.batch_size, warmup=args.warmup,
                  weight_decay=args.weight_decay, train_scenes=args.train_scenes, seed=args.seed,
                  checkpoint_every=args.checkpoint_every, trajectory=trajectory_steps(args.steps, args.trajectory),
                  connector=args.connector, moca=args.moca, captions=args.captions)


def run(recipe: Recipe, out_dir=None, state_dir=None, progress: bool = True) -> int:
    """Load the embedded model, prepare the recipe's step-0 model, build (or reuse) the feature cache, train."""
    from mirlab.tiny.build import embedded_model

    model, processor = embedded_model("random")
    prepare(model, processor, recipe)
    features, captions, _ = scene_features(model, processor, recipe.train_scenes, seed=recipe.seed,
                                           split="train", progress=progress, captions=recipe.captions)
    return train(model, recipe, features, captions, processor, out_dir=out_dir, state_dir=state_dir,
                 progress=progress)


def main(args) -> int:
    """Entry point of `mirlab pretrain`: train (or resume) one recipe."""
    recipe = recipe_from_args(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    step = run(recipe, out_dir=args.out, state_dir=args.state_dir, progress=not args.no_progress)
    print(f"{recipe.name}: step {step}/{recipe.steps}")
    return 0
