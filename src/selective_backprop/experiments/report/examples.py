"""Report sections 5-6: which examples SB backpropagates (counts, galleries, hard examples) and label noise."""

from __future__ import annotations

import statistics
from dataclasses import dataclass

import numpy as np

from ..analysis import estimate, hard_set, hard_set_fraction, noisy_share
from .document import Document, err, est, pct, speed
from .paper import noise_curves, section_hard_examples
from .runs import (
    AXES,
    CONFIDENT,
    GALLERY,
    HARD_FRACTION,
    Context,
    Run,
    baseline_label,
    final,
    group_runs,
    target_stats,
    targets_of,
)


def section_examples(doc: Document, ctx: Context) -> None:
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
                    pct(float(np.mean(a == 0))),
                ]
                for lb, cs in counts.items()
            ],
        )
    else:
        doc.p("No `selection_counts.npy` in any run: no selection histogram.")
    _galleries(doc, ctx)
    section_hard_examples(doc, ctx)
    _hard_set(doc, ctx)


def _galleries(doc: Document, ctx: Context) -> None:
    sb = next((r for r in ctx.runs if r.strategy == "sb" and r.array("selection_counts") is not None), None)
    if not ctx.images:
        doc.p("Image galleries skipped (`images=False`).")
        return
    if sb is None:
        doc.p("No SB run with `selection_counts.npy`: no image galleries.")
        return
    from .. import data as sbdata

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
class HardSet:
    definer: Run
    judge: Run
    indices: np.ndarray
    shares: dict[str, tuple[list[Run], list[float], list[float]]]  # label -> runs, conf >= CONFIDENT, conf > 0.5


def hard_measure(ctx: Context) -> HardSet | None:
    """The hard set from Traditional seed 0 (else its lowest seed), measured on every label's runs.

    Traditional itself is measured on another of its seeds when there is one, so the set is not judged by the run
    that defined it.
    """
    trad_label = baseline_label(ctx.groups, "traditional")
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
    return HardSet(definer, judge, hard, shares)


def _hard_set(doc: Document, ctx: Context) -> None:
    doc.h(3, "Hard training examples learned (ours, not the paper's measure)")
    m = hard_measure(ctx)
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
            [lb, ", ".join(str(r.seed) for r in runs), est(estimate(a), pct), est(estimate(b), pct)]
            for lb, (runs, a, b) in m.shares.items()
        ],
    )


def section_noise(doc: Document, ctx: Context) -> None:
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
        groups = group_runs([r for r in ctx.all_runs if r.noise == level])
        _, targets = targets_of(groups)
        stats = target_stats(groups, targets)
        doc.h(3, f"Label noise {level:g}")
        if not targets:
            doc.p("No Traditional run at this noise level: no targets.")
        rows = []
        for label, group in groups.items():
            row = [label, len(group), err(final(group, "test_error"))]
            for t in targets:
                s = stats[label, "wall_train_s", t]
                row.append(est(s.time) + (f" ({speed(s.vs_trad, s.time)})" if s.vs_trad is not None else ""))
            shares, fractions = [], []
            for r in group:
                c, idx = r.array("selection_counts"), r.array("noisy_indices")
                if c is not None and idx is not None and c.sum() > 0:
                    shares.append(noisy_share(c, idx))
                    fractions.append(len(idx) / len(c))
            if shares:
                share, frac = statistics.fmean(shares), statistics.fmean(fractions)
                row += [pct(frac), est(estimate(shares), pct), f"{share / frac:.2f}" if frac else "—"]
            else:
                row += ["—", "no counts", "—"]
            rows.append(row)
        doc.table(
            ["label", "seeds", "final test error"]
            + [f"to {t}x (s)" for t in targets]
            + ["noisy examples", "backprops on noisy", "ratio"],
            rows,
        )
        noise_curves(doc, ctx, level, groups)
        _noisy_share_figure(doc, ctx, level, groups)


def _noisy_share_figure(doc: Document, ctx: Context, level: float, groups: dict[str, list[Run]]) -> None:
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
