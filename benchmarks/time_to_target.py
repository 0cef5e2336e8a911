"""Time to target: is SB >= 2x faster than Traditional, StaleSB >= 2.5x (and >= 1.26x over SB), SB faster than Kath18?

Claim (Jiang et al. 2019; issue "Performance: measured speedups near the cost-model limit"): in training wall-clock
time to reach 1.2x and 1.4x Traditional's final test error (Fashion-MNIST, small CNN), SB is >= 2.0x faster than
Traditional, StaleSB >= 2.5x faster than Traditional and >= 1.26x faster than SB (the paper's "further 26 %"), and
SB is faster than Kath18. "SB" in the checks is the SB beta with the best mean speedup vs Traditional at the 1.4x
target (printed); StaleSB is also checked against the SB of its own beta, the paper's comparison, when that differs.

Grid (one label per line of the table): Traditional; SB at beta 1, 2, 3 (``--betas``); StaleSB (n = 3, beta = 3;
``--staleness``, ``--stale-beta``); Kath18 (presample 3b); random selection at SB's expected selectivity
1/(beta+1) = 0.25 for beta = 3 (``--random-rate``: SB's cost without its signal); seeds 0, 1, 2; 8 epochs with the
demo's schedule (SGD lr 0.05, x0.1 at 50 % and 75 % of the budget, counted in ``--lr-unit``). Runs go one after the
other in this process, seed by seed (so drift on a shared machine hits every strategy of a seed alike), each into
``--out/<label>-s<seed>``. A run whose ``final.json`` exists is reused without training; an interrupted run
(Ctrl-C, or a killed process after its first epoch) resumes from its checkpoint: rerun the same command.
``selective-backprop report <--out>`` writes curves and the Pareto front of the same folder.

Run by hand:   .venv/bin/python benchmarks/time_to_target.py [--seeds 0,1,2] [--epochs 8] [--device cpu]
Quick check:   .venv/bin/python benchmarks/time_to_target.py --train-limit 2000 --test-limit 500 --epochs 2 --seeds 0
               --out /tmp/ttt   (about a minute)
Runtime: on this project's 2-core CPU (torch 2.13.0+cpu, 2 threads) one full Fashion-MNIST run takes about 2-4 min
(Traditional the slowest), so the default grid of 7 labels x 3 seeds = 21 runs takes about 1 h (plus ~10 s of
data loading and test evaluations per run, which are not counted as training time). Other processes on the
2 cores change timings several-fold (seen while writing this: one epoch took 3.5 s, the next 10 s), so run it on an
otherwise idle machine and compare ``train s`` with ``epoch speedup`` against ``benchmarks/cost_model.py``.

Prints a fixed-width table per label (final error and times as mean +- 95 % t-interval over seeds; speedups paired
by seed; a group is "not reached" when any seed never gets to the target), then MET / MISSED for each target.
Writes ``results.json`` (config, environment, per-run and per-label numbers, checks) and ``command.txt`` to --out.
Speed is never asserted in tests: timings depend on the machine, so this script only measures and prints.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from selective_backprop.experiments.analysis import (
    TARGETS,
    Estimate,
    TimeToTarget,
    estimate,
    paired_speedups,
    read_metrics,
    target_errors,
    time_to_target,
)
from selective_backprop.experiments.config import TrainConfig
from selective_backprop.experiments.errors import Interrupted
from selective_backprop.experiments.runfolder import environment, write_atomic
from selective_backprop.experiments.setup import resolve_device
from selective_backprop.experiments.strategies import STRATEGIES as TRAIN_STRATEGIES
from selective_backprop.experiments.trainer import Trainer

FACTORS = TARGETS  # targets: these multiples of Traditional's final error (mean over its seeds): 1.1, 1.2, 1.4
CHECK_FACTOR = 1.4  # the target at which the best SB beta is chosen
STRATEGIES = ("traditional", "sb", "stale-sb", "kath18", "random")
STRATEGIES_ALL = tuple(TRAIN_STRATEGIES)

Times = dict[int, float | None]  # seed -> seconds (None: never reached)


@dataclass
class Spec:
    """One label of the grid: a strategy and the TrainConfig fields that set it apart."""

    label: str
    strategy: str
    overrides: dict[str, Any] = field(default_factory=dict)
    variant: bool = False  # from --variant: in the tables, not in the MET / MISSED checks


def parse_variant(text: str) -> Spec:
    """``LABEL:strategy=sb,key=value,...`` (TrainConfig fields; values read as JSON, else as text) -> a Spec."""
    label, sep, body = text.partition(":")
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    overrides: dict[str, Any] = {}
    for item in body.split(",") if sep else []:
        key, eq, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not eq or key not in fields:
            raise ValueError(f"--variant {text!r}: {item!r} is not key=value with a TrainConfig field as key")
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value
    strategy = overrides.pop("strategy", None)
    if not label or strategy not in STRATEGIES_ALL:
        raise ValueError(
            f"--variant {text!r}: expected LABEL:strategy=<one of {','.join(STRATEGIES_ALL)}>,key=value,..."
        )
    return Spec(label, strategy, overrides, variant=True)


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v.strip()]


def grid(args: argparse.Namespace) -> list[Spec]:
    chosen = [s.strip() for s in args.strategies.split(",") if s.strip()]
    unknown = sorted(set(chosen) - set(STRATEGIES))
    if unknown:
        raise ValueError(f"--strategies: unknown {unknown}; choose from {','.join(STRATEGIES)}")
    specs = []
    if "traditional" in chosen:
        specs.append(Spec("traditional", "traditional"))
    if "sb" in chosen:
        specs += [Spec(f"sb-b{b:g}", "sb", {"beta": b}) for b in _floats(args.betas)]
    if "stale-sb" in chosen:
        specs.append(Spec(f"stale-sb-n{args.staleness}-b{args.stale_beta:g}", "stale-sb",
                          {"beta": args.stale_beta, "staleness": args.staleness}))  # fmt: skip
    if "kath18" in chosen:
        specs.append(Spec("kath18", "kath18"))
    if "random" in chosen:
        specs.append(Spec(f"random-r{args.random_rate:g}", "random", {"rate": args.random_rate}))
    specs += [parse_variant(v) for v in args.variant]
    if len({s.label for s in specs}) < len(specs):
        raise ValueError(f"labels must differ: {[s.label for s in specs]}")
    return specs


def config_for(args: argparse.Namespace, spec: Spec, seed: int) -> TrainConfig:
    base = dict(dataset="fashion-mnist", model="small-cnn", strategy=spec.strategy, seed=seed, epochs=args.epochs,
                train_limit=args.train_limit, test_limit=args.test_limit, device=args.device, lr_unit=args.lr_unit,
                eval_every=args.eval_every)  # fmt: skip
    return TrainConfig(**{**base, **spec.overrides})


def check_config(config: TrainConfig, folder: Path) -> None:
    """Refuse a run folder made with another config: its numbers would not be this grid's."""
    saved = folder / "config.json"
    if saved.exists():
        old, new = json.loads(saved.read_text()), json.loads(json.dumps(config.to_json()))
        defaults = json.loads(json.dumps(TrainConfig().to_json()))  # fields added since the run: their defaults
        diff = sorted(k for k in new if old.get(k, defaults[k]) != new[k])
        if diff:
            raise ValueError(f"{folder} holds a run with another config (differs in {diff}); "
                             "pass another --out or delete that folder")  # fmt: skip


def run_or_reuse(config: TrainConfig, folder: Path) -> bool:
    """Train ``config`` into ``folder`` unless its run is finished (``final.json``); True when reused."""
    if (folder / "final.json").exists():
        return True
    # Without a checkpoint there is nothing to resume: start afresh (a stale metrics.jsonl would get a 2nd row 0).
    has_checkpoint = (folder / "checkpoint.pt").exists()
    Trainer(config, folder, resume=True, overwrite=not has_checkpoint, progress=False).run()
    return False


def time_after_epoch(rows: list[dict[str, Any]], epoch: int) -> float | None:
    """Training seconds from the end of ``epoch`` to the end of the run (None if the run has no later epoch)."""
    at_epoch = [r["wall_train_s"] for r in rows if r["epoch"] == epoch]  # the last: after the queue's flush
    if not at_epoch or rows[-1]["epoch"] <= epoch:
        return None
    return rows[-1]["wall_train_s"] - at_epoch[-1]


Rows = dict[str, dict[int, list[dict[str, Any]]]]  # label -> seed -> evaluation rows


def reach_times(found: dict[tuple[str, float], TimeToTarget]) -> dict[float, dict[str, Times]]:
    """factor -> label -> seed -> training seconds to the target error (interpolated; None if never reached)."""
    out: dict[float, dict[str, Times]] = {}
    for (label, factor), t in found.items():
        out.setdefault(factor, {})[label] = t.per_seed
    return out


def label_stats(
    specs: list[Spec], rows: Rows, targets: dict[float, float], found: dict[tuple[str, float], TimeToTarget], prime: int
) -> dict[str, dict[str, Any]]:
    """Per label: final error, train time, backprop share, epoch speedups and time to each target (mean +- CI)."""
    labels = [s.label for s in specs]
    trad = "traditional" if "traditional" in labels else None
    kath = "kath18" if "kath18" in labels else None

    def per_seed(label: str, value: Any) -> Times:
        return {seed: value(r) for seed, r in rows[label].items()}

    def vs(base: str | None, label: str, times: dict[str, Times]) -> Estimate | None:
        return None if base is None or base == label else estimate(paired_speedups(times[base], times[label]))

    train = {lb: per_seed(lb, lambda r: r[-1]["wall_train_s"]) for lb in labels}
    steady = {lb: per_seed(lb, lambda r: time_after_epoch(r, prime)) for lb in labels}
    out = {}
    for spec in specs:
        lb, runs = spec.label, rows[spec.label]
        n_examples = {seed: r[-1]["examples_seen"] for seed, r in runs.items()}
        out[lb] = {
            "strategy": spec.strategy, "overrides": spec.overrides, "variant": spec.variant, "seeds": sorted(runs),
            "final_error": estimate([r[-1]["test_error"] for r in runs.values()]),
            "train_time_s": estimate(list(train[lb].values())),
            "backprop_share": estimate([r[-1]["backprops"] / n_examples[s] for s, r in runs.items()]),
            "epoch_speedup_vs_traditional": vs(trad, lb, train),
            f"epoch_speedup_after_epoch_{prime}_vs_traditional": vs(trad, lb, steady),
            "targets": {
                f: {"target_error": targets[f], "time_s": found[lb, f].time, "time_s_per_seed": found[lb, f].per_seed,
                    "vs_traditional": found[lb, f].vs.get(trad or ""), "vs_kath18": found[lb, f].vs.get(kath or "")}
                for f in targets
            },
        }  # fmt: skip
    return out


def fmt(e: Estimate | None, spec: str = ".1f", unit: str = "", scale: float = 1.0) -> str:
    if e is None:
        return "-"
    if e.mean is None:
        return f"not reached ({e.missing}/{e.n})"
    half = "" if e.half_width is None else f"±{e.half_width * scale:{spec}}"
    return f"{e.mean * scale:{spec}}{half}{unit}"


def fmt_speedup(own: Estimate, e: Estimate | None) -> str:
    if e is not None and e.mean is None and own.mean is not None:
        return "base not reached"
    return "not reached" if own.mean is None else fmt(e, ".2f", "x")


def print_columns(header: list[str], rows: list[list[str]]) -> None:
    """Fixed-width columns, each as wide as its widest cell (airbench's print_columns, widths from the data)."""
    widths = [max(len(c) for c in col) for col in zip(header, *rows, strict=True)]
    for row in [header, ["-" * w for w in widths], *rows]:
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))))


def print_tables(stats: dict[str, dict[str, Any]], prime: int) -> None:
    rows = []
    for lb, s in stats.items():
        rows.append([lb, str(len(s["seeds"])), fmt(s["final_error"], ".2f", "%", 100), fmt(s["train_time_s"]),
                     fmt(s["backprop_share"], ".1f", "%", 100), fmt(s["epoch_speedup_vs_traditional"], ".2f", "x"),
                     fmt(s[f"epoch_speedup_after_epoch_{prime}_vs_traditional"], ".2f", "x")])  # fmt: skip
    print_columns(["label", "seeds", "final error", "train s", "backprop", "epoch speedup",
                   f"after epoch {prime}"], rows)  # fmt: skip
    print()
    header, rows = ["label"], [[lb] for lb in stats]
    for f in FACTORS:
        header += [f"time to {f}x (s)", "vs Traditional", "vs Kath18"]
        for row, s in zip(rows, stats.values(), strict=True):
            t = s["targets"].get(f)
            if t is None:
                row += ["-"] * 3
                continue
            row += [fmt(t["time_s"]), fmt_speedup(t["time_s"], t["vs_traditional"]),
                    fmt_speedup(t["time_s"], t["vs_kath18"])]  # fmt: skip
    print_columns(header, rows)


def best_sb(stats: dict[str, dict[str, Any]]) -> str | None:
    """The SB label with the highest mean speedup vs Traditional at the CHECK_FACTOR target (not reached: lowest)."""

    def at_check(lb: str) -> float:
        e = stats[lb]["targets"].get(CHECK_FACTOR, {}).get("vs_traditional")
        return -1.0 if e is None or e.mean is None else e.mean

    return max(
        (lb for lb, s in stats.items() if s["strategy"] == "sb" and not s["variant"]), key=at_check, default=None
    )


def checks(stats: dict[str, dict[str, Any]], times: dict[float, dict[str, Times]]) -> list[dict[str, Any]]:
    """The issue's targets at each target error: MET when the mean paired speedup clears the threshold."""
    best = best_sb(stats)
    stale = next((lb for lb, s in stats.items() if s["strategy"] == "stale-sb" and not s["variant"]), None)
    same = next((lb for lb, s in stats.items() if s["strategy"] == "sb" and stale is not None and not s["variant"]
                 and s["overrides"]["beta"] == stats[stale]["overrides"]["beta"]), None)  # fmt: skip
    kath = "kath18" if "kath18" in stats else None
    out = []
    for f in FACTORS:
        if f not in times:
            continue

        def paired(base: str | None, label: str | None, f: float = f) -> Estimate | None:
            return None if base is None or label is None else estimate(paired_speedups(times[f][base], times[f][label]))

        trad = "traditional" if "traditional" in stats else None
        items = [
            ("SB >= 2.0x vs Traditional", best, trad, 2.0, False),
            ("StaleSB >= 2.5x vs Traditional", stale, trad, 2.5, False),
            ("StaleSB >= 1.26x vs SB", stale, best, 1.26, False),
            ("SB > Kath18", best, kath, 1.0, True),
        ]
        if same is not None and same != best:
            items.insert(3, ("StaleSB >= 1.26x vs SB, same beta", stale, same, 1.26, False))
        for name, label, base, threshold, strict in items:
            e = paired(base, label)
            met = None if e is None or e.mean is None else (e.mean > threshold if strict else e.mean >= threshold)
            out.append({"factor": f, "check": name, "label": label, "baseline": base, "threshold": threshold,
                        "speedup": e, "met": met})  # fmt: skip
    return out


def print_checks(results: list[dict[str, Any]], best: str | None) -> None:
    if not results:
        print("targets: no Traditional runs, nothing to check")
        return
    print(f"targets (SB = {best}: the SB beta with the best mean speedup vs Traditional at the {CHECK_FACTOR}x target)")
    for c in results:
        e = c["speedup"]
        if e is None:
            verdict, value = "SKIPPED", "a strategy it compares was not run (--strategies)"
        else:
            verdict = "MISSED" if not c["met"] else "MET"
            value = f"{c['label']} vs {c['baseline']}: " + ("not reached" if e.mean is None else fmt(e, ".2f", "x"))
            lo = None if e.mean is None or e.half_width is None else e.mean - e.half_width
            hi = None if lo is None else e.mean + e.half_width
            if lo is not None and lo <= c["threshold"] <= hi:
                value += " (CI spans the threshold)"
        print(f"  at {c['factor']}x  {c['check']:<34} {verdict:<8} {value}")


def to_json(obj: Any) -> Any:
    if isinstance(obj, Estimate):
        return dataclasses.asdict(obj)
    if isinstance(obj, dict):
        return {str(k): to_json(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [to_json(v) for v in obj]
    return obj


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default: 0,1,2)")
    parser.add_argument("--epochs", type=int, default=8, help="training budget in epochs (default: 8, the demo's)")
    parser.add_argument("--train-limit", type=int, default=None, help="first N training examples (quick checks)")
    parser.add_argument("--test-limit", type=int, default=None, help="first N test examples (quick checks)")
    parser.add_argument("--betas", default="1,2,3", help="SB betas (default: 1,2,3)")
    parser.add_argument("--stale-beta", type=float, default=3.0, help="StaleSB beta (default: 3)")
    parser.add_argument("--staleness", type=int, default=3, help="StaleSB n (default: 3)")
    parser.add_argument("--random-rate", type=float, default=0.25, help="random's rate (default: 0.25 = 1/(3+1))")
    parser.add_argument("--strategies", default=",".join(STRATEGIES), help="subset of " + ",".join(STRATEGIES))
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda (default: auto)")
    parser.add_argument("--lr-unit", default="examples", help="LR schedule counts examples | backprops")
    parser.add_argument("--eval-every", type=int, default=None,
                        help="also evaluate every N examples seen: finer time-to-target interpolation (default: "
                        "once per epoch; evaluation is not training time but costs wall clock)")  # fmt: skip
    parser.add_argument("--variant", action="append", default=[], metavar="LABEL:strategy=S,key=value,...",
                        help="an extra label with its own TrainConfig settings, e.g. "
                        "sb-fast:strategy=sb,prime_epochs=0,score_batch_size=512 (repeatable; in the tables, "
                        "not in the checks); finished runs in --out are reused, so variants can be added "
                        "later")  # fmt: skip
    parser.add_argument("--out", default="runs/time_to_target", help="folder of all runs and results.json")
    args = parser.parse_args()
    try:
        specs = grid(args)
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
        if not specs or not seeds:
            raise ValueError(f"nothing to run: --strategies {args.strategies!r}, --seeds {args.seeds!r}")
        configs = {(s.label, seed): config_for(args, s, seed) for seed in seeds for s in specs}  # validates early
        out = Path(args.out)
        for (label, seed), config in configs.items():
            check_config(config, out / f"{label}-s{seed}")
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    command = " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv])
    write_atomic(out / "command.txt", lambda f: f.write((command + "\n").encode()))

    rows: Rows = {s.label: {} for s in specs}
    runs = []
    for i, ((label, seed), config) in enumerate(configs.items(), 1):
        name = f"{label}-s{seed}"
        print(f"[{i}/{len(configs)}] {name}", flush=True)
        try:
            reused = run_or_reuse(config, out / name)
        except Interrupted as e:
            print(f"\n{e}; rerun the same command to resume", file=sys.stderr)
            return e.exit_code
        rows[label][seed] = read_metrics(out / name)
        last = rows[label][seed][-1]
        runs.append({"name": name, "label": label, "seed": seed, "reused": reused, "final_error": last["test_error"],
                     "train_time_s": last["wall_train_s"], "backprops": last["backprops"],
                     "environment": json.loads((out / name / "environment.json").read_text())})  # fmt: skip
        if reused:
            print(f"  reused (final.json exists): error {last['test_error']:.4f}, train {last['wall_train_s']:.1f}s")

    env = environment(resolve_device(args.device))
    prime = TrainConfig().prime_epochs
    trad = rows.get("traditional")
    base_error = statistics.fmean(r[-1]["test_error"] for r in trad.values()) if trad else None
    targets = target_errors([r[-1]["test_error"] for r in trad.values()]) if trad else {}
    baselines = [b for b in ("traditional", "kath18") if b in rows]
    found = time_to_target(rows, targets, baselines=baselines)  # the one time-to-target of the project
    reach = reach_times(found)
    stats = label_stats(specs, rows, targets, found, prime)
    check_results = checks(stats, reach)
    best = best_sb(stats)

    print()
    print(f"fashion-mnist small-cnn, {args.epochs} epochs, seeds {seeds}, train limit {args.train_limit}, "
          f"test limit {args.test_limit}, lr unit {args.lr_unit}; {env['device']} ({env['device_name']}), "
          f"torch {env['torch']}, {env['threads']} threads, {env['date']}")  # fmt: skip
    if base_error is None:
        print("no Traditional runs: no targets, no speedups")
    else:
        print(f"Traditional's final error {base_error:.2%} -> targets "
              + ", ".join(f"{f}x = {t:.2%}" for f, t in targets.items()))  # fmt: skip
    print(
        "means ± 95 % t-interval over seeds; speedups paired by seed; train s excludes evaluation; "
        f"epoch speedup = Traditional's train time / this label's, whole run and after the primed epoch {prime}"
    )
    print()
    print_tables(stats, prime)
    print()
    print_checks(check_results, best)

    results = {
        "claim": __doc__.splitlines()[0], "command": command, "arguments": vars(args),
        "config": {lb_seed[0]: configs[lb_seed].to_json() for lb_seed in configs if lb_seed[1] == seeds[0]},
        "environment": env, "traditional_final_error": base_error, "targets": targets, "runs": runs,
        "labels": stats, "best_sb": best, "checks": check_results,
    }  # fmt: skip
    write_atomic(out / "results.json", lambda f: f.write(json.dumps(to_json(results), indent=2).encode()))
    print(f"\nresults: {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
