"""The paper's own measures (Jiang et al. 2019, §5), as pure functions on arrays and evaluation rows.

* Hard examples (§5.2, Figs. 8-9): each model's confidence in the true label of every *test* example after a fixed
  epoch; Fig. 8 is the inverse CDF of those confidences (percentile -> confidence), Fig. 9 the accuracy of the
  examples at each percentile, each model ranking the examples by its *own* confidences. The paper's number:
  "among the examples at the 20th percentile of target confidences, 29 % are classified correctly using SB while
  only 3 % by Traditional".
* Pareto front (§5.5, Fig. 14): the points are (time to reach a target error, that target error) taken from every
  configuration's whole curve, over a grid of target errors; each method's share of the Pareto-optimal points.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .analysis import crossing, pareto_front

__all__ = ["confidence_by_percentile", "accuracy_by_percentile", "accuracy_at_percentile", "target_grid",
           "ParetoPoint", "pareto_points", "pareto_shares"]  # fmt: skip


def confidence_by_percentile(confidence: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Fig. 8: the inverse CDF of true-class confidences -- ``(percentiles in [0, 100), sorted confidences)``.

    Example:
        >>> p, c = confidence_by_percentile(np.array([0.9, 0.1, 0.5, 0.3]))
        >>> p.tolist(), c.tolist()
        ([0.0, 25.0, 50.0, 75.0], [0.1, 0.3, 0.5, 0.9])
    """
    ordered = np.sort(np.asarray(confidence, dtype=float))
    return 100.0 * np.arange(len(ordered)) / len(ordered), ordered


def accuracy_by_percentile(confidence: np.ndarray, correct: np.ndarray, bins: int = 20
                           ) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """Fig. 9: rank the examples by the model's own true-class confidence (ascending, ties by index) and cut the
    ranking into ``bins`` equal bins; return ``(bin centres in percent, share classified correctly in each bin)``.

    Example:
        >>> conf = np.array([0.1, 0.2, 0.3, 0.4, 0.6, 0.7, 0.8, 0.9])
        >>> right = np.array([0, 0, 0, 1, 1, 1, 1, 1])
        >>> c, acc = accuracy_by_percentile(conf, right, bins=4)
        >>> c.tolist(), acc.tolist()
        ([12.5, 37.5, 62.5, 87.5], [0.0, 0.5, 1.0, 1.0])
    """
    confidence, correct = np.asarray(confidence, dtype=float), np.asarray(correct, dtype=bool)
    if confidence.shape != correct.shape or confidence.ndim != 1 or len(confidence) < bins:
        raise ValueError(f"need two (N,) arrays with N >= bins={bins}, got {confidence.shape} and {correct.shape}")
    ranked = correct[np.argsort(confidence, kind="stable")]
    edges = np.linspace(0, len(ranked), bins + 1).round().astype(int)
    accuracy = np.array([ranked[a:b].mean() for a, b in zip(edges[:-1], edges[1:], strict=True)])
    return 100.0 * (np.arange(bins) + 0.5) / bins, accuracy


def accuracy_at_percentile(confidence: np.ndarray, correct: np.ndarray, percentile: float = 20.0,
                           width: float = 5.0) -> float:  # fmt: skip
    """The paper's number: the share classified correctly among the examples whose rank by the model's own
    true-class confidence lies in ``[percentile - width/2, percentile + width/2)`` percent (the bin around it),
    clipped to ``[0, 100]`` percent (a percentile of 0 takes the lowest ``width/2`` percent).

    Example:
        >>> conf = np.linspace(0, 1, 100, endpoint=False)
        >>> right = np.zeros(100, bool); right[[18, 19, 21]] = True   # ranks 17.5 .. 22.5 %: 18, 19, 20, 21, 22
        >>> accuracy_at_percentile(conf, right)
        0.6
        >>> accuracy_at_percentile(conf, right, percentile=0.0)   # ranks 0, 1, 2: clipped at the bottom
        0.0
    """
    confidence, correct = np.asarray(confidence, dtype=float), np.asarray(correct, dtype=bool)
    n = len(confidence)
    ranked = correct[np.argsort(confidence, kind="stable")]
    lo = max(0, int(np.ceil((percentile - width / 2) / 100 * n)))
    hi = min(n, int(np.ceil((percentile + width / 2) / 100 * n)))
    if hi <= lo:
        raise ValueError(f"no example falls in the {width:g}-percent bin around the {percentile:g}th percentile")
    return float(ranked[lo:hi].mean())


def target_grid(best: float, worst: float, points: int = 25) -> np.ndarray:
    """Target errors from ``worst`` down to ``best``, evenly spaced (the grid of the Pareto construction).

    Example:
        >>> target_grid(0.1, 0.3, points=3).tolist()
        [0.3, 0.2, 0.1]
    """
    return np.linspace(worst, best, points)


@dataclass(frozen=True)
class ParetoPoint:
    """(time to reach ``target`` on ``label``'s run ``seed``, ``target``) and whether it is Pareto-optimal."""

    label: str
    seed: int
    target: float
    time: float
    optimal: bool


def pareto_points(runs: Mapping[tuple[str, int], Sequence[Mapping[str, Any]]], targets: Sequence[float],
                  axis: str = "wall_train_s") -> list[ParetoPoint]:  # fmt: skip
    """Every (time to target, target) point of every run's curve, each marked Pareto-optimal or not.

    A point is dominated when another point reaches an error at least as low no later, and is strictly better in one
    of the two; targets a run never reaches give no point. Both coordinates are minimized.

    Args:
        runs: ``(label, seed) -> evaluation rows`` (``metrics.jsonl``).
        targets: the target errors (see :func:`target_grid`).
        axis: the cost of reaching a target, a row key. Default: ``wall_train_s``.

    Example:
        >>> fast = [{"wall_train_s": 0, "test_error": 0.9}, {"wall_train_s": 10, "test_error": 0.3}]
        >>> slow = [{"wall_train_s": 0, "test_error": 0.9}, {"wall_train_s": 20, "test_error": 0.1}]
        >>> points = pareto_points({("a", 0): fast, ("b", 0): slow}, [0.5, 0.3, 0.1])
        >>> [(p.label, p.target, round(p.time, 2)) for p in points if p.optimal]  # a never reaches 0.1
        [('a', 0.5, 6.67), ('a', 0.3, 10.0), ('b', 0.1, 20.0)]
        >>> [(p.label, p.target) for p in points if not p.optimal]  # b reaches 0.5 and 0.3 later than a
        [('b', 0.5), ('b', 0.3)]
    """
    raw = [(label, seed, float(t), crossing(rows, t, axis)) for (label, seed), rows in runs.items() for t in targets]
    points = [(label, seed, t, x) for label, seed, t, x in raw if x is not None]
    optimal = pareto_front([(x, t) for _, _, t, x in points])
    return [ParetoPoint(label, seed, t, float(x), ok) for (label, seed, t, x), ok in zip(points, optimal, strict=True)]


def pareto_shares(points: Sequence[ParetoPoint], family: Mapping[str, str]) -> dict[str, float]:
    """Each family's share of the Pareto-optimal points (the paper's Table: SB + StaleSB 72 % on CIFAR10, ...).

    Example:
        >>> pts = [ParetoPoint("sb", 0, .3, 1, True), ParetoPoint("trad", 0, .3, 2, False),
        ...        ParetoPoint("trad", 0, .1, 5, True), ParetoPoint("stale", 0, .2, 1.5, True)]
        >>> pareto_shares(pts, {"sb": "SB", "stale": "SB", "trad": "Traditional"})
        {'SB': 0.6666666666666666, 'Traditional': 0.3333333333333333}
    """
    optimal = [p for p in points if p.optimal]
    if not optimal:
        return {}
    shares: dict[str, float] = {}
    for p in optimal:
        shares[family[p.label]] = shares.get(family[p.label], 0.0) + 1 / len(optimal)
    return shares
