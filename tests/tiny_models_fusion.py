"""Tiny random-weight models of the families that needed a rule of their own (see docs/families.md):

- early fusion with discrete image codes (Chameleon, Emu3): a VQ-VAE turns the image into codes that enter the
  decoder as ordinary token embeddings at the ``<image>`` positions;
- query tokens prepended by the processor (BLIP-2, InstructBLIP): ``num_query_tokens`` Q-Former outputs at the
  start of the sequence, no placeholder in the prompt;
- cross-attention (Mllama): the image enters through cross-attention layers, not the decoder sequence.

Same contract as tests/tiny_models.py: ``TinyVLM``, hidden 32, 2 decoder layers, byte-level tokenizer,
``expected_image_rows(width, height)`` from the family's published arithmetic.
"""
from __future__ import annotations

import functools

from tiny_models import HIDDEN, LAYERS, TinyVLM, _build, _llama, chat_template, tiny_tokenizer

CODEBOOK = 16  # VQ codebook entries of the early-fusion models


def _letters(code: int) -> str:
    """Chameleon's name of image code ``code``: its decimal digits as letters A-J (0-9)."""
    return "".join(chr(ord("A") + int(digit)) for digit in str(code))


def chameleon() -> TinyVLM:
    """Chameleon: the image is resized and centre-cropped to ``crop`` px, and the VQ-VAE (downsampling
    2^(levels - 1)) gives (crop / 2^(levels - 1))^2 codes, one ``<image>`` row each, between ``<racm3:break>`` and
    ``<eoss>``; a code row's embedding is the BPE token the code maps to (vocabulary_map ``IMGIMG...``)."""
    from transformers import ChameleonConfig, ChameleonForConditionalGeneration, ChameleonProcessor
    from transformers.models.chameleon.image_processing_pil_chameleon import ChameleonImageProcessorPil
    codes = [f"IMGIMG{_letters(code)}Z" for code in range(CODEBOOK)]
    tok = tiny_tokenizer(["<image>", "<racm3:break>", "<eoss>", "<reserved08706>", *codes],
                         named={"image_token": "<image>", "boi_token": "<racm3:break>", "eoi_token": "<eoss>"})
    tok.sep_token = "<reserved08706>"  # appended to every prompt by the processor (chat mode)
    crop, levels = 16, 3
    seq = (crop // 2 ** (levels - 1)) ** 2
    image_processor = ChameleonImageProcessorPil(size={"shortest_edge": crop},
                                                 crop_size={"height": crop, "width": crop})
    processor = ChameleonProcessor(image_processor=image_processor, tokenizer=tok, image_seq_length=seq)
    processor.chat_template = chat_template("USER: ", "<image>", " ", "ASSISTANT: ", "</s>")
    vq = dict(embed_dim=8, num_embeddings=CODEBOOK, latent_channels=8, resolution=crop, base_channels=32,
              channel_multiplier=[1] * levels, num_res_blocks=1, attn_resolutions=[])
    config = ChameleonConfig(vocab_size=len(tok), hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=LAYERS,
                             num_attention_heads=2, num_key_value_heads=2, pad_token_id=tok.pad_token_id,
                             bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, max_position_embeddings=512,
                             vq_config=vq, vocabulary_map=tok.get_vocab())
    return TinyVLM("chameleon", _build(ChameleonForConditionalGeneration, config), processor, [(24, 20), (16, 16)],
                   lambda w, h: seq)


def emu3() -> TinyVLM:
    """Emu3: the image is resized so both sides are multiples of 8 (``spatial_factor``; sides that already are and
    fit the pixel bounds stay), the VQ-VAE gives (H/8) x (W/8) codes, and each code row ends with an end-of-line
    token: (H/8)(W/8 + 1) ``<image>`` rows. Images of different sizes are padded to a common size in a batch."""
    from transformers import Emu3Config, Emu3ForConditionalGeneration, Emu3Processor
    from transformers.models.emu3.image_processing_emu3 import Emu3ImageProcessor
    codes = [f"<|visual token {code:06d}|>" for code in range(CODEBOOK)]
    specials = ["<image>", "<|image start|>", "<|image end|>", "<|image token|>", "<|extra_200|>", "<|extra_201|>",
                *codes]
    tok = tiny_tokenizer(specials, named={"image_token": "<image>", "boi_token": "<|image start|>",
                                          "eoi_token": "<|image end|>", "image_wrapper_token": "<|image token|>",
                                          "eof_token": "<|extra_201|>"}, bos="<|extra_203|>", eos="<|extra_204|>")
    factor = 8  # Emu3Processor.downsample_ratio: the VQ-VAE must downsample by 8, i.e. 4 levels
    image_processor = Emu3ImageProcessor(min_pixels=8 * 8, max_pixels=64 * 64, spatial_factor=factor)
    processor = Emu3Processor(image_processor=image_processor, tokenizer=tok,
                              chat_template=chat_template("USER: ", "<image>", "", " ASSISTANT: ", "<|extra_204|>"))
    vq = dict(codebook_size=CODEBOOK, embed_dim=4, latent_channels=4, base_channels=32, channel_multiplier=[1, 1, 1, 1],
              num_res_blocks=1, attn_resolutions=[], temporal_downsample_factor=4, hidden_size=HIDDEN,
              num_attention_heads=1)
    text = dict(vocab_size=len(tok), hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=LAYERS,
                num_attention_heads=2, num_key_value_heads=2, pad_token_id=tok.pad_token_id,
                bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, max_position_embeddings=512,
                attention_dropout=0.0)
    config = Emu3Config(vq_config=vq, text_config=text, vocabulary_map=tok.get_vocab())
    return TinyVLM("emu3", _build(Emu3ForConditionalGeneration, config), processor, [(24, 16), (16, 32), (32, 32)],
                   lambda w, h: (h // factor) * (w // factor + 1))


def blip2() -> TinyVLM:
    """BLIP-2 (OPT decoder): the processor puts ``num_query_tokens`` ``<image>`` tokens before the text (and
    before BOS); the model writes the Q-Former's query outputs there. No chat template, no placeholder."""
    from transformers import Blip2Config, Blip2ForConditionalGeneration, Blip2Processor
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil
    tok = tiny_tokenizer([], bos="</s>", eos="</s>")  # as released: the processor adds "<image>" itself
    size, patch, queries = 16, 4, 6
    image_processor = BlipImageProcessorPil(size={"height": size, "width": size})
    processor = Blip2Processor(image_processor=image_processor, tokenizer=tok, num_query_tokens=queries)
    image_id = tok.convert_tokens_to_ids("<image>")
    vision = dict(hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  image_size=size, patch_size=patch)
    qformer = dict(vocab_size=len(tok), hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=2,
                   intermediate_size=64, encoder_hidden_size=HIDDEN)
    text = dict(model_type="opt", vocab_size=len(tok), hidden_size=HIDDEN, ffn_dim=64, num_hidden_layers=LAYERS,
                num_attention_heads=2, word_embed_proj_dim=HIDDEN, pad_token_id=tok.pad_token_id,
                bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, max_position_embeddings=512)
    config = Blip2Config(vision_config=vision, qformer_config=qformer, text_config=text, num_query_tokens=queries,
                         image_token_index=image_id)
    return TinyVLM("blip2", _build(Blip2ForConditionalGeneration, config), processor, [(20, 12), (16, 16)],
                   lambda w, h: queries)


def instructblip() -> TinyVLM:
    """InstructBLIP (Llama decoder): like BLIP-2, ``num_query_tokens`` ``<image>`` rows prepended by the
    processor; the Q-Former also reads the text (its own tokenizer, ``qformer_input_ids``)."""
    from transformers import InstructBlipConfig, InstructBlipForConditionalGeneration, InstructBlipProcessor
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil
    tok, qformer_tok = tiny_tokenizer([]), tiny_tokenizer([])
    size, patch, queries = 16, 4, 6
    image_processor = BlipImageProcessorPil(size={"height": size, "width": size})
    processor = InstructBlipProcessor(image_processor=image_processor, tokenizer=tok, qformer_tokenizer=qformer_tok,
                                      num_query_tokens=queries)  # adds "<image>" to the tokenizer
    vision = dict(hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  image_size=size, patch_size=patch)
    qformer = dict(vocab_size=len(qformer_tok), hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=2,
                   intermediate_size=64, encoder_hidden_size=HIDDEN, pad_token_id=qformer_tok.pad_token_id)
    config = InstructBlipConfig(vision_config=vision, qformer_config=qformer, text_config=_llama(tok).to_dict(),
                                num_query_tokens=queries, image_token_index=tok.convert_tokens_to_ids("<image>"))
    return TinyVLM("instructblip", _build(InstructBlipForConditionalGeneration, config), processor,
                   [(20, 12), (16, 16)], lambda w, h: queries)


def mllama() -> TinyVLM:
    """Mllama (Llama 3.2 Vision): one ``<|image|>`` marker in the text; the image tiles reach the decoder through
    its cross-attention layers, so the decoder sequence holds no image rows (expected_image_rows: 0)."""
    from transformers import MllamaConfig, MllamaForConditionalGeneration, MllamaProcessor
    from transformers.models.mllama.image_processing_pil_mllama import MllamaImageProcessorPil
    tok = tiny_tokenizer(["<|image|>", "<|begin_of_text|>", "<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>"],
                         named={"image_token": "<|image|>"}, bos="<|begin_of_text|>", eos="<|eot_id|>")
    size, patch = 16, 4
    image_processor = MllamaImageProcessorPil(size={"height": size, "width": size}, max_image_tiles=2)
    processor = MllamaProcessor(image_processor=image_processor, tokenizer=tok,
                                chat_template=chat_template("<|start_header_id|>user<|end_header_id|>\n\n",
                                                            "<|image|>", "<|eot_id|>",
                                                            "<|start_header_id|>assistant<|end_header_id|>\n\n",
                                                            "<|eot_id|>"))
    vision = dict(hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=2, num_global_layers=1,
                  attention_heads=2, vision_output_dim=2 * HIDDEN, image_size=size, patch_size=patch,
                  max_num_tiles=2, intermediate_layers_indices=[0], supported_aspect_ratios=[[1, 1], [1, 2], [2, 1]])
    text = dict(vocab_size=len(tok), hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=LAYERS,
                num_attention_heads=2, num_key_value_heads=2, cross_attention_layers=[1],
                pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                max_position_embeddings=512)
    config = MllamaConfig(vision_config=vision, text_config=text, image_token_index=tok.image_token_id)
    return TinyVLM("mllama", _build(MllamaForConditionalGeneration, config), processor, [(16, 16)], lambda w, h: 0)


FAMILIES = {f.__name__: f for f in (chameleon, emu3, blip2, instructblip, mllama)}


@functools.lru_cache(maxsize=None)
def build(family: str) -> TinyVLM:
    """The tiny model of ``family`` (cached: builders are deterministic, seed 0)."""
    return FAMILIES[family]()
