"""What a run prints while it trains: a tqdm bar per epoch (rank 0, unless quiet), or one line per epoch."""

from __future__ import annotations

from typing import Any

__all__ = ["open_bar", "epoch_line"]


def open_bar(enabled: bool, desc: str, total: int, done: int) -> Any:
    """A tqdm progress bar counting examples (``None`` when not ``enabled``); ``done`` examples are already done."""
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=min(total, done), desc=desc, unit="ex", leave=False)


def epoch_line(strategy: str, epochs: int, row: dict[str, Any]) -> str:
    """One log line for the evaluation ``row`` of a metrics file."""
    sel = row["selected_fraction"]
    return (
        f"[{strategy}] epoch {row['epoch']:.0f}/{epochs}"
        f"  test error {row['test_error']:.4f}"
        f"  train time {row['wall_train_s']:.1f}s  backprops {row['backprops']}"
        f"  selected {'-' if sel is None else f'{sel:.1%}'}"
    )
