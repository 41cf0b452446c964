"""Any Hugging Face LVLM: load it, find its image and text rows, extract per-layer hidden states to disk.

    models    load_pretrained (Hub id or folder), image_token_id, num_layers, render_prompt, fingerprints
    extract   select_rows, extract_hidden_states -> HiddenStates (the on-disk, per-layer row store)
    moca      MoCa (Eq. 5: learned scale/shift of the image rows per layer), attach_moca -> removable handle
    probes    probes with extra forward passes: visual_dependence, attention_share (eager), logit_lens

Imports mirlab.pairs (to read images) and nothing of mirlab.metrics, mirlab.tiny or the front.
"""
from mirlab.lvlm.extract import HiddenStates, PairError, extract_hidden_states, select_rows
from mirlab.lvlm.moca import MoCa, MoCaHandle
from mirlab.lvlm.moca import attach as attach_moca
from mirlab.lvlm.models import image_token_id, load_pretrained, model_fingerprint, num_layers, render_prompt
from mirlab.lvlm.probes import attention_share, logit_lens, logit_lens_rows, visual_dependence

__all__ = ["HiddenStates", "MoCa", "MoCaHandle", "PairError", "attach_moca", "attention_share", "extract_hidden_states",
           "image_token_id", "load_pretrained", "logit_lens", "logit_lens_rows", "model_fingerprint", "num_layers",
           "render_prompt", "select_rows", "visual_dependence"]
