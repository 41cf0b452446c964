"""mirlab: see and measure the Modality Integration Rate (MIR) of vision-language models.

MIR (arXiv 2410.07167, Eq. 4) = log10( sum over decoder layers k of FD_k ), where FD_k is the Fréchet
distance between the text-centrically scaled, outlier-handled hidden states of the image tokens and of the
text tokens at layer k. Lower MIR = modalities better integrated. See docs/architecture.md.

The package is four wings and a front:

    mirlab.pairs     (image, text) pairs: folder/JSONL readers, bundled samples, synthetic scenes
    mirlab.lvlm      any Hugging Face LVLM: load, find image/text rows, batched extraction, the row store
    mirlab.metrics   per-layer preparation, Fréchet distance, MIR, bootstrap (and the place new metrics go)
    mirlab.tiny      the embedded tiny LLaVA: build, trainable state, pre-training, evaluation
    mirlab.study     experiments that combine the tiny model with the metrics (MIR along pre-training)
    front            run_mir / load_model, plots, the LayerExplorer widget, the course, the CLI

Everything below is imported lazily on first use, so ``import mirlab`` (and ``mirlab --help``) stays light.
"""
from __future__ import annotations

import importlib

__version__ = "0.2.0"

# public name -> module that defines it (the MIR path; the tiny model lives in mirlab.tiny)
_EXPORTS = {
    # metrics
    "compute_mir": "mirlab.metrics.mir", "MIRResult": "mirlab.metrics.mir", "layer_fd": "mirlab.metrics.mir",
    "prepare_layer": "mirlab.metrics.normalize",
    "text_centric_scale": "mirlab.metrics.normalize", "replace_outliers": "mirlab.metrics.normalize",
    "frechet_distance": "mirlab.metrics.frechet", "frechet_from_stats": "mirlab.metrics.frechet",
    "gaussian_stats": "mirlab.metrics.frechet", "trace_sqrt_product": "mirlab.metrics.frechet",
    "bootstrap_mir": "mirlab.metrics.bootstrap", "BootstrapResult": "mirlab.metrics.bootstrap",
    # lvlm
    "extract_hidden_states": "mirlab.lvlm.extract", "HiddenStates": "mirlab.lvlm.extract",
    "PairError": "mirlab.lvlm.extract", "select_rows": "mirlab.lvlm.extract",
    "image_token_id": "mirlab.lvlm.models", "render_prompt": "mirlab.lvlm.models",
    "model_fingerprint": "mirlab.lvlm.models",
    # pairs
    "Pairs": "mirlab.pairs.readers", "folder_pairs": "mirlab.pairs.readers", "jsonl_pairs": "mirlab.pairs.readers",
    "load_image": "mirlab.pairs.readers", "sample_pairs": "mirlab.pairs.samples",
    # front
    "load_model": "mirlab.run", "run_mir": "mirlab.run", "run_probes": "mirlab.run",
    "compute_probes": "mirlab.metrics.probes", "per_layer_figure": "mirlab.plots",
    "LayerExplorer": "mirlab.widgets",
}
_ALIASES = {"FRECHET_METHODS": ("mirlab.metrics.frechet", "METHODS")}
_SUBPACKAGES = ("metrics", "lvlm", "pairs", "tiny", "study", "paths", "run", "plots", "widgets", "course", "cli")

__all__ = sorted([*_EXPORTS, *_ALIASES, *_SUBPACKAGES, "__version__"])


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
    elif name in _ALIASES:
        module, attribute = _ALIASES[name]
        value = getattr(importlib.import_module(module), attribute)
    elif name in _SUBPACKAGES:
        value = importlib.import_module(f"mirlab.{name}")
    else:
        raise AttributeError(f"module 'mirlab' has no attribute {name!r}")
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return __all__
