"""Argument checks shared by the selectors and policies: each raises at construction, naming the value and the fix."""

from __future__ import annotations

from typing import Any

__all__ = ["is_int"]


def is_int(value: Any, low: int) -> bool:
    return not isinstance(value, bool) and isinstance(value, int) and value >= low
