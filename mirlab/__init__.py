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
from mirlab.normalize import replace_outliers, text_centric_scale
from mirlab.frechet import (
    METHODS as FRECHET_METHODS, frechet_distance, frechet_from_stats, gaussian_stats, trace_sqrt_product,
)
from mirlab.mir import MIRResult, compute_mir, layer_fd
# --- extraction: data / models / extract / run ---------------------------------------------------
from mirlab.data import Pairs, folder_pairs, jsonl_pairs, load_image, read_story  # noqa: E402
from mirlab.models import image_token_id, load_model, model_fingerprint, render_prompt  # noqa: E402
from mirlab.extract import HiddenStates, PairError, extract_hidden_states, select_rows  # noqa: E402
from mirlab.plots import per_layer_figure  # noqa: E402
from mirlab.run import run_mir  # noqa: E402
# --- embedded model: samples / scenes / embedded / pretrain -------------------------------------
from .embedded import (build_base_model, embedded_checkpoints, embedded_model, load_projector,  # noqa: E402
                       projector_shapes, save_projector)
from .samples import photo_records, prose_passages, sample_pairs, sample_photos  # noqa: E402
from .scenes import (SceneDataset, caption_mentions, distractor_captions, make_scene,  # noqa: E402
                     scene_dataset)
from .pretrain import Recipe as PretrainRecipe  # noqa: E402
from .evaluate import (caption_retrieval, captioning_scores, captioning_summary, greedy_captions,  # noqa: E402
                       heldout_caption_loss, retrieval_summary)
# --- course: widgets / bootstrap -----------------------------------------------------------------
from mirlab.bootstrap import BootstrapResult, bootstrap_mir  # noqa: E402
from mirlab.widgets import LayerExplorer  # noqa: E402
from mirlab import dynamics  # noqa: E402  (MIR across the shipped projector checkpoints; notebook 06)
