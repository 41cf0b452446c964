"""Experiments on the tiny model that need the metrics: the one wing allowed to import both.

    dynamics        MIR along projector pre-training: shipped tables, pair subsets, rank correlations
    mir_vs_sft      the study: does MIR after pre-training predict the instruction-tuned model (notebook 07)
    probes_vs_mir   probes beside MIR across checkpoints, exact rank correlations (notebook 08)

Imports mirlab.metrics, mirlab.tiny, mirlab.lvlm and mirlab.pairs; nothing below imports it.
"""
