"""What every selector shares: :class:`Selector`, the public base class.

A selector sits between a data loader and the training step: it is offered loader batches (:meth:`Selector.select`)
and hands back the batches to forward in train mode and backpropagate (:class:`~selective_backprop.Batch`).
Selective-Backprop, Kath18, InfoBatch and Composer's rule are all selectors, so a training loop written for one runs
them all.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor, nn
from torch.utils._pytree import tree_map

from . import defaults
from .batch import COUNTER_NAMES, Batch, ForwardFn, LossFn, per_example_cross_entropy
from .batching import as_tree, cut, default_forward, device_of, loader_item, rows_of, take
from .policies import check_losses
from .precision import SCORE_PRECISIONS, downscale, scoring_autocast
from .queue import BackpropQueue, Fields
from .validation import check_callable, check_choice, check_int, check_number

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

    from .distributed import Collectives

__all__ = ["Selector"]


class Selector:
    """The base of every selector: the model and loss, seeded coins, the backprop queue, counters, epochs, state.

    Args:
        model: the network; used for the scoring forward (the caller does the training forward).
        batch_size: examples per training batch (the backprop queue's size). Default: ``128``.
        loss_fn: per-example loss ``loss_fn(outputs, targets) -> (N,)``. Default: cross-entropy. For sequences see
            :func:`selective_backprop.losses.per_sequence_cross_entropy`.
        forward: ``forward(model, inputs) -> outputs``, how a batch is fed to the model, for the scoring forward and
            :meth:`Batch.forward`. Default: ``model(**inputs)`` for a mapping, ``model(*inputs)`` for a tuple,
            ``model(inputs)`` otherwise.
        example_weights: ``example_weights(targets) -> (N,)`` positive weights; ``Batch.loss`` is then
            ``sum(w * l) / sum(w)`` instead of the plain mean (what ``cross_entropy(weight=...)`` or a per-token
            mean over sequences of different lengths computes). Default: ``None``.
        min_batch_size: a remainder smaller than this is never yielded at the end of an epoch: it is carried over
            into the next epoch (never lost; :meth:`flush` returns it at the very end). At most ``batch_size``.
            Default: ``min(2, batch_size)`` (a BatchNorm model cannot train on one example).
        score_precision: the scoring forward's own autocast, independent of the training precision: ``"fp32"``
            (autocast off), ``"bf16"`` or ``"fp16"``; ``None`` (default) inherits the caller's. A scoring forward
            only ranks examples; check what a cheaper one costs in ranking with
            :func:`selective_backprop.precision.scoring_fidelity`.
        score_scale: downscale image inputs ``(N, C, H, W)`` by this factor for the scoring forward only
            (Composer's ``scale_factor``), in ``(0, 1]``. Default: ``None`` (full size).
        score_mode: ``"eval"`` (default, as the authors: BatchNorm running statistics, no dropout) or
            ``"train"`` (BatchNorm batch statistics, which also updates the running statistics twice per step).
        nonfinite: ``"raise"`` (default) a ``ValueError`` naming the batch position of a NaN/inf scoring loss,
            or ``"skip"``: such examples are not selected and not recorded. A non-finite *training* loss always
            raises, naming the dataset indices.
        flush: ``"epoch"`` (default): :meth:`end_epoch` returns the queue's remainder to train on, so every
            selected example is trained within its epoch (unless fewer than ``min_batch_size``); ``"never"``: the
            remainder carries over (call :meth:`flush` at the end of the run).
        seed: seed of the selector's own ``torch.Generator`` (the global RNGs are never touched). Default: ``0``.
        distributed: ``True`` (default group) or a process group: global selection across data-parallel ranks,
            see :mod:`selective_backprop.distributed` (the generator is then seeded ``seed + rank``).
            Default: ``False``.

    Raises:
        TypeError, ValueError: at construction, for any argument of the wrong type or out of range, naming it.

    Writing a selector:
        Subclass ``Selector`` and override :meth:`choose` -- it sees each checked, non-empty loader batch and
        returns the training batches that became ready -- and, if the strategy learns from the training losses,
        :meth:`observe`. Extend :meth:`end_epoch`, :meth:`state_dict` and :meth:`load_state_dict` (calling
        ``super()``) for any state of your own. Inside ``choose`` use :meth:`scoring_forward` for a scoring
        forward (timed apart from bookkeeping), :meth:`finite_rows` to honour ``nonfinite``, :meth:`generator` for
        randomness, :meth:`enqueue` to queue selected examples and receive full batches, :meth:`make_batch` to
        wrap them, :meth:`gather` for the losses of all ranks and :meth:`count` to keep the counters; inputs and
        targets may be nested, so select rows with :func:`selective_backprop.batching.take`. Everything
        ``choose`` returns is backpropagated exactly once by the caller, who calls
        ``batch.loss(batch.forward(model))``.
    """

    def __init__(
        self,
        model: nn.Module,
        batch_size: int = defaults.BATCH_SIZE,
        *,
        loss_fn: LossFn | None = None,
        forward: ForwardFn | None = None,
        example_weights: Callable[[Any], Tensor] | None = None,
        min_batch_size: int | None = None,
        score_precision: Literal["fp32", "bf16", "fp16"] | None = None,
        score_scale: float | None = None,
        score_mode: Literal["eval", "train"] = "eval",
        nonfinite: Literal["raise", "skip"] = "raise",
        flush: Literal["epoch", "never"] = "epoch",
        seed: int = 0,
        distributed: bool | ProcessGroup = False,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        self.model = model
        self.batch_size = check_int("batch_size", batch_size, 1)
        if min_batch_size is None:
            min_batch_size = min(defaults.MIN_BATCH_SIZE, batch_size)
        self.min_batch_size = check_int("min_batch_size", min_batch_size, 1)
        if min_batch_size > batch_size:
            raise ValueError(f"min_batch_size must be at most batch_size={batch_size}, got {min_batch_size!r}")
        self.loss_fn: LossFn = (
            per_example_cross_entropy if loss_fn is None
            else check_callable("loss_fn", loss_fn, "(outputs, targets) -> per-example losses of shape (N,)")
        )  # fmt: skip
        self.forward: ForwardFn = default_forward if forward is None else check_callable(
            "forward", forward, "(model, inputs) -> outputs")  # fmt: skip
        self.example_weights = None if example_weights is None else check_callable(
            "example_weights", example_weights, "(targets) -> per-example weights of shape (N,)")  # fmt: skip
        self.score_mode = check_choice("score_mode", score_mode, ("eval", "train"))
        self.score_precision = None if score_precision is None else check_choice(
            "score_precision", score_precision, SCORE_PRECISIONS)  # fmt: skip
        self.score_scale = None if score_scale is None else check_number(
            "score_scale", score_scale, 0.0, 1.0, low_open=True, fix="the factor images are downscaled by")  # fmt: skip
        self.nonfinite = check_choice("nonfinite", nonfinite, ("raise", "skip"))
        self.flush_mode = check_choice("flush", flush, ("epoch", "never"))
        self.seed = check_int("seed", seed, 0)
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
            self._last_seen: tuple[Any, Any] | None = None  # source of padding batches

    # ----- the interface a training loop uses --------------------------------------------------------------
    @property
    def counters(self) -> dict[str, float]:
        """A copy of the counters (see ``COUNTER_NAMES``)."""
        return dict(self._counters)

    def reset_counters(self) -> None:
        self._counters = dict.fromkeys(COUNTER_NAMES, 0)

    def select(self, inputs: Any, targets: Any, indices: Tensor | None = None) -> list[Batch]:
        """Offer one loader batch; return the training batches that became ready (often zero or one).

        ``inputs`` and ``targets`` are tensors or dicts/lists/tuples of tensors sharing their first dimension;
        ``indices`` the examples' dataset indices (1-D integer tensor) or ``None``. Checks the batch, runs the
        strategy's :meth:`choose` and times it: ``score_time_s`` gets the scoring forwards
        (:meth:`scoring_forward`), ``select_time_s`` the rest. An empty batch is a no-op.

        Raises:
            TypeError: when a batch is not made of tensors, naming what was received.
            ValueError: on mismatched lengths, non-integer indices, or a non-finite scoring loss.
        """
        start = time.perf_counter()
        self._score_s = 0.0
        inputs, targets = as_tree(inputs), as_tree(targets)
        m = self._check_batch(inputs, targets, indices)
        if m == 0:
            return []
        batches = self.choose(inputs, targets, indices)
        self._counters["seen"] += m
        self._counters["score_time_s"] += self._score_s
        self._counters["select_time_s"] += time.perf_counter() - start - self._score_s
        return batches

    def flush(self) -> list[Batch]:
        """Return whatever is queued as one smaller batch (or nothing), emptying the queue: call it once at the very
        end of training. The batch may hold fewer than ``min_batch_size`` examples (a BatchNorm model can train a
        single example in eval mode).

        Distributed: the queue in batches of ``batch_size`` (the last smaller), padded with zero-weight batches
        up to the largest count on any rank, so every rank takes the same number of steps.
        """
        return self._flush(min_rows=1)

    def end_epoch(self) -> list[Batch]:
        """With ``flush='epoch'``, the queue's remainder to train on (unless it holds fewer than
        ``min_batch_size`` examples: then it waits for the next epoch); then advance the epoch counter."""
        batches = self._flush(self.min_batch_size) if self.flush_mode == "epoch" else []
        self.epoch += 1
        return batches

    def iterate(self, loader: Iterable[Any]) -> Iterator[Batch]:
        """Run one epoch over ``loader`` (yielding ``(inputs, targets[, indices])``); yield training batches.

        Calls :meth:`end_epoch` when the loader is exhausted, so the remainder is trained per ``flush``.
        """
        for item in loader:
            yield from self.select(*loader_item(item))
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
    def choose(self, inputs: Any, targets: Any, indices: Tensor | None) -> list[Batch]:
        """The strategy: see a checked, non-empty loader batch; return the training batches now ready.

        ``indices`` are the examples' dataset indices, or ``None`` when the loader gave none.
        """
        raise NotImplementedError(f"{type(self).__name__} must override Selector.choose()")

    def observe(self, batch: Batch, outputs: Any, losses: Tensor) -> None:
        """See the detached outputs and per-example training losses of each trained batch (default: nothing).

        Distributed, it is also called for padding batches (``batch.padding``, ``losses`` of zero weight): an
        override that runs a collective must run it for those too, and record nothing from them."""

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

    def scoring_forward(self, inputs: Any, targets: Any) -> tuple[Any, Tensor]:
        """Scoring forward without autograd (eval mode unless ``score_mode='train'``): (outputs, losses).

        It runs under ``torch.no_grad()``, not ``inference_mode``: state a module creates during it (a cache grown
        for a longer sequence, a lazily materialised parameter) is an ordinary tensor the next training forward
        can use and train. Measured on this project's CPU (small CNN, batch 128): no_grad / inference_mode = 1.00.
        Its host time is added to ``score_time_s`` (on CUDA: launch time unless the caller synchronizes)."""
        start = time.perf_counter()
        was_training = self.model.training
        if self.score_mode == "eval":
            self.model.eval()
        try:
            with torch.no_grad(), scoring_autocast(self.score_precision, device_of(inputs)):
                outputs = self.forward(self.model, downscale(inputs, self.score_scale))
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

    def enqueue(self, inputs: Any, targets: Any, indices: Tensor | None, weights: Tensor | None = None,
                primed: Tensor | None = None) -> list[Fields]:  # fmt: skip
        """Queue selected examples (``primed``: bool mask of rows taken unconditionally while priming); return the
        full batches now ready. Distributed, only as many full batches as every rank has ready (the rest stay
        queued, in order)."""
        fields = (inputs, targets, indices, weights, primed)
        if self._comm is None:
            return self.queue.push(*fields)
        ready = (len(self.queue) + rows_of(inputs)) // self.batch_size
        agreed = self._comm.all_reduce_int(ready, "min", "all_reduce(MIN) of the ready batch counts")
        return self.queue.push(*fields, max_batches=agreed)

    def gather(self, losses: Tensor) -> tuple[Tensor, int]:
        """Every rank's ``losses`` in rank order and this rank's offset in them (``losses, 0`` single-process)."""
        return (losses, 0) if self._comm is None else self._comm.all_gather(losses)

    def make_batch(self, fields: Fields) -> Batch:
        """A :class:`Batch` of queued ``(inputs, targets, indices, weights, primed)`` reporting to this selector."""
        inputs, targets, indices, weights, primed = fields
        return Batch(inputs, targets, indices, weights, primed, self.epoch, _selector=self)

    # ----- machinery ---------------------------------------------------------------------------------------
    def _flush(self, min_rows: int) -> list[Batch]:
        """The queue's remainder as batches (none when it holds fewer than ``min_rows``); distributed, split into
        batches of ``batch_size`` (a last one below ``min_rows`` stays queued) and padded to the same count on
        every rank."""
        if self._comm is None:
            fields = self.queue.flush(min_rows)
            return [] if fields is None else [self.make_batch(fields)]
        fields, batches = self.queue.flush(), []
        if fields is not None:
            n, bs = rows_of(fields[0]), self.batch_size
            keep = n % bs if 0 < n % bs < min_rows else 0  # a short last batch waits in the queue
            batches = [self.make_batch(cut(fields, i, min(i + bs, n - keep))) for i in range(0, n - keep, bs)]
            if keep:
                self.queue.push(*cut(fields, n - keep, None), max_batches=0)
        steps = self._comm.all_reduce_int(len(batches), "max", "all_reduce(MAX) of the flush batch counts")
        return batches + [self._padding_batch() for _ in range(steps - len(batches))]

    def _check_batch(self, inputs: Any, targets: Any, indices: Tensor | None) -> int:
        m, t = rows_of(inputs, "inputs"), rows_of(targets, "targets")
        if t != m or (indices is not None and len(indices) != m):
            lens = f"inputs {m}, targets {t}" + ("" if indices is None else f", indices {len(indices)}")
            raise ValueError(f"inputs, targets and indices must have the same length, got {lens}")
        if indices is not None and (
            not isinstance(indices, Tensor) or indices.ndim != 1 or indices.dtype.is_floating_point
            or indices.is_complex() or indices.dtype == torch.bool
        ):  # fmt: skip
            what = f"dtype {indices.dtype} shape {tuple(indices.shape)}" if isinstance(indices, Tensor) else indices
            raise ValueError(f"indices must be a 1-D integer tensor of dataset indices, got {what}")
        if self._comm is not None:
            if m == 0:
                raise ValueError(
                    f"rank {self.rank} offered an empty batch; in distributed mode every rank must offer a "
                    "non-empty batch at every step (use a DistributedSampler or the lab's ShardedLoader)"
                )
            rows = torch.arange(max(2, self.min_batch_size)) % m  # a padding batch never has one row
            self._last_seen = (take(inputs, rows), take(targets, rows))
        return m

    def _per_example(self, outputs: Any, targets: Any) -> Tensor:
        losses = self.loss_fn(outputs, targets)
        n = rows_of(targets, "targets")
        if not isinstance(losses, Tensor) or losses.ndim != 1 or len(losses) != n:
            got = f"shape {tuple(losses.shape)}" if isinstance(losses, Tensor) else type(losses).__name__
            raise ValueError(
                f"loss_fn must return one loss per example (a tensor of shape ({n},)), got {got}; use "
                "reduction='none', and for sequences selective_backprop.losses.per_sequence_cross_entropy"
            )
        return losses

    def _padding_batch(self) -> Batch:
        if self._last_seen is None:
            raise RuntimeError(f"rank {self.rank} must pad a distributed step but has seen no data yet")
        inputs, targets = self._last_seen
        weights = torch.zeros(rows_of(inputs), device=device_of(inputs))
        return Batch(inputs, targets, None, weights, None, self.epoch, padding=True, _selector=self)

    def _train_loss(self, batch: Batch, outputs: Any) -> Tensor:
        losses = self._per_example(outputs, batch.targets)
        detached = losses.detach()
        if not bool(torch.isfinite(detached).all()):  # host sync: one per step
            bad = (~torch.isfinite(detached)).nonzero().squeeze(1)
            where = (
                f"dataset indices {_capped(batch.indices[bad].tolist())}" if batch.indices is not None
                else f"batch positions {_capped(bad.tolist())}"
            )  # fmt: skip
            raise ValueError(
                f"non-finite training loss at {where} (epoch {batch.epoch}); stop and restore the last good "
                "checkpoint, lower the learning rate or check those examples"
            )
        self._counters["steps"] += 1
        self.observe(batch, tree_map(lambda t: t.detach() if isinstance(t, Tensor) else t, outputs), detached)
        if batch.padding:
            return (losses * 0.0).sum()  # zero gradient, but DDP still sees every parameter used
        self._counters["backpropagated"] += rows_of(batch.inputs)
        weighted = losses if batch.weights is None else losses * batch.weights  # importance weights (Kath18, ...)
        if self.example_weights is None:
            return weighted.mean()
        w: Tensor = self.example_weights(batch.targets).to(losses.dtype)
        return (weighted * w).sum() / w.sum().clamp_min(torch.finfo(w.dtype).tiny)  # no weight at all: loss 0


def _capped(values: list[int], first: int = 8) -> str:
    """``values`` as text, the first ``first`` of them and then how many more."""
    return str(values) if len(values) <= first else f"{values[:first]} and {len(values) - first} more"
