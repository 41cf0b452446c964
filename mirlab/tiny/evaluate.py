"""Downstream scores of the embedded model that need no instruction tuning, on held-out synthetic scenes.

1. Caption retrieval by likelihood. For a scene with true caption c_0 and k distractors c_1..c_k (each changes
   one colour, shape or count word, `scenes.distractor_captions`), score every candidate by its summed
   log-likelihood given the image, over the same target tokens as training (caption + <|im_end|>):

       score(c) = sum_t log p(c_t | prompt(image), c_<t)

   The sum (not the per-token mean) is the log-probability of the whole caption, the natural quantity to rank
   by; candidates differ by one word, so their lengths differ by at most a token or two. The scene counts as
   retrieved when the true caption scores strictly higher than every distractor (ties count as failures).
   accuracy = fraction retrieved; chance = 1 / (k + 1). Per change kind (colour/shape/count) we also report the
   pairwise win rate: fraction of scenes where the true caption beats that distractor (chance 1/2).
   The candidates of a scene are scored in one batch that shares the prompt's key/value cache.
2. Held-out caption loss: - sum of the true captions' log-likelihoods / number of their target tokens (the
   training loss, on unseen scenes).
3. Greedy captioning. Generate a caption per scene (the prompt is the image alone, as in training) and score
   its shape and colour words with `scenes.caption_mentions` against the scene; chance = the same scores
   against a different scene (a seeded derangement of the scenes), which is what an image-blind captioner that
   writes plausible captions would get.

All functions take precomputed vision features (`pretrain.scene_features` / `pretrain.image_features`) where they
can: the vision tower is frozen, so the features of an evaluation set serve every checkpoint.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from . import pretrain
from mirlab.tiny.build import moca_rows
from mirlab.pairs.scenes import COLOURS, SHAPES, distractor_captions

KINDS = ("colour", "shape", "count")
COUNT_WORDS = {"a", "an", "two", "three", "four"}


def change_kind(true_caption: str, distractor: str) -> str:
    """Which attribute a distractor changes: 'colour', 'shape' or 'count', from the words that differ
    (a distractor keeps the scene's template, so words align one to one)."""
    a, b = true_caption.lower().rstrip(".").split(), distractor.lower().rstrip(".").split()
    if len(a) != len(b):
        raise ValueError(f"not a one-attribute distractor: {true_caption!r} vs {distractor!r}")
    changed = {w for x, y in zip(a, b) if x != y for w in (x, y)}
    if changed & set(COLOURS):
        return "colour"
    if changed & COUNT_WORDS:
        return "count"
    return "shape"


@torch.no_grad()
def caption_logprobs(model, processor, features: torch.Tensor, captions: list[str], batch_size: int = 32):
    """(summed log-likelihood, number of target tokens) of each caption given its image features.

    features: (N, tokens, d_vision), one row per caption (index a shared tensor to reuse an image).
    """
    sums, counts = [], []
    for start in range(0, len(captions), batch_size):
        ids, mask, labels = pretrain.encode_captions(processor, captions[start:start + batch_size])
        logprobs = pretrain.target_logprobs(model, features[start:start + batch_size], ids, mask, labels)
        sums.append(logprobs.sum(dim=1))
        counts.append((labels[:, 1:] != pretrain.IGNORE).sum(dim=1))
    return torch.cat(sums), torch.cat(counts)


@torch.no_grad()
def candidate_logprobs(model, processor, features: torch.Tensor, candidates: list[list[str]],
                       scenes_per_batch: int = 8):
    """(scores, tokens), each (S, C): summed log-likelihood and target-token count of every candidate caption of
    every scene (C candidates per scene, features (S, tokens, d_vision)).

    Same numbers as `caption_logprobs`, but the prompt with the image (~75 of ~93 tokens) is run once per scene
    and its key/value cache shared by the scene's C candidates: about 2.5x less work for C = 4.
    """
    tokenizer, lm = processor.tokenizer, model.model.language_model
    prompt = pretrain.prompt_ids(processor)
    end = tokenizer("<|im_end|>", add_special_tokens=False)["input_ids"]
    n_cands = len(candidates[0])
    if any(len(c) != n_cands for c in candidates):
        raise ValueError("every scene needs the same number of candidate captions")
    scores, counts = [], []
    for start in range(0, len(candidates), scenes_per_batch):
        chunk = candidates[start:start + scenes_per_batch]
        n = len(chunk)
        prompt_ids = torch.tensor([prompt] * n)
        prefix = pretrain.embed_inputs(model, features[start:start + n], prompt_ids)
        with moca_rows(model, prompt_ids):  # MoCa (if any) calibrates the image rows; the bodies are text
            out = lm(inputs_embeds=prefix, use_cache=True)
        first = torch.log_softmax(model.lm_head(out.last_hidden_state[:, -1]).float(), dim=-1)  # (n, vocab)
        cache = out.past_key_values
        cache.batch_repeat_interleave(n_cands)

        bodies = [tokenizer(c, add_special_tokens=False)["input_ids"] + end for cands in chunk for c in cands]
        length = max(len(b) for b in bodies)
        ids = torch.tensor([b + [tokenizer.pad_token_id] * (length - len(b)) for b in bodies])
        real = torch.tensor([[1] * len(b) + [0] * (length - len(b)) for b in bodies])
        mask = torch.cat([torch.ones(len(bodies), len(prompt), dtype=real.dtype), real], dim=1)
        hidden = lm(input_ids=ids, attention_mask=mask, past_key_values=cache).last_hidden_state

        # token 0 of a body is predicted by the prompt's last position, token t >= 1 by body position t - 1
        logp_first = first.repeat_interleave(n_cands, dim=0).gather(1, ids[:, :1]).squeeze(1)
        logits = model.lm_head(hidden[:, :-1]).float()
        logp_rest = torch.log_softmax(logits, dim=-1).gather(2, ids[:, 1:, None]).squeeze(2)
        total = logp_first + (logp_rest * real[:, 1:]).sum(dim=1)
        scores.append(total.view(n, n_cands))
        counts.append(real.sum(dim=1).view(n, n_cands))
    return torch.cat(scores), torch.cat(counts)


def heldout_caption_loss(model, processor, features: torch.Tensor, captions: list[str], batch_size: int = 32) -> float:
    """Mean next-token cross-entropy per target token over held-out (features, caption) pairs."""
    sums, counts = caption_logprobs(model, processor, features, captions, batch_size)
    return float(-sums.sum() / counts.sum())


def retrieval_candidates(metadata: list[dict], k: int = 3, seed: int = 0) -> list[list[str]]:
    """Per scene [true caption, k distractors]; seeded, so every checkpoint ranks the same candidates."""
    rng = np.random.default_rng(seed)
    return [[m["caption"], *distractor_captions(m, k, rng)] for m in metadata]


def caption_retrieval(model, processor, features: torch.Tensor, metadata: list[dict], k: int = 3, seed: int = 0,
                      scenes_per_batch: int = 8) -> pd.DataFrame:
    """One row per scene: the true caption's score, the best distractor, the true caption's rank (0 = first),
    `retrieved` (strictly first), and `beats_<kind>` for each distractor kind present."""
    candidates = retrieval_candidates(metadata, k, seed)
    scores, tokens = candidate_logprobs(model, processor, features, candidates, scenes_per_batch)
    return retrieval_table(candidates, scores, tokens)


def retrieval_table(candidates: list[list[str]], scores: torch.Tensor, tokens: torch.Tensor | None = None):
    """Build the per-scene retrieval table from candidate scores (column 0 = the true caption)."""
    rows = []
    for i, (cands, s) in enumerate(zip(candidates, scores.tolist())):
        best = 1 + int(np.argmax(s[1:]))
        row = {"scene": i, "caption": cands[0], "score": s[0], "best_distractor": cands[best],
               "best_distractor_score": s[best], "rank": int(sum(x >= s[0] for x in s[1:])),
               "retrieved": all(s[0] > x for x in s[1:])}
        if tokens is not None:
            row["tokens"] = int(tokens[i, 0])
        for j in range(1, len(cands)):
            kind = change_kind(cands[0], cands[j])
            row[f"beats_{kind}"] = row.get(f"beats_{kind}", True) and s[0] > s[j]
        rows.append(row)
    return pd.DataFrame(rows)


def retrieval_summary(table: pd.DataFrame, k: int) -> dict:
    """accuracy, chance = 1/(k+1), pairwise win rate per kind, and the held-out caption loss if tokens known."""
    out = {"retrieval_accuracy": float(table["retrieved"].mean()), "retrieval_chance": 1 / (k + 1)}
    for kind in KINDS:
        if f"beats_{kind}" in table:
            out[f"beats_{kind}"] = float(table[f"beats_{kind}"].astype(float).mean())
    if "tokens" in table:
        out["heldout_caption_loss"] = float(-table["score"].sum() / table["tokens"].sum())
    return out


@torch.no_grad()
def greedy_captions(model, processor, images, max_new_tokens: int = 32, batch_size: int = 16) -> list[str]:
    """Greedy-decoded captions (plain `model.generate`, prompt = the image alone, as in training)."""
    messages = [{"role": "user", "content": [{"type": "image"}]}]
    prompt = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    out = []
    for start in range(0, len(images), batch_size):
        chunk = list(images[start:start + batch_size])
        inputs = processor(images=chunk, text=[prompt] * len(chunk), return_tensors="pt")  # equal lengths
        generated = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        new_tokens = generated[:, inputs["input_ids"].shape[1]:]
        out += [t.strip() for t in processor.tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]
    return out


def derangement(n: int, seed: int = 0) -> np.ndarray:
    """A seeded permutation with no fixed point (each scene paired with a different one); n >= 2."""
    if n < 2:
        raise ValueError("a derangement needs at least 2 items")
    order = np.random.default_rng(seed).permutation(n)
    other = np.empty(n, dtype=int)
    other[order] = np.roll(order, -1)  # a single cycle through a random order
    return other


SCORE_COLUMNS = ("shape_recall", "colour_recall", "pair_recall", "shape_precision", "colour_precision",
                 "all_correct")


def captioning_scores(captions: list[str], metadata: list[dict], seed: int = 0) -> pd.DataFrame:
    """Per scene: mention scores of its generated caption against the scene itself and (prefix `chance_`)
    against another scene of the set (seeded derangement)."""
    from mirlab.pairs.scenes import caption_mentions

    other = derangement(len(captions), seed)
    rows = []
    for i, (caption, meta) in enumerate(zip(captions, metadata)):
        own, wrong = caption_mentions(caption, meta), caption_mentions(caption, metadata[other[i]])
        rows.append({"scene": i, "true_caption": meta["caption"], "generated": caption,
                     **{c: float(own[c]) for c in SCORE_COLUMNS},
                     **{f"chance_{c}": float(wrong[c]) for c in SCORE_COLUMNS}})
    return pd.DataFrame(rows)


def captioning_summary(table: pd.DataFrame) -> dict:
    """Mean of every score column (own scene and chance) and the fraction of generated captions that are
    exactly the true caption."""
    out = {c: float(table[c].mean()) for c in table.columns if c.removeprefix("chance_") in SCORE_COLUMNS}
    out["exact_match"] = float((table["generated"] == table["true_caption"]).mean())
    return out
