"""The one summary of a comparison: ``summary.csv`` (one row per label and label-noise level) and the Markdown
table ``compare`` prints, both from the same rows.

Targets are multiples (:data:`~selective_backprop.experiments.analysis.TARGETS`) of the Traditional runs' mean
final error at the same noise level; times to a target come from
:func:`~selective_backprop.experiments.analysis.time_to_target` (wall-clock training seconds, crossings interpolated
linearly between evaluations), speedups are paired by seed. A group whose seeds do not all reach a target has no
mean time ("not reached").
"""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path
from typing import Any

from ..analysis import TARGETS, Estimate, estimate, paired_speedups
from ..runfolder import write_atomic
from .runs import USES_BETA, Run, baseline_label, final, group_runs, target_stats, targets_of

__all__ = ["summary_rows", "summary_markdown", "write_summary"]


def _speedups(sp: Estimate | None, time: Estimate) -> tuple[Any, Any]:
    if sp is None:
        return "", ""
    if time.mean is None:
        return "not reached", ""
    return ("baseline not reached" if sp.mean is None else sp.mean), ("" if sp.half_width is None else sp.half_width)


def _level_rows(runs: list[Run], noise: float) -> list[dict[str, Any]]:
    groups = group_runs(runs)
    _, targets = targets_of(groups)
    stats = target_stats(groups, targets)
    trad = baseline_label(groups, "traditional")
    train = {label: {r.seed: float(r.last["wall_train_s"]) for r in g} for label, g in groups.items()}
    rows = []
    for label, group in groups.items():
        err, time = final(group, "test_error"), final(group, "wall_train_s")
        whole = None if trad is None or trad == label else estimate(paired_speedups(train[trad], train[label]))
        row: dict[str, Any] = {
            "label": label, "label_noise": noise, "strategy": group[0].strategy,
            "beta": group[0].config.get("beta") if group[0].strategy in USES_BETA else "", "seeds": len(group),
            "final_error_mean": err.mean, "final_error_ci95": err.half_width, "train_time_s_mean": time.mean,
            "train_time_s_ci95": time.half_width, "speedup_whole_run": whole and whole.mean,
            "backprops_mean": final(group, "backprops").mean, "forwards_mean": final(group, "forwards").mean,
            "skipped_forwards_mean": final(group, "skipped_forwards").mean,
        }  # fmt: skip
        for t in TARGETS:
            s = stats.get((label, "wall_train_s", t))
            if s is None:
                row.update({f"time_to_{t}x_s_mean": "no target", f"reached_{t}x": ""})
                continue
            row[f"time_to_{t}x_s_mean"] = "not reached" if s.time.mean is None else s.time.mean
            row[f"time_to_{t}x_s_ci95"] = s.time.half_width
            row[f"reached_{t}x"] = f"{s.time.n - s.time.missing}/{s.time.n}"
            for name, sp in (("traditional", s.vs_trad), ("kath18", s.vs_kath)):  # None: no baseline, or itself
                mean, half = _speedups(sp, s.time)
                row[f"speedup_vs_{name}_{t}x"], row[f"speedup_vs_{name}_{t}x_ci95"] = mean, half
        rows.append(row)
    return rows


def summary_rows(runs: list[Run]) -> list[dict[str, Any]]:
    """One row per (label-noise level, label) of ``runs`` (as from :func:`~.runs.load_runs`)."""
    levels = sorted({r.noise for r in runs})
    return [row for level in levels for row in _level_rows([r for r in runs if r.noise == level], level)]


def _columns() -> list[str]:
    columns = ["label", "label_noise", "strategy", "beta", "seeds", "final_error_mean", "final_error_ci95",
               "train_time_s_mean", "train_time_s_ci95", "speedup_whole_run", "backprops_mean", "forwards_mean",
               "skipped_forwards_mean"]  # fmt: skip
    for t in TARGETS:
        columns += [f"time_to_{t}x_s_mean", f"time_to_{t}x_s_ci95", f"reached_{t}x"]
        for name in ("traditional", "kath18"):
            columns += [f"speedup_vs_{name}_{t}x", f"speedup_vs_{name}_{t}x_ci95"]
    return columns


def _cell(value: Any, fmt: str, unit: str = "") -> str:
    if value is None or value == "" or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return value if isinstance(value, str) else format(value, fmt) + unit


def summary_markdown(rows: list[dict[str, Any]]) -> str:
    """``compare``'s printed table(s): one per label-noise level when there is noise."""
    levels = sorted({r["label_noise"] for r in rows})
    header = ["strategy", "seeds", "final error", "train time (s)", "backprops", "speedup (whole run)"]
    for t in TARGETS:
        header += [f"time to {t}x (s)", f"speedup {t}x"]
    parts = []
    for level in levels:
        if len(levels) > 1 or level > 0:
            parts.append(f"### Label noise {level:g}\n")
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for r in (r for r in rows if r["label_noise"] == level):
            cells = [r["label"], str(r["seeds"]), _cell(r["final_error_mean"], ".2%"),
                     _cell(r["train_time_s_mean"], ".1f"), _cell(r["backprops_mean"], ".0f"),
                     _cell(r["speedup_whole_run"], ".2f", "x")]  # fmt: skip
            for t in TARGETS:
                cells += [_cell(r.get(f"time_to_{t}x_s_mean"), ".1f"),
                          _cell(r.get(f"speedup_vs_traditional_{t}x"), ".2f", "x")]  # fmt: skip
            lines.append("| " + " | ".join(cells) + " |")
        parts += ["\n".join(lines), ""]
    parts.append(
        f"Targets: {', '.join(f'{t}x' for t in TARGETS)} Traditional's mean final error at the same noise level. "
        "Times are training wall-clock seconds (evaluation excluded), crossing times interpolated linearly between "
        "evaluations; 'not reached' means some seed never got there. Means over seeds; speedups paired by seed."
    )
    return "\n".join(parts)


def write_summary(root: Path, runs: list[Run]) -> str:
    """Write ``summary.csv`` of ``runs`` into ``root``; return the Markdown table."""
    rows = summary_rows(runs)
    out = io.StringIO()
    writer = csv.DictWriter(out, _columns(), lineterminator="\n", restval="")
    writer.writeheader()
    writer.writerows([{k: "" if v is None else v for k, v in row.items()} for row in rows])
    write_atomic(root / "summary.csv", lambda f: f.write(out.getvalue().encode()))
    return summary_markdown(rows)
