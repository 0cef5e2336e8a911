"""MosaicML Composer's selective-backprop rule as a drop-in selector (a peer method, for side-by-side comparison).

Composer's variant of Selective-Backprop (Jiang et al. 2019, https://arxiv.org/abs/1910.00762; code
``mosaicml/composer``, ``composer/algorithms/selective_backprop/selective_backprop.py``): inside each loader batch,
keep a fixed fraction ``keep``, sampled without replacement with probability rising with the loss percentile, on
every other step of a window ``[start, end)`` of training.

It shares :class:`~selective_backprop.Selector`'s interface, draws its randomness only from its own seeded
``torch.Generator`` (Composer uses numpy's global RNG) and keeps the same counters.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor, nn

from . import defaults
from .base import Selector
from .batch import Batch, ForwardFn, LossFn
from .batching import rows_of, take
from .validation import check_int, check_number

__all__ = ["ComposerSB", "composer_probabilities", "composer_select", "composer_should_select"]


def composer_should_select(
    progress: float,
    batch_in_epoch: int,
    start: float = defaults.COMPOSER_START,
    end: float = defaults.COMPOSER_END,
    interrupt: int = defaults.COMPOSER_INTERRUPT,
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


class ComposerSB(Selector):
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
        forward, min_batch_size, score_precision, score_scale, nonfinite, flush: see
            :class:`~selective_backprop.Selector`; with ``nonfinite='skip'`` the kept fraction is drawn from the
            examples whose scoring loss is finite.
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
        batch_size: int = defaults.BATCH_SIZE,
        keep: float = defaults.COMPOSER_KEEP,
        *,
        epochs: int,
        dataset_size: int,
        start: float = defaults.COMPOSER_START,
        end: float = defaults.COMPOSER_END,
        interrupt: int = defaults.COMPOSER_INTERRUPT,
        loss_fn: LossFn | None = None,
        forward: ForwardFn | None = None,
        min_batch_size: int | None = None,
        score_precision: Literal["fp32", "bf16", "fp16"] | None = None,
        score_scale: float | None = None,
        score_mode: Literal["eval", "train"] = "eval",
        nonfinite: Literal["raise", "skip"] = "raise",
        flush: Literal["epoch", "never"] = "epoch",
        seed: int = 0,
    ) -> None:
        super().__init__(
            model, batch_size, loss_fn=loss_fn, forward=forward, min_batch_size=min_batch_size,
            score_precision=score_precision, score_scale=score_scale, score_mode=score_mode, nonfinite=nonfinite,
            flush=flush, seed=seed,
        )  # fmt: skip
        check_number("keep", keep, 0.0, 1.0, low_open=True, fix="the fraction of each batch to backpropagate")
        check_int("epochs", epochs, 1, "the training budget in epochs")
        check_int("dataset_size", dataset_size, 1, "pass len(train_set)")
        check_number("start", start, 0.0, 1.0, fix="a fraction of training")
        check_number("end", end, start, 1.0, fix=f"a fraction of training, at least start={start!r}")
        check_int("interrupt", interrupt, 0, "0 never interrupts")
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

    def choose(self, inputs: Any, targets: Any, indices: Tensor | None) -> list[Batch]:
        m = rows_of(inputs)
        active = self.keep < 1 and composer_should_select(
            self.progress, self.batch_in_epoch, self.start, self.end, self.interrupt
        )
        self.offered += m
        self.batch_in_epoch += 1
        if active:
            losses = self.scoring_forward(inputs, targets)[1]
            finite = self.finite_rows(losses)  # raises on NaN/inf unless nonfinite="skip"
            if self.nonfinite == "skip":
                rows = finite.nonzero().squeeze(1)
                chosen = rows[composer_select(losses[rows], self.keep, self.generator(losses.device))]
            else:
                chosen = composer_select(losses, self.keep, self.generator(losses.device))
            self.count(selection_forwards=m, selected=len(chosen))
            fields = (*take((inputs, targets, indices), chosen), None, None)
            batches = [self.make_batch(fields)] if len(chosen) else []
        else:
            self.count(selected=m)
            batches = [self.make_batch(f) for f in self.enqueue(inputs, targets, indices)]
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
