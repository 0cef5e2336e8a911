"""What a run prints while it trains (rank 0): a tqdm bar per epoch on a terminal, log lines everywhere else.

Where the bar would write (stderr) is a terminal or a notebook: a tqdm bar per epoch and, at the end, the last
epoch's line. Anywhere else (``nohup``, CI, a pipe, a file), where every bar update would be a ``\\r`` fragment
in the log: no bar, one :func:`epoch_line` per epoch, and during an epoch at most one progress line every
:data:`INTERVAL_S` seconds (:class:`LineProgress`). ``--quiet``: one line per epoch and nothing in between.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

__all__ = ["INTERVAL_S", "LineProgress", "is_terminal", "shows_bar", "open_bar", "epoch_line"]

INTERVAL_S = 30.0
"""Seconds between two progress lines of one epoch when there is no bar."""


def is_terminal(stream: Any) -> bool:
    """Whether ``stream`` is an open terminal (``isatty()``); ``False`` for files, pipes, captured streams."""
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):  # no isatty, or a closed stream
        return False


def _in_notebook() -> bool:
    """Whether tqdm draws notebook widgets here (a Jupyter kernel, whose streams are not terminals)."""
    try:
        import tqdm.auto  # noqa: F401  (imports tqdm.autonotebook without its warning)
        from tqdm import autonotebook, std
    except ImportError:
        return False
    return autonotebook.tqdm is not std.tqdm


def shows_bar(enabled: bool, stream: Any = None) -> bool:
    """Whether a run with progress ``enabled`` draws a tqdm bar: only when ``stream`` (default: ``sys.stderr``,
    where tqdm writes) is a terminal, or in a notebook. Otherwise the trainer logs lines instead."""
    return enabled and (is_terminal(sys.stderr if stream is None else stream) or _in_notebook())


class LineProgress:
    """Where a bar would fill a log with ``\\r`` updates: the same interface (``update``, ``set_postfix``,
    ``close``), but a whole line at most every ``interval_s`` seconds (none for an epoch shorter than that).

    Args:
        desc: what is counted, e.g. ``"sb epoch 2/8"``.
        total: examples in the epoch; ``done``: examples already done (a resumed epoch).
        out: where lines go (default: ``sys.stdout``, with the epoch lines).
        interval_s: the least number of seconds between two lines.
        clock: seconds, monotonic (for tests).

    Example:
        >>> import io
        >>> ticks, out = iter([0.0, 10.0, 31.0, 40.0]), io.StringIO()
        >>> p = LineProgress("sb epoch 1/8", total=400, done=0, out=out, clock=lambda: next(ticks))
        >>> for _ in range(3):
        ...     p.update(100)
        >>> print(out.getvalue(), end="")
        sb epoch 1/8: 200/400 examples (50%), 31 s, 6 ex/s
    """

    def __init__(self, desc: str, total: int, done: int, out: TextIO | None = None, interval_s: float = INTERVAL_S,
                 clock: Callable[[], float] = time.monotonic) -> None:  # fmt: skip
        self.desc, self.total, self.n, self.start_n = desc, total, min(total, done), min(total, done)
        self.out, self.interval_s, self.clock = out or sys.stdout, interval_s, clock
        self.start = self.last = clock()
        self.postfix = ""

    def update(self, n: int) -> None:
        """``n`` more examples done; writes a line if ``interval_s`` passed since the last one."""
        self.n += n
        now = self.clock()
        if now - self.last >= self.interval_s:
            self.last = now
            rate = (self.n - self.start_n) / max(now - self.start, 1e-9)
            share = self.n / self.total if self.total else 1.0
            self.out.write(f"{self.desc}: {self.n}/{self.total} examples ({share:.0%}), {now - self.start:.0f} s, "
                           f"{rate:.0f} ex/s{self.postfix}\n")  # fmt: skip
            self.out.flush()

    def set_postfix(self, **values: Any) -> None:
        """Values shown at the end of the next lines (the latest evaluation)."""
        self.postfix = "".join(f", {k} {v}" for k, v in values.items())

    def close(self) -> None:
        """Nothing to clear: the epoch's own line follows."""


def open_bar(enabled: bool, desc: str, total: int, done: int, stream: Any = None) -> Any:
    """Progress over ``total`` examples of which ``done`` are done: a tqdm bar on ``stream`` (default:
    ``sys.stderr``) when :func:`shows_bar`, a :class:`LineProgress` when ``enabled`` but ``stream`` is no
    terminal, ``None`` when not ``enabled``."""
    if not enabled:
        return None
    if not shows_bar(enabled, stream):
        return LineProgress(desc, total, done)
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=min(total, done), desc=desc, unit="ex", leave=False, file=stream)


def epoch_line(strategy: str, epochs: int, row: dict[str, Any]) -> str:
    """One log line for the evaluation ``row`` of a metrics file."""
    sel = row["selected_fraction"]
    return (
        f"[{strategy}] epoch {row['epoch']:.0f}/{epochs}"
        f"  test error {row['test_error']:.4f}"
        f"  train time {row['wall_train_s']:.1f}s  backprops {row['backprops']}"
        f"  selected {'-' if sel is None else f'{sel:.1%}'}"
    )
