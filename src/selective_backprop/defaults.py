"""Every default hyperparameter of the library, named once; the selectors and the lab refer to these names.

Sources: Jiang et al. 2019 (https://arxiv.org/abs/1910.00762) and the authors' code (``../shared/paper`` notes)
for Selective-Backprop; Katharopoulos & Fleuret 2018 for Kath18; the official InfoBatch and Composer code for
the peers.
"""

from __future__ import annotations

BATCH_SIZE = 128
"""Examples per training batch (the backprop queue's size)."""

MIN_BATCH_SIZE = 2
"""The smallest training batch a selector yields at an epoch's end (a BatchNorm model cannot train on one example)."""

BETA = 3.0
"""SB's selectivity exponent: ``P = percentile ** beta`` (the authors' scripts default to 3)."""

HISTORY_SIZE = 1024
"""Losses in the percentile's ring buffer, ``R`` (hard-coded by the authors)."""

STALENESS = 3
"""StaleSB's ``n``: epochs a cached loss is reused (the authors' ``train.py`` default)."""

PRIME_EPOCHS = 1
"""Epochs at the start in which every example is backpropagated (the authors' default)."""

KATH18_PRESAMPLE = 3
"""Kath18's ``k``: the presample is ``B = k * b`` (Katharopoulos & Fleuret; the SB authors used 4)."""

KATH18_TAU_EMA = 0.9
"""Kath18's EMA factor for the variance-reduction estimate ``tau``."""

INFOBATCH_PRUNE_RATIO = 0.5
"""InfoBatch's ``r``: probability of pruning a below-mean example (the authors')."""

INFOBATCH_DELTA = 0.875
"""InfoBatch's ``delta``: fraction of the epochs with pruning (the authors')."""

COMPOSER_KEEP = 0.5
"""Composer's ``keep``: fraction of each active batch to backpropagate (Composer's default)."""

COMPOSER_START = 0.5
"""Composer's ``start``: training progress at which selection starts."""

COMPOSER_END = 0.9
"""Composer's ``end``: training progress at which selection stops."""

COMPOSER_INTERRUPT = 2
"""Composer's ``interrupt``: a whole (vanilla) batch every this many loader batches; 0 never."""
