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

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import Tensor, nn

from . import defaults
from .base import Selector
from .batch import Batch, ForwardFn, LossFn
from .batching import device_of, rows_of, take
from .policies import POLICY_MEMBERS, PercentilePolicy, Policy
from .queue import LossCache
from .validation import check_bool, check_int

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

__all__ = ["SelectiveBackprop"]


class SelectiveBackprop(Selector):
    """Selective-Backprop (and StaleSB) as one object a training loop talks to.

    Args:
        model: the network; used for the scoring forward (the caller does the training forward).
        batch_size: examples per training batch (the backprop queue's size). Default: ``128``.
        beta: exponent of :class:`PercentilePolicy` when ``policy`` is not given. Default: ``3`` (the authors').
        policy: any :class:`~selective_backprop.policies.Policy` instance; default ``PercentilePolicy(beta)``.
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
        loss_fn, forward, example_weights, min_batch_size, score_mode, nonfinite, flush, seed, distributed: see
            :class:`~selective_backprop.Selector`.

    Raises:
        TypeError: when ``policy`` is not a :class:`Policy` instance (e.g. a string or the class itself).
        ValueError: on out-of-range arguments, naming the value and the fix.

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
        batch_size: int = defaults.BATCH_SIZE,
        beta: float = defaults.BETA,
        *,
        policy: Policy | None = None,
        loss_fn: LossFn | None = None,
        staleness: int | None = None,
        dataset_size: int | None = None,
        prime_epochs: int = defaults.PRIME_EPOCHS,
        refresh_on_backprop: bool = True,
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
        super().__init__(
            model, batch_size, loss_fn=loss_fn, forward=forward, example_weights=example_weights,
            min_batch_size=min_batch_size, score_precision=score_precision, score_scale=score_scale,
            score_mode=score_mode, nonfinite=nonfinite, flush=flush, seed=seed, distributed=distributed,
        )  # fmt: skip
        if isinstance(policy, type):
            raise TypeError(f"policy must be a Policy instance, got the class {policy.__name__}; pass "
                            f"{policy.__name__}(...)")  # fmt: skip
        if policy is not None and not isinstance(policy, Policy):
            missing = [m for m in POLICY_MEMBERS if not hasattr(policy, m)]
            raise TypeError(f"policy must be a Policy instance such as PercentilePolicy(beta=3); {policy!r} lacks "
                            f"{', '.join(missing)} (see selective_backprop.Policy)")  # fmt: skip
        self.policy: Policy = policy if policy is not None else PercentilePolicy(beta)
        self.prime_epochs = check_int("prime_epochs", prime_epochs, 0)
        self.refresh_on_backprop = check_bool("refresh_on_backprop", refresh_on_backprop)
        self.cache: LossCache | None = None
        if staleness is not None:
            if dataset_size is None:
                raise ValueError("StaleSB (staleness=...) needs dataset_size=len(train_set) to size its loss cache")
            self.cache = LossCache(dataset_size, staleness)

    @property
    def priming(self) -> bool:
        """True during the first ``prime_epochs`` epochs, when every example is backpropagated."""
        return self.epoch < self.prime_epochs

    def choose(self, inputs: Any, targets: Any, indices: Tensor | None) -> list[Batch]:
        m = len(indices) if indices is not None else rows_of(inputs)
        take_all = self.priming or self.policy.selects_all
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
            self.count(selected=m)
            primed = torch.ones(m, dtype=torch.bool, device=device_of(inputs)) if self.priming else None
            ready = self.enqueue(inputs, targets, indices, primed=primed)
        else:
            if self.policy.needs_loss:
                losses = self._selection_losses(inputs, targets, indices)
            else:
                losses = torch.zeros(m, device=device_of(inputs))
            keep = self._coin_flips(losses)
            chosen = keep.nonzero().squeeze(1)  # host sync: the queue needs the count
            self.count(selected=len(chosen))
            rows = (inputs, targets, indices)
            ready = self.enqueue(*take(rows, chosen))
        return [self.make_batch(fields) for fields in ready]

    def _selection_losses(self, inputs: Any, targets: Any, indices: Tensor | None) -> Tensor:
        """Fresh scoring-forward losses, or cached ones for StaleSB; only stale examples are forwarded."""
        m = rows_of(inputs)
        if self.cache is None:
            self.count(selection_forwards=m)
            return self.scoring_forward(inputs, targets)[1]
        assert indices is not None
        need = self.cache.visit(indices).nonzero().squeeze(1)
        losses = self.cache.loss[indices]
        if len(need):
            fresh = self.scoring_forward(take(inputs, need), take(targets, need))[1]
            losses[need] = fresh.to(losses.dtype)
            self.cache.store(indices[need], fresh)
        self.count(selection_forwards=len(need), skipped_forwards=m - len(need))
        return losses

    def _coin_flips(self, losses: Tensor) -> Tensor:
        """One U[0, 1) draw per (finite) example from the selector's generator; selected iff u < p."""
        if self.nonfinite == "skip" and self.policy.needs_loss:
            finite = torch.isfinite(losses)
            keep = torch.zeros(len(losses), dtype=torch.bool, device=losses.device)
            p = self._probabilities(losses[finite])
            keep[finite] = torch.rand(len(p), generator=self.generator(p.device), device=p.device, dtype=p.dtype) < p
            return keep
        p = self._probabilities(losses)
        return torch.rand(len(p), generator=self.generator(p.device), device=p.device, dtype=p.dtype) < p

    def _probabilities(self, losses: Tensor) -> Tensor:
        """The policy's probabilities for ``losses``; distributed, the policy sees every rank's losses."""
        gathered, offset = self.gather(losses)
        return self.policy(gathered)[offset : offset + len(losses)]

    def observe(self, batch: Batch, outputs: Any, losses: Tensor) -> None:
        """Primed rows' training losses go into the history (gathered over ranks) and the StaleSB cache (fresh);
        other backpropagated rows refresh their cached loss (``refresh_on_backprop``)."""
        primed = batch.primed_rows
        if self._comm is not None and 0 < self.prime_epochs and batch.epoch <= self.prime_epochs:
            # every rank gathers at every step that may hold primed rows (padding too), so the collectives match
            mine = losses[primed] if primed is not None and not batch.padding else losses[:0]
            self.policy.record(self.gather(mine)[0])
        elif primed is not None:
            self.policy.record(losses[primed])
        if self.cache is None or batch.indices is None or batch.padding:
            return
        if primed is not None:
            self.cache.store(batch.indices[primed], losses[primed], fresh=True)
        if self.refresh_on_backprop:
            rest = slice(None) if primed is None else ~primed
            self.cache.store(batch.indices[rest], losses[rest], fresh=False)

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

