"""InfoBatch's dynamic data pruning as a drop-in selector (a peer method, for side-by-side comparison).

Qin et al., "InfoBatch: Lossless Training Speed Up by Unbiased Dynamic Data Pruning" (ICLR 2024,
https://arxiv.org/abs/2303.04947; reference code ``NUS-HPC-AI-Lab/InfoBatch``, ``infobatch/infobatch.py``). Each
example's score is its last training loss; every epoch, examples scoring below the mean are dropped with
probability ``r`` before any forward, and the kept ones have their loss weighted by ``1 / (1 - r)`` so that each
epoch's summed gradient is unbiased for the full-data one.

It shares :class:`~selective_backprop.Selector`'s interface (``select`` / ``end_epoch`` / ``Batch.loss`` /
``state_dict``), draws its randomness only from its own seeded ``torch.Generator`` and keeps the same counters.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor, nn

from . import defaults
from .base import Selector
from .batch import Batch, ForwardFn, LossFn
from .batching import device_of, rows_of, take
from .queue import check_index_range
from .validation import check_int, check_number

__all__ = ["InfoBatch", "mean_score", "infobatch_prune"]


def mean_score(scores: Tensor, scored: Tensor) -> Tensor:
    """Mean of ``scores`` over the entries flagged in ``scored``; NaN (so nothing is below it) when none are.

    A 0-dim tensor on the scores' device: no host sync.

    Example:
        >>> mean_score(torch.tensor([1.0, 2.0, 9.0]), torch.tensor([True, True, False])).item()
        1.5
    """
    count = scored.sum()
    return torch.where(scored, scores, torch.zeros_like(scores)).sum() / count


def infobatch_prune(
    scores: Tensor, scored: Tensor, threshold: Tensor, prune_ratio: float, uniforms: Tensor
) -> tuple[Tensor, Tensor]:
    """InfoBatch's rule for one batch: which examples to keep and the loss weight of each if kept.

    An example is *well learned* (eligible for pruning) when it has a score and the score is strictly below
    ``threshold``. Eligible examples are pruned when their uniform draw is below ``prune_ratio``; kept eligible
    examples get weight ``1 / (1 - prune_ratio)``, every other example weight ``1``.

    Args:
        scores: the batch's scores (last training losses), shape ``(N,)``.
        scored: whether each example has a score yet; unscored examples are always kept with weight 1.
        threshold: the epoch's mean score (0-dim); NaN prunes nothing.
        prune_ratio: ``r``, the probability of pruning an eligible example, in ``[0, 1)``.
        uniforms: one U[0, 1) draw per example, shape ``(N,)``.

    Returns:
        ``(keep, weights)``: a bool mask and float32 weights (for all ``N`` positions).

    Example:
        >>> scores = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 0.0])
        >>> scored = torch.tensor([True, True, True, True, True, False])
        >>> keep, w = infobatch_prune(scores, scored, mean_score(scores, scored), 0.5,
        ...                           torch.tensor([0.2, 0.7, 0.1, 0.1, 0.1, 0.1]))
        >>> keep.tolist(), w.tolist()
        ([False, True, True, True, True, True], [2.0, 2.0, 1.0, 1.0, 1.0, 1.0])
    """
    eligible = scored & (scores < threshold)
    keep = ~(eligible & (uniforms < prune_ratio))
    weights = torch.where(
        eligible,
        torch.full_like(scores, 1.0 / (1.0 - prune_ratio), dtype=torch.float32),
        torch.ones_like(scores, dtype=torch.float32),
    )
    return keep, weights


class InfoBatch(Selector):
    """InfoBatch (Qin et al., ICLR 2024, https://arxiv.org/abs/2303.04947) as a drop-in selector.

    Rule, per loader batch (the loader stays an ordinary full pass; pruning happens in :meth:`select`):

    * Every example's score is its most recent training loss, recorded by ``Batch.loss``.
    * At the first :meth:`select` of an epoch the threshold is fixed to the mean score of the examples that have
      one (InfoBatch also computes it once per epoch, when its sampler is rebuilt).
    * While ``epoch + 1 <= delta * epochs`` (``epoch`` counted from 0; the official sampler's test, so the last
      pruned epoch is ``floor(delta * epochs) - 1``), an example scored strictly below the threshold is pruned with
      probability ``prune_ratio`` -- dropped with **no forward at all** -- and, if kept, its loss is weighted by
      ``1 / (1 - prune_ratio)``. Every other example is kept with weight 1. In the last ``1 - delta`` of the
      epochs nothing is pruned and every weight is 1 (InfoBatch's annealing).
    * Kept examples go through the backprop queue, so training batches hold ``batch_size`` examples (the
      remainder follows ``flush``); ``Batch.loss`` is the weighted mean over the batch.

    Differences from the reference code, and why:

    * Examples never scored are always kept with weight 1 and left out of the mean. InfoBatch starts every
      score at the magic value ``3`` instead, which also enters its mean.
    * One independent coin per example as it arrives (pruned count binomial, mean ``r * eligible``); InfoBatch
      keeps exactly ``int((1 - r) * eligible)`` chosen up front, which a loader-driven selector cannot do
      without seeing the whole epoch first. Both keep each summed epoch gradient unbiased in expectation.
    * ``prune_ratio`` must lie in ``[0, 1)``; InfoBatch silently clamps the keep ratio to at least ``0.1``.
    * Randomness comes from the selector's own generator; InfoBatch reseeds numpy's global RNG each epoch.
    * Every weight is 1 in every epoch without pruning. The official sampler resets its weights when pruning
      stops only if ``delta * epochs`` is an integer; otherwise the last pruned epoch's ``1 / (1 - r)`` weights
      stay on in the full-data epochs, which biases their gradient (a bug we do not copy).
    * Scores, threshold and epoch are in :meth:`state_dict`, so a resumed run continues identically.

    Fewer examples are backpropagated per epoch, not fewer epochs: the trainer's LR schedule counts examples
    *seen* (``counters["seen"]`` includes pruned ones), so it runs to its end as usual. Pruned examples are
    counted in ``seen`` but not in ``selected``; ``selection_forwards`` and ``skipped_forwards`` stay 0 (no
    scoring forward exists to run or skip).

    Args:
        model: the network (not forwarded by the selector; kept for the common interface).
        batch_size: examples per training batch. Default: ``128``.
        prune_ratio: ``r``, probability of pruning a below-mean example. Default: ``0.5`` (the authors').
        epochs: the training budget in epochs; pruning stops after ``delta * epochs`` of them.
        dataset_size: number of training examples (size of the score table); indices are ``0 .. size - 1``.
        delta: fraction of the epochs with pruning. Default: ``0.875`` (the authors').
        loss_fn: per-example loss ``loss_fn(outputs, targets) -> (N,)``. Default: cross-entropy.
        forward, min_batch_size, nonfinite, flush, seed: see :class:`~selective_backprop.Selector` (InfoBatch runs
            no scoring forward, so ``nonfinite`` has no effect; a non-finite training loss always raises).

    Raises:
        ValueError: on out-of-range arguments, and in :meth:`select` when dataset indices are missing.

    Example:
        >>> model = nn.Linear(4, 3)
        >>> ib = InfoBatch(model, batch_size=4, epochs=8, dataset_size=8, seed=0)
        >>> x, y, idx = torch.randn(8, 4), torch.randint(0, 3, (8,)), torch.arange(8)
        >>> for epoch in range(2):
        ...     for batch in ib.select(x, y, idx) + ib.end_epoch():
        ...         batch.loss(model(batch.inputs)).backward()
        >>> c = ib.counters  # a remainder of one example waits in the queue (min_batch_size 2)
        >>> c["seen"], c["selection_forwards"], c["backpropagated"] + len(ib.queue) == c["selected"]
        (16, 0, True)
    """

    def __init__(
        self,
        model: nn.Module,
        batch_size: int = defaults.BATCH_SIZE,
        prune_ratio: float = defaults.INFOBATCH_PRUNE_RATIO,
        *,
        epochs: int,
        dataset_size: int,
        delta: float = defaults.INFOBATCH_DELTA,
        loss_fn: LossFn | None = None,
        forward: ForwardFn | None = None,
        min_batch_size: int | None = None,
        nonfinite: Literal["raise", "skip"] = "raise",
        flush: Literal["epoch", "never"] = "epoch",
        seed: int = 0,
    ) -> None:
        super().__init__(model, batch_size, loss_fn=loss_fn, forward=forward, min_batch_size=min_batch_size,
                         nonfinite=nonfinite, flush=flush, seed=seed)  # fmt: skip
        self.prune_ratio = check_number("prune_ratio", prune_ratio, 0.0, 1.0, high_open=True,
                                        fix="the probability of pruning a below-mean example")  # fmt: skip
        self.epochs = check_int("epochs", epochs, 1, "the training budget in epochs")
        self.dataset_size = check_int("dataset_size", dataset_size, 1, "pass len(train_set)")
        self.delta = check_number("delta", delta, 0.0, 1.0, fix="the fraction of the epochs with pruning")
        self.scores = torch.zeros(dataset_size, dtype=torch.float64)
        self.scored = torch.zeros(dataset_size, dtype=torch.bool)
        self.threshold: Tensor | None = None  # this epoch's mean score, fixed at its first select()

    @property
    def pruning(self) -> bool:
        """Whether this epoch prunes: ``epoch + 1 <= delta * epochs``, as the official ``IBSampler`` decides."""
        return self.epoch + 1 <= self.delta * self.epochs

    def choose(self, inputs: Any, targets: Any, indices: Tensor | None) -> list[Batch]:
        if indices is None:
            raise ValueError(
                "InfoBatch needs dataset indices to keep one score per example: call select(inputs, targets, "
                "indices) or use a loader that yields (inputs, targets, indices)"
            )
        m = len(indices)
        self._place(indices.device)
        self._check_indices(indices)
        if self.pruning:
            if self.threshold is None:
                self.threshold = mean_score(self.scores, self.scored)
            u = torch.rand(m, generator=self.generator(indices.device), device=indices.device, dtype=torch.float64)
            keep, weights = infobatch_prune(
                self.scores[indices], self.scored[indices], self.threshold, self.prune_ratio, u
            )
            kept = keep.nonzero().squeeze(1)  # host sync: the queue needs the count
            fields = take((inputs, targets, indices, weights.to(device_of(inputs))), kept)
        else:
            fields = (inputs, targets, indices, torch.ones(m, dtype=torch.float32, device=device_of(inputs)))
        self.count(selected=rows_of(fields[0]))
        return [self.make_batch(f) for f in self.enqueue(*fields)]

    def end_epoch(self) -> list[Batch]:
        self.threshold = None
        return super().end_epoch()

    def _place(self, device: torch.device) -> None:
        if self.scores.device != device:
            self.scores, self.scored = self.scores.to(device), self.scored.to(device)
            if self.threshold is not None:
                self.threshold = self.threshold.to(device)

    def _check_indices(self, indices: Tensor) -> None:
        check_index_range(indices, self.dataset_size, "InfoBatch's score table")

    def observe(self, batch: Batch, outputs: Tensor, losses: Tensor) -> None:
        assert batch.indices is not None
        idx = batch.indices.to(self.scores.device)
        self.scores[idx] = losses.to(self.scores.device, torch.float64)
        self.scored[idx] = True

    def state_dict(self) -> dict[str, Any]:
        return {
            **super().state_dict(),
            "scores": self.scores.clone(),
            "scored": self.scored.clone(),
            "threshold": None if self.threshold is None else self.threshold.clone(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if len(state["scores"]) != self.dataset_size:
            raise ValueError(
                f"state holds {len(state['scores'])} scores but this selector has dataset_size={self.dataset_size}"
            )
        super().load_state_dict(state)
        device = self.scores.device
        self.scores, self.scored = state["scores"].to(device).clone(), state["scored"].to(device).clone()
        self.threshold = None if state["threshold"] is None else state["threshold"].to(device).clone()
