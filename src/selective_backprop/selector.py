"""The stateful shell around the policies: coin flips, the backprop queue, priming and the StaleSB cache.

Drop-in use (three changed lines in an ordinary loop; the loader yields ``(inputs, targets, indices)``)::

    sb = SelectiveBackprop(model, batch_size=128, beta=3, dataset_size=len(train_set))  # + this line
    for epoch in range(epochs):
        for batch in sb.iterate(loader):                  # was: for inputs, targets in loader:
            loss = batch.loss(model(batch.inputs))        # was: loss = loss_fn(model(inputs), targets)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

For each loader batch the selector runs a scoring forward (``model.eval()``, no grad, per-example loss), turns
the losses into probabilities with its policy, flips one seeded coin per example and queues the selected ones.
Whenever ``batch_size`` selected examples are queued it hands back one :class:`Batch`, which the caller
forwards in train mode and backpropagates. Everything the caller gets back is backpropagated exactly once.

Host-device synchronisation (what a CUDA caller pays): ``select()`` syncs once per loader batch -- the number of
selected examples, which the queue needs to cut full batches -- and ``Batch.loss`` once per training step, to check
that the losses are finite before anything steps on them (``Kath18`` adds one per presample for ``tau``). The
scoring forward runs under ``torch.inference_mode``; losses, coins and the queue stay on the device; counters are
Python numbers taken from tensor shapes, so reading them never syncs.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .policies import PercentilePolicy, Policy

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

    from .distributed import Collectives

__all__ = [
    "Batch",
    "BackpropQueue",
    "LossCache",
    "SelectiveBackprop",
    "per_example_cross_entropy",
    "COUNTER_NAMES",
]

LossFn = Callable[[Tensor, Tensor], Tensor]
Fields = tuple[Tensor | None, ...]

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


def _clone(value: Any) -> Any:
    if isinstance(value, Tensor):
        return value.clone()
    if isinstance(value, (list, tuple)):
        return type(value)(_clone(v) for v in value)
    if isinstance(value, dict):
        return {k: _clone(v) for k, v in value.items()}
    return value


class BackpropQueue:
    """Accumulates selected examples until a full batch of ``batch_size`` is ready.

    Entries are tuples of tensors that share their first dimension (``None`` entries are passed through).
    Tensors stay on their device. Order is first-in, first-out; the remainder carries over between pushes.

    Example:
        >>> q = BackpropQueue(4)
        >>> [tuple(b[0].tolist()) for b in q.push(torch.arange(3))]
        []
        >>> [tuple(b[0].tolist()) for b in q.push(torch.arange(3, 9))]
        [(0, 1, 2, 3), (4, 5, 6, 7)]
        >>> len(q), q.flush()[0].tolist()
        (1, [8])
    """

    def __init__(self, batch_size: int) -> None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
        self.batch_size = batch_size
        self._chunks: list[Fields] = []
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def push(self, *fields: Tensor | None, max_batches: int | None = None) -> list[Fields]:
        """Queue examples; return every full batch now ready (possibly none), or at most ``max_batches`` of them.

        Full batches held back by ``max_batches`` stay queued, in order (distributed lockstep).
        """
        n = len(fields[0])  # type: ignore[arg-type]
        bs = self.batch_size
        full = (self._size + n) // bs if max_batches is None else min(max_batches, (self._size + n) // bs)
        if self._size == 0 and n == bs and full == 1:  # common case (Traditional, priming): no copy at all
            return [fields]
        if n:
            self._chunks.append(fields)
            self._size += n
        if full <= 0:
            return []
        merged = self._merge()
        batches = [tuple(_rows(f, i * bs, (i + 1) * bs) for f in merged) for i in range(full)]
        self._size -= full * bs
        self._chunks = [tuple(_rows(f, full * bs, None) for f in merged)] if self._size else []
        return batches

    def flush(self) -> Fields | None:
        """Return everything queued as one batch and empty the queue, or ``None`` if empty.

        The batch is smaller than ``batch_size`` unless ``push(max_batches=...)`` held full batches back.
        """
        if not self._size:
            return None
        merged = self._merge()
        self._chunks, self._size = [], 0
        return merged

    def _merge(self) -> Fields:
        if len(self._chunks) == 1:
            return self._chunks[0]
        columns = zip(*self._chunks, strict=True)
        return tuple(None if col[0] is None else torch.cat(col) for col in columns)

    def state_dict(self) -> dict[str, Any]:
        return {"batch_size": self.batch_size, "pending": _clone(self._merge()) if self._size else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.batch_size = state["batch_size"]
        pending = state["pending"]
        self._chunks = [_clone(tuple(pending))] if pending is not None else []
        self._size = len(pending[0]) if pending is not None else 0


def _rows(t: Tensor | None, start: int, stop: int | None) -> Tensor | None:
    return None if t is None else t[start:stop]


def check_index_range(indices: Tensor, size: int, owner: str) -> None:
    """Raise ``ValueError`` naming the first dataset index outside ``[0, size)`` and its batch position."""
    bad = (indices < 0) | (indices >= size)
    if bool(bad.any()):
        pos = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"dataset index {int(indices[pos])} at batch position {pos} is out of range for {owner} of "
            f"dataset_size={size}; pass dataset_size=len(train_set) and 0-based indices"
        )


class LossCache:
    """StaleSB's per-dataset-index memory: the last loss of every example and its age in visits.

    Memory is O(N): one float64 loss, one int32 age and one valid flag per index.

    :meth:`visit` advances the age of the visited examples and says which need a fresh loss: those never scored
    and those whose loss is ``staleness`` visits old. With ``staleness = n`` fresh losses therefore come at
    visits 0, n, 2n, ... (every epoch when n = 1).

    Example:
        >>> cache = LossCache(4, staleness=2)
        >>> cache.visit(torch.tensor([0, 1])).tolist()       # never scored
        [True, True]
        >>> cache.store(torch.tensor([0, 1]), torch.tensor([0.5, 0.7]))
        >>> cache.visit(torch.tensor([0, 1])).tolist()       # one visit old: reuse
        [False, False]
        >>> cache.visit(torch.tensor([0, 1])).tolist()       # two visits old: refresh
        [True, True]
    """

    def __init__(self, size: int, staleness: int, device: torch.device | str = "cpu") -> None:
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"dataset_size must be an int >= 1 for the StaleSB cache, got {size!r}")
        if isinstance(staleness, bool) or not isinstance(staleness, int) or staleness < 1:
            raise ValueError(f"staleness must be an int >= 1 (visits a loss is reused), got {staleness!r}")
        self.size, self.staleness = size, staleness
        self.loss = torch.zeros(size, dtype=torch.float64, device=device)
        self.age = torch.zeros(size, dtype=torch.int32, device=device)
        self.valid = torch.zeros(size, dtype=torch.bool, device=device)

    def to(self, device: torch.device) -> LossCache:
        self.loss, self.age, self.valid = self.loss.to(device), self.age.to(device), self.valid.to(device)
        return self

    def check_indices(self, indices: Tensor) -> None:
        check_index_range(indices, self.size, "the StaleSB cache")

    def visit(self, indices: Tensor) -> Tensor:
        """Age the visited entries by one; return the mask of those needing a fresh loss (their age is reset)."""
        age = self.age[indices] + 1
        need = ~self.valid[indices] | (age >= self.staleness)
        self.age[indices] = torch.where(need, torch.zeros_like(age), age)
        return need

    def store(self, indices: Tensor, losses: Tensor, fresh: bool = True) -> None:
        """Remember finite losses; ``fresh=True`` also resets their age (a new scoring forward)."""
        ok = torch.isfinite(losses)
        idx = indices[ok]
        self.loss[idx] = losses[ok].to(self.loss.dtype)
        self.valid[idx] = True
        if fresh:
            self.age[idx] = 0

    def state_dict(self) -> dict[str, Any]:
        return {k: _clone(v) for k, v in self.__dict__.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.__dict__.update(_clone(state))


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
    _selector: _SelectorBase | None = field(default=None, repr=False)

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


class _SelectorBase:
    """What every selector shares: the model and loss, seeded coins, the queue, counters, epochs, state."""

    def __init__(
        self,
        model: nn.Module,
        batch_size: int,
        loss_fn: LossFn | None,
        seed: int,
        score_mode: Literal["eval", "train"],
        flush: Literal["epoch", "never"],
        distributed: bool | ProcessGroup = False,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if score_mode not in ("eval", "train"):
            raise ValueError(f"score_mode must be 'eval' or 'train', got {score_mode!r}")
        if flush not in ("epoch", "never"):
            raise ValueError(f"flush must be 'epoch' or 'never', got {flush!r}")
        self.model = model
        self.loss_fn: LossFn = loss_fn or per_example_cross_entropy
        self.batch_size = batch_size
        self.seed = int(seed)
        self.score_mode = score_mode
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

    # ----- public API -------------------------------------------------------------------------------------
    @property
    def counters(self) -> dict[str, float]:
        """A copy of the counters (see ``COUNTER_NAMES``)."""
        return dict(self._counters)

    def reset_counters(self) -> None:
        self._counters = dict.fromkeys(COUNTER_NAMES, 0)

    def select(self, inputs: Tensor, targets: Tensor, indices: Tensor | None = None) -> list[Batch]:
        """Offer one loader batch; return the training batches that became ready (often zero or one).

        Checks the batch, runs the strategy's :meth:`_select` and times it: ``score_time_s`` gets the scoring
        forwards (:meth:`_score`), ``select_time_s`` the rest.
        """
        start = time.perf_counter()
        self._score_s = 0.0
        m = self._check_batch(inputs, targets, indices)
        if m == 0:
            return []
        batches = self._select(inputs, targets, indices)
        self._counters["seen"] += m
        self._counters["score_time_s"] += self._score_s
        self._counters["select_time_s"] += time.perf_counter() - start - self._score_s
        return batches

    def _select(self, inputs: Tensor, targets: Tensor, indices: Tensor | None) -> list[Batch]:
        """The strategy: see a checked, non-empty loader batch; return the training batches now ready."""
        raise NotImplementedError

    def flush(self) -> list[Batch]:
        """Return whatever is queued as one smaller batch (or nothing), emptying the queue.

        Distributed: the queue in batches of ``batch_size`` (the last smaller), padded with zero-weight batches
        up to the largest count on any rank, so every rank takes the same number of steps.
        """
        fields = self.queue.flush()
        if self._comm is None:
            return [] if fields is None else [self._batch(fields)]
        batches: list[Batch] = []
        if fields is not None:
            n, bs = len(fields[0]), self.batch_size  # type: ignore[arg-type]
            batches = [self._batch(tuple(_rows(f, i, i + bs) for f in fields)) for i in range(0, n, bs)]
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
        self.epoch = state["epoch"]
        self.seed = state.get("seed", self.seed)  # a state taken before the first coin holds only the seed
        self._counters = {**dict.fromkeys(COUNTER_NAMES, 0), **state["counters"]}
        self._generator_state = None if state["generator"] is None else state["generator"].clone()
        self._generator = None  # re-created on the next batch's device from the seed, then the saved state
        self.queue.load_state_dict(state["queue"])

    # ----- shared machinery -------------------------------------------------------------------------------
    def _rng(self, device: torch.device) -> torch.Generator:
        gen = self._generator
        if gen is None or gen.device.type != device.type:
            gen = torch.Generator(device=device)
            gen.manual_seed(self.seed + self.rank)  # distributed: independent coins per rank
            if self._generator_state is not None:
                gen.set_state(self._generator_state)
                self._generator_state = None
            self._generator = gen
        return gen

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
                    "non-empty batch at every step (use selective_backprop.distributed.ShardedLoader)"
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

    def _score(self, inputs: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
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

    def _push(self, *fields: Tensor | None) -> list[Fields]:
        """Queue selected examples; distributed, release only as many full batches as every rank has ready."""
        if self._comm is None:
            return self.queue.push(*fields)
        ready = (len(self.queue) + len(fields[0])) // self.batch_size  # type: ignore[arg-type]
        agreed = self._comm.all_reduce_int(ready, "min", "all_reduce(MIN) of the ready batch counts")
        return self.queue.push(*fields, max_batches=agreed)

    def _gathered(self, losses: Tensor) -> tuple[Tensor, int]:
        """Every rank's ``losses`` in rank order and this rank's offset in them (``losses, 0`` single-process)."""
        return (losses, 0) if self._comm is None else self._comm.all_gather(losses)

    def _padding_batch(self) -> Batch:
        if self._last_seen is None:
            raise RuntimeError(f"rank {self.rank} must pad a distributed step but has seen no data yet")
        inputs, targets = self._last_seen
        weights = torch.zeros(len(targets), device=targets.device)
        return Batch(inputs, targets, None, weights, padding=True, _selector=self)

    def _batch(self, fields: Fields, primed: bool = False) -> Batch:
        inputs, targets, indices = fields[:3]
        weights = fields[3] if len(fields) > 3 else None
        return Batch(inputs, targets, indices, weights, primed, _selector=self)  # type: ignore[arg-type]

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
        self._observe(batch, outputs.detach(), detached)
        self._counters["backpropagated"] += len(batch)
        return (losses * batch.weights).mean() if batch.weights is not None else losses.mean()

    def _observe(self, batch: Batch, outputs: Tensor, losses: Tensor) -> None:
        """Hook: see the training losses of a batch (no grad)."""


class SelectiveBackprop(_SelectorBase):
    """Selective-Backprop (and StaleSB) as one object a training loop talks to.

    Args:
        model: the network; used for the scoring forward (the caller does the training forward).
        batch_size: examples per training batch (the backprop queue's size). Default: ``128``.
        beta: exponent of :class:`PercentilePolicy` when ``policy`` is not given. Default: ``3`` (the authors').
        policy: any :class:`~selective_backprop.policies.Policy`; default ``PercentilePolicy(beta)``.
        loss_fn: per-example loss ``loss_fn(outputs, targets) -> (N,)``. Default: cross-entropy.
        staleness: StaleSB's ``n``: reuse a cached loss until it is ``n`` visits (epochs) old; fresh losses come
            at epochs 0, n, 2n, ... ``None`` (default) is plain SB; the authors' StaleSB default is ``3``.
        dataset_size: number of training examples; required with ``staleness`` (size of the loss cache).
        prime_epochs: epochs at the start during which every example is backpropagated, with no scoring
            forward. Default: ``1`` (as the authors). Unlike the authors' code, the primed batches' train-mode
            losses fill the history (and the StaleSB cache), so the first selective batch is ranked against
            a full history at no extra cost.
        refresh_on_backprop: with ``staleness``, overwrite an example's cached loss with its training loss when
            it is backpropagated (its age is not reset), as the authors did. Default: ``True``.
        score_mode: ``"eval"`` (default, as the authors: BatchNorm running statistics, no dropout) or
            ``"train"`` (BatchNorm batch statistics, which also updates the running statistics twice per step).
        nonfinite: ``"raise"`` (default) a ``ValueError`` naming the batch position of a NaN/inf scoring loss,
            or ``"skip"``: such examples are not selected and not recorded.
        flush: ``"epoch"`` (default): :meth:`end_epoch` trains the queue's remainder as a smaller batch, so every
            selected example is trained within its epoch; ``"never"``: the remainder carries over (call
            :meth:`flush` at the end of the run).
        seed: seed of the selector's own ``torch.Generator`` (the global RNGs are never touched).
        distributed: ``True`` (default group) or a process group: global selection across data-parallel ranks,
            see :mod:`selective_backprop.distributed` (the generator is then seeded ``seed + rank``).
            Default: ``False``.

    Example:
        >>> model = nn.Linear(4, 3)
        >>> sb = SelectiveBackprop(model, batch_size=2, beta=1, prime_epochs=0, seed=0)
        >>> x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
        >>> batches = sb.select(x, y)
        >>> all(len(b) == 2 for b in batches), sb.counters["seen"]
        (True, 8)
    """

    def __init__(
        self,
        model: nn.Module,
        batch_size: int = 128,
        beta: float = 3.0,
        *,
        policy: Policy | None = None,
        loss_fn: LossFn | None = None,
        staleness: int | None = None,
        dataset_size: int | None = None,
        prime_epochs: int = 1,
        refresh_on_backprop: bool = True,
        score_mode: Literal["eval", "train"] = "eval",
        nonfinite: Literal["raise", "skip"] = "raise",
        flush: Literal["epoch", "never"] = "epoch",
        seed: int = 0,
        distributed: bool | ProcessGroup = False,
    ) -> None:
        super().__init__(model, batch_size, loss_fn, seed, score_mode, flush, distributed)
        self.policy: Policy = policy if policy is not None else PercentilePolicy(beta)
        if isinstance(prime_epochs, bool) or not isinstance(prime_epochs, int) or prime_epochs < 0:
            raise ValueError(f"prime_epochs must be an int >= 0, got {prime_epochs!r}")
        if nonfinite not in ("raise", "skip"):
            raise ValueError(f"nonfinite must be 'raise' or 'skip', got {nonfinite!r}")
        self.prime_epochs = prime_epochs
        self.nonfinite = nonfinite
        self.refresh_on_backprop = refresh_on_backprop
        self.cache: LossCache | None = None
        if staleness is not None:
            if dataset_size is None:
                raise ValueError("StaleSB (staleness=...) needs dataset_size=len(train_set) to size its loss cache")
            self.cache = LossCache(dataset_size, staleness)

    @property
    def priming(self) -> bool:
        """True during the first ``prime_epochs`` epochs, when every example is backpropagated."""
        return self.epoch < self.prime_epochs

    def _select(self, inputs: Tensor, targets: Tensor, indices: Tensor | None) -> list[Batch]:
        m = len(inputs)
        take_all = self.priming or getattr(self.policy, "selects_all", False)
        if self.cache is not None:
            if indices is None:
                raise ValueError(
                    "StaleSB (staleness=...) needs dataset indices: call select(inputs, targets, indices) or "
                    "use a loader that yields (inputs, targets, indices)"
                )
            if self.cache.loss.device != indices.device:
                self.cache.to(indices.device)
            self.cache.check_indices(indices)
        if take_all:
            self._counters["selected"] += m
            ready = self._push(inputs, targets, indices)
        else:
            if self.policy.needs_loss:
                losses = self._selection_losses(inputs, targets, indices)
            else:
                losses = torch.zeros(m, device=inputs.device)
            keep = self._coin_flips(losses)
            chosen = keep.nonzero().squeeze(1)  # host sync: the queue needs the count
            self._counters["selected"] += len(chosen)
            ready = self._push(inputs[chosen], targets[chosen], None if indices is None else indices[chosen])
        return [self._batch(fields, self.priming) for fields in ready]

    def _selection_losses(self, inputs: Tensor, targets: Tensor, indices: Tensor | None) -> Tensor:
        """Fresh scoring-forward losses, or cached ones for StaleSB; only stale examples are forwarded."""
        m = len(inputs)
        if self.cache is None:
            self._counters["selection_forwards"] += m
            return self._score(inputs, targets)[1]
        assert indices is not None
        need = self.cache.visit(indices).nonzero().squeeze(1)
        losses = self.cache.loss[indices]
        if len(need):
            fresh = self._score(inputs[need], targets[need])[1]
            losses[need] = fresh.to(losses.dtype)
            self.cache.store(indices[need], fresh)
        self._counters["selection_forwards"] += len(need)
        self._counters["skipped_forwards"] += m - len(need)
        return losses

    def _coin_flips(self, losses: Tensor) -> Tensor:
        """One U[0, 1) draw per (finite) example from the selector's generator; selected iff u < p."""
        if self.nonfinite == "skip" and self.policy.needs_loss:
            finite = torch.isfinite(losses)
            keep = torch.zeros(len(losses), dtype=torch.bool, device=losses.device)
            p = self._probabilities(losses[finite])
            keep[finite] = torch.rand(len(p), generator=self._rng(p.device), device=p.device, dtype=p.dtype) < p
            return keep
        p = self._probabilities(losses)
        return torch.rand(len(p), generator=self._rng(p.device), device=p.device, dtype=p.dtype) < p

    def _probabilities(self, losses: Tensor) -> Tensor:
        """The policy's probabilities for ``losses``; distributed, the policy sees every rank's losses."""
        gathered, offset = self._gathered(losses)
        return self.policy(gathered)[offset : offset + len(losses)]

    def _observe(self, batch: Batch, outputs: Tensor, losses: Tensor) -> None:
        if batch.primed:
            record = getattr(self.policy, "record", None)
            if record is not None:
                record(self._gathered(losses)[0])
            if self.cache is not None and batch.indices is not None:
                self.cache.store(batch.indices, losses, fresh=True)
        elif self.cache is not None and self.refresh_on_backprop and batch.indices is not None:
            self.cache.store(batch.indices, losses, fresh=False)

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        state["policy"] = {"type": type(self.policy).__name__, **self.policy.state_dict()}
        state["cache"] = None if self.cache is None else self.cache.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        policy_state = dict(state["policy"])
        kind = policy_state.pop("type")
        if kind != type(self.policy).__name__:
            raise ValueError(f"state is for a {kind} policy but this selector uses {type(self.policy).__name__}")
        if (state["cache"] is None) != (self.cache is None):
            raise ValueError("state and selector disagree on StaleSB (staleness set in one, not the other)")
        super().load_state_dict(state)
        self.policy.load_state_dict(policy_state)
        if self.cache is not None:
            self.cache.load_state_dict(state["cache"])
