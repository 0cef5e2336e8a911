"""Seeded, resumable iteration over an :class:`ArrayDataset` on its device, and its per-rank shard."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from .augment import Augment
from .dataset import ArrayDataset


class DeviceLoader:
    """Iterate an :class:`ArrayDataset` in batches of ``(inputs, targets, indices)`` on its device.

    Each epoch draws a permutation from the loader's own ``torch.Generator`` (on the dataset's device, seeded
    with ``seed``), so epochs differ, runs with the same seed are identical and the global RNG is never used.
    Augmentation draws from the same generator. ``state_dict()`` taken between epochs and restored with
    ``load_state_dict()`` reproduces the following epochs exactly.

    Args:
        dataset: the data, already on the training device.
        batch_size: examples per batch.
        shuffle: permute every epoch; otherwise dataset order. Default: ``True``.
        augment: training augmentation; ``None`` only normalizes. Default: ``None``.
        seed: generator seed. Default: ``0``.
        drop_last: skip the final batch when it is smaller than ``batch_size``. Default: ``False``.

    Yields:
        ``inputs`` float32 ``B x C x H x W`` (normalized, augmented), ``targets`` int64 ``B``, ``indices``
        int64 ``B`` (positions in ``dataset``).

    Raises:
        ValueError: when ``batch_size < 1``.

    Example:
        >>> ds = ArrayDataset(torch.zeros(5, 1, 2, 2, dtype=torch.uint8), torch.zeros(5, dtype=torch.long),
        ...                   num_classes=2, mean=(0.0,), std=(1.0,), name="toy")
        >>> loader = DeviceLoader(ds, batch_size=2)
        >>> len(loader), [len(idx) for _, _, idx in loader]
        (3, [2, 2, 1])
    """

    def __init__(
        self,
        dataset: ArrayDataset,
        batch_size: int,
        shuffle: bool = True,
        augment: Augment | None = None,
        seed: int = 0,
        drop_last: bool = False,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.dataset = dataset
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.augment = augment if augment is not None else Augment()
        self.seed = seed
        self.drop_last = drop_last
        self.epoch = 0
        self.generator = torch.Generator(device=dataset.device).manual_seed(seed)

    def __len__(self) -> int:
        n = len(self.dataset)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def _epoch_order(self) -> Tensor:
        """This epoch's dataset indices, in visiting order (draws from the generator when shuffling)."""
        n, device = len(self.dataset), self.dataset.device
        return (
            torch.randperm(n, generator=self.generator, device=device)
            if self.shuffle
            else torch.arange(n, device=device)
        )

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        ds, order = self.dataset, self._epoch_order()
        self.epoch += 1
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            indices = order[start : start + self.batch_size]
            inputs = self.augment.apply(ds.images[indices], ds.mean, ds.std, self.generator)
            yield inputs, ds.labels[indices], indices

    def state_dict(self) -> dict[str, Any]:
        """Hyperparameters, epoch counter and generator state (not the dataset)."""
        return {
            "batch_size": self.batch_size,
            "shuffle": self.shuffle,
            "augment": dataclasses.asdict(self.augment),
            "seed": self.seed,
            "drop_last": self.drop_last,
            "epoch": self.epoch,
            "generator": self.generator.get_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved; the next epoch is the one the saved loader would run."""
        state = dict(state)
        self.generator.set_state(state.pop("generator").cpu())
        self.augment = Augment(**state.pop("augment"))
        self.__dict__.update(state)


class ShardedLoader(DeviceLoader):
    """A :class:`~selective_backprop.experiments.data.DeviceLoader` over this rank's static shard of the dataset.

    Rank ``r`` of ``world_size`` owns the dataset indices ``i`` with ``i % world_size == r``, every epoch (so the
    StaleSB cache of each rank sees only its own indices). Each epoch the shard is reshuffled by the loader's own
    generator, seeded ``seed * world_size + rank`` (distinct per rank; with one rank it is exactly
    ``DeviceLoader(seed=seed)``). Augmentation draws from the same generator.

    Every rank yields the same number of batches, as lock-stepped selection needs: with ``pad=True`` (default) a
    shard one example short repeats the first example of its epoch order at the end (every shard has
    ``ceil(N / world_size)`` examples; the repeat is a second visit that epoch); with ``pad=False`` the longer
    shards drop their epoch's last example instead (``floor(N / world_size)``; a different one each epoch).

    Args:
        dataset: the whole training split, on the training device.
        batch_size: examples per batch on this rank.
        rank, world_size: this process's place; default: the initialized process group's, else ``0`` and ``1``.
        seed: base seed (the same on every rank). Default: ``0``.
        augment: training augmentation; ``None`` only normalizes. Default: ``None``.
        shuffle: reshuffle the shard each epoch. Default: ``True``.
        drop_last: skip the last batch when it is smaller than ``batch_size``. Default: ``False``.
        pad: see above. Default: ``True``.

    Yields:
        ``(inputs, targets, indices)`` as :class:`DeviceLoader`, with *global* dataset indices.

    Raises:
        ValueError: on ``rank`` outside ``[0, world_size)`` or fewer examples than ranks.

    Example:
        >>> ds = ArrayDataset(torch.zeros(5, 1, 2, 2, dtype=torch.uint8), torch.zeros(5, dtype=torch.long),
        ...                   num_classes=2, mean=(0.0,), std=(0.5,), name="toy")
        >>> [torch.cat([i for _, _, i in ShardedLoader(ds, 2, rank=r, world_size=2, shuffle=False)]).tolist()
        ...  for r in (0, 1)]   # rank 1 repeats one of its own examples
        [[0, 2, 4], [1, 3, 1]]
    """

    def __init__(
        self,
        dataset: ArrayDataset,
        batch_size: int,
        rank: int | None = None,
        world_size: int | None = None,
        *,
        seed: int = 0,
        augment: Augment | None = None,
        shuffle: bool = True,
        drop_last: bool = False,
        pad: bool = True,
    ) -> None:
        grouped = dist.is_available() and dist.is_initialized()
        world_size = world_size if world_size is not None else (dist.get_world_size() if grouped else 1)
        rank = rank if rank is not None else (dist.get_rank() if grouped else 0)
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if len(dataset) < world_size:
            raise ValueError(f"{len(dataset)} examples cannot be sharded over {world_size} ranks; use fewer ranks")
        super().__init__(dataset, batch_size, shuffle=shuffle, augment=augment, seed=seed, drop_last=drop_last)
        self.rank, self.world_size, self.pad = rank, world_size, pad
        self.generator.manual_seed(seed * world_size + rank)
        self.shard = torch.arange(rank, len(dataset), world_size, device=dataset.device)

    @property
    def shard_length(self) -> int:
        """Examples per epoch on every rank (after padding or dropping)."""
        n, w = len(self.dataset), self.world_size
        return -(-n // w) if self.pad else n // w

    def __len__(self) -> int:
        n = self.shard_length
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def _epoch_order(self) -> Tensor:
        shard = self.shard
        if self.shuffle:
            shard = shard[torch.randperm(len(shard), generator=self.generator, device=shard.device)]
        repeat = shard[: max(0, self.shard_length - len(shard))]  # pad=True: at most one example
        return torch.cat([shard, repeat])[: self.shard_length]

    def state_dict(self) -> dict[str, Any]:
        """As :meth:`DeviceLoader.state_dict`, plus the rank, world size and ``pad``."""
        return {**super().state_dict(), "rank": self.rank, "world_size": self.world_size, "pad": self.pad}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved on the same rank of a job with the same world size."""
        if (state["rank"], state["world_size"]) != (self.rank, self.world_size):
            raise ValueError(
                f"loader state is from rank {state['rank']} of {state['world_size']}, but this loader is rank "
                f"{self.rank} of {self.world_size}; resume with the same world size, each rank with its own state"
            )
        super().load_state_dict(state)
