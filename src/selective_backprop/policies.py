"""Backprop-probability policies: per-example losses in, per-example probabilities out.

A policy is a callable ``policy(losses) -> probabilities`` on 1-D tensors, vectorized and device-agnostic.
The selector (:mod:`selective_backprop.selector`) flips one coin per example against these probabilities.

* :class:`PercentilePolicy` -- the paper's rule, ``P = percentile(loss in recent history) ** beta``
  (Jiang et al. 2019, https://arxiv.org/abs/1910.00762).
* :class:`ThresholdPolicy`, :class:`ClampPolicy` -- the talk's "bad ideas" #1 and #2, kept for comparison.
* :class:`UniformPolicy` -- a constant rate: SB's selectivity without its loss signal (ablation).
* :class:`Traditional` -- every example, and the selector skips the scoring forward altogether.

Policies whose ``needs_loss`` is ``False`` never look at loss values, so the selector does not run a
scoring forward for them.
"""

from __future__ import annotations

import math
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

from . import defaults

__all__ = [
    "Policy",
    "PercentilePolicy",
    "ThresholdPolicy",
    "ClampPolicy",
    "UniformPolicy",
    "Traditional",
    "percentile_probabilities",
    "check_losses",
]


@runtime_checkable
class Policy(Protocol):
    """Everything :class:`~selective_backprop.SelectiveBackprop` uses of a policy.

    Attributes:
        needs_loss: whether ``__call__`` looks at the losses; when ``False`` no scoring forward is run and the
            policy is called with zeros.
        selects_all: whether every example is taken (Traditional): then no coins are drawn at all.
    """

    needs_loss: bool
    selects_all: bool

    def __call__(self, losses: Tensor) -> Tensor:
        """Probabilities (float64, shape ``(N,)``) of backpropagating each of the ``(N,)`` losses."""
        ...

    def record(self, losses: Tensor) -> None:
        """Take losses into account without scoring them (primed train-mode losses); may do nothing."""
        ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


POLICY_MEMBERS = ("needs_loss", "selects_all", "__call__", "record", "state_dict", "load_state_dict")
"""What :class:`Policy` declares (a policy missing one is refused when the selector is built)."""


def check_losses(losses: Tensor, what: str = "losses") -> None:
    """Raise ``ValueError`` unless ``losses`` is a 1-D tensor of finite values.

    The message names the first offending batch position so the caller can find the example.
    """
    if not isinstance(losses, Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(losses).__name__}")
    if losses.ndim != 1:
        raise ValueError(
            f"{what} must be 1-D (one loss per example), got shape {tuple(losses.shape)}; "
            "use a per-example loss (reduction='none') and flatten it"
        )
    finite = torch.isfinite(losses)
    if not bool(finite.all()):  # host sync; one per batch
        pos = int((~finite).nonzero()[0, 0])
        raise ValueError(
            f"non-finite value {losses[pos].item()} in {what} at batch position {pos}; fix the model or data, "
            "or pass nonfinite='skip' to the selector to treat such examples as not selected, not recorded"
        )


def _history_dtype(device: torch.device) -> torch.dtype:
    # float64 holds float16/bfloat16/float32 losses exactly, so ties and strict '<' are preserved.
    return torch.float32 if device.type == "mps" else torch.float64


def percentile_probabilities(history: Tensor, losses: Tensor, beta: float, floor: float = 0.0) -> Tensor:
    """The paper's rule on an explicit history (pure function).

    ``p_i = max(floor, (c_i / n) ** beta)`` with ``n = len(history)`` and ``c_i = #{h in history : h < loss_i}``
    (strict ``<``). ``history`` must already contain ``losses``; its order does not matter.

    Args:
        history: 1-D tensor of recent losses (including this batch's).
        losses: 1-D tensor of the losses to score.
        beta: selectivity exponent (> 0); larger means fewer examples are selected.
        floor: lower bound on every probability. Default: ``0.0``.

    Returns:
        float64 tensor of probabilities, same shape and device as ``losses``.

    Example:
        >>> h = torch.tensor([1.0, 2.0, 3.0, 4.0])
        >>> percentile_probabilities(h, torch.tensor([1.0, 4.0]), beta=1.0).tolist()
        [0.0, 0.75]
    """
    dtype = _history_dtype(losses.device)
    ordered = torch.sort(history.to(dtype)).values
    below = torch.searchsorted(ordered, losses.to(dtype).contiguous(), side="left")  # #h < loss
    p = (below.to(dtype) / ordered.numel()) ** beta
    return p.clamp_min(floor) if floor > 0 else p


def _check_beta(beta: float) -> float:
    if not isinstance(beta, (int, float)) or isinstance(beta, bool) or not math.isfinite(beta) or beta <= 0:
        raise ValueError(f"beta must be a finite number > 0, got {beta!r}; the authors' default is 3")
    return float(beta)


def _check_rate(rate: float, name: str) -> float:
    if not isinstance(rate, (int, float)) or isinstance(rate, bool) or not 0.0 <= rate <= 1.0:
        raise ValueError(f"{name} must be a probability in [0, 1], got {rate!r}")
    return float(rate)


class _Stateless:
    """Shared ``state_dict`` plumbing (``torch.optim`` convention: a plain dict of attributes)."""

    needs_loss = True
    selects_all = False

    def record(self, losses: Tensor) -> None:
        """Nothing to record: this policy keeps no history."""

    def state_dict(self) -> dict[str, Any]:
        # Tensors are cloned: the live buffers are updated in place after the state is taken.
        return {k: v.clone() if isinstance(v, Tensor) else v for k, v in self.__dict__.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.__dict__.update({k: v.clone() if isinstance(v, Tensor) else v for k, v in state.items()})

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.__dict__.items() if not k.startswith("_"))
        return f"{type(self).__name__}({args})"


class PercentilePolicy(_Stateless):
    """Selective-Backprop's probability rule, exactly as in the authors' code.

    For each batch, all of its losses are first appended, in batch order, to a ring buffer holding the most
    recent ``history_size`` losses (the oldest are evicted). Then, with ``n = len(history)`` and
    ``c_i = #{h in history : h < loss_i}`` (strict ``<``: ties count for nothing, and an example's own loss is in
    ``n`` but never in ``c_i``)::

        p_i = max(floor, (c_i / n) ** beta)

    There is no upper clamp. Consequences: the smallest loss in the history gets ``p = floor``; the largest of a
    batch gets ``((n - 1) / n) ** beta < 1`` unless the batch is longer than the history; **all-equal losses all
    get** ``p = floor`` (``0`` by default: nothing is selected). For i.i.d. continuous losses the expected selected
    fraction is ``1 / (beta + 1)`` (50 %, 33 %, 25 % for beta = 1, 2, 3).

    The history is never reset between epochs. It accepts losses gathered from several processes: pass the
    concatenation in rank order and every process computes identical probabilities.

    Args:
        beta: selectivity exponent (> 0). The authors' scripts default to ``3``.
        history_size: ring-buffer length R. Default: ``1024`` (hard-coded by the authors).
        floor: minimum probability (the authors' ``sampling_min``). Default: ``0.0``.

    Example:
        >>> policy = PercentilePolicy(beta=1.0, history_size=4)
        >>> policy(torch.tensor([3.0, 1.0])).tolist()   # history [3, 1]: 1 of 2 below 3.0
        [0.5, 0.0]
        >>> policy(torch.tensor([2.0, 2.0, 5.0])).tolist()  # history [1, 2, 2, 5] (3.0 evicted)
        [0.25, 0.25, 0.75]
    """

    def __init__(
        self, beta: float = defaults.BETA, history_size: int = defaults.HISTORY_SIZE, floor: float = 0.0
    ) -> None:
        self.beta = _check_beta(beta)
        if isinstance(history_size, bool) or not isinstance(history_size, int) or history_size < 1:
            raise ValueError(f"history_size must be an int >= 1, got {history_size!r}; the authors used 1024")
        self.history_size = history_size
        self.floor = _check_rate(floor, "floor")
        self._buffer: Tensor | None = None  # ring buffer, allocated on the first batch's device
        self._count = 0  # losses appended so far (total, not capped)

    def __len__(self) -> int:
        return min(self._count, self.history_size)

    @property
    def history(self) -> Tensor:
        """The current history, oldest first (a copy)."""
        if self._buffer is None:
            return torch.empty(0, dtype=torch.float64)
        n, start = len(self), self._count % self.history_size
        if self._count <= self.history_size:
            return self._buffer[:n].clone()
        return torch.cat([self._buffer[start:], self._buffer[:start]])

    def record(self, losses: Tensor) -> None:
        """Append losses to the history without scoring them (used for primed, train-mode losses)."""
        check_losses(losses)
        self._append(losses)

    def _append(self, losses: Tensor) -> None:
        m, r = losses.numel(), self.history_size
        if m == 0:
            return
        dtype = _history_dtype(losses.device)
        if self._buffer is None:
            self._buffer = torch.zeros(r, dtype=dtype, device=losses.device)
        elif self._buffer.device != losses.device:
            self._buffer = self._buffer.to(losses.device)
        values = losses.detach().to(self._buffer.dtype)
        skip = max(0, m - r)  # values older than the last r of this batch are evicted at once
        slots = (torch.arange(skip, m, device=losses.device) + self._count) % r
        self._buffer.index_copy_(0, slots, values[skip:])
        self._count += m

    def __call__(self, losses: Tensor) -> Tensor:
        check_losses(losses)
        if losses.numel() == 0:
            return torch.empty(0, dtype=torch.float64, device=losses.device)
        self._append(losses)
        assert self._buffer is not None
        return percentile_probabilities(self._buffer[: len(self)], losses, self.beta, self.floor)


class ThresholdPolicy(_Stateless):
    """Bad idea #1 of the talk: backprop iff ``loss >= threshold`` (p is 0 or 1, no randomness).

    Example:
        >>> ThresholdPolicy(1.0)(torch.tensor([0.5, 1.0, 2.0])).tolist()
        [0.0, 1.0, 1.0]
    """

    def __init__(self, threshold: float) -> None:
        if not isinstance(threshold, (int, float)) or not math.isfinite(threshold):
            raise ValueError(f"threshold must be a finite number, got {threshold!r}")
        self.threshold = float(threshold)

    def __call__(self, losses: Tensor) -> Tensor:
        check_losses(losses)
        return (losses >= self.threshold).to(torch.float64)


class ClampPolicy(_Stateless):
    """Bad idea #2 of the talk: ``p = clamp(loss, 0, 1)`` -- absolute, not relative, loss.

    Example:
        >>> ClampPolicy()(torch.tensor([0.25, 3.0])).tolist()
        [0.25, 1.0]
    """

    def __call__(self, losses: Tensor) -> Tensor:
        check_losses(losses)
        return losses.to(torch.float64).clamp(0.0, 1.0)


class UniformPolicy(_Stateless):
    """Select each example with the same probability ``rate``, ignoring its loss (no scoring forward).

    Example:
        >>> UniformPolicy(0.25)(torch.zeros(3)).tolist()
        [0.25, 0.25, 0.25]
    """

    needs_loss = False

    def __init__(self, rate: float) -> None:
        self.rate = _check_rate(rate, "rate")

    def __call__(self, losses: Tensor) -> Tensor:
        return torch.full(losses.shape, self.rate, dtype=torch.float64, device=losses.device)


class Traditional(_Stateless):
    """Plain SGD: every example is backpropagated; the selector runs no scoring forward and draws no coins.

    Example:
        >>> Traditional()(torch.zeros(2)).tolist()
        [1.0, 1.0]
    """

    needs_loss = False
    selects_all = True

    def __call__(self, losses: Tensor) -> Tensor:
        return torch.ones(losses.shape, dtype=torch.float64, device=losses.device)
