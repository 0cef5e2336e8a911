"""What a selector yields: a :class:`Batch` to forward in train mode and backpropagate, and its loss."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch.nn.functional as F
from torch import Tensor, nn

if TYPE_CHECKING:
    from .base import Selector

__all__ = ["Batch", "LossFn", "ForwardFn", "per_example_cross_entropy", "COUNTER_NAMES"]

LossFn = Callable[[Any, Any], Tensor]
"""``loss_fn(outputs, targets) -> (N,)``: one loss per example."""

ForwardFn = Callable[[nn.Module, Any], Any]
"""``forward(model, inputs) -> outputs``: how a batch's inputs are fed to the model."""

COUNTER_NAMES = (
    "seen",  # examples offered to select()
    "selection_forwards",  # examples forwarded for scoring
    "skipped_forwards",  # examples whose scoring forward was skipped thanks to a cached (stale) loss
    "selected",  # examples that won their coin flip (or were taken unconditionally)
    "backpropagated",  # examples whose training loss was computed through Batch.loss
    "steps",  # training batches (one optimizer step each)
    "select_time_s",  # host seconds in selection bookkeeping (policy, coins, queue, cache), forward excluded
    "score_time_s",  # host seconds in the scoring forward (synchronize on CUDA before trusting it)
)


def per_example_cross_entropy(outputs: Tensor, targets: Tensor) -> Tensor:
    """Cross-entropy with ``reduction='none'``: one loss per example (the authors' choice).

    Example:
        >>> import torch
        >>> per_example_cross_entropy(torch.zeros(2, 4), torch.tensor([0, 3])).tolist()  # log(4) each
        [1.3862943649291992, 1.3862943649291992]
    """
    return F.cross_entropy(outputs, targets, reduction="none")


@dataclass(eq=False)
class Batch:
    """One batch to forward in train mode and backpropagate: ``loss = batch.loss(batch.forward(model))``.

    Attributes:
        inputs, targets: the examples, as the loader gave them (a tensor or a dict/list/tuple of tensors).
        indices: their dataset indices, or ``None`` if the loader gave none.
        weights: per-example importance weights (Kath18, InfoBatch), or ``None``.
        primed_rows: bool ``(N,)`` mask of the rows taken unconditionally during priming, or ``None`` for none.
        epoch: the epoch the examples were offered in (errors name it).
        padding: ``True`` for a distributed rank's zero-weight stand-in batch (see
            :mod:`selective_backprop.distributed`): its loss is 0 with a zero gradient, and it is recorded nowhere.
    """

    inputs: Any
    targets: Any
    indices: Tensor | None = None
    weights: Tensor | None = None
    primed_rows: Tensor | None = None
    epoch: int = 0
    padding: bool = False
    _selector: Selector | None = field(default=None, repr=False)

    def __len__(self) -> int:
        from .batching import rows_of

        return rows_of(self.inputs)

    @property
    def primed(self) -> bool:
        """Whether every example of the batch was taken unconditionally during priming."""
        return self.primed_rows is not None and bool(self.primed_rows.all())

    def forward(self, model: nn.Module) -> Any:
        """``model`` applied to the inputs the way the selector's ``forward`` option says (default:
        ``model(**inputs)`` for a mapping, ``model(*inputs)`` for a tuple, ``model(inputs)`` otherwise)."""
        return self._owner().forward(model, self.inputs)

    def loss(self, outputs: Any) -> Tensor:
        """The training loss of ``outputs = batch.forward(model)``: the mean of the per-example losses.

        The plain mean over the batch -- weighted by the importance weights for Kath18 and InfoBatch, and
        normalized by the selector's ``example_weights`` when given (``sum(w * l) / sum(w)``, what
        ``cross_entropy(weight=...)`` or a token count computes). Also records the per-example losses where the
        selector uses them (the history while priming, the StaleSB cache) and counts the step.

        Raises:
            ValueError: naming the dataset indices (or batch positions) and the epoch when a loss is not finite:
                training on would corrupt the model.
        """
        return self._owner()._train_loss(self, outputs)

    def _owner(self) -> Selector:
        if self._selector is None:
            raise RuntimeError("this Batch was not produced by a selector; compute the loss yourself")
        return self._selector
