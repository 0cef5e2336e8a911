"""The one registry of training strategies: name -> how to build its selector, its selectivity knob, whether it
runs under torchrun, and how the report groups it.

Every strategy is a :class:`~selective_backprop.Selector` with the same interface (``select`` / ``end_epoch`` /
``Batch.loss`` / ``state_dict``), so the trainer's loop is the same for all of them. Adding a strategy is one
selector class plus one entry in :data:`STRATEGIES` (and a :class:`~selective_backprop.experiments.config.TrainConfig`
field for any hyperparameter it introduces).

Example:
    >>> from torch import nn
    >>> from selective_backprop.experiments.config import TrainConfig
    >>> selector = build_selector(TrainConfig(strategy="stale-sb", batch_size=4), nn.Linear(2, 2), dataset_size=10)
    >>> type(selector).__name__, selector.cache.staleness
    ('SelectiveBackprop', 3)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from torch import nn

from .. import ComposerSB, InfoBatch, Kath18, SelectiveBackprop, Selector
from ..policies import ClampPolicy, PercentilePolicy, Policy, ThresholdPolicy, Traditional, UniformPolicy

if TYPE_CHECKING:
    from .config import TrainConfig

__all__ = ["Strategy", "STRATEGIES", "FAMILIES", "build_selector", "selectivity_options"]

Builder = Callable[[nn.Module, int, "TrainConfig", float, bool], Selector]
"""``build(model, dataset_size, config, beta, distributed) -> selector``."""


@dataclass(frozen=True)
class Strategy:
    """One registry entry.

    Attributes:
        build: ``build(model, dataset_size, config, beta, distributed)``; ``beta`` is the config's unless
            ``--target-time`` calibrated another one.
        family: how the report groups and colours it (one of :data:`FAMILIES`).
        knob: the :class:`TrainConfig` field ``--selectivity S`` sets, or ``None`` when it has no selectivity knob.
        knob_value: ``S -> value`` of ``knob`` making the strategy backprop about a fraction ``S``.
        uses_beta: ``compare --betas`` sweeps it over beta.
        distributed: it runs under torchrun (global selection); ``False`` refuses it there.
        scores: it runs a scoring forward (so ``--score-precision`` and ``--score-scale`` apply).
        score_mode: the mode of its scoring forward unless ``--score-mode`` says otherwise: ``eval`` (the SB
            authors', ``original-code-notes.md`` §5) or ``train`` (Composer's selective backprop scores in train
            mode, BatchNorm batch statistics).
    """

    build: Builder
    family: str
    knob: str | None = None
    knob_value: Callable[[float], Any] | None = None
    uses_beta: bool = False
    distributed: bool = True
    scores: bool = True
    score_mode: str = "eval"


FAMILIES = ("traditional", "sb", "kath18", "random", "bad idea", "peer")
"""Report families, in report order: SB + StaleSB share the family ``sb`` (the paper's Pareto shares)."""


def _policy_sb(make_policy: Callable[[TrainConfig, float], Policy], staleness: bool = False) -> Builder:
    """An SB-family builder whose policy is ``make_policy(config, beta)``."""

    def build(model: nn.Module, n: int, c: TrainConfig, beta: float, distributed: bool) -> Selector:
        return SelectiveBackprop(
            model, batch_size=c.batch_size, policy=make_policy(c, beta), staleness=c.staleness if staleness else None,
            dataset_size=n, prime_epochs=c.prime_epochs, nonfinite=c.nonfinite,  # type: ignore[arg-type]
            seed=c.seed, distributed=distributed, **_scoring(c),
        )  # fmt: skip

    return build


def _scoring(c: TrainConfig) -> dict[str, Any]:
    """How a strategy's scoring forward runs: mode, precision (``auto`` unresolved: the caller's autocast), scale."""
    precision = None if c.score_precision == "auto" else c.score_precision
    return {"score_mode": c.score_mode, "score_precision": precision, "score_scale": c.score_scale}


def _percentile(c: TrainConfig, beta: float) -> Policy:
    return PercentilePolicy(beta, c.history_size)


def _beta_for(fraction: float) -> float:
    if fraction == 1:
        raise ValueError("selectivity 1 would need beta = 0; use the traditional strategy instead")
    return 1 / fraction - 1


STRATEGIES: dict[str, Strategy] = {
    "traditional": Strategy(
        lambda m, n, c, beta, dist: SelectiveBackprop(
            m, batch_size=c.batch_size, policy=Traditional(), prime_epochs=0, seed=c.seed, distributed=dist
        ),
        family="traditional",
        scores=False,
    ),
    "sb": Strategy(_policy_sb(_percentile), "sb", "beta", _beta_for, uses_beta=True),
    "stale-sb": Strategy(_policy_sb(_percentile, staleness=True), "sb", "beta", _beta_for, uses_beta=True),
    "kath18": Strategy(
        lambda m, n, c, beta, dist: Kath18(
            m, batch_size=c.batch_size, presample=c.presample, score=c.kath_score,  # type: ignore[arg-type]
            reweight=c.kath_reweight == "on",
            nonfinite=c.nonfinite, seed=c.seed, distributed=dist, **_scoring(c),  # type: ignore[arg-type]
        ),  # fmt: skip
        family="kath18",
        knob="presample",
        knob_value=lambda fraction: max(1, round(1 / fraction)),
    ),
    "random": Strategy(
        _policy_sb(lambda c, beta: UniformPolicy(c.rate if c.rate is not None else 1 / (beta + 1))),
        family="random",
        knob="rate",
        knob_value=lambda fraction: fraction,
        uses_beta=True,
        scores=False,
    ),
    "threshold": Strategy(_policy_sb(lambda c, beta: ThresholdPolicy(c.threshold)), family="bad idea"),
    "clamp": Strategy(_policy_sb(lambda c, beta: ClampPolicy()), family="bad idea"),
    "infobatch": Strategy(
        lambda m, n, c, beta, dist: InfoBatch(
            m, batch_size=c.batch_size, prune_ratio=c.prune_ratio, epochs=c.epochs, dataset_size=n,
            delta=c.infobatch_delta, nonfinite=c.nonfinite, seed=c.seed,  # type: ignore[arg-type]
        ),  # fmt: skip
        family="peer",
        distributed=False,
        scores=False,
    ),
    "composer-sb": Strategy(
        lambda m, n, c, beta, dist: ComposerSB(
            m, batch_size=c.batch_size, keep=c.keep, epochs=c.epochs, dataset_size=n, start=c.composer_start,
            end=c.composer_end, interrupt=c.composer_interrupt, nonfinite=c.nonfinite,  # type: ignore[arg-type]
            seed=c.seed, **_scoring(c),
        ),  # fmt: skip
        family="peer",
        score_mode="train",
        knob="keep",
        knob_value=lambda fraction: fraction,
        distributed=False,
    ),
}
"""Every strategy the lab can run, in report order."""


def build_selector(
    config: TrainConfig, model: nn.Module, dataset_size: int, *, beta: float | None = None, distributed: bool = False
) -> Selector:
    """The selector of ``config.strategy`` (with ``beta`` instead of ``config.beta`` when given).

    Raises:
        ValueError: on an unknown strategy, or one that cannot run distributed when ``distributed`` is true.
    """
    entry = STRATEGIES.get(config.strategy)
    if entry is None:
        raise ValueError(f"unknown strategy {config.strategy!r}; choose one of: {', '.join(STRATEGIES)}")
    if distributed and not entry.distributed:
        raise ValueError(
            f"strategy {config.strategy!r} runs in one process only (its pruning is not synchronised across ranks); "
            f"under torchrun use one of: {', '.join(k for k, s in STRATEGIES.items() if s.distributed)}"
        )
    return entry.build(model, dataset_size, config, config.beta if beta is None else beta, distributed)


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
    entry = STRATEGIES.get(strategy)
    tunable = [k for k, s in STRATEGIES.items() if s.knob is not None or s.family == "traditional"]
    if entry is None or (entry.knob is None and entry.family != "traditional"):
        raise ValueError(f"strategy {strategy!r} cannot be tuned to a selectivity; use one of {', '.join(tunable)} "
                         "with it")  # fmt: skip
    if entry.knob is None or entry.knob_value is None:
        return {}
    return {entry.knob: entry.knob_value(fraction)}
