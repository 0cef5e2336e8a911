"""The report of a compare folder: synthetic runs with hand-made, piecewise-linear error curves and .npy files,
so every time to target, speedup, CI, Pareto set and share below is computed by hand."""

from __future__ import annotations

import csv
import json
import math
import re
import statistics
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from scipy.stats import t as student_t

from selective_backprop.experiments.analysis import (
    estimate,
    hard_set,
    hard_set_fraction,
    mean_ci,
    noisy_share,
    paired_speedups,
    pareto_front,
    time_to_targets,
)
from selective_backprop.experiments.report import load_runs, write_report

N = 100  # training examples per synthetic run
T975_1 = student_t.ppf(0.975, 1)  # 12.706...: the 95 % t quantile with one degree of freedom (two seeds)


def half_width(values: list[float]) -> float:
    return T975_1 * statistics.stdev(values) / math.sqrt(len(values)) if len(values) == 2 else math.nan


def row(t: float, err: float, bp: int = 0, sel: int = 0, skip: int = 0) -> dict[str, Any]:
    return {
        "epoch": 0,
        "examples_seen": 0,
        "selection_forwards": sel,
        "skipped_forwards": skip,
        "backprops": bp,
        "steps": 0,
        "wall_train_s": t,
        "time_data_s": 0.0,
        "time_select_forward_s": t / 4,
        "time_bookkeeping_s": 0.0,
        "time_train_s": t / 2,
        "test_error": err,
        "test_loss": 1.0,
        "train_loss": None,
        "selected_fraction": None,
        "lr": 0.1,
    }


def make_run(
    root: Path,
    name: str,
    strategy: str,
    seed: int,
    rows: list[dict[str, Any]],
    *,
    confidence: np.ndarray | None = None,
    counts: np.ndarray | None = None,
    noisy: np.ndarray | None = None,
    test_correct: list[int] | None = None,
    **config: Any,
) -> Path:
    folder = root / name
    folder.mkdir(parents=True)
    cfg = {
        "dataset": "fashion-mnist",
        "model": "small-cnn",
        "strategy": strategy,
        "beta": 3.0,
        "seed": seed,
        "label_noise": 0.0,
        "data_dir": None,
        "train_limit": N,
        "epochs": 2,
        **config,
    }
    (folder / "config.json").write_text(json.dumps(cfg))
    env = {
        "torch": "2.13.0",
        "python": "3.11",
        "platform": "linux",
        "device": "cpu",
        "device_name": "x86_64",
        "threads": 2,
        "git_commit": "abc",
        "date": "2026-11-25T12:00:00+00:00",
    }
    (folder / "environment.json").write_text(json.dumps(env))
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / "final.json").write_text(json.dumps({"final_test_error": rows[-1]["test_error"]}))
    np.save(folder / "selection_counts.npy", counts if counts is not None else np.full(N, 2, dtype=np.int64))
    np.save(folder / "train_confidence.npy", confidence if confidence is not None else np.full(N, 0.9))
    if noisy is not None:
        np.save(folder / "noisy_indices.npy", noisy)
    if test_correct is not None:  # the test-set view after epoch 10: example i has confidence i / 100
        np.save(folder / "test_labels.npy", np.zeros(100, dtype=np.int64))
        np.save(folder / "test_confidence_e10.npy", np.arange(100) / 100)
        np.save(folder / "test_prediction_e10.npy", np.where(np.isin(np.arange(100), test_correct), 0, 1))
    return folder


def conf(first5: list[float]) -> np.ndarray:
    """Confidences: the given values on examples 0..4, 0.9 elsewhere."""
    c = np.full(N, 0.9)
    c[:5] = first5
    return c


def build_compare(root: Path, tiny_fmnist: Path) -> Path:
    """Traditional x2, SB x2, StaleSB x1, Kath18 x2. Traditional ends at 0.25, so the targets are
    1.1x = 0.275, 1.2x = 0.30, 1.4x = 0.35."""
    data = {"data_dir": str(tiny_fmnist)}
    trad_conf = np.full(N, 0.9)
    trad_conf[:5] = [0.01, 0.02, 0.03, 0.04, 0.05]  # the hard set: examples 0..4
    # 0.35 is crossed halfway between 0.45 and 0.25: at 30 s (seed 0) and 36 s (seed 1); 1500 backprops.
    make_run(
        root,
        "traditional-s0",
        "traditional",
        0,
        [row(0, 0.9), row(20, 0.45, 1000), row(40, 0.25, 2000)],
        confidence=trad_conf,
        test_correct=list(range(50, 100)),
        **data,
    )
    make_run(
        root,
        "traditional-s1",
        "traditional",
        1,
        [row(0, 0.9), row(24, 0.45, 1000), row(48, 0.25, 2000)],
        confidence=conf([0.1, 0.35, 0.2, 0.05, 0.9]),
        **data,
    )
    counts = np.ones(N, dtype=np.int64)
    counts[7] = 9  # the most selected example
    make_run(
        root,
        "sb-s0",
        "sb",
        0,
        [row(0, 0.9), row(10, 0.35, 500, 250), row(20, 0.25, 800, 600)],
        confidence=conf([0.3, 0.6, 0.1, 0.8, 0.2]),
        counts=counts,
        test_correct=[18, 19, 20, 60],
        **data,
    )
    make_run(
        root,
        "sb-s1",
        "sb",
        1,
        [row(0, 0.9), row(14, 0.35, 600, 300), row(28, 0.25, 900, 700)],
        confidence=conf([0.9, 0.9, 0.9, 0.9, 0.1]),
        test_correct=[18, 99],
        **data,
    )
    make_run(
        root,
        "stale-sb-s0",
        "stale-sb",
        0,
        [row(0, 0.9), row(8, 0.35, 500, 150, 100), row(16, 0.3, 800, 300, 300)],
        confidence=conf([0.0, 0.0, 0.0, 0.0, 0.5]),
        **data,
    )
    # Kath18: seed 0 crosses 0.35 at 15 + 0.5 * 15 = 22.5 s; seed 1 at 15 + (0.1 / 0.15) * 15 = 25 s and ends at
    # 0.30, so it never reaches 1.1x = 0.275.
    make_run(root, "kath18-s0", "kath18", 0, [row(0, 0.9), row(15, 0.45, 500, 1500), row(30, 0.25, 1000, 3000)], **data)
    make_run(root, "kath18-s1", "kath18", 1, [row(0, 0.9), row(15, 0.45, 500, 1500), row(30, 0.3, 1000, 3000)], **data)
    return root


@pytest.fixture
def compare(tmp_path: Path, tiny_fmnist: Path) -> Path:
    return build_compare(tmp_path / "cmp", tiny_fmnist)


@pytest.fixture(scope="module")
def reported(tmp_path_factory: pytest.TempPathFactory, tiny_fmnist: Path) -> tuple[Path, str]:
    """The compare folder after ``write_report(images=False)`` (shared by the read-only tests), and its report.md."""
    root = build_compare(tmp_path_factory.mktemp("reported") / "cmp", tiny_fmnist)
    return root, write_report(root, images=False).read_text()


def read_csv(path: Path) -> dict[str, dict[str, str]]:
    with open(path) as f:
        return {r["label"]: r for r in csv.DictReader(f)}


def table_row(md: str, label: str, after: str) -> str:
    """The first markdown table row for ``label`` after the line containing ``after``."""
    rest = md[md.index(after) :]
    return next(line for line in rest.splitlines() if line.startswith(f"| {label} |"))


# ----------------------------------------------------------------------------------------------------------
# Pure functions


class TestAnalysis:
    def test_mean_ci_two_seeds(self) -> None:
        mean, half = mean_ci([10.0, 14.0])
        assert mean == 12.0
        assert half == pytest.approx(T975_1 * statistics.stdev([10.0, 14.0]) / math.sqrt(2))
        assert half == pytest.approx(25.4124, abs=1e-4)

    def test_mean_ci_one_seed_and_empty(self) -> None:
        assert mean_ci([5.0]) == (5.0, None)
        with pytest.raises(ValueError, match="at least one"):
            mean_ci([])

    def test_estimate_missing(self) -> None:
        e = estimate([1.0, None])
        assert (e.mean, e.half_width, e.n, e.missing) == (None, None, 2, 1)

    def test_time_to_targets_interpolates(self) -> None:
        rows = [row(0, 0.9), row(20, 0.45), row(40, 0.25)]
        assert time_to_targets(rows, [0.35, 0.25, 0.2]) == [pytest.approx(30.0), 40.0, None]

    def test_paired_speedups(self) -> None:
        assert paired_speedups({0: 30.0, 1: 36.0}, {0: 10.0, 1: 14.0}) == [3.0, pytest.approx(36 / 14)]
        assert paired_speedups({0: 30.0, 1: 36.0}, {5: 11.0}) == [3.0]  # unpaired seed: the baseline's mean
        assert paired_speedups({0: 30.0, 1: None}, {5: 11.0}) == [None]

    def test_pareto_front(self) -> None:
        #            fast, bad   slow, good   dominated    tie with #1   dominated by #0
        points = [(1.0, 0.5), (3.0, 0.2), (4.0, 0.3), (3.0, 0.2), (2.0, 0.5)]
        assert pareto_front(points) == [True, True, False, True, False]

    def test_hard_set_and_fraction(self) -> None:
        c = np.array([0.5, 0.01, 0.9, 0.02, 0.8, 0.03, 0.7, 0.04, 0.6, 0.05] * 2)  # 20 examples: 5 % = 1
        assert hard_set(c).tolist() == [1]
        assert hard_set(c, 0.2).tolist() == [1, 3, 11, 13]
        later = np.linspace(0, 1, 20)  # 1/19, 3/19, 11/19, 13/19 on the hard set
        assert hard_set_fraction(later, np.array([1, 3, 11, 13]), 0.3) == 0.5
        with pytest.raises(ValueError, match="fraction"):
            hard_set(c, 0.0)

    def test_noisy_share(self) -> None:
        counts = np.array([5, 5, 1, 1, 1, 1])
        assert noisy_share(counts, np.array([0, 1])) == pytest.approx(10 / 14)
        with pytest.raises(ValueError, match="all zero"):
            noisy_share(np.zeros(3, dtype=np.int64), np.array([0]))


# ----------------------------------------------------------------------------------------------------------
# The report of a compare folder


def test_load_runs_groups_and_order(compare: Path) -> None:
    runs = load_runs(compare)
    assert [r.name for r in runs] == [
        "traditional-s0",
        "traditional-s1",
        "sb-s0",
        "sb-s1",
        "stale-sb-s0",
        "kath18-s0",
        "kath18-s1",
    ]
    assert [r.label for r in runs][:3] == ["traditional", "traditional", "sb"]
    assert runs[2].rows[1]["forwards"] == 750  # selection_forwards + backprops


def test_summary_csv_numbers(reported: tuple[Path, str]) -> None:
    rows = read_csv(reported[0] / "summary.csv")
    sb, trad, stale, kath = rows["sb"], rows["traditional"], rows["stale-sb"], rows["kath18"]
    assert sb["seeds"] == "2"
    assert float(sb["time_to_1.4x_s_mean"]) == pytest.approx(12.0)
    assert float(sb["time_to_1.4x_s_ci95"]) == pytest.approx(half_width([10.0, 14.0]))
    assert float(trad["time_to_1.4x_s_mean"]) == pytest.approx(33.0)
    speedups = [30 / 10, 36 / 14]  # paired by seed
    assert float(sb["speedup_vs_traditional_1.4x"]) == pytest.approx(statistics.mean(speedups))
    assert float(sb["speedup_vs_traditional_1.4x_ci95"]) == pytest.approx(half_width(speedups))
    assert float(sb["speedup_vs_kath18_1.4x"]) == pytest.approx(statistics.mean([22.5 / 10, 25 / 14]))
    # 1.1x = 0.275: SB crosses between (10 s, 0.35) and (20 s, 0.25): 10 + 0.75 * 10 = 17.5 s and 14 + 0.75 * 14.
    assert float(sb["time_to_1.1x_s_mean"]) == pytest.approx(statistics.mean([17.5, 24.5]))
    # One seed: value, no CI; paired with Traditional seed 0.
    assert float(stale["time_to_1.4x_s_mean"]) == pytest.approx(8.0)
    assert stale["time_to_1.4x_s_ci95"] == ""
    assert float(stale["speedup_vs_traditional_1.4x"]) == pytest.approx(30 / 8)
    # Not reached: Kath18 seed 1 ends at 0.30 > 0.275; StaleSB ends at 0.30 too.
    assert kath["time_to_1.1x_s_mean"] == "not reached"
    assert kath["reached_1.1x"] == "1/2"
    assert kath["speedup_vs_traditional_1.1x"] == "not reached"
    assert stale["reached_1.1x"] == "0/1"
    assert float(kath["time_to_1.4x_s_mean"]) == pytest.approx(23.75)
    assert float(trad["final_error_mean"]) == pytest.approx(0.25)
    assert float(trad["final_error_ci95"]) == pytest.approx(0.0)
    assert float(trad["train_time_s_mean"]) == pytest.approx(44.0)
    assert trad["speedup_vs_traditional_1.4x"] == ""


def test_report_markdown(reported: tuple[Path, str]) -> None:
    md = reported[1]
    for n in range(1, 9):
        assert f"## {n}. " in md
    assert "interpolat" in md and "selection_forwards + backprops" in md
    wall = table_row(md, "sb", "### By wall-clock")
    assert "12.0 ± 25.4" in wall
    assert f"{statistics.mean([3.0, 36 / 14]):.2f}x ± {half_width([3.0, 36 / 14]):.2f}x" in wall
    assert "8.0 (n=1)" in table_row(md, "stale-sb", "### By wall-clock")
    assert "not reached by 1/2 seeds" in table_row(md, "kath18", "### By wall-clock")
    assert "not reached by 1/1 seeds" in table_row(md, "stale-sb", "### By wall-clock")
    # Forwards: SB seeds reach 0.35 at 250 + 500 = 750 and 300 + 600 = 900 forwards.
    assert f"825 ± {half_width([750.0, 900.0]):,.0f}" in table_row(md, "sb", "### By forwards")
    assert "1,500 ± 0" in table_row(md, "traditional", "### By backprops")


def test_pareto_and_stale_sections(reported: tuple[Path, str]) -> None:
    md = reported[1]
    section = md[md.index("## 3.") : md.index("## 4.")]
    # Targets: 21 from 0.35 (1.4 x Traditional's final 0.25) down to 0.25, step 0.005. Computed by hand: StaleSB
    # reaches t at 8 + 160 (0.35 - t) s, SB seed 0 at 10 + 100 (0.35 - t): StaleSB is first down to
    # t = 0.35 - 1/30 = 0.3167 (targets 0.35 .. 0.32: 7 points), SB seed 0 below it (0.315 .. 0.25: 14 points;
    # StaleSB never gets under 0.30); every other run is later on every target.
    assert "for each of 21 target errors from 35.00 % (1.4x Traditional's final error" in section
    assert "down to 25.00 %" in section
    assert "| SB + StaleSB | 100.00 % | 72.00 % | 47.00 % | 80.00 % |" in section
    assert "| Traditional | 0.00 % | 10.00 % | 43.00 % | 6.00 % |" in section
    assert "| Kath18 | 0.00 % | 10.00 % | 8.00 % | 14.00 % |" in section
    assert "| stale-sb | 33.33 % |" in section and "| sb | 66.67 % |" in section
    assert "| traditional | 0.00 % |" in section and "| kath18 | 0.00 % |" in section
    stale = table_row(md, "stale-sb", "## 4.")
    assert "| sb |" in stale and "| 300 | 50.00 % |" in stale  # 300 skipped of 300 + 300 scoring forwards
    assert "16.0 vs 24.0 (33.33 %)" in stale  # train time saved: 1 - 16 / 24
    assert "8.0 vs 12.0 (33.33 %)" in stale  # time to 1.4x


def test_hard_examples_on_the_test_set(reported: tuple[Path, str]) -> None:
    """Paper §5.2 on hand-made test-set views: example i has confidence i / 100, so the bin around the 20th
    percentile (ranks 17.5-22.5 %) is examples 18..22."""
    md = reported[1]
    section = md[md.index("### Hard examples on the test set") : md.index("### Hard training examples")]
    assert "After epoch 10" in section and "figures/hard_examples_test.png" in section
    # Traditional (seed 0 only) is wrong on examples 0..49: error 50 %, so the bin of the error percentile is
    # 47.5-52.5 % = examples 48..52, of which Traditional has 50, 51, 52 right; SB seed 0 none, seed 1 none.
    assert "at Traditional's error percentile (50.0 %, ours)" in section
    assert "| traditional | 10 | 0.00 % (n=1) | 60.00 % (n=1) | 3.00 % |" in section  # correct only from 50 on
    sb = [3 / 5, 1 / 5]  # seed 0: 18, 19, 20 of 18..22 correct; seed 1: 18 only
    ci = f"{100 * statistics.mean(sb):.2f} % ± {100 * half_width(sb):.2f} %"
    assert f"| sb | 10, 10 | {ci} | 0.00 % ± 0.00 % | 29.00 % |" in section
    assert "| stale-sb |" not in section  # no test-set view saved
    paper = md[md.index("## 7.") : md.index("## 8.")]
    assert "same measure, test set: traditional 0.00 %, sb 40.00 %" in paper


def test_hard_set_section(reported: tuple[Path, str]) -> None:
    md = reported[1]
    section = md[md.index("### Hard training examples") : md.index("## 6.")]
    assert "seed 0" in section and "measured on seed 1" in section
    # Traditional seed 1 on examples 0..4: [0.1, 0.35, 0.2, 0.05, 0.9] -> 2/5 >= 0.3, 1/5 > 0.5.
    assert "| traditional | 1 | 40.00 % (n=1) | 20.00 % (n=1) |" in section
    sb = [0.6, 0.8]  # [0.3, 0.6, 0.1, 0.8, 0.2] -> 3/5; [0.9, 0.9, 0.9, 0.9, 0.1] -> 4/5
    assert f"| sb | 0, 1 | {100 * statistics.mean(sb):.2f} % ± {100 * half_width(sb):.2f} % |" in section
    assert "| stale-sb | 0 | 20.00 % (n=1) | 0.00 % (n=1) |" in section
    paper = md[md.index("## 7.") : md.index("## 8.")]
    assert "3.75x (n=1) (stale-sb)" in paper  # best speedup vs Traditional at 1.4x
    assert "stale-sb vs sb: 1.50x" in paper  # 12 s / 8 s
    assert "| sb to 1.4x | 1.5x | 1.2x | 3.5x | sb 2.79x ± 2.72x |" in paper  # the paper's Table 1 beside ours
    assert "| stale-sb to 1.1x | – | 1.5x | 4.3x | stale-sb not reached |" in paper
    assert "see each run's `config.json`" in paper
    assert "No run with label noise" in md


def test_files_figures_and_html_links(compare: Path) -> None:
    (compare / "command.txt").write_text("selective-backprop compare --seeds 0,1\n")
    md_path = write_report(compare)  # images=True: galleries from the tiny Fashion-MNIST (train_limit = N)
    md = md_path.read_text()
    assert md_path == compare / "report.md"
    assert "`selective-backprop compare --seeds 0,1`" in md
    expected = {
        "curves_time.png",
        "curves_backprops.png",
        "pareto.png",
        "selection_counts.png",
        "time_breakdown.png",
        "hard_examples_test.png",
        "gallery_most.png",
        "gallery_least.png",
    }
    written = {p.name for p in (compare / "figures").iterdir()}
    assert written == expected
    for name in expected:
        data = (compare / "figures" / name).read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) > 1000
    linked = set(re.findall(r"\]\((figures/[^)]+)\)", md))
    assert linked == {f"figures/{n}" for n in expected}
    page = (compare / "report.html").read_text()
    refs = re.findall(r'(?:src|href)="([^"]*)"', page)
    assert len(refs) == len(expected)
    for ref in refs:
        assert ref.startswith("data:image/png;base64,") or (compare / ref).is_file(), ref[:60]
    assert "<table>" in page and "12.0 ± 25.4" in page
    assert not list(compare.glob(".*.tmp")) and not list((compare / "figures").glob(".*.tmp"))


def test_galleries_skipped_with_a_note(reported: tuple[Path, str], compare: Path) -> None:
    assert "Image galleries skipped (`images=False`)" in reported[1]
    assert not (reported[0] / "figures" / "gallery_most.png").exists()
    cfg = json.loads((compare / "sb-s0" / "config.json").read_text())
    (compare / "sb-s0" / "config.json").write_text(json.dumps({**cfg, "dataset": "no-such-set"}))
    md = write_report(compare).read_text()
    assert "Image galleries skipped: could not load the training images" in md


# ----------------------------------------------------------------------------------------------------------
# Label noise, missing inputs, errors


def test_label_noise_section(tmp_path: Path) -> None:
    noisy = np.arange(10)  # 10 % of the examples
    sb_counts = np.ones(N, dtype=np.int64)
    sb_counts[noisy] = 5  # 50 of 140 backprops on noisy labels
    for name, strategy, counts in (("traditional-s0", "traditional", None), ("sb-s0", "sb", sb_counts)):
        make_run(
            tmp_path,
            name,
            strategy,
            0,
            [row(0, 0.9), row(10, 0.5), row(20, 0.4)],
            counts=counts,
            noisy=noisy,
            label_noise=0.1,
        )
    md = write_report(tmp_path, images=False).read_text()
    section = md[md.index("## 6.") : md.index("## 7.")]
    assert "### Label noise 0.1" in section
    assert "| traditional | 1 | 40.00 % (n=1) |" in section and "10.00 % | 10.00 % (n=1) | 1.00 |" in section
    assert f"| 10.00 % | {100 * 50 / 140:.2f} % (n=1) | {(50 / 140) / 0.1:.2f} |" in table_row(section, "sb", "###")


def test_missing_inputs_are_noted(tmp_path: Path) -> None:
    make_run(tmp_path, "sb-s0", "sb", 0, [row(0, 0.9), row(10, 0.5)])
    md = write_report(tmp_path, images=False).read_text()
    assert "No Traditional run: there is no target error" in md
    assert "No StaleSB run with a matching SB run" in md
    assert "No Traditional run with `train_confidence.npy`" in md
    assert "a single seed per label, so no band" in md
    rows = read_csv(tmp_path / "summary.csv")
    assert rows["sb"]["time_to_1.4x_s_mean"] == "no target"


def test_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(FileNotFoundError, match="no run folders"):
        write_report(tmp_path)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ImportError, match=r"pip install 'selective-backprop\[experiments\]'"):
        write_report(tmp_path)

