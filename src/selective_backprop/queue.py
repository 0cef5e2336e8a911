"""The selector's two stores: the backprop queue (selected examples waiting for a full batch) and StaleSB's
per-example loss cache.

Both hold tensors on the device they were given and expose ``state_dict`` / ``load_state_dict`` in the
``torch.optim`` convention (plain dicts of tensors and numbers, snapshots rather than views).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.utils._pytree import tree_map

__all__ = ["BackpropQueue", "LossCache", "check_index_range"]

Fields = tuple[Tensor | None, ...]
"""One queue entry: tensors sharing their first dimension (``None`` entries are passed through)."""


def _clone(value: Any) -> Any:
    """A deep copy of the tensors in a pytree (containers and other leaves are rebuilt or kept)."""
    return tree_map(lambda v: v.clone() if isinstance(v, Tensor) else v, value)


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


def _take(t: Tensor, rows: Tensor, device: torch.device | None = None) -> Tensor:
    """``t[rows]`` whatever device ``rows`` is on (moved to ``device`` if given)."""
    out = t[rows.to(t.device)]
    return out if device is None else out.to(device)


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
