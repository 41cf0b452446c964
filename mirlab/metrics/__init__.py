"""The MIR core and its siblings: functions of (image rows, text rows) per layer, nothing about models.

    normalize   check_rows, text_centric_scale, replace_outliers, prepare_layer (scale + 3σ rule, one layer)
    frechet     the Fréchet distance of Gaussian fits: exact, and the official code's arithmetic for parity
    mir         layer_fd, compute_mir -> MIRResult (MIR = log10 of the summed per-layer FD)
    bootstrap   bootstrap_mir: a confidence interval by resampling pairs
    frechet_torch  the exact Fréchet distance in torch float64 on the rows' device (CUDA), streaming layers
    probes      modality-bias probes of the rows: norm ratio, modality gap, effective rank / participation
                ratio, paired alignment (linear CKA, mutual kNN); compute_probes -> a wide per-layer table

A new per-layer metric goes here as its own module: a function of one layer's (image, text) rows that
returns a row of a per-layer table (see docs/architecture.md, "Adding a metric"). This package imports
nothing of mirlab.lvlm, mirlab.pairs, mirlab.tiny or the front (checked by tests/test_architecture.py).
"""
from mirlab.metrics.bootstrap import BootstrapResult, bootstrap_mir
from mirlab.metrics.frechet import METHODS, frechet_distance, frechet_from_stats, gaussian_stats, trace_sqrt_product
from mirlab.metrics.mir import MIRResult, compute_mir, layer_fd
from mirlab.metrics.normalize import check_rows, prepare_layer, replace_outliers, text_centric_scale
from mirlab.metrics.probes import (compute_probes, effective_rank, layer_probes, linear_cka, modality_gap,
                                   mutual_knn, norm_ratio, participation_ratio, tidy_probes, wide_probes)

__all__ = ["BootstrapResult", "METHODS", "MIRResult", "bootstrap_mir", "check_rows", "compute_mir", "compute_probes",
           "effective_rank", "frechet_distance", "frechet_from_stats", "gaussian_stats", "layer_fd", "layer_probes",
           "linear_cka", "modality_gap", "mutual_knn", "norm_ratio", "participation_ratio", "prepare_layer",
           "replace_outliers", "text_centric_scale", "tidy_probes", "trace_sqrt_product", "wide_probes"]
