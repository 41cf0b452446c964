"""Tiny random-weight models of more placeholder families (image rows = ``input_ids == image_token_id``).

Same contract as tests/tiny_models.py (``TinyVLM``, hidden 32, 2 decoder layers, byte-level tokenizer, PIL image
processors, ``expected_image_rows(width, height)`` computed by hand from the family's published arithmetic):
Qwen3-VL (dense and MoE), GLM-4V, Aya Vision, InternVL, Idefics2, LLaVA-NeXT-Video (images), Janus,
DeepSeek-VL, Ovis2. Families that needed a rule of their own (early fusion, query tokens, cross-attention)
are in tests/tiny_models_fusion.py.
"""
from __future__ import annotations

import functools

from tiny_models import HIDDEN, LAYERS, QWEN_SPECIALS, QWEN_TEMPLATE, VICUNA, TinyVLM, _build, _llama, chat_template
from tiny_models import tiny_tokenizer, without_video_processor

CHATML = dict(user="<|im_start|>user\n", image="<image>", end_user="<|im_end|>\n", assistant="<|im_start|>assistant\n",
              end_assistant="<|im_end|>\n")


def _qwen2_text(tok, **extra) -> dict:
    return dict(vocab_size=len(tok), hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=LAYERS,
                num_attention_heads=2, num_key_value_heads=2, pad_token_id=tok.pad_token_id,
                max_position_embeddings=512, **extra)


def _qwen3_vl(moe: bool) -> TinyVLM:
    """Qwen3-VL: patches of ``patch`` px, 2x2 merge (rows = (H/patch)(W/patch)/4 for sides that are multiples of
    patch*merge within the pixel bounds), DeepStack features added to the first decoder layers' image rows."""
    import transformers as tf
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    tok = tiny_tokenizer(QWEN_SPECIALS, named={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"},
                         bos="<|endoftext|>", eos="<|im_end|>")
    patch, merge = 4, 2
    image_processor = Qwen2VLImageProcessorPil(patch_size=patch, merge_size=merge, temporal_patch_size=2,
                                               size={"shortest_edge": 64, "longest_edge": 64 * 64})
    processor = without_video_processor(tf.Qwen3VLProcessor)(image_processor=image_processor, tokenizer=tok,
                                                              video_processor=None,
                                                              chat_template=chat_template(**QWEN_TEMPLATE))
    text = _qwen2_text(tok, head_dim=16, rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3],
                                                          "mrope_interleaved": True, "rope_theta": 10000.0})
    if moe:
        text.update(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, decoder_sparse_step=1)
    vision = dict(depth=2, hidden_size=HIDDEN, intermediate_size=64, num_heads=2, patch_size=patch,
                  spatial_merge_size=merge, temporal_patch_size=2, out_hidden_size=HIDDEN, num_position_embeddings=64,
                  deepstack_visual_indexes=[0])
    ids = dict(image_token_id=tok.image_token_id, video_token_id=tok.video_token_id,
               vision_start_token_id=tok.convert_tokens_to_ids("<|vision_start|>"),
               vision_end_token_id=tok.convert_tokens_to_ids("<|vision_end|>"))
    if moe:
        config = tf.Qwen3VLMoeConfig(vision_config=vision, text_config=text, **ids)
        model = _build(tf.Qwen3VLMoeForConditionalGeneration, config)
    else:
        config = tf.Qwen3VLConfig(vision_config=vision, text_config=text, **ids)
        model = _build(tf.Qwen3VLForConditionalGeneration, config)
    return TinyVLM("qwen3_vl_moe" if moe else "qwen3_vl", model, processor, [(24, 16), (16, 32)],
                   lambda w, h: (h // patch) * (w // patch) // merge ** 2)


def qwen3_vl() -> TinyVLM:
    return _qwen3_vl(moe=False)


def qwen3_vl_moe() -> TinyVLM:
    return _qwen3_vl(moe=True)


def glm4v() -> TinyVLM:
    """GLM-4V: like Qwen2-VL (patch, 2x2 merge, rows = (H/patch)(W/patch)/4 for sides that are multiples of
    patch*merge) with ``<|begin_of_image|><|image|>...<|end_of_image|>`` around the image."""
    import transformers as tf
    from transformers.models.glm4v.image_processing_pil_glm4v import Glm4vImageProcessorPil
    specials = ["[gMASK]", "<sop>", "<|user|>", "<|assistant|>", "<|begin_of_image|>", "<|end_of_image|>", "<|image|>",
                "<|begin_of_video|>", "<|end_of_video|>", "<|video|>", "<|endoftext|>"]
    tok = tiny_tokenizer(specials, named={"image_token": "<|image|>", "video_token": "<|video|>"}, bos="<sop>",
                         eos="<|endoftext|>")
    patch, merge = 4, 2
    image_processor = Glm4vImageProcessorPil(patch_size=patch, merge_size=merge, temporal_patch_size=2,
                                             size={"shortest_edge": 64, "longest_edge": 64 * 64 * 2})
    processor = without_video_processor(tf.Glm4vProcessor)(
        image_processor=image_processor, tokenizer=tok, video_processor=None,
        chat_template=chat_template("[gMASK]<sop><|user|>\n", "<|begin_of_image|><|image|><|end_of_image|>", "",
                                    "<|assistant|>\n", "<|endoftext|>"))
    # half of each 16-wide head is rotated: 8 dims, 4 frequencies split over (t, h, w)
    text = _qwen2_text(tok, head_dim=16, rope_parameters={"rope_type": "default", "mrope_section": [1, 1, 2],
                                                          "rope_theta": 10000.0, "partial_rotary_factor": 0.5})
    vision = dict(depth=2, hidden_size=HIDDEN, intermediate_size=64, num_heads=2, patch_size=patch, image_size=16,
                  spatial_merge_size=merge, temporal_patch_size=2, out_hidden_size=HIDDEN)
    config = tf.Glm4vConfig(vision_config=vision, text_config=text, image_token_id=tok.image_token_id,
                            video_token_id=tok.video_token_id,
                            image_start_token_id=tok.convert_tokens_to_ids("<|begin_of_image|>"),
                            image_end_token_id=tok.convert_tokens_to_ids("<|end_of_image|>"),
                            video_start_token_id=tok.convert_tokens_to_ids("<|begin_of_video|>"),
                            video_end_token_id=tok.convert_tokens_to_ids("<|end_of_video|>"))
    return TinyVLM("glm4v", _build(tf.Glm4vForConditionalGeneration, config), processor, [(24, 16), (16, 32)],
                   lambda w, h: (h // patch) * (w // patch) // merge ** 2)


def _tiles(width: int, height: int, max_tiles: int, tile: int) -> int:
    """GOT-OCR2 crop_to_patches, for an image whose aspect ratio equals a grid's: cols x rows tiles of ``tile``
    px, plus one thumbnail when there is more than one tile. Among the grids of that ratio (fewest tiles first),
    a larger one wins the tie while the image's area exceeds half the area of its tiles."""
    grids = sorted(((c, r) for c in range(1, max_tiles + 1) for r in range(1, max_tiles + 1) if c * r <= max_tiles
                    and c * height == r * width), key=lambda g: g[0] * g[1])
    cols, rows = grids[0]
    for c, r in grids[1:]:  # ties are won by more tiles while the image is larger than half their area
        if width * height > 0.5 * tile * tile * c * r:
            cols, rows = c, r
    return cols * rows + (cols * rows > 1)


def aya_vision() -> TinyVLM:
    """Aya Vision: GOT-OCR2 tiling (``_tiles``), each tile (img_size / (patch * downsample))^2
    ``<|IMG_PATCH|>`` rows; ``TILE_i`` / ``TILE_GLOBAL`` / begin and end markers are neither image nor text rows."""
    from transformers import AyaVisionConfig, AyaVisionForConditionalGeneration, AyaVisionProcessor
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil
    specials = ["<|START_OF_TURN_TOKEN|>", "<|END_OF_TURN_TOKEN|>", "<|USER_TOKEN|>", "<|CHATBOT_TOKEN|>",
                "<|START_OF_IMG|>", "<|END_OF_IMG|>", "<|IMG_PATCH|>", "<|IMG_LINE_BREAK|>", "TILE", "TILE_GLOBAL",
                "<image>"]
    tok = tiny_tokenizer(specials, bos="<BOS_TOKEN>", eos="<|END_OF_TURN_TOKEN|>")
    size, patch, down, max_tiles = 16, 4, 2, 4
    image_processor = GotOcr2ImageProcessorPil(size={"height": size, "width": size}, crop_to_patches=True,
                                               min_patches=1, max_patches=max_tiles)
    processor = AyaVisionProcessor(image_processor=image_processor, tokenizer=tok, patch_size=patch, img_size=size,
                                   downsample_factor=down,
                                   chat_template=chat_template("<|START_OF_TURN_TOKEN|><|USER_TOKEN|>", "<image>",
                                                               "<|END_OF_TURN_TOKEN|>",
                                                               "<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>",
                                                               "<|END_OF_TURN_TOKEN|>"))
    vision = dict(model_type="siglip_vision_model", hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=2, image_size=size, patch_size=patch, vision_use_head=False)
    text = dict(model_type="cohere2", vocab_size=len(tok), hidden_size=HIDDEN, intermediate_size=64,
                num_hidden_layers=LAYERS, num_attention_heads=2, num_key_value_heads=2, head_dim=16,
                pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                sliding_window=8, layer_types=["sliding_attention", "full_attention"])
    config = AyaVisionConfig(vision_config=vision, text_config=text, downsample_factor=down,
                             image_token_index=tok.convert_tokens_to_ids("<|IMG_PATCH|>"))
    per_tile = (size // (patch * down)) ** 2
    return TinyVLM("aya_vision", _build(AyaVisionForConditionalGeneration, config), processor,
                   [(32, 16), (16, 16), (32, 32)], lambda w, h: _tiles(w, h, max_tiles, size) * per_tile)


def internvl() -> TinyVLM:
    """InternVL: GOT-OCR2 tiling (``_tiles``), each tile (image_size/patch)^2 * downsample_ratio^2
    ``<IMG_CONTEXT>`` rows between ``<img>`` and ``</img>``."""
    from transformers import InternVLConfig, InternVLForConditionalGeneration, InternVLProcessor
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil
    specials = ["<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>", "<video>", "<image>"]
    tok = tiny_tokenizer(specials, named={"start_image_token": "<img>", "end_image_token": "</img>",
                                          "context_image_token": "<IMG_CONTEXT>", "video_token": "<video>"},
                         bos="<|endoftext|>", eos="<|im_end|>")
    size, patch, max_tiles = 16, 4, 4
    seq = (size // patch) ** 2 // 4
    image_processor = GotOcr2ImageProcessorPil(size={"height": size, "width": size}, crop_to_patches=True,
                                               min_patches=1, max_patches=max_tiles)
    template = chat_template(**{**CHATML, "image": "<IMG_CONTEXT>"})  # the placeholder is the context token
    processor = without_video_processor(InternVLProcessor)(image_processor=image_processor, tokenizer=tok,
                                                           video_processor=None, image_seq_length=seq,
                                                           chat_template=template)
    vision = dict(hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  image_size=[size, size], patch_size=[patch, patch])
    text = dict(model_type="qwen2", **_qwen2_text(tok))
    config = InternVLConfig(vision_config=vision, text_config=text, image_token_id=tok.context_image_token_id,
                            image_seq_length=seq, downsample_ratio=0.5)
    return TinyVLM("internvl", _build(InternVLForConditionalGeneration, config), processor,
                   [(32, 16), (16, 16), (32, 32)], lambda w, h: _tiles(w, h, max_tiles, size) * seq)


def idefics2() -> TinyVLM:
    """Idefics2 with image splitting: 4 crops + the whole image, each resampled by the perceiver to
    ``resampler_n_latents`` ``<image>`` rows (whatever the image size); ``<fake_token_around_image>`` is neither."""
    from transformers import Idefics2Config, Idefics2ForConditionalGeneration, Idefics2Processor
    from transformers.models.idefics2.image_processing_pil_idefics2 import Idefics2ImageProcessorPil
    tok = tiny_tokenizer(["<fake_token_around_image>", "<image>", "<end_of_utterance>"],
                         named={"image_token": "<image>", "image_boundary_token": "<fake_token_around_image>"})
    latents = 4
    image_processor = Idefics2ImageProcessorPil(size={"shortest_edge": 16, "longest_edge": 32},
                                                do_image_splitting=True)
    processor = Idefics2Processor(image_processor=image_processor, tokenizer=tok, image_seq_len=latents,
                                  chat_template=chat_template("User:", "<image>", "<end_of_utterance>\n", "Assistant: ",
                                                              "<end_of_utterance>\n"))
    vision = dict(hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  image_size=32, patch_size=4)
    perceiver = dict(hidden_size=HIDDEN, resampler_n_latents=latents, resampler_depth=1, resampler_n_heads=2,
                     resampler_head_dim=16, num_key_value_heads=2)
    text = dict(model_type="mistral", vocab_size=len(tok), hidden_size=HIDDEN, intermediate_size=64,
                num_hidden_layers=LAYERS, num_attention_heads=2, num_key_value_heads=2, pad_token_id=tok.pad_token_id,
                max_position_embeddings=512)
    config = Idefics2Config(vision_config=vision, perceiver_config=perceiver, text_config=text,
                            image_token_id=tok.image_token_id)
    return TinyVLM("idefics2", _build(Idefics2ForConditionalGeneration, config), processor, [(40, 20), (24, 24)],
                   lambda w, h: 5 * latents)


def llava_next_video() -> TinyVLM:
    """LLaVA-NeXT-Video on images: LLaVA-NeXT's anyres arithmetic (base tile + grid + one newline row per grid
    row, for an image at a pinpoint); its video slot is unused."""
    from transformers import (CLIPVisionConfig, LlavaNextVideoConfig, LlavaNextVideoForConditionalGeneration,
                              LlavaNextVideoProcessor)
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil
    tok = tiny_tokenizer(["<image>", "<video>"], named={"image_token": "<image>", "video_token": "<video>"})
    crop, patch = 32, 8
    pinpoints = [[32, 64], [64, 32], [64, 64]]
    image_processor = LlavaNextImageProcessorPil(size={"shortest_edge": crop},
                                                 crop_size={"height": crop, "width": crop},
                                                 image_grid_pinpoints=pinpoints)
    processor = without_video_processor(LlavaNextVideoProcessor)(
        image_processor=image_processor, tokenizer=tok, video_processor=None, patch_size=patch,
        vision_feature_select_strategy="default", num_additional_image_tokens=1, chat_template=chat_template(**VICUNA))
    vision = CLIPVisionConfig(hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=crop, patch_size=patch)
    config = LlavaNextVideoConfig(vision_config=vision, text_config=_llama(tok), image_token_index=tok.image_token_id,
                                  video_token_index=tok.video_token_id, vision_feature_select_strategy="default",
                                  vision_feature_layer=-2, image_grid_pinpoints=pinpoints)
    return TinyVLM("llava_next_video", _build(LlavaNextVideoForConditionalGeneration, config), processor,
                   [(64, 32), (32, 64)], lambda w, h: (crop // patch) ** 2 + (h // patch) * (w // patch) + h // patch)


def janus() -> TinyVLM:
    """Janus (understanding path): SigLIP-like tower on a padded square, (image_size / patch)^2 ``<image_placeholder>``
    rows between ``<begin_of_image>`` and ``<end_of_image>``. The VQ tokenizer (generation path) is built but unused."""
    from transformers import JanusConfig, JanusForConditionalGeneration, JanusProcessor
    from transformers.models.janus.image_processing_pil_janus import JanusImageProcessorPil
    tok = tiny_tokenizer(["<image_placeholder>", "<begin_of_image>", "<end_of_image>"],
                         named={"image_token": "<image_placeholder>", "boi_token": "<begin_of_image>",
                                "eoi_token": "<end_of_image>"}, bos="<|begin_of_sentence|>", eos="<|end_of_sentence|>")
    size, patch = 16, 4
    tokens = (size // patch) ** 2
    image_processor = JanusImageProcessorPil(size={"height": size, "width": size}, min_size=4)
    processor = JanusProcessor(image_processor=image_processor, tokenizer=tok, num_image_tokens=tokens,
                               chat_template=chat_template("<|User|>: ", "<image_placeholder>", "\n\n",
                                                           "<|Assistant|>: ", "<|end_of_sentence|>"))
    vision = dict(hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  image_size=size, patch_size=patch, projection_dim=HIDDEN, num_image_tokens=tokens)
    vq = dict(embed_dim=8, num_embeddings=16, latent_channels=32, base_channels=32, channel_multiplier=[1, 1],
              num_res_blocks=1, num_patches=4, projection_dim=HIDDEN, image_token_embed_dim=HIDDEN)
    config = JanusConfig(text_config=_llama(tok).to_dict(), vision_config=vision, vq_config=vq,
                         image_token_id=tok.image_token_id)
    return TinyVLM("janus", _build(JanusForConditionalGeneration, config), processor, [(20, 12), (16, 16)],
                   lambda w, h: tokens)


def deepseek_vl() -> TinyVLM:
    """DeepSeek-VL: SigLIP on a padded square, (image_size / patch)^2 ``<image_placeholder>`` rows."""
    from transformers import DeepseekVLConfig, DeepseekVLForConditionalGeneration, DeepseekVLProcessor
    from transformers.models.deepseek_vl.image_processing_pil_deepseek_vl import DeepseekVLImageProcessorPil
    tok = tiny_tokenizer(["<image_placeholder>"], named={"image_token": "<image_placeholder>"},
                         bos="<|begin_of_sentence|>", eos="<|end_of_sentence|>")
    size, patch = 16, 4
    tokens = (size // patch) ** 2
    image_processor = DeepseekVLImageProcessorPil(size={"height": size, "width": size}, min_size=4)
    processor = DeepseekVLProcessor(image_processor=image_processor, tokenizer=tok, num_image_tokens=tokens,
                                    chat_template=chat_template("User: ", "<image_placeholder>", "\n\n",
                                                                "Assistant: ", "<|end_of_sentence|>"))
    vision = dict(model_type="siglip_vision_model", hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=2, image_size=size, patch_size=patch)
    config = DeepseekVLConfig(text_config=_llama(tok).to_dict(), vision_config=vision,
                              image_token_id=tok.image_token_id)
    return TinyVLM("deepseek_vl", _build(DeepseekVLForConditionalGeneration, config), processor,
                   [(20, 12), (16, 16)], lambda w, h: tokens)


OVIS_MARKERS = ["<IMG_START>", "<IMG_GRID>", "<IMG_COL>", "<IMG_ROW>", "<IMG_END>"]


def ovis2() -> TinyVLM:
    """Ovis2 (no tiling): ``image_seq_length`` = (image_size / patch / hidden_stride)^2 ``<IMG_ATOM>`` rows, each a
    softmax mixture of the visual embedding table; the five indicator tokens get fixed visual-table embeddings
    (the same for every image), so they are neither image nor text rows."""
    from transformers import Ovis2Config, Ovis2ForConditionalGeneration, Ovis2Processor
    from transformers.models.ovis2.image_processing_pil_ovis2 import Ovis2ImageProcessorPil
    tok = tiny_tokenizer(["<image>", "<IMG_ATOM>", *OVIS_MARKERS, "<|im_start|>", "<|im_end|>"],
                         bos="<|endoftext|>", eos="<|im_end|>")
    size, patch, stride = 16, 4, 2
    seq = (size // patch // stride) ** 2
    image_processor = Ovis2ImageProcessorPil(size={"height": size, "width": size}, crop_to_patches=False)
    processor = Ovis2Processor(image_processor=image_processor, tokenizer=tok, image_seq_length=seq,
                               chat_template=chat_template(**CHATML))
    vision = dict(hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  image_size=size, patch_size=patch, hidden_stride=stride, vocab_size=64,
                  num_visual_indicator_tokens=len(OVIS_MARKERS))
    text = dict(model_type="qwen2", **_qwen2_text(tok))
    config = Ovis2Config(vision_config=vision, text_config=text, hidden_size=HIDDEN, vocab_size=len(tok),
                         image_token_id=tok.convert_tokens_to_ids("<IMG_ATOM>"),
                         visual_indicator_token_ids=tok.convert_tokens_to_ids(OVIS_MARKERS))
    return TinyVLM("ovis2", _build(Ovis2ForConditionalGeneration, config), processor, [(20, 12), (16, 16)],
                   lambda w, h: seq)


FAMILIES = {f.__name__: f for f in (qwen3_vl, qwen3_vl_moe, glm4v, aya_vision, internvl, idefics2, llava_next_video,
                                    janus, deepseek_vl, ovis2)}


@functools.lru_cache(maxsize=None)
def build(family: str) -> TinyVLM:
    """The tiny model of ``family`` (cached: builders are deterministic, seed 0)."""
    return FAMILIES[family]()
