"""The allowed values of every :class:`~selective_backprop.experiments.config.TrainConfig` option, checked before
anything is made or loaded; a refusal is one line naming the command-line flag, the value received and the fix.

Example:
    >>> check_option("lr", float("nan"))
    Traceback (most recent call last):
    ...
    ValueError: --lr must be a finite number > 0, got nan
    >>> check_option("lr_milestones", (0.75, 0.5))
    Traceback (most recent call last):
    ...
    ValueError: --lr-milestones must be ascending numbers > 0, comma-separated (e.g. 0.5,0.75), got 0.75,0.5
"""

from __future__ import annotations

import math
import numbers
import os
import re
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from .data.registry import DATASETS
from .models import MODELS
from .strategies import STRATEGIES

__all__ = ["OPTIONS", "flag", "check_option", "check_options"]


class Rule:
    """One option's check: ``ok(value)`` and the requirement it states (``"a finite number > 0"``)."""

    def __init__(self, ok: Callable[[Any], bool], requirement: str, optional: bool = False) -> None:
        self.ok, self.requirement, self.optional = ok, requirement, optional

    def __call__(self, value: Any) -> bool:
        return (self.optional and value is None) or self.ok(value)


def _is_real(v: Any) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)


def _is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def number(low: float | None = None, high: float | None = None, *, low_open: bool = False, high_open: bool = False,
           optional: bool = False) -> Rule:  # fmt: skip
    """A finite real number in the interval given (``None``: unbounded on that side)."""

    def ok(v: Any) -> bool:
        if not _is_real(v):
            return False
        above = low is None or (v > low if low_open else v >= low)
        return above and (high is None or (v < high if high_open else v <= high))

    if low is not None and high is not None:
        text = f"a number in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    elif low is not None:
        text = f"a finite number {'>' if low_open else '>='} {low:g}"
    else:
        text = "a finite number"
    return Rule(ok, text, optional)


def integer(low: int, optional: bool = False) -> Rule:
    """A whole number ``>= low``."""
    return Rule(lambda v: _is_int(v) and v >= low, f"an integer >= {low}", optional)


def choice(options: Iterable[str], optional: bool = False) -> Rule:
    """One of ``options``."""
    names = tuple(options)
    return Rule(lambda v: v in names, f"one of {', '.join(names)}", optional)


def _milestones(v: Any) -> bool:
    if isinstance(v, (str, bytes)) or not isinstance(v, Sequence):
        return False
    return all(_is_real(m) and m > 0 for m in v) and all(a < b for a, b in zip(v, v[1:], strict=False))


_BOOL = Rule(lambda v: isinstance(v, bool), "true or false")
_FRACTION_UP_TO_1 = number(0, 1, low_open=True, optional=True)  # (0, 1]

OPTIONS: dict[str, Rule] = {
    "dataset": choice(DATASETS),
    "model": choice(MODELS),
    "strategy": choice(STRATEGIES),
    "epochs": integer(1),
    "batch_size": integer(1),
    "lr": number(0, low_open=True),
    "momentum": number(0, 1, high_open=True),
    "weight_decay": number(0),
    "lr_schedule": choice(("step", "cosine", "constant")),
    "lr_milestones": Rule(_milestones, "ascending numbers > 0, comma-separated (e.g. 0.5,0.75)"),
    "lr_milestone_unit": choice(("budget", "epochs")),
    "nesterov": _BOOL,
    "lr_gamma": number(0, low_open=True),
    "lr_unit": choice(("examples", "backprops")),
    "beta": number(0, low_open=True),
    "selectivity": _FRACTION_UP_TO_1,
    "target_time": _FRACTION_UP_TO_1,
    "history_size": integer(1),
    "staleness": integer(1),
    "prime_epochs": integer(0),
    "rate": _FRACTION_UP_TO_1,
    "threshold": number(),
    "presample": integer(1),
    "kath_score": choice(("upper-bound", "loss")),
    "kath_reweight": choice(("on", "off")),
    "prune_ratio": number(0, 1, high_open=True),
    "infobatch_delta": number(0, 1),
    "keep": number(0, 1, low_open=True),
    "composer_start": number(0, 1),
    "composer_end": number(0, 1),
    "composer_interrupt": integer(0),
    "score_mode": choice(("eval", "train"), optional=True),
    "wrn_depth": Rule(lambda v: _is_int(v) and v >= 10 and (v - 4) % 6 == 0, "6n + 4 with n >= 1 (10, 16, 22, 28, 40)"),
    "wrn_width": integer(1),
    "wrn_dropout": number(0, 1, high_open=True),
    "label_noise": number(0, 1),
    "crop_padding": integer(0, optional=True),
    "flip": Rule(_BOOL.ok, _BOOL.requirement, optional=True),
    "cutout": integer(0, optional=True),
    "eval_every": integer(1, optional=True),
    "time_budget": number(0, low_open=True, optional=True),
    "evals_per_epoch": integer(1, optional=True),
    "hard_epoch": integer(1),
    "train_limit": integer(1, optional=True),
    "test_limit": integer(1, optional=True),
    "seed": integer(0),
    "device": Rule(lambda v: isinstance(v, str) and re.fullmatch(r"auto|cpu|cuda(:\d+)?", v) is not None,
                   "auto, cpu, cuda or cuda:N"),  # fmt: skip
    "channels_last": _BOOL,
    "score_batch_size": integer(1, optional=True),
    "amp": choice(("off", "bf16", "fp16")),
    "score_precision": Rule(lambda v: v in ("auto", "fp32", "bf16", "fp16"), "one of auto, fp32, bf16, fp16 (int8 is "
                            "not offered: see selective_backprop.experiments.scoring)"),  # fmt: skip
    "score_scale": number(0, 1, low_open=True, optional=True),
    "compile": Rule(lambda v: isinstance(v, str) and v != "", "a torch.compile backend name (e.g. inductor)", True),
    "threads": integer(1, optional=True),
    "data_dir": Rule(lambda v: isinstance(v, (str, os.PathLike)) and str(v) != "", "a folder", optional=True),
    "download": _BOOL,
    "nonfinite": choice(("raise", "skip")),
    "dist_timeout": number(0, low_open=True),
}
"""Option name -> its rule; every field of ``TrainConfig`` has one (a test pins that)."""


def flag(name: str) -> str:
    """The command-line flag of option ``name``: ``lr_gamma`` -> ``--lr-gamma``."""
    return "--" + name.replace("_", "-")


def shown(value: Any) -> str:
    """``value`` as a user would type it: ``nan``, ``0.5,0.75``, ``'nope'``."""
    if isinstance(value, (list, tuple)):
        return ",".join(shown(v) for v in value)
    return repr(value)


def check_option(name: str, value: Any, as_flag: str | None = None) -> None:
    """Raise ``ValueError("--name must be <requirement>, got <value>")`` unless ``value`` is allowed for option
    ``name``; ``as_flag`` names another flag that gave the value (``--betas`` for ``beta``)."""
    rule = OPTIONS[name]
    if not rule(value):
        raise ValueError(f"{as_flag or flag(name)} must be {rule.requirement}, got {shown(value)}")


def check_options(values: dict[str, Any], sb_family: Sequence[str]) -> None:
    """Check every option in ``values`` (in order), then the rules between options.

    Raises:
        ValueError: one line naming the first bad option's flag, the value and what is allowed.
    """
    for name, value in values.items():
        check_option(name, value)
    milestones = values["lr_milestones"]
    if values["lr_milestone_unit"] == "budget" and any(m >= 1 for m in milestones):
        raise ValueError(f"--lr-milestones must be fractions in (0, 1) of the budget, or absolute epochs with "
                         f"--lr-milestone-unit epochs, got {shown(milestones)}")  # fmt: skip
    if values["nesterov"] and values["momentum"] == 0:
        raise ValueError("--nesterov needs --momentum > 0, got 0")
    if values["composer_start"] > values["composer_end"]:
        raise ValueError(f"--composer-start must be <= --composer-end, got {shown(values['composer_start'])} > "
                         f"{shown(values['composer_end'])}")  # fmt: skip
    if values["target_time"] is not None:
        if values["strategy"] not in sb_family:
            raise ValueError(f"--target-time needs --strategy {' or '.join(sb_family)}, got --strategy "
                             f"{values['strategy']}")  # fmt: skip
        if values["selectivity"] is not None:
            raise ValueError("give --selectivity or --target-time, not both")
