"""Scene-QA benchmark of the embedded model, with blind baselines: how much do its answers depend on the image?

Questions: `mirlab.pairs.scene_qa.qa_dataset(n_scenes, "test", seed, per_kind)`, six kinds with balanced answers,
on held-out scenes (no scene structure shared with the training split). Each question is asked in the model's
chat format (`instruct.prompt_ids`): the image, then the question, in the user turn.

1. Ranking (the main score). Every valid answer c of the question (its `choices`) is scored by its log-likelihood
   as the assistant's reply, over the same target tokens as training (answer + end-of-turn token):

       score(c) = sum_t log p(c_t | prompt(image, question), c_<t)          (= log p(c | prompt))

   predicted = the highest-scoring choice; a question counts as correct when the true answer scores strictly
   higher than every other choice (a tie is a failure). Why the sum and not the per-token mean: the sum is the
   model's own probability of the whole reply, so its argmax is the answer the model prefers among the valid
   ones. The sum penalizes an answer split into more tokens only by the log-probabilities of those tokens; for
   one-word answers the continuation tokens ("tri|angle", "diam|ond") are nearly certain (log p ~ 0), so they
   cost almost nothing, while the mean would divide by the length and thereby *favour* multi-token answers
   (averaging in near-zero terms). Length normalization (lm-eval-harness's acc_norm) is meant for long
   free-text options of very different lengths; here the options are single words, or captions that differ by
   one word. `rank_by="mean"` gives the normalized view; every table keeps both numbers (logliks, tokens).
2. Free generation (a second view). Greedy decoding of the reply, at most (longest valid answer in tokens + 2)
   tokens, cut at the end-of-turn token; correct when the normalized reply equals the normalized answer
   (lower case, punctuation dropped, spaces collapsed, a leading a/an/the dropped, digits spelled as words).
3. Blind baselines, the same questions with an uninformative image:
   - "blank": the image features are those of a uniform mid-grey picture, RGB (128, 128, 128), of the scenes'
     size (224 px), through the same image processor and vision tower -- a scene with nothing in it (grey is
     also one of the scenes' background colours). The sequence is unchanged; only the image rows differ.
   - "no-image": the image-token rows are deleted from the sequence (`instruct.prompt_ids(image=False)`): the
     prompt is the chat template without the image, every text token kept (the newline after the image too).
   visual gain = accuracy - blind accuracy, per kind and for the average. It is the simplest measure of how
   much the answers depend on the image (the modality bias of "MLLMs are Deeply Affected by Modality Bias"): a
   model that answers from the question alone has zero gain however high its accuracy.

Chance level of a kind = mean over its questions of 1 / number of choices; with balanced answers this is also
the accuracy of always giving the same answer. The average over kinds is a macro average (each kind counts
once, whatever its number of questions).

Speed: the shared prefix (chat header + image rows) runs once per scene, the question once, and its valid
answers together on a copy of the question's key/value cache; rows are padded at the right and carry explicit
positions, so the numbers equal a plain forward of each full sequence (tested).
"""
from __future__ import annotations

import dataclasses
import json
import re
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

from mirlab.pairs import scene_qa
from mirlab.tiny import instruct, pretrain
from mirlab.tiny.build import moca_rows

BLIND_MODES = ("blank", "no-image")
BLANK_RGB = (128, 128, 128)
SCENE_SIZE = 224  # pixels of a scene (scenes.scene_dataset's default), and of the blank picture
RANK_BY = ("sum", "mean")
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


# --- the prefix machinery ------------------------------------------------------------------------------------

@dataclasses.dataclass
class _Prefix:
    """B token sequences run so far: their key/value cache, which cache slots are real tokens (mask), the
    position the next token gets (length = number of real tokens), and the log-probs of that next token."""
    cache: object
    mask: torch.Tensor  # (B, T) 1 = real token, 0 = right padding left inside the sequence
    length: torch.Tensor  # (B,)
    next_logprobs: torch.Tensor | None  # (B, vocab)


def _select(prefix: _Prefix, index: torch.Tensor) -> _Prefix:
    """A new prefix made of rows `index` of `prefix` (rows may repeat); `prefix` itself is left untouched."""
    from transformers import DynamicCache

    layers = [(layer.keys[index], layer.values[index]) for layer in prefix.cache.layers]
    logprobs = None if prefix.next_logprobs is None else prefix.next_logprobs[index]
    return _Prefix(DynamicCache(layers), prefix.mask[index], prefix.length[index], logprobs)


def _extend(model, prefix: _Prefix | None, embeds: torch.Tensor, mask: torch.Tensor | None = None,
            next_token: bool = True, input_ids: torch.Tensor | None = None):
    """Run `embeds` (B, L, d), right-padded per `mask` (B, L), after `prefix` (None: from scratch). Consumes the
    prefix's cache. Returns (new prefix, last hidden states (B, L, d)); next_token=False skips the next-token
    log-probs (left None).

    Token j of row b gets position length_b + j, so padding left inside a row (a shorter question before an
    answer) shifts nothing: with those slots masked out it is as if the row had no padding at all.
    input_ids: the token ids behind `embeds` when they hold image rows (the shared context), so that MoCa, if the
    model has one, calibrates those rows; None = no image rows (questions, answers, generated tokens).
    """
    batch, length = embeds.shape[:2]
    mask = torch.ones(batch, length, dtype=torch.long) if mask is None else mask.long()
    start = torch.zeros(batch, dtype=torch.long) if prefix is None else prefix.length
    full_mask = mask if prefix is None else torch.cat([prefix.mask, mask], dim=1)
    ids = torch.zeros(batch, length, dtype=torch.long) if input_ids is None else input_ids
    if input_ids is None and model.config.image_token_id == 0:
        raise ValueError("image_token_id 0 cannot be told from the placeholder ids of a text-only call")
    with moca_rows(model, ids):  # MoCa (if any) calibrates the image rows of the context, nothing else
        out = model.model.language_model(inputs_embeds=embeds, attention_mask=full_mask,
                                         position_ids=start[:, None] + torch.arange(length), use_cache=True,
                                         cache=None if prefix is None else prefix.cache)
    hidden = out.last_hidden_state
    real = mask.sum(dim=1)
    logprobs = None
    if next_token:
        if (real == 0).any():
            raise ValueError("every row must have at least one real token")
        last = hidden[torch.arange(batch), real - 1]
        logprobs = torch.log_softmax(model.lm_head(last).float(), dim=-1)
    return _Prefix(out.cache, full_mask, start + real, logprobs), hidden


def _pad(rows: list[list[int]], pad: int):
    """(ids, mask): right-padded (B, L) tensors."""
    length = max(len(r) for r in rows)
    ids = torch.tensor([r + [pad] * (length - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (length - len(r)) for r in rows])
    return ids, mask


# --- encoding the questions --------------------------------------------------------------------------------

def _blind_check(blind):
    if blind is not None and blind not in BLIND_MODES:
        raise ValueError(f"blind must be None or one of {BLIND_MODES}, got {blind!r}")


def blank_image(size: int = SCENE_SIZE) -> Image.Image:
    """The 'blank' blind input: a uniform RGB (128, 128, 128) square of the scenes' size."""
    return Image.new("RGB", (size, size), BLANK_RGB)


def blank_features(model, processor, size: int = SCENE_SIZE) -> torch.Tensor:
    """Vision features (1, tokens, d_vision) of `blank_image(size)`."""
    return pretrain.image_features(model, processor, [blank_image(size)])


def _split_prompts(processor, questions, blind):
    """(context ids shared by every question, suffix ids per question). The context is everything up to the
    image rows' end (no-image: up to where they were); the suffix is the rest of the prompt."""
    image_id = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    contexts, suffixes = set(), []
    for q in questions:
        ids = instruct.prompt_ids(processor, q["question"], image=True)
        first = ids.index(image_id)
        last = len(ids) - ids[::-1].index(image_id)
        context = ids[:first] if blind == "no-image" else ids[:last]
        if not context:  # the image opens the prompt: keep one token in the shared part
            context = ids[last:last + 1]
            last += 1
        contexts.add(tuple(context))
        suffixes.append(ids[last:])
    if len(contexts) != 1:
        raise ValueError("the chat template puts question-dependent text before the image; the shared-prefix "
                         "scoring needs the image (or the prompt's start) to come first")
    return list(contexts.pop()), suffixes


def _context_embeds(model, context, image_features):
    """Embeddings of the shared context for each row of `image_features` (None: no image rows)."""
    ids = torch.tensor([context])
    if image_features is None:
        return model.get_input_embeddings()(ids)
    return pretrain.embed_inputs(model, image_features, ids.expand(len(image_features), -1))


def _image_rows(model, processor, features, blind):
    """The image features the contexts use: all scenes' (None blind), the blank picture's, or None (no-image)."""
    if blind == "no-image":
        return None
    if blind == "blank":
        return blank_features(model, processor)
    return features


def _question_prefixes(model, processor, image_rows, questions, blind, context, suffixes):
    """_Prefix of the full prompts of `questions` (one row each): the shared context runs once per distinct
    image (scene), then each question's suffix runs on a copy of its scene's context."""
    if blind is None:
        scenes = [int(q["scene"]) for q in questions]
        unique = sorted(set(scenes))
        ctx_rows, keys = image_rows[unique], [unique.index(s) for s in scenes]
    else:  # one context for every question
        ctx_rows, keys = image_rows, [0] * len(questions)
    ctx_ids = None if ctx_rows is None else torch.tensor([context]).expand(len(ctx_rows), -1)
    ctx, _ = _extend(model, None, _context_embeds(model, context, ctx_rows), input_ids=ctx_ids)
    ids, mask = _pad(suffixes, processor.tokenizer.pad_token_id)
    prefix, _ = _extend(model, _select(ctx, torch.tensor(keys)), model.get_input_embeddings()(ids), mask)
    return prefix


def _chunks(questions, batch_size):
    """Index chunks of at most batch_size questions, scene by scene (questions of a scene share a context)."""
    order = sorted(range(len(questions)), key=lambda i: (int(questions[i].get("scene") or 0), i))
    return [order[s:s + batch_size] for s in range(0, len(order), batch_size)]


def _check(features, questions, blind):
    _blind_check(blind)
    if not questions:
        raise ValueError("no questions to score")
    if blind is None:
        if features is None:
            raise ValueError("features are needed unless blind is set")
        top = max(int(q["scene"]) for q in questions)
        if top >= len(features):
            raise ValueError(f"question about scene {top} but features hold {len(features)} scenes")


# --- 1. ranking ------------------------------------------------------------------------------------------------

def rank_choices(logliks, tokens, rank_by: str = "sum") -> tuple[int, np.ndarray]:
    """(index of the best choice, the scores ranked by): score = summed log-likelihood, or divided by the number
    of target tokens for rank_by="mean". The first of tied maxima is returned."""
    if rank_by not in RANK_BY:
        raise ValueError(f"rank_by must be one of {RANK_BY}, got {rank_by!r}")
    scores = np.asarray(logliks, dtype=float)
    if rank_by == "mean":
        scores = scores / np.asarray(tokens, dtype=float)
    return int(np.argmax(scores)), scores


@torch.no_grad()
def choice_logliks(model, processor, features, questions, blind: str | None = None, batch_size: int = 16,
                   progress: bool = False):
    """Per question, (summed log-likelihood of each choice, number of target tokens of each choice)."""
    from tqdm.auto import tqdm

    _check(features, questions, blind)
    context, suffixes = _split_prompts(processor, questions, blind)
    image_rows = _image_rows(model, processor, features, blind)
    pad = processor.tokenizer.pad_token_id
    logliks, tokens = [None] * len(questions), [None] * len(questions)
    for chunk in tqdm(_chunks(questions, batch_size), desc=f"scoring ({blind or 'image'})", disable=not progress):
        qs = [questions[i] for i in chunk]
        prefix = _question_prefixes(model, processor, image_rows, qs, blind, context, [suffixes[i] for i in chunk])
        owner, bodies = [], []
        for j, q in enumerate(qs):
            for choice in q["choices"]:
                owner.append(j)
                bodies.append(instruct.answer_ids(processor, choice)[0])
        rows = _select(prefix, torch.tensor(owner))
        ids, mask = _pad(bodies, pad)
        first = rows.next_logprobs.gather(1, ids[:, :1]).squeeze(1)  # token 0: predicted by the prompt's end
        total = first
        if ids.shape[1] > 1:
            _, hidden = _extend(model, rows, model.get_input_embeddings()(ids[:, :-1]), mask[:, :-1],
                                next_token=False)
            real = mask[:, 1:].bool()  # token t >= 1 is predicted by body position t - 1
            picked = torch.log_softmax(model.lm_head(hidden[real]).float(), dim=-1)
            picked = picked.gather(1, ids[:, 1:][real].unsqueeze(1)).squeeze(1)
            rest = torch.zeros(real.shape).masked_scatter(real, picked)
            total = first + rest.sum(dim=1)
        counts = mask.sum(dim=1)
        for j, i in enumerate(chunk):
            mine = [r for r, o in enumerate(owner) if o == j]
            logliks[i] = [float(total[r]) for r in mine]
            tokens[i] = [int(counts[r]) for r in mine]
    return logliks, tokens


def score_questions(model, processor, features, questions, blind: str | None = None, batch_size: int = 16,
                    rank_by: str = "sum", progress: bool = False) -> pd.DataFrame:
    """One row per question: kind, question, answer, predicted, correct, chance, scene, choices, logliks (summed
    log-likelihood of each choice), tokens (target tokens of each choice), answer_loglik, mode, rank_by.

    features: vision features (n_scenes, tokens, d_vision) of the scenes the questions index
    (`pretrain.scene_features`); not used when blind is "blank" or "no-image" (see the module notes).
    """
    logliks, tokens = choice_logliks(model, processor, features, questions, blind, batch_size, progress)
    rows = []
    for q, ll, tk in zip(questions, logliks, tokens):
        best, scores = rank_choices(ll, tk, rank_by)
        truth = q["choices"].index(q["answer"])
        rows.append({"kind": q["kind"], "question": q["question"], "answer": q["answer"],
                     "predicted": q["choices"][best],
                     "correct": bool(all(scores[truth] > s for k, s in enumerate(scores) if k != truth)),
                     "chance": 1 / len(q["choices"]), "scene": q.get("scene"), "choices": list(q["choices"]),
                     "logliks": ll, "tokens": tk, "answer_loglik": ll[truth], "mode": blind or "image",
                     "rank_by": rank_by})
    return pd.DataFrame(rows)


# --- 2. free generation ----------------------------------------------------------------------------------------

def normalize_answer(text: str) -> str:
    """Lower case, words only (punctuation dropped), digits spelled out, a leading a/an/the dropped."""
    words = re.findall(r"[a-z]+|\d", text.lower())
    words = [NUMBER_WORDS[int(w)] if w.isdigit() else w for w in words]
    if len(words) > 1 and words[0] in ("a", "an", "the"):
        words = words[1:]
    return " ".join(words)


def max_new_tokens(processor, question: dict, extra: int = 2) -> int:
    """Token budget of a free answer: the longest valid answer (with its end-of-turn token) + extra."""
    return max(len(instruct.answer_ids(processor, c)[0]) for c in question["choices"]) + extra


@torch.no_grad()
def greedy_tokens(model, processor, features, questions, blind: str | None = None, batch_size: int = 16,
                  progress: bool = False) -> list[list[int]]:
    """Greedy continuation of each question's prompt, up to `max_new_tokens` and cut before the end of turn
    (or end of sequence) token."""
    from tqdm.auto import tqdm

    _check(features, questions, blind)
    context, suffixes = _split_prompts(processor, questions, blind)
    image_rows = _image_rows(model, processor, features, blind)
    stops = {instruct.stop_token_id(processor), processor.tokenizer.eos_token_id}
    out = [None] * len(questions)
    for chunk in tqdm(_chunks(questions, batch_size), desc=f"generating ({blind or 'image'})",
                      disable=not progress):
        qs = [questions[i] for i in chunk]
        limits = [max_new_tokens(processor, q) for q in qs]
        prefix = _question_prefixes(model, processor, image_rows, qs, blind, context, [suffixes[i] for i in chunk])
        generated = [[] for _ in chunk]
        done = [False] * len(chunk)
        for step in range(max(limits)):
            token = prefix.next_logprobs.argmax(dim=-1)
            for j, t in enumerate(token.tolist()):
                if not done[j]:
                    if t in stops or step >= limits[j]:
                        done[j] = True
                    else:
                        generated[j].append(t)
            if all(done) or step == max(limits) - 1:
                break
            prefix, _ = _extend(model, prefix, model.get_input_embeddings()(token[:, None]))
        for j, i in enumerate(chunk):
            out[i] = generated[j]
    return out


def generate_answers(model, processor, features, questions, blind: str | None = None, batch_size: int = 16,
                     progress: bool = False) -> pd.DataFrame:
    """One row per question: kind, question, answer, generated (decoded greedy reply), correct (normalized exact
    match), in_choices (the normalized reply is one of the valid answers), chance, scene, mode."""
    tokens = greedy_tokens(model, processor, features, questions, blind, batch_size, progress)
    rows = []
    for q, t in zip(questions, tokens):
        text = processor.tokenizer.decode(t, skip_special_tokens=True).strip()
        norm = normalize_answer(text)
        rows.append({"kind": q["kind"], "question": q["question"], "answer": q["answer"], "generated": text,
                     "correct": norm == normalize_answer(q["answer"]),
                     "in_choices": norm in {normalize_answer(c) for c in q["choices"]},
                     "chance": 1 / len(q["choices"]), "scene": q.get("scene"), "mode": blind or "image"})
    return pd.DataFrame(rows)


# --- summaries -------------------------------------------------------------------------------------------------

AVERAGE = "average"


def summary(table: pd.DataFrame) -> pd.DataFrame:
    """Per kind (scene_qa.KINDS order): accuracy = mean of `correct`, chance = mean of `chance`, n; then the row
    "average": the unweighted mean of the kinds' accuracy and chance (macro), n = all questions."""
    missing = {"kind", "correct", "chance"} - set(table.columns)
    if missing:
        raise ValueError(f"summary needs columns kind, correct, chance; missing {sorted(missing)}")
    kinds = [k for k in scene_qa.KINDS if k in set(table["kind"])]
    kinds += sorted(set(table["kind"]) - set(kinds))
    grouped = table.groupby("kind")
    out = pd.DataFrame({"kind": kinds,
                        "accuracy": [float(grouped.get_group(k)["correct"].astype(float).mean()) for k in kinds],
                        "chance": [float(grouped.get_group(k)["chance"].mean()) for k in kinds],
                        "n": [int(len(grouped.get_group(k))) for k in kinds]})
    average = {"kind": AVERAGE, "accuracy": float(out["accuracy"].mean()), "chance": float(out["chance"].mean()),
               "n": int(out["n"].sum())}
    return pd.concat([out, pd.DataFrame([average])], ignore_index=True)


def combined_summary(tables: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """summary of tables["image"] plus, for each blind mode present, `<mode>_accuracy` and
    `visual_gain_<mode>` = accuracy - that blind accuracy, and `generation_accuracy` if tables["generation"]."""
    out = summary(tables["image"])
    for mode in BLIND_MODES:
        if mode in tables:
            blind = summary(tables[mode]).set_index("kind")["accuracy"]
            column = mode.replace("-", "_")
            out[f"{column}_accuracy"] = out["kind"].map(blind)
            out[f"visual_gain_{column}"] = out["accuracy"] - out[f"{column}_accuracy"]
    if "generation" in tables:
        out["generation_accuracy"] = out["kind"].map(summary(tables["generation"]).set_index("kind")["accuracy"])
    return out


# --- the whole benchmark -------------------------------------------------------------------------------------

def benchmark(model, processor, n_scenes: int = 500, seed: int = 0, per_kind: int | None = 100,
              blind=BLIND_MODES, generation: bool = True, batch_size: int = 16, rank_by: str = "sum",
              progress: bool = False, split: str = "test") -> dict[str, pd.DataFrame]:
    """Score `model` on qa_dataset(n_scenes, split, seed, per_kind) with the image, each blind mode, and by
    free generation. Returns {"image", <each blind mode>, "generation"?: per-question tables, "summary": per kind
    with visual gains (combined_summary), "timing": seconds per part}.

    500 test scenes are enough for 100 balanced questions of every kind (600 questions, ~160 distinct scenes).
    split "val" (scenes disjoint from train and test) is for choosing a recipe; "test" is for reporting.
    """
    for mode in blind:
        _blind_check(mode)
    if split not in ("val", "test"):
        raise ValueError(f"benchmark split must be 'val' or 'test' (never the instruction data's 'train'), "
                         f"got {split!r}")
    timing = []
    start = time.perf_counter()
    questions = scene_qa.qa_dataset(n_scenes, split=split, seed=seed, per_kind=per_kind)
    features, _, _ = pretrain.scene_features(model, processor, n_scenes, seed=seed, split=split,
                                             progress=progress)
    timing.append({"part": "questions and image features", "seconds": time.perf_counter() - start})
    tables = {}
    for mode in (None, *blind):
        start = time.perf_counter()
        tables[mode or "image"] = score_questions(model, processor, features, questions, blind=mode,
                                                  batch_size=batch_size, rank_by=rank_by, progress=progress)
        timing.append({"part": f"ranking ({mode or 'image'})", "seconds": time.perf_counter() - start})
    if generation:
        start = time.perf_counter()
        tables["generation"] = generate_answers(model, processor, features, questions, batch_size=batch_size,
                                                progress=progress)
        timing.append({"part": "generation (image)", "seconds": time.perf_counter() - start})
    tables["summary"] = combined_summary(tables)
    tables["timing"] = pd.DataFrame(timing)
    return tables


def benchmark_figure(summary_table: pd.DataFrame, title: str | None = None, ax=None):
    """Bars: accuracy per kind (and the average) with the image; markers: chance level (black bar) and each blind
    accuracy present in the table (blank: open circle, no-image: cross). Returns the Figure."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    if ax is None:
        _, ax = plt.subplots(figsize=(8, 3.8), layout="constrained")
    table = summary_table.reset_index(drop=True)
    sns.barplot(data=table, x="kind", y="accuracy", color=sns.color_palette()[0], ax=ax, label="with the image")
    x = np.arange(len(table))
    ax.scatter(x, table["chance"], marker="_", s=900, color="black", zorder=3, label="chance")
    if "blank_accuracy" in table:
        ax.scatter(x, table["blank_accuracy"], marker="o", s=60, zorder=4, facecolors="none",
                   edgecolors="tab:red", label="blind: blank image")
    if "no_image_accuracy" in table:
        ax.scatter(x, table["no_image_accuracy"], marker="x", s=60, zorder=4, color="tab:red",
                   label="blind: no image rows")
    ax.set_ylim(0, 1)
    ax.set_xlabel("question kind")
    ax.set_ylabel("accuracy (likelihood ranking)")
    ax.legend(loc="upper right", fontsize="small", ncols=2)
    if title:
        ax.set_title(title)
    return ax.figure


# --- files and `mirlab benchmark` --------------------------------------------------------------------------------

LIST_COLUMNS = ("choices", "logliks", "tokens")


def write_outputs(tables: dict[str, pd.DataFrame], out_dir, meta: dict | None = None) -> list[Path]:
    """<name>.csv per table (list cells as JSON), summary.json (summary rows + meta), benchmark.png."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, table in tables.items():
        table = table.copy()
        for column in LIST_COLUMNS:
            if column in table:
                table[column] = table[column].map(json.dumps)
        path = out_dir / f"{name}.csv"
        table.to_csv(path, index=False)
        written.append(path)
    path = out_dir / "summary.json"
    path.write_text(json.dumps({"meta": meta or {}, "summary": tables["summary"].to_dict(orient="records"),
                                "timing": tables.get("timing", pd.DataFrame()).to_dict(orient="records")},
                               indent=2))
    written.append(path)
    figure = benchmark_figure(tables["summary"], title=(meta or {}).get("title"))
    path = out_dir / "benchmark.png"
    figure.savefig(path, dpi=150)
    plt.close(figure)
    written.append(path)
    return written


def add_arguments(parser):
    """Options of `mirlab benchmark`."""
    parser.add_argument("--checkpoint", default="final", help="projector checkpoint of the embedded model "
                        "(see mirlab.tiny.embedded_checkpoints(); 'random' = untrained)")
    parser.add_argument("--scenes", type=int, default=500, help="held-out (test split) scenes to draw from")
    parser.add_argument("--per-kind", type=int, default=100, help="balanced questions per kind (6 kinds)")
    parser.add_argument("--seed", type=int, default=0, help="scenes and questions")
    parser.add_argument("--blind", nargs="*", choices=BLIND_MODES, default=list(BLIND_MODES),
                        help="blind baselines to run (default: both)")
    parser.add_argument("--rank-by", choices=RANK_BY, default="sum",
                        help="rank the valid answers by summed (default) or per-token mean log-likelihood")
    parser.add_argument("--no-generation", action="store_true", help="skip the free-generation view")
    parser.add_argument("--batch-size", type=int, default=16, help="questions per forward pass")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (1 is fastest on a busy machine)")
    parser.add_argument("--out", required=True, help="folder for the tables (CSV), summary.json and benchmark.png")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def main(args) -> int:
    """Score the embedded model on held-out scene questions, with blind baselines (visual gain)."""
    from mirlab.tiny.build import embedded_model

    if args.threads:
        torch.set_num_threads(args.threads)
    start = time.perf_counter()
    model, processor = embedded_model(args.checkpoint)
    tables = benchmark(model, processor, n_scenes=args.scenes, seed=args.seed, per_kind=args.per_kind,
                       blind=tuple(args.blind), generation=not args.no_generation, batch_size=args.batch_size,
                       rank_by=args.rank_by, progress=not args.no_progress)
    seconds = time.perf_counter() - start
    meta = {"checkpoint": args.checkpoint, "scenes": args.scenes, "per_kind": args.per_kind, "seed": args.seed,
            "rank_by": args.rank_by, "seconds": round(seconds, 1), "threads": torch.get_num_threads(),
            "title": f"scene QA, embedded model @ {args.checkpoint}"}
    write_outputs(tables, args.out, meta)
    with pd.option_context("display.width", 160, "display.max_columns", 20):
        print(tables["summary"].round(3).to_string(index=False))
    print(f"{seconds:.0f} s; wrote tables, summary.json and benchmark.png to {args.out}")
    return 0
