"""A registry of training strategies: name -> the selector that runs a training step that way.

Every strategy is a selector with the same interface (``select`` / ``end_epoch`` / ``Batch.loss`` /
``state_dict``), so the trainer's loop is the same for all of them.

Example:
    >>> from torch import nn
    >>> selector = build_selector("stale-sb", nn.Linear(2, 2), dataset_size=10, batch_size=4)
    >>> type(selector).__name__, selector.cache.staleness
    ('SelectiveBackprop', 3)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from .kath18 import Kath18
from .peers import ComposerSB, InfoBatch
from .policies import ClampPolicy, PercentilePolicy, ThresholdPolicy, Traditional, UniformPolicy
from .selector import SelectiveBackprop, _SelectorBase

__all__ = ["StrategyOptions", "STRATEGIES", "build_selector", "selectivity_options"]


@dataclass
class StrategyOptions:
    """Hyperparameters of every strategy (each uses the ones it needs). Defaults follow the authors."""

    batch_size: int = 128
    beta: float = 3.0  # SB / StaleSB selectivity exponent (authors' default)
    history_size: int = 1024
    staleness: int = 3  # StaleSB: reuse a loss for this many visits (authors' train.py default)
    prime_epochs: int = 1  # epochs of unconditional backprop at the start (SB family)
    rate: float | None = None  # random: selection rate; None -> 1/(beta+1), SB's expected selectivity
    threshold: float = 0.5  # threshold strategy: backprop iff loss >= threshold
    presample: int = 3  # Kath18: B = presample * batch_size
    kath_score: str = "upper-bound"
    epochs: int = 1  # training budget in epochs (InfoBatch's annealing, Composer SB's progress window)
    prune_ratio: float = 0.5  # InfoBatch: probability of pruning a below-mean example
    infobatch_delta: float = 0.875  # InfoBatch: fraction of the epochs with pruning
    keep: float = 0.5  # Composer SB: fraction of each active batch to backpropagate
    sb_start: float = 0.5  # Composer SB: progress at which selection starts
    sb_end: float = 0.9  # Composer SB: progress at which selection stops
    interrupt: int = 2  # Composer SB: a whole (vanilla) batch every `interrupt` loader batches; 0 never
    score_mode: str = "eval"
    seed: int = 0
    distributed: bool = False  # global selection over the default process group (torchrun)


def _sb(model: nn.Module, n: int, o: StrategyOptions, policy: Any, staleness: int | None = None) -> SelectiveBackprop:
    return SelectiveBackprop(
        model,
        batch_size=o.batch_size,
        policy=policy,
        staleness=staleness,
        dataset_size=n,
        prime_epochs=o.prime_epochs,
        score_mode=o.score_mode,  # type: ignore[arg-type]
        seed=o.seed,
        distributed=o.distributed,
    )


def _percentile(o: StrategyOptions) -> PercentilePolicy:
    return PercentilePolicy(o.beta, o.history_size)


Factory = Callable[[nn.Module, int, StrategyOptions], _SelectorBase]

STRATEGIES: dict[str, Factory] = {
    "traditional": lambda m, n, o: SelectiveBackprop(
        m, batch_size=o.batch_size, policy=Traditional(), prime_epochs=0, distributed=o.distributed
    ),
    "sb": lambda m, n, o: _sb(m, n, o, _percentile(o)),
    "stale-sb": lambda m, n, o: _sb(m, n, o, _percentile(o), staleness=o.staleness),
    "kath18": lambda m, n, o: Kath18(
        m,
        batch_size=o.batch_size,
        presample=o.presample,
        score=o.kath_score,  # type: ignore[arg-type]
        score_mode=o.score_mode,  # type: ignore[arg-type]
        seed=o.seed,
        distributed=o.distributed,
    ),
    "random": lambda m, n, o: _sb(m, n, o, UniformPolicy(o.rate if o.rate is not None else 1 / (o.beta + 1))),
    "threshold": lambda m, n, o: _sb(m, n, o, ThresholdPolicy(o.threshold)),
    "clamp": lambda m, n, o: _sb(m, n, o, ClampPolicy()),
    "infobatch": lambda m, n, o: InfoBatch(
        m,
        batch_size=o.batch_size,
        prune_ratio=o.prune_ratio,
        epochs=o.epochs,
        dataset_size=n,
        delta=o.infobatch_delta,
        seed=o.seed,
    ),
    "composer-sb": lambda m, n, o: ComposerSB(
        m,
        batch_size=o.batch_size,
        keep=o.keep,
        epochs=o.epochs,
        dataset_size=n,
        start=o.sb_start,
        end=o.sb_end,
        interrupt=o.interrupt,
        score_mode=o.score_mode,  # type: ignore[arg-type]
        seed=o.seed,
    ),
}


SINGLE_PROCESS_ONLY = ("infobatch", "composer-sb")


def build_selector(name: str, model: nn.Module, dataset_size: int, **options: Any) -> _SelectorBase:
    """Build the selector of strategy ``name`` (see ``STRATEGIES``) with ``StrategyOptions`` fields as kwargs."""
    if name not in STRATEGIES:
        raise ValueError(f"unknown strategy {name!r}; choose one of: {', '.join(STRATEGIES)}")
    if options.get("distributed") and name in SINGLE_PROCESS_ONLY:
        raise ValueError(
            f"strategy {name!r} runs in one process only (its pruning is not synchronised across ranks); "
            f"under torchrun use one of: {', '.join(k for k in STRATEGIES if k not in SINGLE_PROCESS_ONLY)}"
        )
    return STRATEGIES[name](model, dataset_size, StrategyOptions(**options))


def selectivity_options(strategy: str, fraction: float) -> dict[str, Any]:
    """Options that make ``strategy`` backprop about ``fraction`` of the examples it sees (static selectivity).

    SB / StaleSB: ``beta = 1/fraction - 1`` (the percentile rule selects ``1/(beta+1)`` of i.i.d. losses; primed
    epochs still backprop everything); random: ``rate = fraction``; Kath18: ``presample = round(1/fraction)``
    (once importance sampling is on, one batch of b per presample of k*b); Composer's rule: ``keep = fraction``
    (while it is active). Traditional is the baseline and takes no option. Threshold, clamp and InfoBatch have
    no selectivity knob: ``ValueError``.

    Example:
        >>> selectivity_options("sb", 0.2), selectivity_options("kath18", 0.2)
        ({'beta': 4.0}, {'presample': 5})
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"selectivity must be a fraction in (0, 1], got {fraction!r}")
    options: dict[str, dict[str, Any]] = {
        "traditional": {},
        "sb": {"beta": 1 / fraction - 1},
        "stale-sb": {"beta": 1 / fraction - 1},
        "random": {"rate": fraction},
        "kath18": {"presample": max(1, round(1 / fraction))},
        "composer-sb": {"keep": fraction},
    }
    if strategy not in options:
        raise ValueError(
            f"strategy {strategy!r} cannot be tuned to a selectivity; use one of {', '.join(options)} with it"
        )
    if strategy in ("sb", "stale-sb") and fraction == 1:
        raise ValueError("selectivity 1 would need beta = 0; use the traditional strategy instead")
    return options[strategy]
