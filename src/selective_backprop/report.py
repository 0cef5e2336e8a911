"""A Markdown + HTML report of a ``compare`` folder, computed only from the runs' own logs.

:func:`write_report` reads every run subfolder of ``run_dir`` (``config.json``, ``environment.json``,
``metrics.jsonl``, ``selection_counts.npy``, ``train_confidence.npy``, ``noisy_indices.npy``; see
:mod:`selective_backprop.train`), groups runs by label (the run name without its ``-s<seed>`` suffix, e.g.
``sb-b3-s1`` -> ``sb-b3``) and writes into ``run_dir``:

* ``report.md`` -- time to 1.1x / 1.2x / 1.4x Traditional's final error by wall-clock time, backprops and
  forwards with speedups and 95 % confidence intervals over seeds; error curves; the Pareto front of
  (training time, final error); StaleSB's savings; which examples SB backpropagates (selection histograms,
  image galleries, the paper's hard-set measure); label-noise robustness; the paper's claims next to ours;
  the environment.
* ``report.html`` -- the same content in one file (figures embedded as base64 ``data:`` URIs).
* ``figures/*.png`` -- the figures, referenced by ``report.md``.
* ``summary.csv`` -- one row per label.

Every file is written atomically (a temporary file, then ``os.replace``). matplotlib and scipy are needed
(``pip install 'selective-backprop[experiments]'``); the training core never imports this module.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import re
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .analysis import (
    Estimate,
    Row,
    add_forwards,
    crossing,
    curve_band,
    estimate,
    hard_set,
    hard_set_fraction,
    noisy_share,
    paired_speedups,
    pareto_front,
    read_metrics,
)
from .train import write_atomic

__all__ = ["Run", "load_runs", "write_report", "TARGETS", "HARD_FRACTION", "CONFIDENT"]

TARGETS = (1.1, 1.2, 1.4)
"""Target errors as multiples of Traditional's final test error (mean over its seeds)."""
AXES = {"wall_train_s": "wall-clock training time (s)", "backprops": "backprops", "forwards": "forwards"}
"""x-axes of the time-to-target tables: ``metrics.jsonl`` keys (``forwards`` from :func:`add_forwards`)."""
HARD_FRACTION = 0.05
"""The hard set: this fraction of training examples with the lowest true-class confidence under Traditional."""
CONFIDENT = 0.3
"""A hard example counts as learned when its final true-class confidence is at least this."""
GALLERY = 16
SB_FAMILY = ("sb", "stale-sb")
STRATEGY_ORDER = ("traditional", "sb", "stale-sb", "kath18", "random", "threshold", "clamp")
USES_BETA = ("sb", "stale-sb", "random")
INSTALL_HINT = "pip install 'selective-backprop[experiments]'"
PAPER_DATASET = "CIFAR-10"


# ----------------------------------------------------------------------------------------------------------
# Runs


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
        """``<name>.npy`` of the run folder, or ``None`` when the run did not write it."""
        path = self.path / f"{name}.npy"
        return np.load(path) if path.exists() else None


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


def _groups(runs: Sequence[Run]) -> dict[str, list[Run]]:
    groups: dict[str, list[Run]] = {}
    for run in runs:
        groups.setdefault(run.label, []).append(run)
    return groups


def _times(group: Sequence[Run], target: float, axis: str) -> dict[int, float | None]:
    return {run.seed: crossing(run.rows, target, axis) for run in group}


def _final(group: Sequence[Run], key: str) -> Estimate:
    return estimate([float(run.last[key]) for run in group])


def _baseline(groups: dict[str, list[Run]], strategy: str) -> str | None:
    """The label of a baseline strategy's group: the label equal to its name, else the first of that strategy."""
    if strategy in groups:
        return strategy
    return next((label for label, group in groups.items() if group[0].strategy == strategy), None)


def _targets(groups: dict[str, list[Run]]) -> tuple[float | None, dict[float, float]]:
    trad = _baseline(groups, "traditional")
    if trad is None:
        return None, {}
    base = statistics.fmean(run.last["test_error"] for run in groups[trad])
    return base, {t: t * base for t in TARGETS}


@dataclass
class _TimeToTarget:
    time: Estimate
    vs_trad: Estimate | None
    vs_kath: Estimate | None


def _target_stats(
    groups: dict[str, list[Run]], targets: dict[float, float]
) -> dict[tuple[str, str, float], _TimeToTarget]:
    """(label, axis, factor) -> time to target and speedups vs Traditional / Kath18 (paired by seed)."""
    out = {}
    trad, kath = _baseline(groups, "traditional"), _baseline(groups, "kath18")
    for axis in AXES:
        for factor, target in targets.items():
            times = {label: _times(group, target, axis) for label, group in groups.items()}

            def vs(base: str | None, label: str, times: dict[str, dict[int, float | None]] = times) -> Estimate | None:
                return None if base is None or label == base else estimate(paired_speedups(times[base], times[label]))

            for label in groups:
                out[label, axis, factor] = _TimeToTarget(
                    estimate(list(times[label].values())), vs(trad, label), vs(kath, label)
                )
    return out


# ----------------------------------------------------------------------------------------------------------
# Formatting


def _num(value: float, axis: str = "wall_train_s") -> str:
    return f"{value:.1f}" if axis == "wall_train_s" else f"{value:,.0f}"


def _count(value: float) -> str:
    return f"{value:,.0f}"


def _est(e: Estimate, fmt: Callable[[float], str] = lambda v: f"{v:.1f}") -> str:
    if e.mean is None:
        return f"not reached by {e.missing}/{e.n} seeds"
    if e.half_width is None:
        return f"{fmt(e.mean)} (n=1)"
    return f"{fmt(e.mean)} ± {fmt(e.half_width)}"


def _pct(v: float) -> str:
    return f"{100 * v:.2f} %"


def _err(e: Estimate) -> str:
    return _est(e, _pct)


def _speed(sp: Estimate | None, time: Estimate) -> str:
    if sp is None:
        return "—"
    if time.mean is None:
        return "not reached"
    if sp.mean is None:
        return "baseline not reached"
    return _est(sp, lambda v: f"{v:.2f}x")


def _csv_value(value: float | None, missing: str = "") -> str | float:
    return missing if value is None else value


# ----------------------------------------------------------------------------------------------------------
# The document: blocks rendered both as Markdown and as HTML


@dataclass
class _Doc:
    blocks: list[tuple[str, Any]] = field(default_factory=list)
    figures: dict[str, bytes] = field(default_factory=dict)

    def h(self, level: int, text: str) -> None:
        self.blocks.append(("h", (level, text)))

    def p(self, text: str) -> None:
        self.blocks.append(("p", text))

    def table(self, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
        self.blocks.append(("table", (list(header), [[str(c) for c in row] for row in rows])))

    def figure(self, name: str, fig: Any, caption: str) -> None:
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
        self.figures[name] = buffer.getvalue()
        self.blocks.append(("img", (name, caption)))

    def markdown(self) -> str:
        out = []
        for kind, value in self.blocks:
            if kind == "h":
                out.append("#" * value[0] + " " + value[1])
            elif kind == "p":
                out.append(value)
            elif kind == "table":
                header, rows = value
                cell = lambda c: str(c).replace("|", "\\|")  # noqa: E731
                out.append(
                    "\n".join(
                        ["| " + " | ".join(map(cell, header)) + " |", "|" + "---|" * len(header)]
                        + ["| " + " | ".join(map(cell, row)) + " |" for row in rows]
                    )
                )
            else:
                out.append(f"![{value[1]}](figures/{value[0]})\n\n*{value[1]}*")
        return "\n\n".join(out) + "\n"

    def html(self, title: str) -> str:
        def inline(text: str) -> str:
            return re.sub(r"`([^`]+)`", r"<code>\1</code>", html.escape(text))

        body = []
        for kind, value in self.blocks:
            if kind == "h":
                body.append(f"<h{value[0]}>{inline(value[1])}</h{value[0]}>")
            elif kind == "p":
                body.append(f"<p>{inline(value)}</p>")
            elif kind == "table":
                header, rows = value
                head = "".join(f"<th>{inline(c)}</th>" for c in header)
                cells = "".join("<tr>" + "".join(f"<td>{inline(c)}</td>" for c in row) + "</tr>" for row in rows)
                body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{cells}</tbody></table>")
            else:
                data = base64.b64encode(self.figures[value[0]]).decode()
                body.append(
                    f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(value[1])}">'
                    f"<figcaption>{inline(value[1])}</figcaption></figure>"
                )
        style = (
            "body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;line-height:1.45}"
            "table{border-collapse:collapse;margin:1em 0;font-size:.9em}"
            "th,td{border:1px solid #ccc;padding:.25em .5em;text-align:right}th{background:#f3f3f3}"
            "td:first-child,th:first-child{text-align:left}img{max-width:100%}figcaption{color:#555;font-size:.9em}"
            "code{background:#f3f3f3;padding:0 .2em}"
        )
        return (
            f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{style}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n"
        )


# ----------------------------------------------------------------------------------------------------------
# Sections


@dataclass
class _Ctx:
    root: Path
    runs: list[Run]
    groups: dict[str, list[Run]]
    all_runs: list[Run]
    base_error: float | None
    targets: dict[float, float]
    stats: dict[tuple[str, str, float], _TimeToTarget]
    images: bool
    new_figure: Any  # matplotlib.figure.Figure, imported only by write_report


def _section_overview(doc: _Doc, ctx: _Ctx) -> None:
    first = ctx.runs[0].config
    doc.p(
        f"Dataset `{first.get('dataset', '?')}`, model `{first.get('model', '?')}`, {len(ctx.runs)} runs in "
        f"{len(ctx.groups)} groups. Every number below is computed from the runs' own files in this folder "
        "(`metrics.jsonl`, `config.json`, `*.npy`). A group (label) is a run name without its `-s<seed>` "
        "suffix; its seeds are the repetitions."
    )
    unfinished = [r.name for r in ctx.runs if not r.finished]
    if unfinished:
        doc.p(f"Unfinished runs (no `final.json`; their last evaluation is used): {', '.join(unfinished)}.")
    excluded = [r for r in ctx.all_runs if r not in ctx.runs]
    if excluded:
        doc.p(
            f"Sections 1–5 and 7 use the runs at label noise {ctx.runs[0].noise:g}; the {len(excluded)} runs "
            "at higher noise levels appear in section 6 only."
        )
    rows = []
    for label, group in ctx.groups.items():
        cfg = group[0].config
        beta = f"{cfg.get('beta'):g}" if group[0].strategy in USES_BETA and cfg.get("beta") is not None else "—"
        rows.append(
            [
                label,
                group[0].strategy,
                beta,
                ", ".join(str(r.seed) for r in group),
                _err(_final(group, "test_error")),
                _est(_final(group, "wall_train_s")),
                _est(_final(group, "backprops"), _count),
                _est(_final(group, "forwards"), _count),
                _est(_final(group, "skipped_forwards"), _count),
            ]
        )
    doc.table(
        [
            "label",
            "strategy",
            "beta",
            "seeds",
            "final test error",
            "train time (s)",
            "backprops",
            "forwards",
            "skipped forwards",
        ],
        rows,
    )
    doc.p(
        "± is the half-width of the 95 % confidence interval of the mean over seeds (Student t with n−1 degrees "
        "of freedom, `scipy.stats.t`); with one seed the value is shown with n=1."
    )


def _section_targets(doc: _Doc, ctx: _Ctx) -> None:
    doc.h(2, "1. Time to target error")
    if not ctx.targets:
        doc.p("No Traditional run: there is no target error, so this section is skipped.")
        return
    n_trad = len(ctx.groups[_baseline(ctx.groups, "traditional") or ""])
    doc.p(
        f"Targets: {', '.join(f'{t}x = {_pct(v)}' for t, v in ctx.targets.items())} — multiples of "
        f"Traditional's final test error {_pct(ctx.base_error or 0.0)} (mean over its {n_trad} seeds). "
        "The crossing is where the test error first reaches the target, linearly interpolated between the last "
        "evaluation above it and the first at or below it (`analysis.crossing`), so a crossing is only as "
        "precise as the evaluation grid. A group whose seeds do not all reach a target is shown as "
        "'not reached by k/n seeds'."
    )
    doc.p(
        "forwards = selection_forwards + backprops: the scoring forwards plus the training-mode forward of "
        "every backpropagated example (StaleSB's skipped scoring forwards are not counted; for Kath18 the "
        "scoring forwards are its presample)."
    )
    kath = _baseline(ctx.groups, "kath18") is not None
    doc.p(
        "Speedup = the baseline's time to the target / this run's, per seed (paired with the baseline's run of "
        "the same seed, or its mean over seeds when it has no such run); mean ± 95 % CI over seeds."
        + ("" if kath else " No Kath18 run: no speedup vs Kath18.")
    )
    for axis, title in AXES.items():
        doc.h(3, f"By {title}")
        header = ["label"]
        for t in ctx.targets:
            header += [f"to {t}x", f"{t}x vs Traditional"] + ([f"{t}x vs Kath18"] if kath else [])
        rows = []
        for label in ctx.groups:
            row = [label]
            for t in ctx.targets:
                s = ctx.stats[label, axis, t]
                row += [_est(s.time, lambda v, a=axis: _num(v, a)), _speed(s.vs_trad, s.time)]
                row += [_speed(s.vs_kath, s.time)] if kath else []
            rows.append(row)
        doc.table(header, rows)


def _section_curves(doc: _Doc, ctx: _Ctx) -> None:
    doc.h(2, "2. Test error curves")
    several = any(len(g) > 1 for g in ctx.groups.values())
    doc.p(
        "One line per label; "
        + (
            "the band spans the seeds' minimum to maximum and the line is their mean, "
            "both interpolated linearly onto a common grid up to the shortest seed's end."
            if several
            else "a single seed per label, so no band."
        )
        + " Dashed lines: the target errors."
    )
    finals = [r.last["test_error"] for r in ctx.runs]
    top = min(1.0, 3 * max(finals + list(ctx.targets.values())))
    for axis, name in (("wall_train_s", "curves_time.png"), ("backprops", "curves_backprops.png")):
        fig = ctx.new_figure(figsize=(8, 4.8))
        ax = fig.subplots()
        for i, (label, group) in enumerate(ctx.groups.items()):
            color = f"C{i % 10}"
            curves = [([row[axis] for row in r.rows], [row["test_error"] for row in r.rows]) for r in group]
            if len(curves) == 1:
                ax.plot(*curves[0], color=color, marker=".", label=label)
            else:
                grid, mean, lo, hi = curve_band(curves)
                ax.plot(grid, mean, color=color, label=f"{label} ({len(curves)} seeds)")
                ax.fill_between(grid, lo, hi, color=color, alpha=0.2, linewidth=0)
        for t, target in ctx.targets.items():
            ax.axhline(target, color="gray", linestyle="--", linewidth=0.8)
            ax.annotate(f"{t}x", (1.0, target), xycoords=("axes fraction", "data"), fontsize=7, color="gray")
        if top > 0.9 * min(finals):
            ax.set_ylim(0.9 * min(finals), top)
        ax.set_xlabel(AXES[axis])
        ax.set_ylabel("test error")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        doc.figure(name, fig, f"Test error vs {AXES[axis]}")


def _section_pareto(doc: _Doc, ctx: _Ctx) -> None:
    doc.h(2, "3. Pareto front: training time vs final error")
    labels = list(ctx.groups)
    points = [(_final(g, "wall_train_s").mean or 0.0, _final(g, "test_error").mean or 0.0) for g in ctx.groups.values()]
    optimal = pareto_front(points)
    doc.p(
        "Each label's point is its mean over seeds of (final training wall-clock time, final test error). A "
        "point is Pareto-optimal when no other label is at least as fast and at least as accurate, and strictly "
        "better in one of the two."
    )
    fig = ctx.new_figure(figsize=(7, 4.8))
    ax = fig.subplots()
    for i, (label, group) in enumerate(ctx.groups.items()):
        color = f"C{i % 10}"
        ax.scatter(
            [r.last["wall_train_s"] for r in group], [r.last["test_error"] for r in group], color=color, alpha=0.3, s=12
        )
        x, y = points[i]
        ax.scatter(
            [x],
            [y],
            color=color,
            s=110 if optimal[i] else 40,
            marker="*" if optimal[i] else "o",
            edgecolors="black" if optimal[i] else "none",
            label=label,
            zorder=3,
        )
        ax.annotate(label, (x, y), textcoords="offset points", xytext=(5, 4), fontsize=7)
    front = sorted(p for p, ok in zip(points, optimal, strict=True) if ok)
    ax.plot([p[0] for p in front], [p[1] for p in front], color="black", linewidth=0.8, drawstyle="steps-post")
    ax.set_xlabel("training time (s)")
    ax.set_ylabel("final test error")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    doc.figure("pareto.png", fig, "Final test error vs training time; stars: Pareto-optimal labels, faint: seeds")
    doc.table(
        ["label", "strategy", "train time (s)", "final test error", "Pareto-optimal"],
        [
            [lb, ctx.groups[lb][0].strategy, f"{x:.1f}", _pct(y), "yes" if ok else "no"]
            for lb, (x, y), ok in zip(labels, points, optimal, strict=True)
        ],
    )
    families: dict[str, list[bool]] = {}
    for label, ok in zip(labels, optimal, strict=True):
        families.setdefault(ctx.groups[label][0].strategy, []).append(ok)
    total = sum(optimal)
    doc.table(
        ["strategy family", "labels", "Pareto-optimal", "share of the family", "share of the front"],
        [[fam, len(oks), sum(oks), _pct(sum(oks) / len(oks)), _pct(sum(oks) / total)] for fam, oks in families.items()],
    )


def _sb_match(ctx: _Ctx, stale: list[Run]) -> str | None:
    """The sb label with the same beta as the stale-sb group (or the only sb label)."""
    sb = {lb: g for lb, g in ctx.groups.items() if g[0].strategy == "sb"}
    same = [lb for lb, g in sb.items() if g[0].config.get("beta") == stale[0].config.get("beta")]
    return same[0] if same else (next(iter(sb)) if len(sb) == 1 else None)


def _stale_pairs(ctx: _Ctx) -> list[tuple[str, str]]:
    pairs = []
    for label, group in ctx.groups.items():
        if group[0].strategy == "stale-sb" and (sb := _sb_match(ctx, group)) is not None:
            pairs.append((label, sb))
    return pairs


def _section_stale(doc: _Doc, ctx: _Ctx) -> None:
    doc.h(2, "4. StaleSB savings")
    pairs = _stale_pairs(ctx)
    if not pairs:
        doc.p("No StaleSB run with a matching SB run (same beta): section skipped.")
        return
    t = max(ctx.targets) if ctx.targets else None
    doc.p(
        "Each StaleSB label is compared with the SB label of the same beta. Skipped share = skipped / (skipped + "
        "performed) scoring forwards. Saved = 1 − StaleSB / SB (positive: StaleSB is faster). Means over seeds."
        + ("" if t else " No Traditional run, so no time to target.")
    )
    rows = []
    for stale, sb in pairs:
        g, h = ctx.groups[stale], ctx.groups[sb]
        skipped, performed = _final(g, "skipped_forwards").mean or 0.0, _final(g, "selection_forwards").mean or 0.0
        row = [
            stale,
            sb,
            _num(skipped, "backprops"),
            _pct(skipped / (skipped + performed)) if skipped + performed else "—",
        ]
        for key in ("time_select_forward_s", "wall_train_s"):
            a, b = _final(g, key).mean, _final(h, key).mean
            row.append(
                f"{a:.1f} vs {b:.1f} ({_pct(1 - a / b) if b else '—'})" if a is not None and b is not None else "—"
            )
        if t:
            a, b = ctx.stats[stale, "wall_train_s", t].time.mean, ctx.stats[sb, "wall_train_s", t].time.mean
            row.append(f"{a:.1f} vs {b:.1f} ({_pct(1 - a / b)})" if a is not None and b else "not reached")
        rows.append(row)
    doc.table(
        [
            "StaleSB",
            "SB",
            "scoring forwards skipped",
            "skipped share",
            "scoring-forward time (s), saved",
            "train time (s), saved",
        ]
        + ([f"time to {t}x (s), saved"] if t else []),
        rows,
    )


def _section_examples(doc: _Doc, ctx: _Ctx) -> None:
    doc.h(2, "5. Which examples SB backpropagates")
    counts = {lb: [c for r in g if (c := r.array("selection_counts")) is not None] for lb, g in ctx.groups.items()}
    counts = {lb: c for lb, c in counts.items() if c}
    if counts:
        fig = ctx.new_figure(figsize=(8, 4.5))
        ax = fig.subplots()
        top = max(int(c.max()) for cs in counts.values() for c in cs)
        bins = np.arange(top + 2) - 0.5
        for i, (label, cs) in enumerate(counts.items()):
            ax.hist(np.concatenate(cs), bins=bins, histtype="step", density=True, color=f"C{i % 10}", label=label)
        ax.set_xlabel("times backpropagated")
        ax.set_ylabel("share of training examples")
        ax.legend(fontsize=8)
        doc.figure("selection_counts.png", fig, "Per-example selection counts (seeds pooled)")
        doc.table(
            ["label", "mean", "std", "min", "max", "never backpropagated"],
            [
                [
                    lb,
                    f"{(a := np.concatenate(cs)).mean():.2f}",
                    f"{a.std():.2f}",
                    int(a.min()),
                    int(a.max()),
                    _pct(float(np.mean(a == 0))),
                ]
                for lb, cs in counts.items()
            ],
        )
    else:
        doc.p("No `selection_counts.npy` in any run: no selection histogram.")
    _galleries(doc, ctx)
    _hard_set(doc, ctx)


def _galleries(doc: _Doc, ctx: _Ctx) -> None:
    sb = next((r for r in ctx.runs if r.strategy == "sb" and r.array("selection_counts") is not None), None)
    if not ctx.images:
        doc.p("Image galleries skipped (`images=False`).")
        return
    if sb is None:
        doc.p("No SB run with `selection_counts.npy`: no image galleries.")
        return
    from . import data as sbdata

    cfg = sb.config
    try:
        train, _ = sbdata.load_dataset(cfg["dataset"], cfg.get("data_dir"))
    except (KeyError, OSError, ValueError) as e:
        doc.p(f"Image galleries skipped: could not load the training images ({type(e).__name__}: {e}).")
        return
    images, labels = train.images.numpy(), train.labels
    if cfg.get("train_limit"):
        images, labels = images[: cfg["train_limit"]], labels[: cfg["train_limit"]]
    if sb.noise > 0:  # the labels the run trained on (the same seeded draw as in training)
        labels, _ = sbdata.apply_label_noise(labels, sb.noise, train.num_classes, sb.seed)
    labels = labels.numpy()
    counts = sb.array("selection_counts")
    assert counts is not None
    if len(counts) != len(images):
        doc.p(
            f"Image galleries skipped: {sb.name} has {len(counts)} selection counts but the dataset has "
            f"{len(images)} training examples."
        )
        return
    noisy_indices = sb.array("noisy_indices")
    noisy = set(noisy_indices.tolist()) if noisy_indices is not None else set()
    doc.p(
        f"The {GALLERY} most and {GALLERY} least backpropagated training examples of `{sb.name}` (ties broken "
        "by index). Titles: index, training label (* = randomized by label noise), times backpropagated."
    )
    order = np.argsort(counts, kind="stable")
    for name, idx, title in (
        ("gallery_most.png", np.argsort(-counts, kind="stable")[:GALLERY], "most"),
        ("gallery_least.png", order[:GALLERY], "least"),
    ):
        side = int(np.ceil(np.sqrt(len(idx))))
        fig = ctx.new_figure(figsize=(1.6 * side, 1.75 * side))
        for k, i in enumerate(idx):
            ax = fig.add_subplot(side, side, k + 1)
            img = images[i].transpose(1, 2, 0)  # C x H x W -> H x W x C
            gray = img.shape[2] == 1
            ax.imshow(img[..., 0] if gray else img, cmap="gray" if gray else None, vmin=0, vmax=255)
            ax.set_title(f"#{i} y={labels[i]}{'*' if int(i) in noisy else ''} n={counts[i]}", fontsize=7)
            ax.axis("off")
        doc.figure(name, fig, f"The {len(idx)} {title} backpropagated examples of {sb.name}")


@dataclass
class _HardSet:
    definer: Run
    judge: Run
    indices: np.ndarray
    shares: dict[str, tuple[list[Run], list[float], list[float]]]  # label -> runs, conf >= CONFIDENT, conf > 0.5


def _hard_measure(ctx: _Ctx) -> _HardSet | None:
    """The hard set from Traditional seed 0 (else its lowest seed), measured on every label's runs.

    Traditional itself is measured on another of its seeds when there is one, so the set is not judged by the run
    that defined it.
    """
    trad_label = _baseline(ctx.groups, "traditional")
    trad = [r for r in ctx.groups.get(trad_label or "", []) if r.array("train_confidence") is not None]
    if not trad:
        return None
    definer = next((r for r in trad if r.seed == 0), trad[0])
    conf0 = definer.array("train_confidence")
    assert conf0 is not None
    hard = hard_set(conf0, HARD_FRACTION)
    judge = next((r for r in trad if r is not definer), definer)
    shares = {}
    for label, group in ctx.groups.items():
        pairs = [
            (r, c)
            for r in ([judge] if label == trad_label else group)
            if (c := r.array("train_confidence")) is not None and len(c) == len(conf0)
        ]
        if pairs:
            shares[label] = (
                [r for r, _ in pairs],
                [hard_set_fraction(c, hard, CONFIDENT) for _, c in pairs],
                [float(np.mean(c[hard] > 0.5)) for _, c in pairs],
            )
    return _HardSet(definer, judge, hard, shares)


def _hard_set(doc: _Doc, ctx: _Ctx) -> None:
    doc.h(3, "Hard examples learned")
    m = _hard_measure(ctx)
    if m is None:
        doc.p("No Traditional run with `train_confidence.npy`: the hard-set measure is skipped.")
        return
    doc.p(
        f"The hard set is the {100 * HARD_FRACTION:g} % of training examples ({len(m.indices)}) with the lowest final "
        f"true-class confidence under Traditional seed {m.definer.seed}. Each run's final true-class softmax "
        f"probability on those examples (`train_confidence.npy`) gives the share with confidence ≥ {CONFIDENT} "
        "(the measure reported here) and the share above 0.5 (then the true class surely is the argmax, i.e. "
        "classified correctly; we only have the true-class probability, so correctness below 0.5 is unknown). "
        + (
            f"Traditional is measured on seed {m.judge.seed}, not on the seed that defined the set."
            if m.judge is not m.definer
            else f"Only one Traditional seed: Traditional is measured on the run that defined the set (seed "
            f"{m.definer.seed}), which biases its share toward 0."
        )
        + " Paper (slides, CIFAR-10): Traditional 3 % "
        "vs SB 29 %."
    )
    doc.table(
        ["label", "seeds measured", f"confidence ≥ {CONFIDENT}", "confidence > 0.5"],
        [
            [lb, ", ".join(str(r.seed) for r in runs), _est(estimate(a), _pct), _est(estimate(b), _pct)]
            for lb, (runs, a, b) in m.shares.items()
        ],
    )


def _section_noise(doc: _Doc, ctx: _Ctx) -> None:
    doc.h(2, "6. Label-noise robustness")
    levels = sorted({r.noise for r in ctx.all_runs if r.noise > 0})
    if not levels:
        doc.p("No run with label noise (`label_noise` = 0 in every config): section skipped.")
        return
    doc.p(
        "Per noise level: targets are multiples of that level's Traditional final error (wall-clock seconds, "
        "speedup vs Traditional in brackets). Backprops on noisy = the share of all backprops spent on the "
        "examples whose label was randomized (`selection_counts.npy`, `noisy_indices.npy`), at the end of "
        "training; ratio = that share / the noise fraction (1: no preference; Traditional is exactly 1)."
    )
    for level in levels:
        groups = _groups([r for r in ctx.all_runs if r.noise == level])
        _, targets = _targets(groups)
        stats = _target_stats(groups, targets)
        doc.h(3, f"Label noise {level:g}")
        if not targets:
            doc.p("No Traditional run at this noise level: no targets.")
        rows = []
        for label, group in groups.items():
            row = [label, len(group), _err(_final(group, "test_error"))]
            for t in targets:
                s = stats[label, "wall_train_s", t]
                row.append(_est(s.time) + (f" ({_speed(s.vs_trad, s.time)})" if s.vs_trad is not None else ""))
            shares, fractions = [], []
            for r in group:
                c, idx = r.array("selection_counts"), r.array("noisy_indices")
                if c is not None and idx is not None and c.sum() > 0:
                    shares.append(noisy_share(c, idx))
                    fractions.append(len(idx) / len(c))
            if shares:
                share, frac = statistics.fmean(shares), statistics.fmean(fractions)
                row += [_pct(frac), _est(estimate(shares), _pct), f"{share / frac:.2f}" if frac else "—"]
            else:
                row += ["—", "no counts", "—"]
            rows.append(row)
        doc.table(
            ["label", "seeds", "final test error"]
            + [f"to {t}x (s)" for t in targets]
            + ["noisy examples", "backprops on noisy", "ratio"],
            rows,
        )
        _noisy_share_figure(doc, ctx, level, groups)


def _noisy_share_figure(doc: _Doc, ctx: _Ctx, level: float, groups: dict[str, list[Run]]) -> None:
    """Share of the backprops so far spent on noisy examples, at each evaluation (``noisy_backprops`` rows)."""
    curves = {
        label: [
            [(row["backprops"], row["noisy_backprops"] / row["backprops"]) for row in r.rows
             if row.get("noisy_backprops") is not None and row["backprops"] > 0]
            for r in group
        ]
        for label, group in groups.items()
    }  # fmt: skip
    if not any(points for runs in curves.values() for points in runs):
        doc.p("No `noisy_backprops` in these runs' metrics (written by newer versions): no share-over-time figure.")
        return
    fig = ctx.new_figure(figsize=(8, 4.2))
    ax = fig.subplots()
    for i, (label, runs) in enumerate(curves.items()):
        for k, points in enumerate(runs):
            if points:
                xs, ys = zip(*points, strict=True)
                ax.plot(xs, ys, color=f"C{i % 10}", marker=".", alpha=1.0 if k == 0 else 0.4,
                        label=label if k == 0 else None)  # fmt: skip
    ax.axhline(level, color="gray", linestyle="--", linewidth=0.8)
    ax.set_xlabel(AXES["backprops"])
    ax.set_ylabel("share of backprops on noisy examples")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    doc.figure(f"noisy_share_{level:g}.png", fig, f"Label noise {level:g}: share of backprops spent on noisy "
               "examples so far (dashed: the noise fraction, what uniform training spends)")  # fmt: skip


def _section_paper(doc: _Doc, ctx: _Ctx) -> None:
    doc.h(2, "7. Paper vs ours")
    cfg = ctx.runs[0].config
    t = max(TARGETS)
    ours = f"{cfg.get('dataset', '?')} / {cfg.get('model', '?')}"

    def sp(label: str, key: str) -> str:
        s = ctx.stats[label, "wall_train_s", t]
        return f"{_speed(getattr(s, key), s.time)} ({label})"

    if not ctx.targets:
        best = "no Traditional run"
    else:
        cands = [
            (s.vs_trad.mean, lb)
            for lb in ctx.groups
            if (s := ctx.stats[lb, "wall_train_s", t]).vs_trad is not None and s.vs_trad.mean is not None
        ]
        best = sp(max(cands)[1], "vs_trad") if cands else f"no strategy reached {t}x on every seed"
    sb_labels = [lb for lb, g in ctx.groups.items() if g[0].strategy == "sb"]
    has_kath = _baseline(ctx.groups, "kath18") is not None
    if not ctx.targets or not has_kath or not sb_labels:
        vs_kath = "no " + ("Traditional" if not ctx.targets else "Kath18" if not has_kath else "SB") + " run"
    else:
        vs_kath = "; ".join(sp(lb, "vs_kath") for lb in sb_labels)
    stale = []
    for a, b in _stale_pairs(ctx) if ctx.targets else []:
        ta, tb = ctx.stats[a, "wall_train_s", t].time.mean, ctx.stats[b, "wall_train_s", t].time.mean
        stale.append(f"{a} vs {b}: " + (f"{tb / ta:.2f}x ({tb:.1f} s vs {ta:.1f} s)" if ta and tb else "not reached"))
    m = _hard_measure(ctx)
    hard = {lb: statistics.fmean(a) for lb, (_, a, _) in m.shares.items()} if m else {}
    trad_hard = hard.pop(m.judge.label, None) if m else None
    sb_hard = {lb: v for lb, v in hard.items() if ctx.groups[lb][0].strategy in SB_FAMILY}
    hard_text = (
        f"Traditional {_pct(trad_hard)} vs " + ", ".join(f"{lb} {_pct(v)}" for lb, v in sb_hard.items())
        if trad_hard is not None and sb_hard
        else "no Traditional or SB confidences"
    )
    doc.p(
        f"Ours: {ours}, wall-clock time to {t}x Traditional's final error (speedups mean ± 95 % CI over seeds). "
        f"The paper's numbers are on {PAPER_DATASET} and other image sets with their own models and GPUs; ours "
        "are on the dataset above and this machine (section 8)."
    )
    doc.table(
        ["paper's claim (slides)", "ours"],
        [
            ["up to 3.5x faster than SGD (Traditional)", f"best speedup vs Traditional: {best}"],
            ["1.02–1.8x faster than Kath18", f"SB vs Kath18: {vs_kath}"],
            ["StaleSB ~26 % faster than SB", "SB time / StaleSB time: " + ("; ".join(stale) or "no StaleSB/SB pair")],
            [
                f"3 % vs 29 % of hard examples learned ({PAPER_DATASET}, Traditional vs SB)",
                f"confidence ≥ {CONFIDENT} on the hard set: {hard_text}",
            ],
        ],
    )
    command = ctx.root / "command.txt"
    if command.exists():
        doc.p(f"Command that produced the runs: `{command.read_text().strip()}`")
    else:
        doc.p("Command: not recorded (no `command.txt`); see each run's `config.json`.")


def _section_environment(doc: _Doc, ctx: _Ctx) -> None:
    doc.h(2, "8. Environment")
    run = ctx.runs[0]
    env, cfg = run.environment, run.config
    if not env:
        doc.p(f"No `environment.json` in {run.name}.")
    keys = ("device", "device_name", "torch", "python", "threads", "platform", "git_commit", "date")
    rows = [[k, env.get(k, "—")] for k in keys if env]
    rows += [[k, cfg.get(k, "—")] for k in ("dataset", "model", "epochs", "batch_size", "train_limit", "test_limit")]
    doc.table(["", f"{run.name}"], rows)
    devices = {(r.environment.get("device"), r.environment.get("device_name")) for r in ctx.all_runs}
    doc.p(
        "All runs ran on the same device."
        if len(devices) == 1
        else f"Runs ran on {len(devices)} different devices: compare their times with care."
    )


# ----------------------------------------------------------------------------------------------------------
# summary.csv


def _summary_csv(ctx: _Ctx) -> str:
    header = [
        "label",
        "strategy",
        "beta",
        "seeds",
        "final_error_mean",
        "final_error_ci95",
        "train_time_s_mean",
        "train_time_s_ci95",
        "backprops_mean",
        "forwards_mean",
        "skipped_forwards_mean",
    ]
    for t in TARGETS:
        header += [
            f"time_to_{t}x_s_mean",
            f"time_to_{t}x_s_ci95",
            f"reached_{t}x",
            f"speedup_vs_traditional_{t}x",
            f"speedup_vs_traditional_{t}x_ci95",
            f"speedup_vs_kath18_{t}x",
            f"speedup_vs_kath18_{t}x_ci95",
        ]
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(header)
    for label, group in ctx.groups.items():
        err, time = _final(group, "test_error"), _final(group, "wall_train_s")
        beta = group[0].config.get("beta") if group[0].strategy in USES_BETA else None
        row: list[Any] = [
            label,
            group[0].strategy,
            _csv_value(beta),
            len(group),
            err.mean,
            _csv_value(err.half_width),
            time.mean,
            _csv_value(time.half_width),
            _final(group, "backprops").mean,
            _final(group, "forwards").mean,
            _final(group, "skipped_forwards").mean,
        ]
        for t in TARGETS:
            s = ctx.stats.get((label, "wall_train_s", t))
            if s is None:
                row += ["no target"] + [""] * 6
                continue
            row += [
                _csv_value(s.time.mean, "not reached"),
                _csv_value(s.time.half_width),
                f"{s.time.n - s.time.missing}/{s.time.n}",
            ]
            for sp in (s.vs_trad, s.vs_kath):
                if sp is None:
                    row += ["", ""]
                elif s.time.mean is None:
                    row += ["not reached", ""]
                else:
                    row += [_csv_value(sp.mean, "baseline not reached"), _csv_value(sp.half_width)]
        writer.writerow(row)
    return out.getvalue()


# ----------------------------------------------------------------------------------------------------------
# Entry point


def write_report(run_dir: str | Path, *, images: bool = True) -> Path:
    """Write ``report.md``, ``report.html``, ``figures/*.png`` and ``summary.csv`` into ``run_dir``.

    Args:
        run_dir: a ``compare`` folder (one subfolder per run) or a single run folder.
        images: draw galleries of the most and least backpropagated training images, which loads the dataset
            named in the first SB run's config. Default: ``True``.

    Returns:
        The path of ``report.md``.

    Raises:
        ImportError: without matplotlib or scipy; install them with ``pip install
            'selective-backprop[experiments]'``.
        FileNotFoundError: when ``run_dir`` holds no run with a ``metrics.jsonl``.
    """
    try:
        import matplotlib
    except ImportError as e:
        raise ImportError(f"write_report needs matplotlib: {INSTALL_HINT}") from e
    try:
        import scipy  # noqa: F401  (confidence intervals: analysis.mean_ci)
    except ImportError as e:
        raise ImportError(f"write_report needs scipy: {INSTALL_HINT}") from e
    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    root = Path(run_dir)
    all_runs = load_runs(root)
    lowest_noise = min(r.noise for r in all_runs)
    runs = [r for r in all_runs if r.noise == lowest_noise]
    groups = _groups(runs)
    base, targets = _targets(groups)
    ctx = _Ctx(root, runs, groups, all_runs, base, targets, _target_stats(groups, targets), images, Figure)

    doc = _Doc()
    doc.h(1, f"Selective-Backprop report: {root.resolve().name}")
    for section in (
        _section_overview,
        _section_targets,
        _section_curves,
        _section_pareto,
        _section_stale,
        _section_examples,
        _section_noise,
        _section_paper,
        _section_environment,
    ):
        section(doc, ctx)

    figures = root / "figures"
    figures.mkdir(exist_ok=True)
    for name, png in doc.figures.items():
        write_atomic(figures / name, lambda f, png=png: f.write(png))
    _write_text(root / "summary.csv", _summary_csv(ctx))
    _write_text(root / "report.html", doc.html(f"Selective-Backprop report: {root.resolve().name}"))
    _write_text(root / "report.md", doc.markdown())
    return root / "report.md"


def _write_text(path: Path, text: str) -> None:
    write_atomic(path, lambda f: f.write(text.encode()))
