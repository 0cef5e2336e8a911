"""Which checkpoint a run resumes from: the files of each rank, the agreement across ranks, the compatibility checks.

Resume takes ``checkpoint.pt`` unless it fails to load or its checksum, then ``checkpoint.prev.pt`` (with a warning
naming the file and the reason). Under torchrun each rank has ``checkpoint-rank<r>.pt`` (+ ``.prev.pt``) and the
ranks agree on the newest (epoch, batch) position for which every rank has a usable checkpoint (a crash during the
writes can leave ranks one checkpoint apart); another world size is refused, naming the right command.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch

from ..distributed import Collectives
from .errors import SHOWN, CheckpointError, capped
from .options import flag, shown
from .runfolder import read_checkpoint

__all__ = ["CHECKPOINT", "PREVIOUS_CHECKPOINT", "MAY_CHANGE_ON_RESUME", "checkpoint_paths", "has_checkpoint",
           "read_latest", "check_compatible"]  # fmt: skip

CHECKPOINT, PREVIOUS_CHECKPOINT = "checkpoint.pt", "checkpoint.prev.pt"
MAY_CHANGE_ON_RESUME = ("epochs", "device", "threads", "nonfinite", "dist_timeout")
"""Config fields a resumed run may set differently from the checkpoint's."""


def checkpoint_paths(out: Path, rank: int, world_size: int) -> tuple[Path, Path]:
    """This rank's (checkpoint, previous checkpoint): ``checkpoint.pt`` / ``checkpoint.prev.pt`` in one
    process, ``checkpoint-rank<r>.pt`` / ``checkpoint-rank<r>.prev.pt`` under torchrun."""
    if world_size == 1:
        return out / CHECKPOINT, out / PREVIOUS_CHECKPOINT
    return out / f"checkpoint-rank{rank}.pt", out / f"checkpoint-rank{rank}.prev.pt"


def has_checkpoint(out: Path, rank: int, world_size: int, comm: Collectives | None) -> bool:
    """Whether there is a checkpoint to resume from; refuses one written with another number of ranks."""
    mine = any(path.exists() for path in checkpoint_paths(out, rank, world_size))
    others = sorted(out.glob("checkpoint-rank*.pt") if world_size == 1 else out.glob(CHECKPOINT))
    if not mine and others:
        ranks = len({p.name.split(".")[0] for p in others}) if world_size == 1 else 1
        how = f"torchrun --nproc-per-node {ranks} -m selective_backprop train ..." if ranks > 1 else "one process"
        raise ValueError(f"cannot resume {out} with {world_size} process(es): its checkpoints ({others[0].name}, "
                         f"...) were written by {ranks}; resume it with {how}")  # fmt: skip
    found = mine if comm is None else comm.all_gather_object(mine, "all_gather of 'has a checkpoint'")
    if isinstance(found, list) and len(set(found)) > 1:
        missing = [r for r, has in enumerate(found) if not has]
        raise CheckpointError(f"cannot resume {out}: ranks {capped(missing)} have no checkpoint; start it again with "
                              "--overwrite")  # fmt: skip
    return mine


def read_latest(
    out: Path, rank: int, world_size: int, comm: Collectives | None, device: torch.device
) -> tuple[dict[str, Any], Path]:
    """The newest checkpoint that loads and passes its checksum (agreed across ranks); warns about each one
    rejected. Raises :class:`CheckpointError` when there is none."""
    problems, usable = [], []
    for path in checkpoint_paths(out, rank, world_size):
        if not path.exists():
            problems.append(f"{path}: missing")
            continue
        try:
            usable.append((read_checkpoint(path, map_location=device), path))
        except CheckpointError as e:
            problems.append(str(e))
            print(f"warning: rejected checkpoint {e}", file=sys.stderr, flush=True)
        if comm is None and usable:
            return usable[0]
    positions = [(state["epoch"], state["batches_done"]) for state, _ in usable]
    if comm is not None:
        everyone = comm.all_gather_object(positions, "all_gather of the checkpoint positions")
        common = sorted(set.intersection(*(set(p) for p in everyone)), reverse=True)
        if common:
            return next(item for item, position in zip(usable, positions, strict=True) if position == common[0])
        problems.append(f"no (epoch, batch) position has a usable checkpoint on every rank: {capped(everyone)}")
    raise CheckpointError(
        f"cannot resume {out}: no usable checkpoint ({'; '.join(problems)}); start it again with --overwrite"
    )


def check_compatible(state: dict[str, Any], path: Path, config: dict[str, Any], rank: int, world_size: int) -> None:
    """Refuse a checkpoint of another rank or world size, or of a config that differs beyond
    :data:`MAY_CHANGE_ON_RESUME`."""
    if (state.get("rank", 0), state.get("world_size", 1)) != (rank, world_size):
        raise ValueError(f"{path} is rank {state.get('rank', 0)} of {state.get('world_size', 1)}, not rank "
                         f"{rank} of {world_size}: resume with the same number of ranks")  # fmt: skip
    saved = {k: v for k, v in state["config"].items() if k not in MAY_CHANGE_ON_RESUME}
    ours = {k: v for k, v in config.items() if k in saved}
    if json.loads(json.dumps(saved)) != json.loads(json.dumps(ours)):
        diff = sorted(k for k in saved if json.dumps(saved[k]) != json.dumps(ours.get(k)))
        changes = [f"{flag(k)} {shown(saved[k])} in the checkpoint, {shown(ours.get(k))} now" for k in diff]
        more = f"; and {len(changes) - SHOWN} more" if len(changes) > SHOWN else ""
        raise ValueError(f"cannot resume {path.parent}: the config differs from the checkpoint's: "
                         f"{'; '.join(changes[:SHOWN])}{more}. Resume with the checkpoint's values, or start "
                         "afresh with --overwrite")  # fmt: skip
