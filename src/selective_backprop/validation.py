"""Argument checks shared by the selectors and policies: each raises when the object is built, naming the argument,
the value received and the fix -- never epochs later inside training.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection
from typing import Any

__all__ = ["is_int", "check_int", "check_number", "check_choice", "check_callable", "check_bool"]


def is_int(value: Any, low: int) -> bool:
    """Whether ``value`` is an ``int`` (not a ``bool``) of at least ``low``."""
    return not isinstance(value, bool) and isinstance(value, int) and value >= low


def check_int(name: str, value: Any, low: int, fix: str = "") -> int:
    """``value`` as an int ``>= low``, else ``ValueError`` (``TypeError`` for a non-int)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int >= {low}, got {value!r} ({type(value).__name__}){fix and '; ' + fix}")
    if value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}{fix and '; ' + fix}")
    return value


def check_number(
    name: str,
    value: Any,
    low: float = -math.inf,
    high: float = math.inf,
    *,
    low_open: bool = False,
    high_open: bool = False,
    fix: str = "",
) -> float:
    """``value`` as a finite float in the interval (``low_open``/``high_open`` exclude an end), else an error.

    Raises:
        TypeError: for a non-number (``bool`` included).
        ValueError: for NaN, an infinity or a value outside the interval.
    """
    interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    what = f"{name} must be a finite number in {interval}"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{what}, got {value!r} ({type(value).__name__}){fix and '; ' + fix}")
    inside = (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    if not math.isfinite(value) or not inside:
        raise ValueError(f"{what}, got {value!r}{fix and '; ' + fix}")
    return float(value)


def check_choice(name: str, value: Any, choices: Collection[Any]) -> Any:
    """``value`` if it is one of ``choices``, else ``ValueError`` listing them."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(repr(c) for c in choices)}; got {value!r}")
    return value


def check_callable(name: str, value: Any, signature: str) -> Callable[..., Any]:
    """``value`` if callable, else ``TypeError`` saying what to pass."""
    if not callable(value) or isinstance(value, type):
        raise TypeError(f"{name} must be a function {signature}, got {value!r}")
    return value  # type: ignore[no-any-return]


def check_bool(name: str, value: Any) -> bool:
    """``value`` if it is a ``bool``, else ``TypeError``."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return value
