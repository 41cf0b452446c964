"""The MIR core and its siblings: functions of (image rows, text rows) per layer, nothing about models.

    normalize   check_rows, text_centric_scale, replace_outliers, prepare_layer (scale + 3σ rule, one layer)
    frechet     the Fréchet distance of Gaussian fits: exact, and the official code's arithmetic for parity
    mir         layer_fd, compute_mir -> MIRResult (MIR = log10 of the summed per-layer FD)
    bootstrap   bootstrap_mir: a confidence interval by resampling pairs

A new per-layer metric goes here as its own module: a function of one layer's (image, text) rows that
returns a row of a per-layer table (see docs/architecture.md, "Adding a metric"). This package imports
nothing of mirlab.lvlm, mirlab.pairs, mirlab.tiny or the front (checked by tests/test_architecture.py).
"""
from mirlab.metrics.bootstrap import BootstrapResult, bootstrap_mir
from mirlab.metrics.frechet import METHODS, frechet_distance, frechet_from_stats, gaussian_stats, trace_sqrt_product
from mirlab.metrics.mir import MIRResult, compute_mir, layer_fd
from mirlab.metrics.normalize import check_rows, prepare_layer, replace_outliers, text_centric_scale

__all__ = ["BootstrapResult", "METHODS", "MIRResult", "bootstrap_mir", "check_rows", "compute_mir",
           "frechet_distance", "frechet_from_stats", "gaussian_stats", "layer_fd", "prepare_layer",
           "replace_outliers", "text_centric_scale", "trace_sqrt_product"]
