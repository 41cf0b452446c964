"""mirlab: see and measure the Modality Integration Rate (MIR) of vision-language models.

MIR (arXiv 2410.07167) = log10( sum over decoder layers of the Fréchet distance between the
text-centrically normalized, outlier-cleaned hidden states of image tokens and of text tokens ).
Lower MIR = modalities better integrated by pre-training.

The data flow is one-directional:
    data/samples/scenes -> models/embedded -> extract -> normalize -> frechet -> mir -> plots/widgets/cli
Each block below re-exports one module's public API.
"""

__version__ = "0.1.0"

# --- math: normalize / frechet / mir -----------------------------------------------------------
# --- extraction: data / models / extract / run ---------------------------------------------------
# --- embedded model: samples / scenes / embedded / pretrain -------------------------------------
