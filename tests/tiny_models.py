"""Tiny random-weight vision-language models of eight families, built offline from their real classes.

Each builder returns ``TinyVLM(family, model, processor, image_sizes, expected_image_rows)`` where
``expected_image_rows(width, height)`` is the number of image-token rows the family's *published arithmetic*
implies for an image of one of ``image_sizes`` -- computed here by hand from patch / merge / pooling sizes, not by
asking the processor. Everything is really tiny (hidden 32, 2 decoder layers, images of 16-64 px) so a
forward pass takes milliseconds.

Tokenizers: a byte-level BPE trained in memory on a few sentences (so captions merge across word
boundaries, like real tokenizers), plus the special tokens each family needs. Chat templates: small Jinja
templates shaped like each family's real one (image in the user turn, text in the assistant turn).
"""
from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from typing import Callable

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

HIDDEN = 32
LAYERS = 2
CORPUS = [
    "a cat sits on the mat", "the quick brown fox jumps over the lazy dog", "a red square and a blue circle",
    "USER: ASSISTANT: User: Assistant: user model system", "photo of two dogs in the park at night",
] * 4


@contextlib.contextmanager
def single_thread():
    """Run torch on one thread: tiny matmuls on a busy 2-core machine are ~30x faster without OpenMP
    contention (measured 2.7 s -> 0.07 s for four tiny LLaVA forwards)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@dataclass
class TinyVLM:
    """A tiny model with its processor; ``expected_image_rows(width, height)`` from hand arithmetic."""
    family: str
    model: torch.nn.Module
    processor: object
    image_sizes: list[tuple[int, int]]  # (width, height) of test images whose row count is exact by hand
    expected_image_rows: Callable[[int, int], int]


def tiny_tokenizer(specials: list[str], named: dict[str, str] | None = None, bos="<s>", eos="</s>",
                   pad="<pad>", vocab_size=320) -> PreTrainedTokenizerFast:
    """Byte-level BPE (every string encodes; offsets work) with ``specials`` as unsplittable special tokens."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    special_tokens = list(dict.fromkeys([pad, bos, eos, *specials]))
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special_tokens, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos, pad_token=pad,
                                   extra_special_tokens=named or {})


def chat_template(user: str, image: str, end_user: str, assistant: str, end_assistant: str) -> str:
    """A Jinja chat template: ``user + image + end_user + assistant + text + end_assistant`` per turn pair."""
    return (
        "{% for m in messages %}{% if m['role'] == 'user' %}" + user
        + "{% for c in m['content'] %}{% if c['type'] == 'image' %}" + image
        + "{% else %}{{ c['text'] }}{% endif %}{% endfor %}" + end_user
        + "{% else %}" + assistant + "{% for c in m['content'] %}{{ c['text'] }}{% endfor %}" + end_assistant
        + "{% endif %}{% endfor %}{% if add_generation_prompt %}" + assistant + "{% endif %}"
    )


def _llama(tokenizer, **extra):
    from transformers import LlamaConfig
    return LlamaConfig(vocab_size=len(tokenizer), hidden_size=HIDDEN, intermediate_size=64,
                       num_hidden_layers=LAYERS, num_attention_heads=2, num_key_value_heads=2,
                       pad_token_id=tokenizer.pad_token_id, max_position_embeddings=512, **extra)


def chatml_llava(chat_template: str, tied: bool = False):
    """A tiny LLaVA (16 image tokens) with the given chat template, e.g. the embedded model's ChatML; its lm_head
    tied to the input embeddings or not. Seeded: the same weights on every call."""
    from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

    tok = tiny_tokenizer(["<image>", "<|im_start|>", "<|im_end|>"], named={"image_token": "<image>"},
                         bos="<|im_start|>", eos="<|im_end|>", pad="<|endoftext|>")
    crop, patch = 32, 8
    processor = LlavaProcessor(image_processor=LlavaImageProcessorPil(size={"shortest_edge": crop},
                                                                      crop_size={"height": crop, "width": crop}),
                               tokenizer=tok, patch_size=patch, vision_feature_select_strategy="default",
                               num_additional_image_tokens=1, chat_template=chat_template)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=crop, patch_size=patch)
    config = LlavaConfig(vision_config=vision, text_config=_llama(tok, tie_word_embeddings=tied),
                         image_token_index=tok.image_token_id, vision_feature_select_strategy="default",
                         vision_feature_layer=-2, tie_word_embeddings=tied)
    torch.manual_seed(0)
    return LlavaForConditionalGeneration(config).eval(), processor


def without_video_processor(processor_class):
    """``processor_class`` accepting ``video_processor=None``: video processors need torchvision, which cannot be
    installed beside this CPU torch; images never touch that slot."""
    class Processor(processor_class):
        def check_argument_for_proper_class(self, argument_name, argument):
            if argument_name == "video_processor" and argument is None:
                return None
            return super().check_argument_for_proper_class(argument_name, argument)
    Processor.__name__ = Processor.__qualname__ = processor_class.__name__
    return Processor


def _build(model_class, config) -> torch.nn.Module:
    torch.manual_seed(0)
    return model_class(config).eval()


VICUNA = dict(user="USER: ", image="<image>\n", end_user=" ", assistant="ASSISTANT: ", end_assistant="</s>")


def llava() -> TinyVLM:
    """LLaVA-1.5: CLIP tower (CLS dropped, 'default' strategy), rows = (crop / patch)^2."""
    from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil
    tok = tiny_tokenizer(["<image>"], named={"image_token": "<image>"})
    crop, patch = 32, 8
    image_processor = LlavaImageProcessorPil(size={"shortest_edge": crop}, crop_size={"height": crop, "width": crop})
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tok, patch_size=patch,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1,
                               chat_template=chat_template(**VICUNA))
    vision = CLIPVisionConfig(hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=crop, patch_size=patch)
    config = LlavaConfig(vision_config=vision, text_config=_llama(tok), image_token_index=tok.image_token_id,
                         vision_feature_select_strategy="default", vision_feature_layer=-2)
    return TinyVLM("llava", _build(LlavaForConditionalGeneration, config), processor, [(40, 30), (32, 32)],
                   lambda w, h: (crop // patch) ** 2)


def llava_next() -> TinyVLM:
    """LLaVA-NeXT anyres: for an image exactly at a grid pinpoint (W, H) the rows are the base tile
    (crop/patch)^2 + the high-res grid (H/patch)(W/patch) + one newline row per high-res patch row (H/patch)."""
    from transformers import (CLIPVisionConfig, LlavaNextConfig, LlavaNextForConditionalGeneration,
                              LlavaNextProcessor)
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil
    tok = tiny_tokenizer(["<image>"], named={"image_token": "<image>"})
    crop, patch = 32, 8
    pinpoints = [[32, 64], [64, 32], [64, 64]]  # (height, width)
    image_processor = LlavaNextImageProcessorPil(size={"shortest_edge": crop},
                                                 crop_size={"height": crop, "width": crop},
                                                 image_grid_pinpoints=pinpoints)
    processor = LlavaNextProcessor(image_processor=image_processor, tokenizer=tok, patch_size=patch,
                                   vision_feature_select_strategy="default", num_additional_image_tokens=1,
                                   chat_template=chat_template(**VICUNA))
    vision = CLIPVisionConfig(hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=crop, patch_size=patch)
    config = LlavaNextConfig(vision_config=vision, text_config=_llama(tok), image_token_index=tok.image_token_id,
                             vision_feature_select_strategy="default", vision_feature_layer=-2,
                             image_grid_pinpoints=pinpoints)
    return TinyVLM("llava_next", _build(LlavaNextForConditionalGeneration, config), processor, [(64, 32), (32, 64), (64, 64)],
                   lambda w, h: (crop // patch) ** 2 + (h // patch) * (w // patch) + h // patch)


def llava_onevision() -> TinyVLM:
    """LLaVA-OneVision: SigLIP tower (no CLS, 'full'), anyres_max_9 -- same arithmetic as LLaVA-NeXT for an
    image at a pinpoint with at most 9 tiles."""
    from transformers import (LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration,
                              LlavaOnevisionProcessor, Qwen2Config, SiglipVisionConfig)
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil)
    tok = tiny_tokenizer(["<image>", "<video>", "<|im_start|>", "<|im_end|>"],
                         named={"image_token": "<image>", "video_token": "<video>"}, bos="<|endoftext|>",
                         eos="<|im_end|>")
    size, patch = 16, 4
    pinpoints = [[16, 16], [16, 32], [32, 16], [32, 32]]
    image_processor = LlavaOnevisionImageProcessorPil(size={"height": size, "width": size},
                                                      image_grid_pinpoints=pinpoints)
    processor = without_video_processor(LlavaOnevisionProcessor)(
        image_processor=image_processor, tokenizer=tok, video_processor=None, num_image_tokens=(size // patch) ** 2,
        vision_feature_select_strategy="full", vision_aspect_ratio="anyres_max_9",
        chat_template=chat_template("<|im_start|>user\n", "<image>", "<|im_end|>\n", "<|im_start|>assistant\n",
                                    "<|im_end|>\n"))
    vision = SiglipVisionConfig(hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=2,
                                num_attention_heads=2, image_size=size, patch_size=patch)
    text = Qwen2Config(vocab_size=len(tok), hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=LAYERS,
                       num_attention_heads=2, num_key_value_heads=2, pad_token_id=tok.pad_token_id)
    config = LlavaOnevisionConfig(vision_config=vision, text_config=text, image_token_index=tok.image_token_id,
                                  video_token_index=tok.video_token_id, vision_feature_select_strategy="full",
                                  vision_feature_layer=-1, image_grid_pinpoints=pinpoints,
                                  vision_aspect_ratio="anyres_max_9")
    return TinyVLM("llava_onevision", _build(LlavaOnevisionForConditionalGeneration, config), processor, [(32, 16), (32, 32)],
                   lambda w, h: (size // patch) ** 2 + (h // patch) * (w // patch) + h // patch)


QWEN_SPECIALS = ["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
                 "<|video_pad|>"]
QWEN_TEMPLATE = dict(user="<|im_start|>user\n", image="<|vision_start|><|image_pad|><|vision_end|>",
                     end_user="<|im_end|>\n", assistant="<|im_start|>assistant\n", end_assistant="<|im_end|>\n")


def _qwen(version: str) -> TinyVLM:
    """Qwen2-VL / Qwen2.5-VL: patches of ``patch`` px, 2x2 merge: rows = (H/patch)(W/patch) / merge^2 for an
    image whose sides are multiples of patch*merge within the min/max pixel bounds (no resize)."""
    import transformers as tf
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    tok = tiny_tokenizer(QWEN_SPECIALS, named={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"},
                         bos="<|endoftext|>", eos="<|im_end|>")
    patch, merge = 4, 2
    image_processor = Qwen2VLImageProcessorPil(patch_size=patch, merge_size=merge, temporal_patch_size=2,
                                               size={"shortest_edge": 64, "longest_edge": 64 * 64})
    processor_class = without_video_processor(tf.Qwen2VLProcessor if version == "2" else tf.Qwen2_5_VLProcessor)
    processor = processor_class(image_processor=image_processor, tokenizer=tok, video_processor=None,
                                chat_template=chat_template(**QWEN_TEMPLATE))
    text = dict(vocab_size=len(tok), hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=LAYERS,
                num_attention_heads=2, num_key_value_heads=2, pad_token_id=tok.pad_token_id,
                rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0})
    text.update(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    ids = dict(image_token_id=tok.image_token_id, video_token_id=tok.video_token_id,
               vision_start_token_id=tok.convert_tokens_to_ids("<|vision_start|>"),
               vision_end_token_id=tok.convert_tokens_to_ids("<|vision_end|>"))
    if version == "2":
        vision = dict(depth=2, embed_dim=HIDDEN, hidden_size=HIDDEN, num_heads=2, mlp_ratio=2, patch_size=patch,
                      spatial_merge_size=merge, temporal_patch_size=2)
        config = tf.Qwen2VLConfig(vision_config=vision, text_config=text, **ids)
        model = _build(tf.Qwen2VLForConditionalGeneration, config)
    else:
        vision = dict(depth=2, hidden_size=HIDDEN, out_hidden_size=HIDDEN, intermediate_size=64, num_heads=2,
                      patch_size=patch, spatial_merge_size=merge, temporal_patch_size=2, window_size=16,
                      fullatt_block_indexes=[1])
        config = tf.Qwen2_5_VLConfig(vision_config=vision, text_config=text, **ids)
        model = _build(tf.Qwen2_5_VLForConditionalGeneration, config)
    return TinyVLM(f"qwen{version.replace('.', '_')}_vl", model, processor, [(24, 16), (16, 32)],
                   lambda w, h: (h // patch) * (w // patch) // merge ** 2)


def qwen2_vl() -> TinyVLM:
    return _qwen("2")


def qwen2_5_vl() -> TinyVLM:
    return _qwen("2.5")


def idefics3() -> TinyVLM:
    """Idefics3 / SmolVLM with image splitting: the image is scaled so its longest edge is ``size`` px, cut into
    ``max_size`` px tiles, plus one global tile; each tile gives (max_size/patch)^2 / scale^2 image rows. Tiles
    are wrapped in ``<fake_token_around_image><row_i_col_j>`` / ``<global-img>`` markers, which are not image
    rows."""
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration, Idefics3Processor
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil
    specials = ["<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>"]
    specials += [f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)]
    tok = tiny_tokenizer(specials, named={"image_token": "<image>"}, bos="<|im_start|>", eos="<end_of_utterance>")
    size, max_size, patch, scale = 64, 32, 4, 2
    seq_len = (max_size // patch) ** 2 // scale ** 2
    image_processor = Idefics3ImageProcessorPil(size={"longest_edge": size}, max_image_size={"longest_edge": max_size},
                                                do_image_splitting=True)
    processor = Idefics3Processor(image_processor=image_processor, tokenizer=tok, image_seq_len=seq_len,
                                  chat_template=chat_template("<|im_start|>User:", "<image>", "<end_of_utterance>\n",
                                                              "Assistant: ", "<end_of_utterance>\n"))
    vision = dict(hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  image_size=max_size, patch_size=patch)
    config = Idefics3Config(vision_config=vision, text_config=_llama(tok), scale_factor=scale,
                            image_token_id=tok.image_token_id)

    def rows(w, h):
        longest = max(w, h)
        tiles = (size * h // longest // max_size) * (size * w // longest // max_size)
        return (tiles + 1) * seq_len
    return TinyVLM("idefics3", _build(Idefics3ForConditionalGeneration, config), processor, [(64, 32), (24, 24)],
                   rows)


def paligemma() -> TinyVLM:
    """PaliGemma: SigLIP, rows = (image_size/patch)^2; no chat template (text passed as the suffix)."""
    from transformers import (GemmaConfig, PaliGemmaConfig, PaliGemmaForConditionalGeneration,
                              PaliGemmaProcessor, SiglipVisionConfig)
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil
    tok = tiny_tokenizer(["<image>"], named={"image_token": "<image>"}, bos="<bos>", eos="<eos>")
    size, patch = 16, 4
    image_processor = SiglipImageProcessorPil(size={"height": size, "width": size})
    image_processor.image_seq_length = (size // patch) ** 2
    processor = PaliGemmaProcessor(image_processor=image_processor, tokenizer=tok)
    vision = SiglipVisionConfig(hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=2,
                                num_attention_heads=2, image_size=size, patch_size=patch,
                                projection_dim=HIDDEN)
    text = GemmaConfig(vocab_size=len(tok), hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=LAYERS,
                       num_attention_heads=2, num_key_value_heads=1, head_dim=16, pad_token_id=tok.pad_token_id)
    config = PaliGemmaConfig(vision_config=vision, text_config=text, image_token_index=tok.image_token_id,
                             projection_dim=HIDDEN)
    return TinyVLM("paligemma", _build(PaliGemmaForConditionalGeneration, config), processor, [(20, 30), (16, 16)],
                   lambda w, h: (size // patch) ** 2)


def gemma3() -> TinyVLM:
    """Gemma3: SigLIP patches average-pooled to ``mm_tokens_per_image`` soft tokens inside
    ``<start_of_image> ... <end_of_image>``; the soft-token id is the image row id (not the boi marker)."""
    from transformers import (Gemma3Config, Gemma3ForConditionalGeneration, Gemma3Processor,
                              Gemma3TextConfig, SiglipVisionConfig)
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil
    specials = ["<start_of_image>", "<end_of_image>", "<image_soft_token>", "<start_of_turn>", "<end_of_turn>"]
    tok = tiny_tokenizer(specials, named={"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>",
                                          "image_token": "<image_soft_token>"}, bos="<bos>", eos="<eos>")
    size, patch, tokens = 16, 2, 4  # 8x8 patches pooled to 2x2
    image_processor = Gemma3ImageProcessorPil(size={"height": size, "width": size})
    processor = Gemma3Processor(image_processor=image_processor, tokenizer=tok, image_seq_length=tokens,
                                chat_template=chat_template("<bos><start_of_turn>user\n", "<start_of_image>",
                                                            "<end_of_turn>\n", "<start_of_turn>model\n",
                                                            "<end_of_turn>\n"))
    vision = SiglipVisionConfig(hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=2,
                                num_attention_heads=2, image_size=size, patch_size=patch)
    text = Gemma3TextConfig(vocab_size=len(tok), hidden_size=HIDDEN, intermediate_size=64,
                            num_hidden_layers=LAYERS, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                            pad_token_id=tok.pad_token_id, sliding_window=8)
    config = Gemma3Config(vision_config=vision, text_config=text, mm_tokens_per_image=tokens,
                          image_token_index=tok.image_token_id,
                          boi_token_index=tok.convert_tokens_to_ids("<start_of_image>"),
                          eoi_token_index=tok.convert_tokens_to_ids("<end_of_image>"))
    return TinyVLM("gemma3", _build(Gemma3ForConditionalGeneration, config), processor, [(24, 20), (16, 16)],
                   lambda w, h: tokens)


FAMILIES = {f.__name__: f for f in (llava, llava_next, llava_onevision, qwen2_vl, qwen2_5_vl, idefics3,
                                    paligemma, gemma3)}


@functools.lru_cache(maxsize=None)
def build(family: str) -> TinyVLM:
    """The tiny model of ``family`` (cached: builders are deterministic, seed 0)."""
    return FAMILIES[family]()
