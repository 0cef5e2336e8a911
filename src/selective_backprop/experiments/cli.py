"""Command line: ``selective-backprop train|compare|report`` (also ``python -m selective_backprop``).

``train`` runs one experiment into a folder. ``compare`` runs a grid of strategies x seeds (x betas) into one
folder, prints a table (final test error, training time, time to reach 1.1x, 1.2x and 1.4x Traditional's final
error, and the speedup over Traditional), writes it as ``summary.csv`` and writes the report. ``report`` (re)writes
the report of a folder.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import sys
import typing
from pathlib import Path
from typing import Any, NoReturn

import torch.distributed as dist

from .config import TrainConfig
from .errors import Interrupted, RunExistsError, exit_code
from .options import check_option
from .presets import PRESETS, preset_values
from .report.runs import load_runs
from .report.summary import write_summary
from .runfolder import write_atomic
from .setup import launched_distributed
from .strategies import STRATEGIES
from .trainer import Trainer

PAPER_NOISE = "0.01,0.1,0.2"
"""The paper's label-noise levels (§5.4: 1 % = 500 of 50,000, 10 %, 20 %)."""

class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line (the option, the value, where to look), not the 40-line usage."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}; see {self.prog} --help\n")


def _add_config_args(parser: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        if f.name in skip:
            continue
        flag = "--" + f.name.replace("_", "-")
        kind = hints[f.name]
        help_text = f"{f.metadata.get('help', '')} (default: {f.default})"
        if kind in (bool, bool | None):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=help_text)
        elif f.name == "lr_milestones":
            parser.add_argument(flag, type=_milestones, default=f.default, help=help_text + "; comma-separated")
        else:
            base = next(t for t in typing.get_args(kind) or (kind,) if t is not type(None))
            parser.add_argument(flag, type=base, default=f.default, help=help_text)


def _numbers(text: str, kind: type, flag: str) -> tuple[Any, ...]:
    """``"0.5,0.75"`` -> ``(0.5, 0.75)``; ``ValueError`` naming ``flag`` and the text when an item is not a number."""
    try:
        return tuple(kind(v) for v in text.split(",") if v.strip())
    except ValueError:
        what = "integers" if kind is int else "numbers"
        raise ValueError(f"{flag} must be comma-separated {what} (e.g. {'0,1,2' if kind is int else '0.5,0.75'}), "
                         f"got {text!r}") from None  # fmt: skip


def _milestones(text: str) -> tuple[float, ...]:
    try:
        return _numbers(text, float, "--lr-milestones")
    except ValueError as e:  # argparse shows an ArgumentTypeError's message as it is
        raise argparse.ArgumentTypeError(str(e).removeprefix("--lr-milestones ")) from None


def _config(args: argparse.Namespace, **overrides: Any) -> TrainConfig:
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if hasattr(args, f.name)}
    return TrainConfig(**{**values, **overrides})


def _run(config: TrainConfig, out: Path, args: argparse.Namespace) -> dict[str, Any]:
    trainer = Trainer(config, out, resume=args.resume, overwrite=args.overwrite, progress=not args.quiet)
    if (out / "final.json").exists() and trainer.epoch >= config.epochs:
        return json.loads((out / "final.json").read_text())
    return trainer.run()


def cmd_train(args: argparse.Namespace) -> int:
    out = Path(args.out or f"runs/{args.strategy}-s{args.seed}")
    summary = _run(_config(args), out, args)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"run folder: {out}")
        print(json.dumps(summary, indent=2))
    return 0


def _grid(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every (strategy, beta, label noise, seed) of the comparison, with its run name and config overrides."""
    strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    betas = _numbers(args.betas, float, "--betas") if args.betas else (args.beta,)
    noises = _numbers(args.label_noise, float, "--label-noise") if args.label_noise else (0.0,)
    seeds = _numbers(args.seeds, int, "--seeds")
    for name, values, flag in (("strategy", strategies, "--strategies"), ("beta", betas, "--betas"),
                               ("label_noise", noises, "--label-noise"), ("seed", seeds, "--seeds")):  # fmt: skip
        if not values:
            raise ValueError(f"{flag} must list at least one value, comma-separated")
        for value in values:
            check_option(name, value, as_flag=flag)
    several_betas = len(betas) > 1 and args.selectivity is None
    grid = []
    for strategy in strategies:
        uses_beta = strategy in STRATEGIES and STRATEGIES[strategy].uses_beta and args.selectivity is None
        for beta in betas if uses_beta else (None,):
            for noise in noises:
                for seed in seeds:
                    label = strategy + (f"-b{beta:g}" if beta is not None and several_betas else "")
                    label += f"-n{noise:g}" if len(noises) > 1 or noise > 0 else ""
                    overrides: dict[str, Any] = {"strategy": strategy, "seed": seed, "label_noise": noise}
                    if beta is not None:
                        overrides["beta"] = beta
                    grid.append({"name": f"{label}-s{seed}", "label": label, "noise": noise, "strategy": strategy,
                                 "overrides": overrides})  # fmt: skip
    return grid


def cmd_compare(args: argparse.Namespace) -> int:
    if launched_distributed():
        raise ValueError("compare runs its grid in one process; under torchrun use `selective-backprop train`")
    out = Path(args.out)
    grid = _grid(args)
    configs = [_config(args, **run["overrides"]) for run in grid]  # every value checked before the folder is made
    if out.exists() and any(out.iterdir()) and not (args.resume or args.overwrite):
        raise RunExistsError(f"compare folder {out} already exists; pass --resume to finish it or --overwrite")
    if args.overwrite and out.exists():
        import shutil

        shutil.rmtree(out)
        args.overwrite = False
    out.mkdir(parents=True, exist_ok=True)
    command = "selective-backprop " + " ".join(shlex.quote(a) for a in args.argv)
    write_atomic(out / "command.txt", lambda f: f.write((command + "\n").encode()))
    for i, (run, config) in enumerate(zip(grid, configs, strict=True), 1):
        print(f"[{i}/{len(grid)}] {run['name']}", flush=True)
        _run(config, out / run["name"], args)
    table = write_summary(out, [r for r in load_runs(out) if r.name in {run["name"] for run in grid}])
    print()
    print(table)
    if not args.no_report:
        print(f"\nreport: {_report(out)}")
    print(f"run folder: {out}")
    return 0


def _report(out: Path) -> Path:
    from .report import write_report

    md = write_report(out)
    return md.with_suffix(".html")


def cmd_report(args: argparse.Namespace) -> int:
    from .report import write_report

    md = write_report(args.run_dir, images=not args.no_images)
    print(f"report: {md} and {md.with_suffix('.html')}")
    return 0


TRAIN_PRESETS = ("paper", "paper-compressed", "static-1-5")
"""Presets that set one run's options; the others are ``compare`` grids."""


def build_parser(preset: dict[str, Any] | None = None) -> argparse.ArgumentParser:
    """The command-line parser; ``preset`` (from :func:`~.presets.preset_values`) replaces argument defaults, so
    flags given explicitly win over the preset."""
    parser = _Parser(prog="selective-backprop", description=__doc__.splitlines()[0])
    presets_help = "; ".join(f"{k}: {v}" for k, v in PRESETS.items())
    sub = parser.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--resume", action="store_true", help="continue an existing run folder")
    common.add_argument("--overwrite", action="store_true", help="delete an existing run folder first")
    common.add_argument("--quiet", action="store_true", help="no progress bar; one log line per epoch")

    p_train = sub.add_parser("train", parents=[common], help="run one experiment")
    p_train.add_argument("--out", default=None, help="run folder (default: runs/<strategy>-s<seed>)")
    p_train.add_argument("--preset", choices=TRAIN_PRESETS, default=None, help=presets_help)
    _add_config_args(p_train)
    p_train.set_defaults(func=cmd_train)

    p_cmp = sub.add_parser("compare", parents=[common], help="strategies x seeds (x betas) side by side")
    p_cmp.add_argument("--out", default="runs/compare", help="folder for all runs (default: runs/compare)")
    p_cmp.add_argument("--strategies", default="traditional,sb,stale-sb,kath18",
                       help="comma-separated strategies (default: the paper's comparison)")  # fmt: skip
    p_cmp.add_argument("--seeds", default="0", help="comma-separated seeds (default: 0)")
    p_cmp.add_argument("--betas", default=None, help="comma-separated betas for sb/stale-sb/random (default: --beta)")
    p_cmp.add_argument("--preset", choices=list(PRESETS), default=None, help=presets_help)
    p_cmp.add_argument("--no-report", action="store_true", help="skip writing report.md/report.html at the end")
    p_cmp.add_argument(
        "--label-noise", nargs="?", const=PAPER_NOISE, default=None,
        help=f"comma-separated label-noise fractions; alone, the paper's grid {PAPER_NOISE} (the slides' 0.001 "
        "can be given: 0.001,0.1,0.2); default: no noise",
    )  # fmt: skip
    _add_config_args(p_cmp, skip=("strategy", "seed", "label_noise"))
    p_cmp.set_defaults(func=cmd_compare, evals_per_epoch=None)  # auto: 4 a epoch on a small test set

    if preset:
        fields = {f.name for f in dataclasses.fields(TrainConfig)}
        p_train.set_defaults(**{k: v for k, v in preset.items() if k in fields})
        p_cmp.set_defaults(**{k: v for k, v in preset.items() if k not in ("strategy", "seed", "label_noise")})

    p_rep = sub.add_parser("report", help="write report.md, report.html, figures/ and summary.csv of a folder")
    p_rep.add_argument("run_dir", help="a compare folder (or a single run folder)")
    p_rep.add_argument("--no-images", action="store_true", help="skip the example galleries (no dataset load)")
    p_rep.set_defaults(func=cmd_report)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    if getattr(args, "preset", None):  # parsed again with the preset's values as defaults: explicit flags win
        args = build_parser(preset_values(args.preset, args.dataset)).parse_args(argv)
    args.argv = argv
    try:
        return args.func(args)
    except Exception as e:
        code = exit_code(e)  # see selective_backprop.experiments.errors
        if code is None:
            raise
        print(f"\n{e}; continue with --resume" if isinstance(e, Interrupted) else f"error: {e}", file=sys.stderr)
        return code


def leave_distributed(code: int) -> NoReturn:
    """End a torchrun rank: destroy the process group, flush, and exit with ``code`` without interpreter teardown.

    Why not a plain ``sys.exit``: ``DistributedDataParallel`` keeps a C++ reference to the gloo process group, so
    ``destroy_process_group`` cannot stop its three threads (two ``pt_gloo_runloop`` workers, ``gloo_tcp_loop``);
    they are still running while the interpreter and then the C++ runtime tear down, and a rank that finished could
    abort there ("terminate called without an active exception", launcher exit non-zero). Everything a run writes
    is on disk (atomic writes) and stdout/stderr are flushed before ``os._exit``, which skips that teardown.
    """
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def run() -> None:
    """Console entry point (``selective-backprop``, ``python -m selective_backprop``): :func:`main`, then exit;
    a torchrun rank leaves through :func:`leave_distributed`."""
    code = main()
    if launched_distributed():
        leave_distributed(code)
    sys.exit(code)


if __name__ == "__main__":
    run()
