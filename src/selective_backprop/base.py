"""What every selector shares: :class:`Selector` (the public base class) and :class:`Batch` (what it yields).

A selector sits between a data loader and the training step: it is offered loader batches (:meth:`Selector.select`)
and hands back the batches to forward in train mode and backpropagate. Selective-Backprop, Kath18, InfoBatch and
Composer's rule are all selectors, so a training loop written for one runs them all.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import defaults
from .policies import check_losses
from .queue import BackpropQueue, Fields, _rows

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

    from .distributed import Collectives

__all__ = ["Batch", "Selector", "COUNTER_NAMES", "LossFn", "per_example_cross_entropy"]

LossFn = Callable[[Tensor, Tensor], Tensor]
"""``loss_fn(outputs, targets) -> (N,)``: one loss per example."""

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
    """Cross-entropy with ``reduction='none'``: one loss per example (the authors' choice)."""
    return F.cross_entropy(outputs, targets, reduction="none")


@dataclass(eq=False)
class Batch:
    """One batch to forward in train mode and backpropagate.

    Attributes:
        inputs, targets: the examples (on their original device).
        indices: their dataset indices, or ``None`` if the loader gave none.
        weights: per-example loss weights (importance sampling), or ``None`` for a plain mean.
        primed: ``True`` for batches taken unconditionally during priming epochs.
        padding: ``True`` for a distributed rank's zero-weight stand-in batch (see
            :mod:`selective_backprop.distributed`): its loss is 0 with a zero gradient, and it is recorded nowhere.
    """

    inputs: Tensor
    targets: Tensor
    indices: Tensor | None = None
    weights: Tensor | None = None
    primed: bool = False
    padding: bool = False
    _selector: Selector | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.inputs)

    def loss(self, outputs: Tensor) -> Tensor:
        """The training loss of ``outputs = model(batch.inputs)``: the (weighted) mean per-example loss.

        Also records the per-example losses where the selector uses them (the history while priming, the
        StaleSB cache) and counts the step. Raises ``ValueError`` naming the dataset indices if a loss is
        not finite: training on would corrupt the model.
        """
        if self._selector is None:
            raise RuntimeError("this Batch was not produced by a selector; compute the loss yourself")
        return self._selector._train_loss(self, outputs)


class Selector:
    """The base of every selector: the model and loss, seeded coins, the backprop queue, counters, epochs, state.

    Args:
        model: the network; used for the scoring forward (the caller does the training forward).
        batch_size: examples per training batch (the backprop queue's size). Default: ``128``.
        loss_fn: per-example loss ``loss_fn(outputs, targets) -> (N,)``. Default: cross-entropy.
        score_mode: ``"eval"`` (default, as the authors: BatchNorm running statistics, no dropout) or
            ``"train"`` (BatchNorm batch statistics, which also updates the running statistics twice per step).
        nonfinite: ``"raise"`` (default) a ``ValueError`` naming the batch position of a NaN/inf scoring loss,
            or ``"skip"``: such examples are not selected and not recorded. A non-finite *training* loss always
            raises, naming the dataset indices.
        flush: ``"epoch"`` (default): :meth:`end_epoch` trains the queue's remainder as a smaller batch, so every
            selected example is trained within its epoch; ``"never"``: the remainder carries over (call
            :meth:`flush` at the end of the run).
        seed: seed of the selector's own ``torch.Generator`` (the global RNGs are never touched). Default: ``0``.
        distributed: ``True`` (default group) or a process group: global selection across data-parallel ranks,
            see :mod:`selective_backprop.distributed` (the generator is then seeded ``seed + rank``).
            Default: ``False``.

    Writing a selector:
        Subclass ``Selector`` and override :meth:`choose` -- it sees each checked, non-empty loader batch and
        returns the training batches that became ready -- and, if the strategy learns from the training losses,
        :meth:`observe`. Extend :meth:`end_epoch`, :meth:`state_dict` and :meth:`load_state_dict` (calling
        ``super()``) for any state of your own. Inside ``choose`` use :meth:`scoring_forward` for a scoring
        forward (timed apart from bookkeeping), :meth:`finite_rows` to honour ``nonfinite``, :meth:`generator` for
        randomness, :meth:`enqueue` to queue selected examples and receive full batches, :meth:`make_batch` to
        wrap them, :meth:`gather` for the losses of all ranks and :meth:`count` to keep the counters. Everything
        ``choose`` returns is backpropagated exactly once by the caller, who calls
        ``batch.loss(model(batch.inputs))``.
    """

    def __init__(
        self,
        model: nn.Module,
        batch_size: int = defaults.BATCH_SIZE,
        *,
        loss_fn: LossFn | None = None,
        score_mode: Literal["eval", "train"] = "eval",
        nonfinite: Literal["raise", "skip"] = "raise",
        flush: Literal["epoch", "never"] = "epoch",
        seed: int = 0,
        distributed: bool | ProcessGroup = False,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if loss_fn is not None and not callable(loss_fn):
            raise TypeError(f"loss_fn must be a callable (outputs, targets) -> per-example losses, got {loss_fn!r}")
        if score_mode not in ("eval", "train"):
            raise ValueError(f"score_mode must be 'eval' or 'train', got {score_mode!r}")
        if nonfinite not in ("raise", "skip"):
            raise ValueError(f"nonfinite must be 'raise' or 'skip', got {nonfinite!r}")
        if flush not in ("epoch", "never"):
            raise ValueError(f"flush must be 'epoch' or 'never', got {flush!r}")
        self.model = model
        self.loss_fn: LossFn = loss_fn or per_example_cross_entropy
        self.batch_size = batch_size
        self.seed = int(seed)
        self.score_mode = score_mode
        self.nonfinite = nonfinite
        self.flush_mode = flush
        self.queue = BackpropQueue(batch_size)
        self.epoch = 0
        self._counters: dict[str, float] = dict.fromkeys(COUNTER_NAMES, 0)
        self._score_s = 0.0  # scoring-forward seconds of the select() call in progress
        self._generator: torch.Generator | None = None
        self._generator_state: Tensor | None = None  # restored state waiting for the first batch's device
        # Global selection over a process group (selective_backprop.distributed): None when single-process.
        self._comm: Collectives | None = None
        self.rank = 0
        if distributed is not False and distributed is not None:
            from .distributed import Collectives, unwrap_model

            self._comm = Collectives(None if distributed is True else distributed)
            self.rank = self._comm.rank
            self.model = unwrap_model(model)  # the scoring forward must not run DDP's collectives
            self._last_seen: tuple[Tensor, Tensor] | None = None  # source of padding batches

    # ----- the interface a training loop uses --------------------------------------------------------------
    @property
    def counters(self) -> dict[str, float]:
        """A copy of the counters (see ``COUNTER_NAMES``)."""
        return dict(self._counters)

    def reset_counters(self) -> None:
        self._counters = dict.fromkeys(COUNTER_NAMES, 0)

    def select(self, inputs: Tensor, targets: Tensor, indices: Tensor | None = None) -> list[Batch]:
        """Offer one loader batch; return the training batches that became ready (often zero or one).

        Checks the batch, runs the strategy's :meth:`choose` and times it: ``score_time_s`` gets the scoring
        forwards (:meth:`scoring_forward`), ``select_time_s`` the rest. An empty batch is a no-op.
        """
        start = time.perf_counter()
        self._score_s = 0.0
        m = self._check_batch(inputs, targets, indices)
        if m == 0:
            return []
        batches = self.choose(inputs, targets, indices)
        self._counters["seen"] += m
        self._counters["score_time_s"] += self._score_s
        self._counters["select_time_s"] += time.perf_counter() - start - self._score_s
        return batches

    def flush(self) -> list[Batch]:
        """Return whatever is queued as one smaller batch (or nothing), emptying the queue.

        Distributed: the queue in batches of ``batch_size`` (the last smaller), padded with zero-weight batches
        up to the largest count on any rank, so every rank takes the same number of steps.
        """
        fields = self.queue.flush()
        if self._comm is None:
            return [] if fields is None else [self.make_batch(fields)]
        batches: list[Batch] = []
        if fields is not None:
            n, bs = len(fields[0]), self.batch_size  # type: ignore[arg-type]
            batches = [self.make_batch(tuple(_rows(f, i, i + bs) for f in fields)) for i in range(0, n, bs)]
        steps = self._comm.all_reduce_int(len(batches), "max", "all_reduce(MAX) of the flush batch counts")
        return batches + [self._padding_batch() for _ in range(steps - len(batches))]

    def end_epoch(self) -> list[Batch]:
        """Advance the epoch counter; with ``flush='epoch'`` also return the queue's remainder to train on."""
        self.epoch += 1
        return self.flush() if self.flush_mode == "epoch" else []

    def iterate(self, loader: Iterable[Any]) -> Iterator[Batch]:
        """Run one epoch over ``loader`` (yielding ``(inputs, targets[, indices])``); yield training batches.

        Calls :meth:`end_epoch` when the loader is exhausted, so the remainder is trained per ``flush``.
        """
        for item in loader:
            if not isinstance(item, (tuple, list)) or len(item) not in (2, 3):
                raise TypeError(
                    "the loader must yield (inputs, targets) or (inputs, targets, indices) tuples, got "
                    f"{type(item).__name__}{'' if not isinstance(item, (tuple, list)) else f' of {len(item)}'}"
                )
            yield from self.select(*item)
        yield from self.end_epoch()

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue with identical selections (not the model, not the loss function)."""
        gen = self._generator.get_state() if self._generator is not None else self._generator_state
        return {
            "seed": self.seed,
            "epoch": self.epoch,
            "counters": dict(self._counters),
            "generator": None if gen is None else gen.clone(),
            "queue": self.queue.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned; the next selections are those the saved selector would make."""
        self.epoch = state["epoch"]
        self.seed = state.get("seed", self.seed)  # a state taken before the first coin holds only the seed
        self._counters = {**dict.fromkeys(COUNTER_NAMES, 0), **state["counters"]}
        self._generator_state = None if state["generator"] is None else state["generator"].clone()
        self._generator = None  # re-created on the next batch's device from the seed, then the saved state
        self.queue.load_state_dict(state["queue"])

    # ----- what a strategy overrides -----------------------------------------------------------------------
    def choose(self, inputs: Tensor, targets: Tensor, indices: Tensor | None) -> list[Batch]:
        """The strategy: see a checked, non-empty loader batch; return the training batches now ready.

        ``indices`` are the examples' dataset indices, or ``None`` when the loader gave none.
        """
        raise NotImplementedError(f"{type(self).__name__} must override Selector.choose()")

    def observe(self, batch: Batch, outputs: Tensor, losses: Tensor) -> None:
        """See the detached outputs and per-example training losses of each trained batch (default: nothing)."""

    # ----- helpers for strategies --------------------------------------------------------------------------
    def count(self, **increments: float) -> None:
        """Add to the counters named in ``COUNTER_NAMES``, e.g. ``self.count(selected=5)``."""
        for name, value in increments.items():
            if name not in self._counters:
                raise KeyError(f"unknown counter {name!r}; counters are {', '.join(COUNTER_NAMES)}")
            self._counters[name] += value

    def generator(self, device: torch.device) -> torch.Generator:
        """The selector's own ``torch.Generator`` on ``device`` (seeded ``seed + rank``; restored after a load)."""
        gen = self._generator
        if gen is None or gen.device.type != device.type:
            gen = torch.Generator(device=device)
            gen.manual_seed(self.seed + self.rank)  # distributed: independent coins per rank
            if self._generator_state is not None:
                gen.set_state(self._generator_state)
                self._generator_state = None
            self._generator = gen
        return gen

    def scoring_forward(self, inputs: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        """Scoring forward under inference mode (eval mode unless ``score_mode='train'``): (outputs, losses).

        Its host time is added to ``score_time_s`` (on CUDA: launch time unless the caller synchronizes)."""
        start = time.perf_counter()
        was_training = self.model.training
        if self.score_mode == "eval":
            self.model.eval()
        try:
            with torch.inference_mode():  # no autograd bookkeeping at all (cheaper than no_grad)
                outputs = self.model(inputs)
                losses = self._per_example(outputs, targets)
        finally:
            self.model.train(was_training)
            self._score_s += time.perf_counter() - start
        return outputs, losses

    def finite_rows(self, losses: Tensor) -> Tensor:
        """The mask of finite ``losses``; with ``nonfinite='raise'`` a ``ValueError`` naming the first bad row."""
        if self.nonfinite == "raise":
            check_losses(losses, "scoring losses")
        return torch.isfinite(losses)

    def enqueue(self, *fields: Tensor | None) -> list[Fields]:
        """Queue selected examples; return the full batches now ready. Distributed, only as many full batches as
        every rank has ready (the rest stay queued, in order)."""
        if self._comm is None:
            return self.queue.push(*fields)
        ready = (len(self.queue) + len(fields[0])) // self.batch_size  # type: ignore[arg-type]
        agreed = self._comm.all_reduce_int(ready, "min", "all_reduce(MIN) of the ready batch counts")
        return self.queue.push(*fields, max_batches=agreed)

    def gather(self, losses: Tensor) -> tuple[Tensor, int]:
        """Every rank's ``losses`` in rank order and this rank's offset in them (``losses, 0`` single-process)."""
        return (losses, 0) if self._comm is None else self._comm.all_gather(losses)

    def make_batch(self, fields: Fields, primed: bool = False) -> Batch:
        """A :class:`Batch` of ``(inputs, targets, indices[, weights])`` whose ``loss`` reports to this selector."""
        inputs, targets, indices = fields[:3]
        weights = fields[3] if len(fields) > 3 else None
        return Batch(inputs, targets, indices, weights, primed, _selector=self)  # type: ignore[arg-type]

    # ----- machinery ---------------------------------------------------------------------------------------
    def _check_batch(self, inputs: Tensor, targets: Tensor, indices: Tensor | None) -> int:
        m = len(inputs)
        if len(targets) != m or (indices is not None and len(indices) != m):
            lens = f"inputs {m}, targets {len(targets)}" + ("" if indices is None else f", indices {len(indices)}")
            raise ValueError(f"inputs, targets and indices must have the same length, got {lens}")
        if indices is not None and (indices.ndim != 1 or indices.dtype.is_floating_point or indices.is_complex()):
            raise ValueError(
                f"indices must be a 1-D integer tensor of dataset indices, got dtype {indices.dtype} "
                f"shape {tuple(indices.shape)}"
            )
        if self._comm is not None:
            if m == 0:
                raise ValueError(
                    f"rank {self.rank} offered an empty batch; in distributed mode every rank must offer a "
                    "non-empty batch at every step (use a DistributedSampler or the lab's ShardedLoader)"
                )
            self._last_seen = (inputs[:2], targets[:2])  # two rows: BatchNorm1d rejects a batch of one
        return m

    def _per_example(self, outputs: Tensor, targets: Tensor) -> Tensor:
        losses = self.loss_fn(outputs, targets)
        if losses.ndim != 1 or len(losses) != len(targets):
            raise ValueError(
                f"loss_fn must return one loss per example (shape ({len(targets)},)), got shape "
                f"{tuple(losses.shape)}; use reduction='none'"
            )
        return losses

    def _padding_batch(self) -> Batch:
        if self._last_seen is None:
            raise RuntimeError(f"rank {self.rank} must pad a distributed step but has seen no data yet")
        inputs, targets = self._last_seen
        weights = torch.zeros(len(targets), device=targets.device)
        return Batch(inputs, targets, None, weights, padding=True, _selector=self)

    def _train_loss(self, batch: Batch, outputs: Tensor) -> Tensor:
        losses = self._per_example(outputs, batch.targets)
        detached = losses.detach()
        if not bool(torch.isfinite(detached).all()):
            bad = (~torch.isfinite(detached)).nonzero().squeeze(1)
            where = (
                f"dataset indices {batch.indices[bad].tolist()}"
                if batch.indices is not None
                else f"batch positions {bad.tolist()}"
            )
            raise ValueError(
                f"non-finite training loss at {where} (epoch {self.epoch}); stop and restore the last good "
                "checkpoint, lower the learning rate or check those examples"
            )
        self._counters["steps"] += 1
        if batch.padding:
            return (losses * 0.0).sum()  # zero gradient, but DDP still sees every parameter used
        self.observe(batch, outputs.detach(), detached)
        self._counters["backpropagated"] += len(batch)
        return (losses * batch.weights).mean() if batch.weights is not None else losses.mean()
