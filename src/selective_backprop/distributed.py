"""Data-parallel Selective-Backprop with *global* selection (``torch.distributed``: gloo on CPU, nccl on CUDA).

Drop-in use, one process per rank (e.g. ``torchrun --nproc-per-node 2 train.py``)::

    rank, world = init_distributed(timeout_s=60)                            # + this line
    sampler = DistributedSampler(train_set, num_replicas=world, rank=rank, seed=0)  # pads: equal batch counts
    loader = DataLoader(train_set, batch_size=64, sampler=sampler)          # yields (inputs, targets, indices)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    sb = SelectiveBackprop(ddp, batch_size=64, beta=3, distributed=True)    # + distributed=True
    for epoch in range(epochs):
        for batch in sb.iterate(loader):
            loss = batch.loss(ddp(batch.inputs))
            optimizer.zero_grad()
            loss.backward()                                                 # DDP averages the gradients
            optimizer.step()
        sampler.set_epoch(epoch + 1)

What is global, what is per rank:

* **Selection is global.** Every step each rank's scoring losses are all-gathered (unequal lengths allowed) and
  the concatenation, in rank order, is fed to the policy on every rank. So the loss history -- hence every
  percentile -- is identical on all ranks and equal to what one process computes when fed the union of the
  ranks' batches in rank order. Primed (train-mode) losses are gathered the same way before they are recorded.
  Each rank then keeps its own slice of the probabilities and flips its coins with its own generator, seeded
  ``seed + rank`` (the ranks' coins are independent).
* **StaleSB's cache is per rank.** With static sharding (each rank always owns the same examples, as the lab's
  ``ShardedLoader`` or a per-rank ``Subset`` does) a rank only ever sees its own dataset indices, so the cache
  needs no synchronisation; its cached (stale) losses still enter the gathered history, exactly as they would in
  one process. ``DistributedSampler`` reshuffles examples across ranks every epoch: StaleSB then still works,
  but a rank re-scores every example it has not seen before, so fewer forwards are skipped.
* **Lockstep.** Ranks select different numbers of examples, but DDP needs the same number of backward passes on
  every rank. After each loader batch the ranks agree (``all_reduce(MIN)``) on how many full batches they all
  have ready and each yields exactly that many; the rest stay queued, in order. A rank that selects little
  therefore holds the others' batches back until the end of the epoch (with ``flush='epoch'`` their queues
  grow by at most one epoch's selections; with ``flush='never'`` until the next flush).
  At :meth:`~selective_backprop.selector.SelectiveBackprop.flush` each rank splits its queue into
  batches of ``batch_size`` (the last one smaller), the ranks agree (``all_reduce(MAX)``) on the number of flush
  batches, and a rank with fewer yields *padding* batches: up to two examples of its last loader batch with
  weight 0, so DDP's gradient all-reduce still matches. ``Batch.padding`` marks them; they count as a step but
  not as backpropagated examples, and their loss is recorded nowhere.
* **Global batch.** Each rank's ``batch.loss`` is the mean over *its* batch, and DDP averages gradients over
  ranks, so a step's gradient is the mean of the per-rank means: ``world_size * batch_size`` examples when all
  batches are full. A flush step with padding batches averages in zero gradients (the real ranks' gradients are
  scaled by ``real ranks / world_size``), as DDP does for any uneven batch.
* **Every rank must call** ``select()`` (or iterate a loader) **the same number of times** with non-empty
  batches: ``DistributedSampler`` (which pads the shards to equal length) or the lab's ``ShardedLoader`` yield
  the same number of batches on every rank. Pass the DDP-wrapped model
  or the bare module; the selector's scoring forward always uses the bare module, so it runs no collective.
* **Cost.** Per loader batch: two all_gathers (sizes, then the float64 losses; one host sync) and one
  all_reduce of an int; one more all_gather pair per primed batch. Policies must be of the same kind on all ranks.
* **Checkpoints are per rank**: each rank saves and restores its own ``sb.state_dict()`` (its queue, cache and
  generator) and ``loader.state_dict()``; the policy's history is the same on every rank.
* **Failures.** A collective that fails -- a peer died, stalled past the timeout, or ran a different number of
  steps -- raises :class:`CollectiveError` naming the collective and the likely cause, instead of hanging:
  gloo raises as soon as a peer's connection closes, and otherwise after ``init_distributed(timeout_s=...)``.

``Kath18`` (``distributed=True``): each rank draws its batch from its own presample (its pools fill in lockstep,
since every rank offers equal batches) with weights ``1 / (B g_i)`` from its own scores -- each rank's loss is an
unbiased estimate of its presample's mean, so DDP's average is one of the union's. The variance-reduction
estimate ``tau``, and so the switch to importance sampling, is computed from the scores gathered over all ranks
(normalized over the union), so every rank switches at the same step.

The lab's trainer (``torchrun --nproc-per-node N -m selective_backprop train ...``) does all of this for a config;
see :class:`selective_backprop.experiments.trainer.Trainer`.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["CollectiveError", "Collectives", "init_distributed", "unwrap_model"]

DEFAULT_TIMEOUT_S = 60.0


class CollectiveError(RuntimeError):
    """A collective failed or timed out: a peer process died or stalled, or the ranks fell out of step."""


def init_distributed(
    backend: str | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    init_method: str = "env://",
    rank: int | None = None,
    world_size: int | None = None,
) -> tuple[int, int]:
    """Join (or reuse) the default process group; return ``(rank, world_size)``.

    Args:
        backend: ``"gloo"`` or ``"nccl"``; default ``"nccl"`` when CUDA is available, else ``"gloo"``. With nccl
            the current CUDA device is set to ``$LOCAL_RANK`` (default: the rank).
        timeout_s: seconds a collective may wait for its peers before :class:`CollectiveError` is raised. Keep it
            above the longest gap between two steps (evaluation, checkpointing). Default: ``60``.
        init_method: rendezvous, e.g. ``"env://"`` (default: torchrun's ``MASTER_ADDR``/``RANK``/...),
            ``"tcp://127.0.0.1:29500"`` or ``"file:///tmp/rendezvous"``.
        rank, world_size: needed with ``tcp://`` and ``file://``; ``env://`` reads ``$RANK``/``$WORLD_SIZE``.

    Raises:
        ValueError: on an unknown backend or a non-positive timeout.
        CollectiveError: when the rendezvous fails or times out.
    """
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"backend must be 'gloo' (CPU) or 'nccl' (CUDA), got {backend!r}")
    if not timeout_s > 0:
        raise ValueError(f"timeout_s must be > 0 seconds, got {timeout_s!r}")
    kwargs: dict[str, Any] = {}
    if rank is not None:
        kwargs["rank"] = rank
    if world_size is not None:
        kwargs["world_size"] = world_size
    try:
        dist.init_process_group(
            backend, init_method=init_method, timeout=datetime.timedelta(seconds=timeout_s), **kwargs
        )
    except (RuntimeError, ValueError) as err:
        raise CollectiveError(
            f"rendezvous via {init_method!r} failed ({err}); check that every rank was started with the same "
            "init method and world size (torchrun sets RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT)"
        ) from err
    rank, world_size = dist.get_rank(), dist.get_world_size()
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    return rank, world_size


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The bare module inside ``DistributedDataParallel`` (so a no-grad forward runs no collective)."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


class Collectives:
    """The collectives of the selector (and the lab's trainer) on one process group, each tagged with its phase.

    Every collective first exchanges a small header -- a sequence number, the phase (e.g. "all_gather of the batch
    losses") and, where it carries one, an integer -- so ranks that fall out of step (one offers another loader
    batch while the other flushes its epoch) are caught at the first collective where they differ, and *every*
    rank raises :class:`CollectiveError` naming what each rank was doing, instead of one rank failing and the other
    hanging in DDP's backward until a backend timeout.

    Args:
        group: a process group; ``None`` is the default (world) group, which must be initialized.

    Raises:
        RuntimeError: when no process group is initialized.
    """

    PHASE_CHARS = 56  # characters of the phase name carried in the header

    def __init__(self, group: dist.ProcessGroup | None = None) -> None:
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError(
                "distributed=True needs an initialized process group: call "
                "selective_backprop.distributed.init_distributed() (or torch.distributed.init_process_group) "
                "in every rank before creating the selector"
            )
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        nccl = dist.get_backend(group) == "nccl"
        self.device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
        self.sequence = 0  # collectives run so far on this object: the same on every rank while in step

    @contextmanager
    def _guard(self, what: str) -> Iterator[None]:
        try:
            yield
        except RuntimeError as err:  # gloo/nccl raise RuntimeError subclasses (DistBackendError, ...)
            raise CollectiveError(
                f"{what} failed on rank {self.rank} of {self.world_size}: another rank probably died or stalled "
                "past the collective timeout (look for the first error in the other ranks' logs), or the ranks "
                "ran different numbers of steps (every rank must offer the same number of non-empty batches; "
                f"a DistributedSampler guarantees it). Underlying error: {err}"
            ) from err

    def _step(self, what: str, value: int = 0) -> list[int]:
        """Exchange ``(sequence, value, phase)`` with every rank; return every rank's ``value``, in rank order.

        Raises :class:`CollectiveError` on every rank when the ranks are not at the same collective."""
        self.sequence += 1
        code = list(what.encode("ascii", "replace")[: self.PHASE_CHARS])
        header = torch.tensor([self.sequence, value, *code, *[0] * (self.PHASE_CHARS - len(code))],
                              dtype=torch.int64, device=self.device)  # fmt: skip
        headers = [torch.empty_like(header) for _ in range(self.world_size)]
        with self._guard(f"{what} (header)"):
            dist.all_gather(headers, header, group=self.group)
        rows = torch.stack(headers).cpu()
        tags = torch.cat([rows[:, :1], rows[:, 2:]], dim=1)  # sequence and phase: what must agree
        if not bool((tags == tags[self.rank]).all()):
            where = "; ".join(
                f"rank {r} at collective #{int(row[0])} ({bytes(int(c) for c in row[2:] if c).decode()})"
                for r, row in enumerate(rows)
            )
            raise CollectiveError(
                f"the ranks fell out of step on rank {self.rank} of {self.world_size}: {where}. Every rank must offer "
                "the same number of non-empty loader batches per epoch and call end_epoch() together (a "
                "DistributedSampler or the lab's ShardedLoader guarantees equal batch counts)"
            )
        return [int(v) for v in rows[:, 1]]

    def all_gather(self, values: Tensor, what: str = "all_gather of the batch losses") -> tuple[Tensor, int]:
        """Concatenate every rank's 1-D ``values`` (lengths may differ) in rank order; also return this rank's
        offset in the result. Values travel as float64, so float16/32 losses come back bit-identical."""
        local = values.detach().reshape(-1).to(self.device, torch.float64)
        counts = self._step(what, len(local))
        padded = torch.zeros(max(1, *counts), dtype=torch.float64, device=self.device)  # never 0-sized
        padded[: len(local)] = local
        parts = [torch.empty_like(padded) for _ in range(self.world_size)]
        with self._guard(what):
            dist.all_gather(parts, padded, group=self.group)
        gathered = torch.cat([part[:n] for part, n in zip(parts, counts, strict=True)])
        return gathered.to(values.device, values.dtype), sum(counts[: self.rank])

    def all_reduce_int(self, value: int, op: Literal["min", "max"], what: str) -> int:
        """The minimum or maximum of every rank's integer ``value`` (carried by the phase header itself)."""
        values = self._step(what, int(value))
        return min(values) if op == "min" else max(values)

    def all_reduce_sum(self, values: Tensor, what: str) -> Tensor:
        """The element-wise sum over ranks of ``values`` (returned on ``values``' device and dtype)."""
        self._step(what)
        buf = values.detach().to(self.device, torch.float64).clone()
        with self._guard(what):
            dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=self.group)
        return buf.to(values.device, values.dtype)

    def all_gather_object(self, obj: Any, what: str) -> list[Any]:
        """Every rank's picklable ``obj``, in rank order (for small, rare exchanges such as resume positions)."""
        self._step(what)
        out: list[Any] = [None] * self.world_size
        with self._guard(what):
            dist.all_gather_object(out, obj, group=self.group)
        return out

    def broadcast_(self, tensors: list[Tensor], what: str, src: int = 0) -> None:
        """Overwrite ``tensors`` in place with rank ``src``'s."""
        self._step(what)
        with self._guard(what):
            for t in tensors:
                dist.broadcast(t, src, group=self.group)

    def barrier(self, what: str) -> None:
        """Wait until every rank gets here (the header exchange is itself a barrier)."""
        self._step(what)
