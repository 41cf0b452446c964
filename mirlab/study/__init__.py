"""Experiments on the tiny model that need the metrics: the one wing allowed to import both.

    dynamics   MIR along projector pre-training: shipped tables, pair subsets, rank correlations

Imports mirlab.metrics, mirlab.tiny, mirlab.lvlm and mirlab.pairs; nothing below imports it.
"""
