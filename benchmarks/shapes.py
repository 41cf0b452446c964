"""Random-weight models with the architecture and size of released LVLMs, built from their configs (no download).

    model, processor = build("llava-1.5-7b", device="cuda", dtype="bfloat16")

SHAPES holds each model's published config.json values written out as dicts (vision tower, language model,
image processor), so a benchmark sees the real layer count, widths, head layout, vocabulary size and number of
image tokens; the weights are random (a forward pass costs what the real one costs) and the tokenizer is a tiny
byte-level BPE (token ids stay below its ~330 entries; the embedding table still has the real vocabulary size).

    llava-1.5-7b      llava-hf/llava-1.5-7b-hf: CLIP ViT-L/14 at 336 px (576 image tokens), Vicuna-7B
                      (32 layers x 4096, 32 heads, vocabulary 32064)
    qwen2.5-vl-7b     Qwen/Qwen2.5-VL-7B-Instruct: 32-block ViT (1280 wide, windowed attention), 2x2 merge of
                      14 px patches, Qwen2 LLM (28 layers x 3584, 28 heads / 4 KV heads, vocabulary 152064)
    tiny              LLaVA-1.5's layout (336 px, 576 image tokens) with 2 + 2 layers of width 64: seconds on a CPU
    tiny-qwen2.5-vl   Qwen2.5-VL's layout with 2 + 2 layers of width 64 (and 16-wide heads)

Builders take ``device`` and ``dtype``: the model is created directly there (random init on a GPU takes seconds
for 7B parameters; on a CPU a 7B model needs ~28 GB in float32).
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from tiny_models import QWEN_SPECIALS, QWEN_TEMPLATE, VICUNA, chat_template, tiny_tokenizer  # noqa: E402
from tiny_models import without_video_processor  # noqa: E402

LLAVA_VISION_L14_336 = dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                            image_size=336, patch_size=14, projection_dim=768, hidden_act="quick_gelu",
                            layer_norm_eps=1e-5)
VICUNA_7B = dict(vocab_size=32064, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096, rms_norm_eps=1e-5,
                 rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
QWEN25_VL_VISION = dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
                        patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=112,
                        fullatt_block_indexes=[7, 15, 23, 31], hidden_act="silu")
QWEN25_7B = dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                 num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=128000, rms_norm_eps=1e-6,
                 rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]})
QWEN_PIXELS = {"shortest_edge": 56 * 56, "longest_edge": 28 * 28 * 16384}  # min_pixels, max_pixels

SHAPES = {
    "llava-1.5-7b": dict(family="llava", vision=LLAVA_VISION_L14_336, text=VICUNA_7B),
    "qwen2.5-vl-7b": dict(family="qwen2.5-vl", vision=QWEN25_VL_VISION, text=QWEN25_7B),
    "tiny": dict(family="llava", vision={**LLAVA_VISION_L14_336, "hidden_size": 64, "intermediate_size": 128,
                                         "num_hidden_layers": 2, "num_attention_heads": 2},
                 text={**VICUNA_7B, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                       "num_attention_heads": 4, "num_key_value_heads": 4}),
    "tiny-qwen2.5-vl": dict(family="qwen2.5-vl",
                            vision={**QWEN25_VL_VISION, "depth": 2, "hidden_size": 64, "intermediate_size": 128,
                                    "num_heads": 4, "out_hidden_size": 64, "fullatt_block_indexes": [1]},
                            text={**QWEN25_7B, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                                  "num_attention_heads": 4, "num_key_value_heads": 2,
                                  "rope_parameters": {**QWEN25_7B["rope_parameters"], "mrope_section": [2, 3, 3]}}),
}


def _llava(shape: dict, tokenizer):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

    size = shape["vision"]["image_size"]
    image_processor = LlavaImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer,
                               patch_size=shape["vision"]["patch_size"], vision_feature_select_strategy="default",
                               num_additional_image_tokens=1, chat_template=chat_template(**VICUNA))
    config = LlavaConfig(vision_config=CLIPVisionConfig(**shape["vision"]),
                         text_config=LlamaConfig(**shape["text"], pad_token_id=tokenizer.pad_token_id),
                         image_token_index=tokenizer.image_token_id, vision_feature_select_strategy="default",
                         vision_feature_layer=-2, projector_hidden_act="gelu")
    return LlavaForConditionalGeneration, config, processor


def _qwen25_vl(shape: dict, tokenizer):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    vision = shape["vision"]
    image_processor = Qwen2VLImageProcessorPil(patch_size=vision["patch_size"], merge_size=vision["spatial_merge_size"],
                                               temporal_patch_size=vision["temporal_patch_size"], size=QWEN_PIXELS)
    processor = without_video_processor(Qwen2_5_VLProcessor)(image_processor=image_processor, tokenizer=tokenizer,
                                                              video_processor=None,
                                                              chat_template=chat_template(**QWEN_TEMPLATE))
    ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in
           (("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
            ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"))}
    text = {**shape["text"], "pad_token_id": tokenizer.pad_token_id}
    config = Qwen2_5_VLConfig(vision_config=vision, text_config=text, **ids)
    return Qwen2_5_VLForConditionalGeneration, config, processor


def build(name: str, device="cpu", dtype="float32"):
    """(model, processor) of shape ``name`` (SHAPES) with random weights (seed 0), created on ``device`` in
    ``dtype`` (a torch dtype or its name), in eval mode."""
    if name not in SHAPES:
        raise ValueError(f"unknown shape {name!r}: one of {sorted(SHAPES)}")
    shape = SHAPES[name]
    if shape["family"] == "llava":
        tokenizer = tiny_tokenizer(["<image>"], named={"image_token": "<image>"})
        model_class, config, processor = _llava(shape, tokenizer)
    else:
        tokenizer = tiny_tokenizer(QWEN_SPECIALS, named={"image_token": "<|image_pad|>",
                                                         "video_token": "<|video_pad|>"},
                                   bos="<|endoftext|>", eos="<|im_end|>")
        model_class, config, processor = _qwen25_vl(shape, tokenizer)
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    torch.manual_seed(0)
    with torch.device(device):
        model = model_class._from_config(config, dtype=dtype)
    return model.eval(), processor


def parameter_count(model) -> int:
    return sum(p.numel() for p in model.parameters())
