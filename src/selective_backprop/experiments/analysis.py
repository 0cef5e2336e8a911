"""Pure functions over runs' logs: time to a target error, speedups, seed statistics, Pareto fronts, and the
per-example measures of the paper (hard-set accuracy, backprops spent on noisy labels).

A run's log is a list of evaluation rows (dicts as in ``metrics.jsonl``), in order, each holding at least the
x-axis (``wall_train_s``, ``backprops``, ...) and ``test_error``. The first row is the evaluation before any
training (x = 0).
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "TARGETS",
    "TimeToTarget",
    "target_errors",
    "time_to_target",
    "read_metrics",
    "crossing",
    "speedup",
    "add_forwards",
    "time_to_targets",
    "Estimate",
    "mean_ci",
    "estimate",
    "paired_speedups",
    "pareto_front",
    "hard_set",
    "hard_set_fraction",
    "noisy_share",
    "curve_band",
]

Row = dict[str, Any]

TARGETS = (1.1, 1.2, 1.4)
"""Target errors as multiples of Traditional's final test error (mean over its seeds): the paper's Table 1."""


def read_metrics(run_dir: str | Path) -> list[Row]:
    """The evaluation rows of a run folder's ``metrics.jsonl``."""
    path = Path(run_dir) / "metrics.jsonl"
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def crossing(rows: Sequence[Row], target: float, x: str = "wall_train_s") -> float | None:
    """The ``x`` at which ``test_error`` first reaches ``target`` (≤), or ``None`` if it never does.

    Between the last evaluation above the target and the first at or below it, the error is taken to fall
    linearly in ``x``, so the crossing is interpolated: ``x0 + (e0 - target) / (e0 - e1) * (x1 - x0)``. If the
    very first row is already at or below the target, its ``x`` is returned.

    Example:
        >>> rows = [{"wall_train_s": 0, "test_error": 0.9}, {"wall_train_s": 10, "test_error": 0.3},
        ...         {"wall_train_s": 20, "test_error": 0.1}]
        >>> crossing(rows, 0.2)
        15.0
        >>> crossing(rows, 0.05) is None
        True
    """
    prev: Row | None = None
    for row in rows:
        err = row["test_error"]
        if err is not None and not math.isnan(err) and err <= target:
            if prev is None:
                return float(row[x])
            e0, e1, x0, x1 = prev["test_error"], err, prev[x], row[x]
            return float(x0 + (e0 - target) / (e0 - e1) * (x1 - x0)) if e0 != e1 else float(x1)
        prev = row
    return None


def speedup(baseline: float | None, other: float | None) -> float | None:
    """``baseline / other`` (how many times faster ``other`` reaches the same point), ``None`` if either is."""
    if baseline is None or other is None or other <= 0:
        return None
    return baseline / other


def add_forwards(rows: Sequence[Row]) -> list[Row]:
    """Copies of ``rows`` with ``forwards = selection_forwards + backprops``.

    Every backpropagated example needs one training-mode forward on top of any scoring forward, so this counts
    all forward passes over single examples; StaleSB's skipped scoring forwards are not in it.

    Example:
        >>> add_forwards([{"selection_forwards": 300, "backprops": 100}])[0]["forwards"]
        400
    """
    return [{**row, "forwards": row["selection_forwards"] + row["backprops"]} for row in rows]


def time_to_targets(rows: Sequence[Row], targets: Sequence[float], x: str = "wall_train_s") -> list[float | None]:
    """:func:`crossing` of each target error, in order (``None`` where a target is never reached).

    Example:
        >>> rows = [{"backprops": 0, "test_error": 1.0}, {"backprops": 100, "test_error": 0.5}]
        >>> time_to_targets(rows, [0.75, 0.5, 0.25], x="backprops")
        [50.0, 100.0, None]
    """
    return [crossing(rows, t, x) for t in targets]


def target_errors(final_errors: Sequence[float], factors: Sequence[float] = TARGETS) -> dict[float, float]:
    """``{factor: factor * mean(final_errors)}``: the target errors from the baseline's final errors over seeds.

    Example:
        >>> {f: round(t, 4) for f, t in target_errors([0.08, 0.10], factors=(1.1, 1.4)).items()}
        {1.1: 0.099, 1.4: 0.126}
    """
    if not final_errors:
        raise ValueError("target_errors needs the baseline's final errors; got none")
    base = statistics.fmean(final_errors)
    return {f: f * base for f in factors}


@dataclass(frozen=True)
class TimeToTarget:
    """One label's time to one target error over its seeds, and its speedups over baseline labels.

    Attributes:
        time: mean and CI over seeds of the crossing (``mean=None`` when a seed never reaches the target).
        vs: baseline label -> :func:`estimate` of the per-seed speedups ``baseline / this`` (paired by seed);
            ``None`` for the baseline itself.
        per_seed: seed -> crossing (``None`` when not reached).
    """

    time: Estimate
    vs: dict[str, Estimate | None]
    per_seed: dict[int, float | None]


def time_to_target(
    groups: Mapping[str, Mapping[int, Sequence[Row]]],
    targets: Mapping[float, float],
    axis: str = "wall_train_s",
    baselines: Sequence[str] = (),
) -> dict[tuple[str, float], TimeToTarget]:
    """The one time-to-target computation (compare's table, the report and the benchmarks all use it).

    Args:
        groups: label -> seed -> evaluation rows of that run.
        targets: factor -> target error (see :func:`target_errors`).
        axis: the row key measuring cost: ``wall_train_s`` (seconds), ``backprops``, ``forwards``.
        baselines: labels to compute speedups against (paired by seed, :func:`paired_speedups`).

    Returns:
        ``(label, factor) -> TimeToTarget`` for every label and factor.

    Example:
        >>> runs = {"trad": {0: [{"wall_train_s": 0, "test_error": 1.0}, {"wall_train_s": 10, "test_error": 0.2}]},
        ...         "sb": {0: [{"wall_train_s": 0, "test_error": 1.0}, {"wall_train_s": 4, "test_error": 0.2}]}}
        >>> t = time_to_target(runs, {1.0: 0.2}, baselines=["trad"])
        >>> t["sb", 1.0].time.mean, t["sb", 1.0].vs["trad"].mean, t["trad", 1.0].vs["trad"]
        (4.0, 2.5, None)
    """
    out = {}
    for factor, target in targets.items():
        times = {label: {seed: crossing(rows, target, axis) for seed, rows in runs.items()}
                 for label, runs in groups.items()}  # fmt: skip
        for label in groups:
            vs = {b: None if b == label else estimate(paired_speedups(times[b], times[label]))
                  for b in baselines if b in times}  # fmt: skip
            out[label, factor] = TimeToTarget(estimate(list(times[label].values())), vs, times[label])
    return out


def mean_ci(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float | None]:
    """Mean and half-width of the two-sided Student-t confidence interval of the mean.

    ``half = t_{(1 + confidence) / 2, n - 1} * s / sqrt(n)`` with ``s`` the sample standard deviation
    (``n - 1`` in the denominator). With one value the half-width is ``None``: one seed gives no spread.

    Raises:
        ValueError: on an empty sequence.
        ImportError: without scipy (``pip install 'selective-backprop[experiments]'``).

    Example:
        >>> m, h = mean_ci([10.0, 14.0])   # t(0.975, 1) = 12.706, s = 2.828, sqrt(2) = 1.414
        >>> m, round(h, 4)
        (12.0, 25.4124)
        >>> mean_ci([3.0])
        (3.0, None)
    """
    if not values:
        raise ValueError("mean_ci needs at least one value; got an empty sequence")
    mean = statistics.fmean(values)
    if len(values) == 1:
        return mean, None
    try:
        from scipy.stats import t
    except ImportError as e:  # pragma: no cover - scipy ships with the [experiments] extra
        raise ImportError("confidence intervals need scipy: pip install 'selective-backprop[experiments]'") from e
    half = float(t.ppf((1 + confidence) / 2, len(values) - 1)) * statistics.stdev(values) / math.sqrt(len(values))
    return mean, half


@dataclass(frozen=True)
class Estimate:
    """A mean over seeds with its confidence interval.

    Attributes:
        mean: mean of the seeds' values; ``None`` when any seed is missing (e.g. never reached the target).
        half_width: half-width of the 95 % t-interval; ``None`` with one seed or when ``mean`` is ``None``.
        n: number of seeds.
        missing: seeds without a value.
    """

    mean: float | None
    half_width: float | None
    n: int
    missing: int = 0


def estimate(values: Sequence[float | None], confidence: float = 0.95) -> Estimate:
    """Mean and CI of per-seed values, or ``mean=None`` and the count of missing ones when any seed is ``None``.

    A group whose seeds do not all reach a target has no meaningful mean time-to-target (the missing seeds would
    be the slow ones), so it is reported as "not reached by ``missing``/``n`` seeds" instead.

    Example:
        >>> e = estimate([10.0, 14.0])
        >>> e.mean, round(e.half_width, 4), e.n, e.missing
        (12.0, 25.4124, 2, 0)
        >>> estimate([10.0, None, None])
        Estimate(mean=None, half_width=None, n=3, missing=2)
    """
    present = [v for v in values if v is not None]
    if len(present) < len(values) or not values:
        return Estimate(None, None, len(values), len(values) - len(present))
    mean, half = mean_ci(present, confidence)
    return Estimate(mean, half, len(values))


def paired_speedups(baseline: Mapping[int, float | None], other: Mapping[int, float | None]) -> list[float | None]:
    """Per-seed speedups ``baseline / other`` for each seed of ``other`` (maps: seed -> time to target).

    Each seed is paired with the baseline's run of the same seed when there is one (same data order and
    initialization); otherwise with the baseline's mean over its seeds (``None`` if any baseline seed is).

    Example:
        >>> paired_speedups({0: 10.0, 1: 12.0}, {0: 5.0, 1: 4.0, 2: 11.0})
        [2.0, 3.0, 1.0]
        >>> paired_speedups({0: 10.0}, {0: None})
        [None]
    """
    values = list(baseline.values())
    fallback = None if not values or any(v is None for v in values) else statistics.fmean(values)  # type: ignore[arg-type]
    return [speedup(baseline.get(seed, fallback), time) for seed, time in other.items()]


def pareto_front(points: Sequence[tuple[float, float]]) -> list[bool]:
    """Which points are Pareto-optimal when both coordinates are to be minimized (e.g. time, error).

    A point is dominated when another is no worse in both coordinates and better in at least one; identical
    points do not dominate each other.

    Example:
        >>> pareto_front([(1, 0.5), (2, 0.3), (3, 0.4), (2, 0.3), (0.5, 0.9)])
        [True, True, False, True, True]
    """
    return [not any(qx <= px and qy <= py and (qx < px or qy < py) for qx, qy in points) for px, py in points]


def hard_set(confidence: np.ndarray, fraction: float = 0.05) -> np.ndarray:
    """Indices of the ``fraction`` of examples with the lowest true-class confidence (the paper's "hard" set).

    The set holds ``max(1, round(fraction * N))`` examples; ties are broken by index (stable sort).

    Example:
        >>> hard_set(np.array([0.9, 0.1, 0.5, 0.1, 0.99]), fraction=0.4)
        array([1, 3])
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    confidence = np.asarray(confidence)
    k = max(1, round(fraction * len(confidence)))
    return np.sort(np.argsort(confidence, kind="stable")[:k])


def hard_set_fraction(confidence: np.ndarray, indices: np.ndarray, threshold: float = 0.3) -> float:
    """Share of the examples at ``indices`` whose true-class confidence is at least ``threshold``.

    Example:
        >>> hard_set_fraction(np.array([0.2, 0.3, 0.9, 0.1]), np.array([0, 1, 3]))
        0.3333333333333333
    """
    indices = np.asarray(indices)
    if len(indices) == 0:
        raise ValueError("hard_set_fraction needs a non-empty set of indices")
    return float(np.mean(np.asarray(confidence)[indices] >= threshold))


def noisy_share(selection_counts: np.ndarray, noisy_indices: np.ndarray) -> float:
    """Share of all backprops spent on the examples at ``noisy_indices`` (those given a random label).

    Traditional backpropagates every example equally, so its share equals the noise fraction; a selector that
    chases high losses spends more on noisy labels, whose losses stay high.

    Example:
        >>> noisy_share(np.array([1, 1, 4, 2]), np.array([2]))
        0.5
    """
    counts = np.asarray(selection_counts)
    total = counts.sum()
    if total == 0:
        raise ValueError("noisy_share: the selection counts are all zero; the run backpropagated nothing")
    return float(counts[np.asarray(noisy_indices, dtype=np.int64)].sum() / total)


def curve_band(
    curves: Sequence[tuple[Sequence[float], Sequence[float]]], points: int = 200
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Seeds' curves ``(xs, ys)`` interpolated (linearly) onto one grid: ``(grid, mean, min, max)``.

    The grid spans ``[0, shortest curve's last x]`` so that every seed contributes at every grid point.

    Example:
        >>> grid, mean, lo, hi = curve_band([([0, 10], [1.0, 0.0]), ([0, 20], [1.0, 0.5])], points=3)
        >>> grid.tolist(), mean.tolist(), lo.tolist(), hi.tolist()
        ([0.0, 5.0, 10.0], [1.0, 0.6875, 0.375], [1.0, 0.5, 0.0], [1.0, 0.875, 0.75])
    """
    if not curves:
        raise ValueError("curve_band needs at least one curve")
    grid = np.linspace(0.0, min(float(xs[-1]) for xs, _ in curves), points)
    ys = np.stack([np.interp(grid, np.asarray(xs, float), np.asarray(y, float)) for xs, y in curves])
    return grid, ys.mean(0), ys.min(0), ys.max(0)
