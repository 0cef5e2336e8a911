"""Two peer methods as drop-in selectors: InfoBatch's dynamic data pruning and Composer's selective backprop.

* :class:`InfoBatch` -- Qin et al., "InfoBatch: Lossless Training Speed Up by Unbiased Dynamic Data Pruning"
  (ICLR 2024, https://arxiv.org/abs/2303.04947; reference code ``NUS-HPC-AI-Lab/InfoBatch``,
  ``infobatch/infobatch.py``). Each example's score is its last training loss; every epoch, examples scoring
  below the mean are dropped with probability ``r`` before any forward, and the kept ones have their loss
  weighted by ``1 / (1 - r)`` so that each epoch's summed gradient is unbiased for the full-data one.
* :class:`ComposerSB` -- MosaicML Composer's rule for Selective-Backprop (Jiang et al. 2019,
  https://arxiv.org/abs/1910.00762; code ``mosaicml/composer``,
  ``composer/algorithms/selective_backprop/selective_backprop.py``): inside each loader batch, keep a fixed
  fraction ``keep``, sampled without replacement with probability rising with the loss percentile, on every
  other step of a window ``[start, end)`` of training.

Both share :class:`~selective_backprop.selector.SelectiveBackprop`'s interface (``select`` / ``end_epoch`` /
``Batch.loss`` / ``state_dict``), draw their randomness only from their own seeded ``torch.Generator`` and keep
the same counters.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor, nn

from .selector import Batch, LossFn, _SelectorBase, check_index_range

__all__ = [
    "InfoBatch",
    "ComposerSB",
    "mean_score",
    "infobatch_prune",
    "composer_probabilities",
    "composer_select",
    "composer_should_select",
]


def _is_int(value: Any, low: int) -> bool:
    return not isinstance(value, bool) and isinstance(value, int) and value >= low


def _take(t: Tensor, rows: Tensor, device: torch.device | None = None) -> Tensor:
    """``t[rows]`` whatever device ``rows`` is on (moved to ``device`` if given)."""
    out = t[rows.to(t.device)]
    return out if device is None else out.to(device)


# ----- InfoBatch: functional core ----------------------------------------------------------------------------
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


class InfoBatch(_SelectorBase):
    """InfoBatch (Qin et al., ICLR 2024, https://arxiv.org/abs/2303.04947) as a drop-in selector.

    Rule, per loader batch (the loader stays an ordinary full pass; pruning happens in :meth:`select`):

    * Every example's score is its most recent training loss, recorded by ``Batch.loss``.
    * At the first :meth:`select` of an epoch the threshold is fixed to the mean score of the examples that have
      one (InfoBatch also computes it once per epoch, when its sampler is rebuilt).
    * While ``epoch < delta * epochs``, an example scored strictly below the threshold is pruned with
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
        flush: ``"epoch"`` (default) or ``"never"``, as in :class:`~selective_backprop.SelectiveBackprop`.
        seed: seed of the selector's own ``torch.Generator``.

    Raises:
        ValueError: on out-of-range arguments, and in :meth:`select` when dataset indices are missing.

    Example:
        >>> model = nn.Linear(4, 3)
        >>> ib = InfoBatch(model, batch_size=4, epochs=8, dataset_size=8, seed=0)
        >>> x, y, idx = torch.randn(8, 4), torch.randint(0, 3, (8,)), torch.arange(8)
        >>> for epoch in range(2):
        ...     for batch in ib.select(x, y, idx) + ib.end_epoch():
        ...         batch.loss(model(batch.inputs)).backward()
        >>> c = ib.counters
        >>> c["seen"], c["selection_forwards"], c["backpropagated"] == c["selected"], 8 < c["selected"] <= 16
        (16, 0, True, True)
    """

    def __init__(
        self,
        model: nn.Module,
        batch_size: int = 128,
        prune_ratio: float = 0.5,
        *,
        epochs: int,
        dataset_size: int,
        delta: float = 0.875,
        loss_fn: LossFn | None = None,
        flush: Literal["epoch", "never"] = "epoch",
        seed: int = 0,
    ) -> None:
        super().__init__(model, batch_size, loss_fn, seed, "eval", flush)
        if not 0.0 <= prune_ratio < 1.0:
            raise ValueError(f"prune_ratio must be in [0, 1) (probability of pruning), got {prune_ratio!r}")
        if not _is_int(epochs, 1):
            raise ValueError(f"epochs must be an int >= 1 (the training budget), got {epochs!r}")
        if not _is_int(dataset_size, 1):
            raise ValueError(f"dataset_size must be an int >= 1 (pass len(train_set)), got {dataset_size!r}")
        if not 0.0 <= delta <= 1.0:
            raise ValueError(f"delta must be in [0, 1] (fraction of epochs with pruning), got {delta!r}")
        self.prune_ratio = float(prune_ratio)
        self.epochs = epochs
        self.dataset_size = dataset_size
        self.delta = float(delta)
        self.scores = torch.zeros(dataset_size, dtype=torch.float64)
        self.scored = torch.zeros(dataset_size, dtype=torch.bool)
        self.threshold: Tensor | None = None  # this epoch's mean score, fixed at its first select()

    @property
    def pruning(self) -> bool:
        """Whether this epoch prunes (``epoch < delta * epochs``)."""
        return self.epoch < self.delta * self.epochs

    def _check_batch(self, inputs: Tensor, targets: Tensor, indices: Tensor | None) -> int:
        m = super()._check_batch(inputs, targets, indices)
        if indices is None:
            raise ValueError(
                "InfoBatch needs dataset indices to keep one score per example: call select(inputs, targets, "
                "indices) or use a loader that yields (inputs, targets, indices)"
            )
        return m

    def _select(self, inputs: Tensor, targets: Tensor, indices: Tensor | None) -> list[Batch]:
        assert indices is not None  # _check_batch
        m = len(inputs)
        self._place(indices.device)
        self._check_indices(indices)
        if self.pruning:
            if self.threshold is None:
                self.threshold = mean_score(self.scores, self.scored)
            u = torch.rand(m, generator=self._rng(indices.device), device=indices.device, dtype=torch.float64)
            keep, weights = infobatch_prune(
                self.scores[indices], self.scored[indices], self.threshold, self.prune_ratio, u
            )
            kept = keep.nonzero().squeeze(1)  # host sync: the queue needs the count
            fields = (_take(inputs, kept), _take(targets, kept), indices[kept], _take(weights, kept, inputs.device))
        else:
            fields = (inputs, targets, indices, torch.ones(m, dtype=torch.float32, device=inputs.device))
        self._counters["selected"] += len(fields[0])
        return [self._batch(f) for f in self.queue.push(*fields)]

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

    def _observe(self, batch: Batch, outputs: Tensor, losses: Tensor) -> None:
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


# ----- Composer's selective backprop: functional core ----------------------------------------------------------
def composer_should_select(
    progress: float, batch_in_epoch: int, start: float = 0.5, end: float = 0.9, interrupt: int = 2
) -> bool:
    """Composer's ``should_selective_backprop``: inside ``[start, end)`` of training, except every ``interrupt``-th
    batch of the epoch (``interrupt=0``: never interrupted).

    Args:
        progress: fraction of training done before this batch, in ``[0, 1)``.
        batch_in_epoch: 0-based index of the loader batch within its epoch.
        start, end: the window of ``progress`` where selection is on. Default: ``0.5``, ``0.9``.
        interrupt: train a whole (vanilla) batch on batches where ``(batch_in_epoch + 1) % interrupt == 0``.
            Default: ``2`` (alternate).

    Example:
        >>> [composer_should_select(0.6, i) for i in range(4)], composer_should_select(0.95, 0)
        ([True, False, True, False], False)
    """
    in_window = start <= progress < end
    return in_window and (interrupt == 0 or (batch_in_epoch + 1) % interrupt != 0)


def composer_probabilities(n: int, keep: float, device: torch.device | str | None = None) -> Tensor:
    """Composer's sampling distribution over the ascending-sorted losses of a batch of ``n``.

    ``p_i ∝ ((i + 0.5) / n) ** (1 / keep - 1)``: the loss percentile raised to a power that grows as ``keep``
    shrinks (uniform at ``keep = 1``). Float64.

    Example:
        >>> composer_probabilities(4, keep=0.5).tolist()   # percentiles 1/8, 3/8, 5/8, 7/8, to the power 1
        [0.0625, 0.1875, 0.3125, 0.4375]
    """
    percentiles = (torch.arange(n, dtype=torch.float64, device=device) + 0.5) / n
    probs = percentiles ** (1.0 / keep - 1.0)
    return probs / probs.sum()


def composer_select(losses: Tensor, keep: float, generator: torch.Generator | None = None) -> Tensor:
    """Composer's ``select_using_loss`` on given losses: ``int(keep * N)`` positions, in draw order.

    Losses are sorted ascending (ties in batch order), then ``int(keep * N)`` ranks are drawn without
    replacement with :func:`composer_probabilities` (``torch.multinomial`` on the losses' device, instead of
    Composer's ``np.random.choice``). The first position returned is the first draw.

    Args:
        losses: per-example losses of the batch, shape ``(N,)``.
        keep: fraction of the batch to keep, in ``(0, 1]``.
        generator: the ``torch.Generator`` to draw from (on the losses' device).

    Example:
        >>> composer_select(torch.tensor([0.3, 0.1, 0.2, 0.4]), keep=1.0).sort().values.tolist()
        [0, 1, 2, 3]
    """
    n = len(losses)
    count = int(keep * n)
    order = torch.argsort(losses, stable=True)
    if count == 0:
        return order[:0]
    probs = composer_probabilities(n, keep, losses.device)
    return order[torch.multinomial(probs, count, replacement=False, generator=generator)]


class ComposerSB(_SelectorBase):
    """MosaicML Composer's Selective Backprop rule as a drop-in selector.

    Composer's variant of Selective-Backprop (Jiang et al. 2019, https://arxiv.org/abs/1910.00762), from
    ``mosaicml/composer``'s ``should_selective_backprop`` and ``select_using_loss``. For each loader batch of
    ``N``:

    * **Active** (:func:`composer_should_select`: training progress in ``[start, end)`` and not an interrupt
      batch): one scoring forward (no grad; ``score_mode``), then ``int(keep * N)`` examples are drawn without
      replacement with probability rising with their loss percentile (:func:`composer_select`). That smaller
      batch is returned at once, not queued, and its loss is the plain mean (no reweighting, as Composer: the
      effective learning rate per kept example rises by ``1 / keep``).
    * **Inactive**: the whole batch is trained, through the queue, with no scoring forward.

    Progress is examples offered so far (before this batch) over ``epochs * dataset_size``: Composer's
    ``state.get_elapsed_duration()`` with ``max_duration`` in samples (with ``max_duration`` in epochs Composer's
    progress moves in whole-epoch steps). ``batch_in_epoch`` counts loader batches and restarts at each
    :meth:`end_epoch`, as Composer's ``state.timer.batch_in_epoch``. As in Composer's ``match``, ``keep = 1`` is
    never active. A batch with ``int(keep * N) = 0`` yields nothing.

    Args:
        model: the network, used for the scoring forward.
        batch_size: examples per training batch on inactive steps (the queue's size). Default: ``128``.
        keep: fraction of each active loader batch to backpropagate, in ``(0, 1]``. Default: ``0.5``.
        epochs: the training budget in epochs (for the progress fraction).
        dataset_size: examples per epoch (for the progress fraction).
        start: progress at which selection starts. Default: ``0.5`` (Composer's).
        end: progress at which selection stops. Default: ``0.9`` (Composer's).
        interrupt: a vanilla batch every ``interrupt`` loader batches; ``0`` never. Default: ``2`` (Composer's).
        loss_fn: per-example loss ``loss_fn(outputs, targets) -> (N,)``. Default: cross-entropy.
        score_mode: ``"eval"`` (default) or ``"train"`` (Composer's behaviour: BatchNorm batch statistics,
            running statistics updated twice per step, dropout active).
        flush: ``"epoch"`` (default) or ``"never"``, as in :class:`~selective_backprop.SelectiveBackprop`.
        seed: seed of the selector's own ``torch.Generator`` (Composer uses numpy's global RNG).

    Example:
        >>> model = nn.Linear(4, 3)
        >>> sb = ComposerSB(model, batch_size=8, keep=0.5, epochs=1, dataset_size=16, start=0.0, interrupt=0)
        >>> x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
        >>> [len(b) for b in sb.select(x, y)], sb.counters["selection_forwards"]
        ([4], 8)
    """

    def __init__(
        self,
        model: nn.Module,
        batch_size: int = 128,
        keep: float = 0.5,
        *,
        epochs: int,
        dataset_size: int,
        start: float = 0.5,
        end: float = 0.9,
        interrupt: int = 2,
        loss_fn: LossFn | None = None,
        score_mode: Literal["eval", "train"] = "eval",
        flush: Literal["epoch", "never"] = "epoch",
        seed: int = 0,
    ) -> None:
        super().__init__(model, batch_size, loss_fn, seed, score_mode, flush)
        if not 0.0 < keep <= 1.0:
            raise ValueError(f"keep must be in (0, 1] (fraction of each batch to backpropagate), got {keep!r}")
        if not _is_int(epochs, 1):
            raise ValueError(f"epochs must be an int >= 1 (the training budget), got {epochs!r}")
        if not _is_int(dataset_size, 1):
            raise ValueError(f"dataset_size must be an int >= 1 (pass len(train_set)), got {dataset_size!r}")
        if not 0.0 <= start <= end <= 1.0:
            raise ValueError(f"need 0 <= start <= end <= 1 (fractions of training), got start={start!r}, end={end!r}")
        if not _is_int(interrupt, 0):
            raise ValueError(f"interrupt must be an int >= 0 (0: never interrupt), got {interrupt!r}")
        self.keep = float(keep)
        self.epochs = epochs
        self.dataset_size = dataset_size
        self.start = float(start)
        self.end = float(end)
        self.interrupt = interrupt
        self.offered = 0  # examples offered over the run (not reset with the counters): drives progress
        self.batch_in_epoch = 0

    @property
    def progress(self) -> float:
        """Fraction of the training budget offered so far: ``offered / (epochs * dataset_size)``."""
        return self.offered / (self.epochs * self.dataset_size)

    def _select(self, inputs: Tensor, targets: Tensor, indices: Tensor | None) -> list[Batch]:
        m = len(inputs)
        active = self.keep < 1 and composer_should_select(
            self.progress, self.batch_in_epoch, self.start, self.end, self.interrupt
        )
        self.offered += m
        self.batch_in_epoch += 1
        if active:
            losses = self._score(inputs, targets)[1]
            chosen = composer_select(losses, self.keep, self._rng(losses.device))
            self._counters["selection_forwards"] += m
            self._counters["selected"] += len(chosen)
            fields = (inputs[chosen], _take(targets, chosen), None if indices is None else _take(indices, chosen))
            batches = [self._batch(fields)] if len(chosen) else []
        else:
            self._counters["selected"] += m
            batches = [self._batch(f) for f in self.queue.push(inputs, targets, indices)]
        return batches

    def end_epoch(self) -> list[Batch]:
        self.batch_in_epoch = 0
        return super().end_epoch()

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "offered": self.offered, "batch_in_epoch": self.batch_in_epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.offered = state["offered"]
        self.batch_in_epoch = state["batch_in_epoch"]
