"""Selective-Backprop: backpropagate only the examples the model gets most wrong.

Jiang et al. 2019, "Accelerating Deep Learning by Focusing on the Biggest Losers" (https://arxiv.org/abs/1910.00762).

This package is the library: it needs only torch and numpy, and ``__all__`` below is its stable API. The
experiment harness (data, models, trainer, report, command line) lives in :mod:`selective_backprop.experiments`,
which needs the ``[experiments]`` extra and makes no stability promise.
"""

from . import defaults
from .base import Selector
from .batch import COUNTER_NAMES, Batch, per_example_cross_entropy
from .composer_sb import ComposerSB
from .infobatch import InfoBatch
from .kath18 import Kath18
from .losses import per_sequence_cross_entropy, token_counts
from .policies import (
    ClampPolicy,
    PercentilePolicy,
    Policy,
    ThresholdPolicy,
    Traditional,
    UniformPolicy,
    percentile_probabilities,
)
from .queue import BackpropQueue, LossCache
from .selector import SelectiveBackprop

__version__ = "0.1.0"

__all__ = [
    "SelectiveBackprop",
    "Kath18",
    "InfoBatch",
    "ComposerSB",
    "Selector",
    "Batch",
    "BackpropQueue",
    "LossCache",
    "Policy",
    "PercentilePolicy",
    "ThresholdPolicy",
    "ClampPolicy",
    "UniformPolicy",
    "Traditional",
    "percentile_probabilities",
    "per_example_cross_entropy",
    "per_sequence_cross_entropy",
    "token_counts",
    "COUNTER_NAMES",
    "defaults",
]
