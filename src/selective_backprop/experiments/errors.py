"""The lab's errors and the command line's exit codes.

Exit codes of ``selective-backprop train`` / ``compare``: ``0`` done; ``1`` a file could not be written (disk
full, read-only folder: the message names the file); ``2`` bad configuration, data or checkpoint (the message
names the value or file and the fix); ``3`` training diverged (:class:`TrainingDiverged`); ``4`` another rank
failed or stalled (torchrun; :class:`~selective_backprop.distributed.CollectiveError`); ``130`` / ``143``
interrupted by SIGINT / SIGTERM after writing a checkpoint (continue with ``--resume``).
"""

from __future__ import annotations

import signal
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..distributed import CollectiveError

__all__ = ["Interrupted", "RunExistsError", "TrainingDiverged", "CheckpointError", "INTERRUPT_EXIT_CODES", "exit_code",
           "nonfinite_indices", "nonfinite_parameters", "capped", "SHOWN"]  # fmt: skip

INTERRUPT_EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}


class Interrupted(Exception):
    """Training stopped by SIGINT/SIGTERM after writing a checkpoint; ``exit_code`` is 130 or 143."""

    def __init__(self, signum: int, checkpoint: Path) -> None:
        self.exit_code = INTERRUPT_EXIT_CODES.get(signal.Signals(signum), 1)
        self.checkpoint = checkpoint
        super().__init__(f"interrupted by {signal.Signals(signum).name}; checkpoint saved to {checkpoint}")


class RunExistsError(FileExistsError):
    pass


class TrainingDiverged(ValueError):
    """A loss or the parameters became NaN/inf; training stopped before the optimizer stepped on it.

    Attributes:
        step: the 1-based training step (optimizer steps taken or skipped before it, plus one).
        epoch: the 0-based epoch it happened in (shown 1-based in the message, as in the progress bar).
        indices: dataset indices of the examples with a non-finite loss (``None`` for non-finite parameters); all
            of them here, the first :data:`SHOWN` in the message.
        checkpoint: the last good checkpoint to go back to, or ``None`` if none was written yet.
    """

    exit_code = 3  # of the command line

    def __init__(self, what: str, step: int, epoch: int, epochs: int, indices: list[int] | None,
                 checkpoint: Path | None) -> None:  # fmt: skip
        self.step, self.epoch, self.indices, self.checkpoint = step, epoch, indices, checkpoint
        where = "" if indices is None else f" at dataset indices {capped(indices)}"
        last = f"last good checkpoint: {checkpoint}" if checkpoint else "no checkpoint was written yet"
        super().__init__(
            f"training diverged: {what}{where} at step {step} (epoch {epoch + 1}/{epochs}); {last}. Lower --lr, "
            "check those examples, or pass --nonfinite skip to drop such steps"
        )


SHOWN = 8
"""How many items of a list (dataset indices, ranks, positions) a message shows before "and N more"."""


def capped(items: Sequence[Any], limit: int = SHOWN) -> str:
    """``items`` for a message: all of them up to ``limit``, else the first ``limit`` and how many more.

    Example:
        >>> capped([3, 1, 4]), capped(list(range(20)))
        ('[3, 1, 4]', '[0, 1, 2, 3, 4, 5, 6, 7] and 12 more')
    """
    items = list(items)
    if len(items) <= limit:
        return str(items)
    return f"{items[:limit]} and {len(items) - limit} more"


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used: unreadable, truncated, of an unknown format or failing its checksum."""


def exit_code(error: BaseException) -> int | None:
    """The command line's exit code for ``error`` (see the module docstring), or ``None`` if it is not ours."""
    if isinstance(error, Interrupted):
        return error.exit_code
    if isinstance(error, CollectiveError):
        return 4
    if isinstance(error, TrainingDiverged):
        return TrainingDiverged.exit_code
    if isinstance(error, (RunExistsError, FileNotFoundError, ValueError)):
        return 2
    if isinstance(error, OSError):
        return 1
    return None


@torch.no_grad()
def nonfinite_indices(model: nn.Module, loss_fn: Callable[[Tensor, Tensor], Tensor], outputs: Tensor | None,
                      targets: Tensor, indices: Tensor | None, inputs: Any = None) -> list[int]:  # fmt: skip
    """Dataset indices (batch positions without indices) whose loss is NaN/inf. Error path only: it syncs.

    Without ``outputs`` the scoring forward is redone on ``inputs`` in eval mode (the model's mode is restored)."""
    if outputs is None:
        was_training = model.training
        model.eval()
        outputs = model(inputs)
        model.train(was_training)
    where = (~torch.isfinite(loss_fn(outputs.detach(), targets))).nonzero().squeeze(1)
    return (where if indices is None else indices[where]).tolist()


def nonfinite_parameters(model: nn.Module) -> list[str]:
    """Names of the parameters holding a NaN/inf (one host sync per parameter)."""
    return [name for name, p in model.named_parameters() if not bool(torch.isfinite(p).all())]
