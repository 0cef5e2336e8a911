"""Report sections 7-8 (paper vs ours, environment) and :func:`write_report`, which writes every file."""

from __future__ import annotations

import statistics
from pathlib import Path

from ..analysis import TARGETS
from ..runfolder import write_atomic
from .document import Document, pct, speed
from .examples import hard_measure, section_examples, section_noise
from .runs import (
    CONFIDENT,
    INSTALL_HINT,
    PAPER_DATASET,
    SB_FAMILY,
    Context,
    baseline_label,
    group_runs,
    load_runs,
    target_stats,
    targets_of,
)
from .sections import section_curves, section_overview, section_pareto, section_stale, section_targets, stale_pairs
from .summary import write_summary


def section_paper(doc: Document, ctx: Context) -> None:
    doc.h(2, "7. Paper vs ours")
    cfg = ctx.runs[0].config
    t = max(TARGETS)
    ours = f"{cfg.get('dataset', '?')} / {cfg.get('model', '?')}"

    def sp(label: str, key: str) -> str:
        s = ctx.stats[label, "wall_train_s", t]
        return f"{speed(getattr(s, key), s.time)} ({label})"

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
    has_kath = baseline_label(ctx.groups, "kath18") is not None
    if not ctx.targets or not has_kath or not sb_labels:
        vs_kath = "no " + ("Traditional" if not ctx.targets else "Kath18" if not has_kath else "SB") + " run"
    else:
        vs_kath = "; ".join(sp(lb, "vs_kath") for lb in sb_labels)
    stale = []
    for a, b in stale_pairs(ctx) if ctx.targets else []:
        ta, tb = ctx.stats[a, "wall_train_s", t].time.mean, ctx.stats[b, "wall_train_s", t].time.mean
        stale.append(f"{a} vs {b}: " + (f"{tb / ta:.2f}x ({tb:.1f} s vs {ta:.1f} s)" if ta and tb else "not reached"))
    m = hard_measure(ctx)
    hard = {lb: statistics.fmean(a) for lb, (_, a, _) in m.shares.items()} if m else {}
    trad_hard = hard.pop(m.judge.label, None) if m else None
    sb_hard = {lb: v for lb, v in hard.items() if ctx.groups[lb][0].strategy in SB_FAMILY}
    hard_text = (
        f"Traditional {pct(trad_hard)} vs " + ", ".join(f"{lb} {pct(v)}" for lb, v in sb_hard.items())
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


def section_environment(doc: Document, ctx: Context) -> None:
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
    groups = group_runs(runs)
    base, targets = targets_of(groups)
    ctx = Context(root, runs, groups, all_runs, base, targets, target_stats(groups, targets), images, Figure)

    doc = Document()
    doc.h(1, f"Selective-Backprop report: {root.resolve().name}")
    for section in (
        section_overview,
        section_targets,
        section_curves,
        section_pareto,
        section_stale,
        section_examples,
        section_noise,
        section_paper,
        section_environment,
    ):
        section(doc, ctx)

    figures = root / "figures"
    figures.mkdir(exist_ok=True)
    for name, png in doc.figures.items():
        write_atomic(figures / name, lambda f, png=png: f.write(png))
    write_summary(root, all_runs)
    write_text(root / "report.html", doc.html(f"Selective-Backprop report: {root.resolve().name}"))
    write_text(root / "report.md", doc.markdown())
    return root / "report.md"


def write_text(path: Path, text: str) -> None:
    write_atomic(path, lambda f: f.write(text.encode()))
