"""Selective-Backprop: backpropagate only the examples the model gets most wrong.

Jiang et al. 2019, "Accelerating Deep Learning by Focusing on the Biggest Losers" (https://arxiv.org/abs/1910.00762).
"""

from .kath18 import Kath18
from .peers import ComposerSB, InfoBatch
from .policies import (
    ClampPolicy,
    PercentilePolicy,
    Policy,
    ThresholdPolicy,
    Traditional,
    UniformPolicy,
    percentile_probabilities,
)
from .selector import COUNTER_NAMES, BackpropQueue, Batch, LossCache, SelectiveBackprop

__version__ = "0.1.0"

__all__ = [
    "SelectiveBackprop",
    "Kath18",
    "InfoBatch",
    "ComposerSB",
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
    "COUNTER_NAMES",
]
