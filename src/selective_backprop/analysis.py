"""Pure functions over a run's evaluation log: time to a target error and speedups.

A run's log is a list of evaluation rows (dicts as in ``metrics.jsonl``), in order, each holding at least the
x-axis (``wall_train_s``, ``backprops``, ...) and ``test_error``. The first row is the evaluation before any
training (x = 0).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["read_metrics", "crossing", "speedup"]

Row = dict[str, Any]


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
