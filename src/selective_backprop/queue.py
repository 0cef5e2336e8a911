"""The selector's two stores: the backprop queue (selected examples waiting for a full batch) and StaleSB's
per-example loss cache.

Both hold tensors on the device they were given and expose ``state_dict`` / ``load_state_dict`` in the
``torch.optim`` convention (plain dicts of tensors and numbers, snapshots rather than views).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .batching import clone, concat, cut, rows_of
from .validation import check_int

__all__ = ["BackpropQueue", "LossCache", "check_index_range"]

Fields = tuple[Any, ...]
"""One queue entry: fields (tensors, ``None`` or pytrees of tensors) sharing their first dimension."""


class BackpropQueue:
    """Accumulates selected examples until a full batch of ``batch_size`` is ready.

    Entries are tuples of fields (inputs, targets, indices, ...), each a tensor, ``None`` or any nesting of
    dicts/lists/tuples of tensors sharing their first dimension (:mod:`selective_backprop.batching`). A tensor field
    that is ``None`` in some pushes reads as its default there when batches are cut: all ``False`` for a bool field
    (the primed mask), all ones otherwise (weights). Tensors stay on their device. Order is first-in, first-out; the
    remainder carries over between pushes.

    Example:
        >>> q = BackpropQueue(4)
        >>> [tuple(b[0].tolist()) for b in q.push(torch.arange(3))]
        []
        >>> [tuple(b[0].tolist()) for b in q.push(torch.arange(3, 9))]
        [(0, 1, 2, 3), (4, 5, 6, 7)]
        >>> len(q), q.flush()[0].tolist()
        (1, [8])
        >>> [b[0]["ids"].tolist() for b in q.push({"ids": torch.arange(4)})]   # nested inputs
        [[0, 1, 2, 3]]
    """

    def __init__(self, batch_size: int) -> None:
        self.batch_size = check_int("batch_size", batch_size, 1)
        self._chunks: list[Fields] = []
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def push(self, *fields: Any, max_batches: int | None = None) -> list[Fields]:
        """Queue examples; return every full batch now ready (possibly none), or at most ``max_batches`` of them.

        Full batches held back by ``max_batches`` stay queued, in order (distributed lockstep).
        """
        n = rows_of(fields[0])
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
        batches = [cut(merged, i * bs, (i + 1) * bs) for i in range(full)]
        self._size -= full * bs
        self._chunks = [cut(merged, full * bs, None)] if self._size else []
        return batches

    def flush(self, min_rows: int = 1) -> Fields | None:
        """Return everything queued as one batch and empty the queue; ``None`` (the queue kept as it is) when it
        holds fewer than ``min_rows`` examples.

        The batch is smaller than ``batch_size`` unless ``push(max_batches=...)`` held full batches back.
        """
        if not self._size or self._size < min_rows:
            return None
        merged = self._merge()
        self._chunks, self._size = [], 0
        return merged

    def _merge(self) -> Fields:
        if len(self._chunks) == 1:
            return self._chunks[0]
        chunks = self._chunks
        for k in range(len(chunks[0])):  # a per-example field given in some pushes only: fill in its default
            given = next((c[k] for c in chunks if isinstance(c[k], Tensor)), None)
            if given is not None and any(c[k] is None for c in chunks):
                fill = torch.zeros if given.dtype == torch.bool else torch.ones
                chunks = [c if c[k] is not None else (*c[:k], fill(rows_of(c[0]), dtype=given.dtype,
                          device=given.device), *c[k + 1 :]) for c in chunks]  # fmt: skip
        return concat(chunks, ("inputs", "targets", "indices", "weights", "primed_rows"))  # type: ignore[no-any-return]

    def state_dict(self) -> dict[str, Any]:
        return {"batch_size": self.batch_size, "pending": clone(self._merge()) if self._size else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.batch_size = state["batch_size"]
        pending = state["pending"]
        self._chunks = [clone(tuple(pending))] if pending is not None else []
        self._size = rows_of(pending[0]) if pending is not None else 0


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
        return {k: clone(v) for k, v in self.__dict__.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.__dict__.update(clone(state))
