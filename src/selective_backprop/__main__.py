"""``python -m selective_backprop``: the lab's command line (:mod:`selective_backprop.experiments.cli`)."""

from .experiments.cli import run

run()
