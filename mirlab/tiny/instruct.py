"""Instruction examples for the embedded model: a question about the image in the user turn, the answer as the
assistant turn, in the model's own chat template. For the embedded model (ChatML, no system prompt):

    <|im_start|>user\\n<image>\\n{question}<|im_end|>\\n<|im_start|>assistant\\n{answer}<|im_end|>\\n
    \\____________________________ prompt (never a target) ___________________________/\\_ targets _/

Targets are the answer's tokens and the end-of-turn token (so the model learns to stop); the rest of the turn's
end (the final newline) and the padding are not (label IGNORE), exactly as `pretrain.encode_captions` does for
captions. The image placeholder is expanded to the model's image tokens, whose rows `pretrain.embed_inputs`
overwrites with projected vision features; `pretrain.target_logprobs` then gives the answer's log-probabilities.

The end-of-turn text is read from the chat template (what it writes after an assistant message), so the same
code serves any LLaVA-style processor whose template puts the image and the question in the user turn.

Without the image (`image=False`) the prompt is the same token sequence with the image-token rows deleted: the
text tokens, the newline after the image included, stay exactly as they were.
"""
from __future__ import annotations

import functools

import torch
from PIL import Image

from mirlab.tiny.pretrain import IGNORE, pad_right

_ANSWER_PROBE = "\u2063ANSWER\u2063"  # a marker no template writes by itself


def user_message(question: str, image: bool = True) -> dict:
    """The user turn: the image part (if any) followed by the question text."""
    content = [{"type": "image"}] if image else []
    return {"role": "user", "content": content + [{"type": "text", "text": question}]}


def prompt_text(processor, question: str) -> str:
    """The chat-templated prompt (image placeholder not yet expanded), ending with the assistant header."""
    return processor.apply_chat_template([user_message(question)], tokenize=False, add_generation_prompt=True)


@functools.lru_cache(maxsize=32)
def end_of_turn(processor) -> str:
    """What the chat template writes after an assistant answer, e.g. '<|im_end|>\\n' for ChatML (read off the
    template by rendering a probe answer after the prompt)."""
    prompt = prompt_text(processor, "Q")
    full = processor.apply_chat_template(
        [user_message("Q"), {"role": "assistant", "content": [{"type": "text", "text": _ANSWER_PROBE}]}],
        tokenize=False)
    head, found, end = full.partition(_ANSWER_PROBE)
    if not found or head != prompt or not end:
        raise ValueError("the chat template must render a conversation as prompt (with generation prompt) + "
                         f"answer + end of turn; got {full!r} for prompt {prompt!r}")
    return end


@functools.lru_cache(maxsize=32)
def image_token_count(processor) -> int:
    """How many image-token rows the processor expands one image placeholder into (64 for the embedded model)."""
    size = processor.image_processor.crop_size
    blank = Image.new("RGB", (size["width"], size["height"]))
    ids = processor(images=[blank], text=[processor.image_token])["input_ids"][0]
    image_id = processor.tokenizer.convert_tokens_to_ids(processor.image_token)
    return sum(int(i == image_id) for i in ids)


def prompt_ids(processor, question: str, image: bool = True) -> list[int]:
    """Token ids of the prompt for `question`, image placeholder expanded to `image_token_count` rows
    (image=False: those rows deleted). Equal to what the processor gives for the same text and one image."""
    tokenizer = processor.tokenizer
    image_id = tokenizer.convert_tokens_to_ids(processor.image_token)
    ids = tokenizer(prompt_text(processor, question))["input_ids"]
    if sum(int(i == image_id) for i in ids) != 1:
        raise ValueError(f"expected one image placeholder in the prompt of {question!r}")
    n = image_token_count(processor) if image else 0
    out = []
    for i in ids:
        out += [image_id] * n if i == image_id else [i]
    return out


def answer_ids(processor, answer: str) -> tuple[list[int], list[int]]:
    """(targets, rest): the answer's tokens + the first token of the end of turn; the end's remaining tokens."""
    tokenizer = processor.tokenizer
    end = tokenizer(end_of_turn(processor), add_special_tokens=False)["input_ids"]
    return tokenizer(answer, add_special_tokens=False)["input_ids"] + end[:1], end[1:]


def stop_token_id(processor) -> int:
    """The end-of-turn token: the first token of what the template writes after an answer."""
    return answer_ids(processor, "")[0][0]


def encode_qa(processor, questions: list[str], answers: list[str], image: bool = True):
    """(input_ids, attention_mask, labels), right-padded: `prompt(question) + answer + end of turn` per example.

    labels = input_ids on the answer tokens and the end-of-turn token, IGNORE elsewhere (prompt, image rows, the
    rest of the end of turn, padding) -- the instruction-data counterpart of `pretrain.encode_captions`.
    """
    if len(questions) != len(answers):
        raise ValueError(f"{len(questions)} questions but {len(answers)} answers")
    tokenizer = processor.tokenizer
    rows, targets = [], []
    for question, answer in zip(questions, answers):
        prompt = prompt_ids(processor, question, image=image)
        body, rest = answer_ids(processor, answer)
        rows.append(prompt + body + rest)
        targets.append([IGNORE] * len(prompt) + body + [IGNORE] * len(rest))
    return pad_right(rows, targets, tokenizer.pad_token_id)
