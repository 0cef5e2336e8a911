"""Report sections 0-4: overview, time to target, error curves, Pareto front, StaleSB savings."""

from __future__ import annotations

from .document import Document, count, err, est, num, pct, speed
from .paper import plot_curves, time_breakdown
from .runs import (
    AXES,
    USES_BETA,
    Context,
    Run,
    baseline_label,
    final,
)


def section_overview(doc: Document, ctx: Context) -> None:
    first = ctx.runs[0].config
    doc.p(
        f"Dataset `{first.get('dataset', '?')}`, model `{first.get('model', '?')}`, {len(ctx.runs)} runs in "
        f"{len(ctx.groups)} groups. Every number below is computed from the runs' own files in this folder "
        "(`metrics.jsonl`, `config.json`, `*.npy`). A group (label) is a run name without its `-s<seed>` "
        "suffix; its seeds are the repetitions."
    )
    budgets = {(r.config.get("time_budget"), r.config.get("epochs")) for r in ctx.all_runs}
    doc.p("Budget: " + "; ".join(
        f"{epochs} epochs" if seconds is None else f"{seconds:g} s of training time (`--time-budget`, evaluation "
        f"excluded; the paper's equal-time comparison), at most {epochs} epochs" for seconds, epochs in sorted(
            budgets, key=str)) + ".")  # fmt: skip
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
                err(final(group, "test_error")),
                est(final(group, "wall_train_s")),
                est(final(group, "backprops"), count),
                est(final(group, "forwards"), count),
                est(final(group, "skipped_forwards"), count),
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


def section_targets(doc: Document, ctx: Context) -> None:
    doc.h(2, "1. Time to target error")
    if not ctx.targets:
        doc.p("No Traditional run: there is no target error, so this section is skipped.")
        return
    n_trad = len(ctx.groups[baseline_label(ctx.groups, "traditional") or ""])
    doc.p(
        f"Targets: {', '.join(f'{t}x = {pct(v)}' for t, v in ctx.targets.items())} — multiples of "
        f"Traditional's final test error {pct(ctx.base_error or 0.0)} (mean over its {n_trad} seeds). "
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
    kath = baseline_label(ctx.groups, "kath18") is not None
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
                row += [est(s.time, lambda v, a=axis: num(v, a)), speed(s.vs_trad, s.time)]
                row += [speed(s.vs_kath, s.time)] if kath else []
            rows.append(row)
        doc.table(header, rows)


def section_curves(doc: Document, ctx: Context) -> None:
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
        plot_curves(ax, ctx.groups, axis)
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
    time_breakdown(doc, ctx)


def _sb_match(ctx: Context, stale: list[Run]) -> str | None:
    """The sb label with the same beta as the stale-sb group (or the only sb label)."""
    sb = {lb: g for lb, g in ctx.groups.items() if g[0].strategy == "sb"}
    same = [lb for lb, g in sb.items() if g[0].config.get("beta") == stale[0].config.get("beta")]
    return same[0] if same else (next(iter(sb)) if len(sb) == 1 else None)


def stale_pairs(ctx: Context) -> list[tuple[str, str]]:
    pairs = []
    for label, group in ctx.groups.items():
        if group[0].strategy == "stale-sb" and (sb := _sb_match(ctx, group)) is not None:
            pairs.append((label, sb))
    return pairs


def section_stale(doc: Document, ctx: Context) -> None:
    doc.h(2, "4. StaleSB savings")
    pairs = stale_pairs(ctx)
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
        skipped, performed = final(g, "skipped_forwards").mean or 0.0, final(g, "selection_forwards").mean or 0.0
        row = [
            stale,
            sb,
            num(skipped, "backprops"),
            pct(skipped / (skipped + performed)) if skipped + performed else "—",
        ]
        for key in ("time_select_forward_s", "wall_train_s"):
            a, b = final(g, key).mean, final(h, key).mean
            row.append(
                f"{a:.1f} vs {b:.1f} ({pct(1 - a / b) if b else '—'})" if a is not None and b is not None else "—"
            )
        if t:
            a, b = ctx.stats[stale, "wall_train_s", t].time.mean, ctx.stats[sb, "wall_train_s", t].time.mean
            row.append(f"{a:.1f} vs {b:.1f} ({pct(1 - a / b)})" if a is not None and b else "not reached")
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
