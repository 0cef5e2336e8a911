"""The report's data model: the runs of a folder, their groups (labels), the target errors and time-to-target."""

from __future__ import annotations

import json
import re
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..analysis import Estimate, Row, add_forwards, estimate, read_metrics, target_errors, time_to_target
from ..strategies import STRATEGIES

AXES = {"wall_train_s": "wall-clock training time (s)", "backprops": "backprops", "forwards": "forwards"}
"""x-axes of the time-to-target tables: ``metrics.jsonl`` keys (``forwards`` from :func:`add_forwards`)."""
HARD_FRACTION = 0.05
"""The hard set: this fraction of training examples with the lowest true-class confidence under Traditional."""
CONFIDENT = 0.3
"""A hard example counts as learned when its final true-class confidence is at least this."""
GALLERY = 16
SB_FAMILY = tuple(name for name, s in STRATEGIES.items() if s.family == "sb")
STRATEGY_ORDER = tuple(STRATEGIES)
USES_BETA = tuple(name for name, s in STRATEGIES.items() if s.uses_beta)
INSTALL_HINT = "pip install 'selective-backprop[experiments]'"
PAPER_DATASET = "CIFAR-10"


@dataclass
class Run:
    """One run folder: its name, label, config, environment and evaluation rows (with ``forwards`` added)."""

    name: str
    path: Path
    config: dict[str, Any]
    environment: dict[str, Any]
    rows: list[Row]
    finished: bool
    label: str = field(init=False)

    def __post_init__(self) -> None:
        match = re.fullmatch(r"(.+)-s\d+", self.name)
        self.label = match.group(1) if match else self.name

    @property
    def seed(self) -> int:
        return int(self.config.get("seed", 0))

    @property
    def strategy(self) -> str:
        return str(self.config.get("strategy", self.label))

    @property
    def noise(self) -> float:
        return float(self.config.get("label_noise") or 0.0)

    @property
    def last(self) -> Row:
        return self.rows[-1]

    def array(self, name: str) -> np.ndarray | None:
        """``<name>.npy`` of the run folder, or ``None`` when the run did not write it.

        Read with ``allow_pickle=False``: an array of Python objects (a pickle inside the ``.npy``) is refused
        before anything in it is unpickled, so a run folder from someone else cannot run code here.

        Raises:
            ValueError: naming the file when it is not a plain numeric ``.npy`` array (pickled objects, corrupt).
        """
        path = self.path / f"{name}.npy"
        if not path.exists():
            return None
        try:
            return np.load(path, allow_pickle=False)
        except (ValueError, OSError, EOFError) as e:  # np.load: ValueError for object arrays and bad headers
            raise ValueError(f"{path}: not a plain numeric .npy array ({e}); the report reads no pickled objects: "
                             "delete the file or rerun that run") from e  # fmt: skip


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.exists() else {}


def load_runs(run_dir: str | Path) -> list[Run]:
    """The runs of a compare folder (its subfolders holding ``metrics.jsonl``), or ``run_dir`` itself when it is a
    single run folder; ordered by strategy (Traditional first), label, then seed.

    Raises:
        FileNotFoundError: when no run folder with evaluation rows is found.
    """
    root = Path(run_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such folder; pass a folder written by `selective-backprop compare`")
    folders = [root] if (root / "metrics.jsonl").exists() else sorted(p for p in root.iterdir() if p.is_dir())
    runs = []
    for folder in folders:
        if not (folder / "metrics.jsonl").exists():
            continue
        rows = read_metrics(folder)
        if rows:
            runs.append(
                Run(
                    folder.name,
                    folder,
                    _read_json(folder / "config.json"),
                    _read_json(folder / "environment.json"),
                    add_forwards(rows),
                    (folder / "final.json").exists(),
                )
            )
    if not runs:
        raise FileNotFoundError(
            f"{root}: no run folders with a metrics.jsonl; pass a folder written by `selective-backprop compare` "
            "or `train`"
        )
    order = {s: i for i, s in enumerate(STRATEGY_ORDER)}
    return sorted(runs, key=lambda r: (order.get(r.strategy, len(order)), r.label, r.seed))


def group_runs(runs: Sequence[Run]) -> dict[str, list[Run]]:
    groups: dict[str, list[Run]] = {}
    for run in runs:
        groups.setdefault(run.label, []).append(run)
    return groups


def final(group: Sequence[Run], key: str) -> Estimate:
    return estimate([float(run.last[key]) for run in group])


def baseline_label(groups: dict[str, list[Run]], strategy: str) -> str | None:
    """The label of a baseline strategy's group: the label equal to its name, else the first of that strategy."""
    if strategy in groups:
        return strategy
    return next((label for label, group in groups.items() if group[0].strategy == strategy), None)


def targets_of(groups: dict[str, list[Run]]) -> tuple[float | None, dict[float, float]]:
    """Traditional's mean final error and the target errors (:data:`~..analysis.TARGETS`), or ``(None, {})``."""
    trad = baseline_label(groups, "traditional")
    if trad is None:
        return None, {}
    finals = [run.last["test_error"] for run in groups[trad]]
    return statistics.fmean(finals), target_errors(finals)


@dataclass
class Stat:
    """Time to one target error (mean over seeds) and the paired speedups vs Traditional and Kath18."""

    time: Estimate
    vs_trad: Estimate | None
    vs_kath: Estimate | None


def target_stats(groups: dict[str, list[Run]], targets: dict[float, float]) -> dict[tuple[str, str, float], Stat]:
    """(label, axis, factor) -> time to target and speedups vs Traditional / Kath18, from
    :func:`~..analysis.time_to_target` on each axis."""
    trad, kath = baseline_label(groups, "traditional"), baseline_label(groups, "kath18")
    rows = {label: {run.seed: run.rows for run in group} for label, group in groups.items()}
    out = {}
    for axis in AXES:
        found = time_to_target(rows, targets, axis, [b for b in (trad, kath) if b is not None])
        for (label, factor), t in found.items():
            out[label, axis, factor] = Stat(t.time, t.vs.get(trad or ""), t.vs.get(kath or ""))
    return out


@dataclass
class Context:
    """What every section reads: the runs (at the lowest label-noise level), their groups and time-to-target."""

    root: Path
    runs: list[Run]
    groups: dict[str, list[Run]]
    all_runs: list[Run]
    base_error: float | None
    targets: dict[float, float]
    stats: dict[tuple[str, str, float], Stat]
    images: bool
    new_figure: Any  # matplotlib.figure.Figure, imported only by write_report
