"""Report sections 7-8 (paper vs ours, environment) and :func:`write_report`, which writes every file."""

from __future__ import annotations

import statistics
from pathlib import Path

from ..analysis import TARGETS
from ..measures import accuracy_at_percentile
from ..runfolder import write_atomic
from .document import Document, pct, speed
from .examples import section_examples, section_noise
from .paper import hard_views, section_pareto
from .runs import (
    INSTALL_HINT,
    PAPER_DATASET,
    Context,
    baseline_label,
    group_runs,
    load_runs,
    target_stats,
    targets_of,
)
from .sections import section_curves, section_overview, section_stale, section_targets, stale_pairs
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
    at20 = hard_at_20th(ctx)
    hard_text = ", ".join(f"{lb} {pct(v)}" for lb, v in at20.items()) or "no run saved its test-set view"
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
                f"at the 20th percentile of target confidences after 10 epochs, 3 % (Traditional) vs 29 % (SB) "
                f"classified correctly ({PAPER_DATASET})",
                f"same measure, test set: {hard_text}",
            ],
        ],
    )
    table1(doc, ctx)
    command = ctx.root / "command.txt"
    if command.exists():
        doc.p(f"Command that produced the runs: `{command.read_text().strip()}`")
    else:
        doc.p("Command: not recorded (no `command.txt`); see each run's `config.json`.")


PAPER_TABLE1 = {
    "CIFAR10": {"sb": (1.4, 1.2, 1.5), "stale-sb": (None, 1.5, 2.0), "kath18": (1.4, 1.1, 1.3)},
    "CIFAR100": {"sb": (1.2, 1.2, 1.2), "stale-sb": (1.5, 1.0, 1.6), "kath18": (1.1, 0.8, 0.8)},
    "SVHN": {"sb": (3.4, 3.4, 3.5), "stale-sb": (4.3, 4.9, 5.0), "kath18": (1.9, 2.8, 3.4)},
}
"""Paper Table 1: wall-clock speedup vs Traditional to 1.1x / 1.2x / 1.4x Traditional's final error ("–": none)."""


def table1(doc: Document, ctx: Context) -> None:
    """The paper's Table 1 and, beside each entry, ours on the same measure (every label of that strategy)."""
    rows = []
    for strategy in ("sb", "stale-sb", "kath18"):
        labels = [lb for lb, g in ctx.groups.items() if g[0].strategy == strategy]
        for k, t in enumerate(TARGETS):
            paper = [v[strategy][k] for v in PAPER_TABLE1.values()]
            ours = "; ".join(f"{lb} {speed(s.vs_trad, s.time)}" for lb in labels
                             if (s := ctx.stats.get((lb, "wall_train_s", t))) is not None) or "no run"  # fmt: skip
            rows.append([f"{strategy} to {t}x", *("–" if v is None else f"{v:.1f}x" for v in paper), ours])
    doc.p("The paper's Table 1 (speedup in wall-clock time vs Traditional to reach 1.1x / 1.2x / 1.4x Traditional's "
          "final error, on its GPUs and datasets) and ours on the same measure (mean ± 95 % CI over seeds, "
          "paired).")  # fmt: skip
    doc.table(["strategy, target", *(f"paper {d}" for d in PAPER_TABLE1), "ours"], rows)


def hard_at_20th(ctx: Context) -> dict[str, float]:
    """Label -> mean over seeds of the accuracy at the 20th percentile of test-set confidence (paper §5.2)."""
    out = {}
    for label, group in ctx.groups.items():
        views = [v for r in group if (v := hard_views(r)) is not None]
        if views:
            out[label] = statistics.fmean(accuracy_at_percentile(conf, ok) for _, conf, ok in views)
    return out


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
