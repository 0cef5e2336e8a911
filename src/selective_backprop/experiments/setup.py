"""Builds the parts of one run from its config: device and process group, run folder, data, networks, optimizer,
precision, selector and loader (:func:`build_run`). Nothing here trains.

Distributed (``torchrun --nproc-per-node N -m selective_backprop train ...``; ``$WORLD_SIZE`` > 1): the ranks join
a process group (gloo on CPU, nccl on CUDA with rank r on ``cuda:$LOCAL_RANK``), each trains on its static shard
of the training set (:class:`~selective_backprop.experiments.data.ShardedLoader`) through
``DistributedDataParallel`` with global selection (:mod:`selective_backprop.distributed`), and evaluates every
``N``-th test example. Not under torchrun: the strategies whose registry entry says so, ``--nonfinite skip``.
"""

from __future__ import annotations

import dataclasses
import json
import os
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .. import Selector
from ..distributed import Collectives, init_distributed
from . import calibrate, scoring
from . import data as sbdata
from .checkpoints import has_checkpoint
from .config import TrainConfig
from .models import build_model
from .runfolder import prepare_folder
from .strategies import STRATEGIES, build_selector

__all__ = ["RunParts", "build_run", "resolve_device", "launched_distributed"]


def keep_freed_memory() -> bool:
    """Have glibc's malloc serve every allocation from its heap and keep freed memory for reuse (Linux, glibc).

    Why: glibc maps each block above 32 MiB (the most ``M_MMAP_THRESHOLD`` may be) straight from the OS and unmaps it
    when freed, so every large activation of a big batch -- a scoring forward at 512 or Kath18's presample of 384 on
    the small CNN: a 51 MB first conv output -- is zero-filled page by page again: 25,000 page faults per forward at
    512, which made such a forward cost 1.3-1.8x more per example than at 128. With ``M_MMAP_MAX = 0`` and a 1 GiB
    ``M_TRIM_THRESHOLD``, measured here: 0 faults and 137-161 instead of 284-304 us/example at 512 (no change at
    128). The process keeps its peak memory. Returns whether it applied (False off glibc)."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(-4, 0)) and bool(mallopt(-1, 1 << 30))  # M_MMAP_MAX = 0, M_TRIM_THRESHOLD = 1 GiB


def launched_distributed() -> bool:
    """Whether this process is one of several ranks started by torchrun (``$WORLD_SIZE`` > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; a CUDA device that is not there is refused."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available; use --device cpu")
    return device


@dataclass
class RunParts:
    """Everything a run is made of; code outside the trainer takes these parts, never the trainer."""

    config: TrainConfig
    out: Path
    device: torch.device
    comm: Collectives | None
    rank: int
    world_size: int
    train_set: sbdata.ArrayDataset
    test_set: sbdata.ArrayDataset
    eval_set: sbdata.ArrayDataset  # this rank's share of the test set (every world_size-th example under torchrun)
    noisy_indices: Tensor
    augment: sbdata.Augment
    model: nn.Module  # the bare module: parameters, state_dict, evaluation
    train_model: nn.Module  # what the training forward calls (DDP-wrapped under torchrun, compiled with --compile)
    scoring_model: nn.Module  # what the selector's scoring forward calls (compiled with --compile)
    memory_format: torch.memory_format
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    autocast_dtype: torch.dtype | None
    selector: Selector = field(init=False)
    loader: sbdata.DeviceLoader = field(init=False)
    compile_s: float = 0.0  # seconds spent compiling before training (this process)
    calibration: dict[str, Any] = field(default_factory=dict)  # --target-time's and --score-precision auto's numbers
    score_precision: str | None = None  # the scoring forward's precision, resolved (auto measured) at start-up
    warm_graphs: int | None = None  # graphs torch.compile had built when the warm-up ended (None: not compiled)
    eval_every: int | None = None  # examples seen between evaluations inside an epoch (None: once per epoch)

    def autocast(self) -> AbstractContextManager[Any]:
        """The autocast context of both forwards (disabled with ``amp='off'``)."""
        dtype = self.autocast_dtype or torch.bfloat16
        return torch.autocast(self.device.type, dtype=dtype, enabled=self.autocast_dtype is not None)

    def sync(self) -> None:
        """Wait for the device (CUDA) so that host timers measure the work."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def recompiles(self) -> int:
        """Graphs torch.compile built after the warm-up (during training): 0 is the goal; 0 without --compile."""
        return 0 if self.warm_graphs is None else calibrate.compiled_graphs() - self.warm_graphs

    def barrier(self, what: str) -> None:
        if self.comm is not None:
            self.comm.barrier(what)


def _join_process_group(config: TrainConfig, device: torch.device) -> tuple[Collectives, torch.device]:
    """Started by torchrun: check the config, join the process group (gloo on CPU, nccl on CUDA)."""
    if not STRATEGIES[config.strategy].distributed:
        raise ValueError(f"strategy {config.strategy!r} cannot run under torchrun (its pruning is per process); "
                         "run it in one process or pick another strategy")  # fmt: skip
    if config.nonfinite == "skip":
        raise ValueError("nonfinite='skip' cannot run under torchrun (a rank skipping a step would desync DDP); "
                         "use --nonfinite raise")  # fmt: skip
    init_distributed("nccl" if device.type == "cuda" else "gloo", timeout_s=config.dist_timeout)
    if device.type == "cuda":  # each rank on its own GPU ($LOCAL_RANK, set by init_distributed)
        device = torch.device("cuda", torch.cuda.current_device())
    return Collectives(), device


def _limit(dataset: sbdata.ArrayDataset, rows: slice) -> sbdata.ArrayDataset:
    return dataclasses.replace(dataset, images=dataset.images[rows], labels=dataset.labels[rows])


def _load_data(config: TrainConfig, device: torch.device, rank: int, world_size: int) -> dict[str, Any]:
    train, test = sbdata.load_dataset(config.dataset, config.data_dir, config.download, device=device)
    train = _limit(train, slice(config.train_limit)) if config.train_limit else train
    test = _limit(test, slice(config.test_limit)) if config.test_limit else test
    noisy = torch.empty(0, dtype=torch.int64)
    if config.label_noise > 0:
        labels, noisy = sbdata.apply_label_noise(train.labels, config.label_noise, train.num_classes, config.seed)
        train = dataclasses.replace(train, labels=labels)
    aug = sbdata.default_augment(config.dataset)
    augment = sbdata.Augment(
        crop_padding=aug.crop_padding if config.crop_padding is None else config.crop_padding,
        flip=aug.flip if config.flip is None else config.flip,
        cutout=aug.cutout if config.cutout is None else config.cutout,
    )
    eval_set = _limit(test, slice(rank, None, world_size)) if world_size > 1 else test
    return {"train_set": train, "test_set": test, "eval_set": eval_set, "noisy_indices": noisy, "augment": augment}


def _networks(config: TrainConfig, train: sbdata.ArrayDataset, device: torch.device, comm: Collectives | None
              ) -> dict[str, Any]:  # fmt: skip
    memory_format = torch.channels_last if config.channels_last else torch.contiguous_format
    options = ({"depth": config.wrn_depth, "widen_factor": config.wrn_width, "dropout": config.wrn_dropout}
               if config.model == "wideresnet" else {})  # fmt: skip
    model = build_model(config.model, num_classes=train.num_classes, in_channels=train.images.shape[1], **options)
    model = model.to(device).to(memory_format=memory_format)  # type: ignore[call-arg]
    train_model: nn.Module = model
    if comm is not None:
        ids = [device.index] if device.type == "cuda" else None
        train_model = nn.parallel.DistributedDataParallel(model, device_ids=ids)
    scoring_model: nn.Module = model
    if config.compile:  # scoring batches padded to a few bucket sizes; see calibrate.compile_forwards
        compiled = torch.compile(model, backend=config.compile)
        largest = min(config.score_batch_size or config.batch_size, len(train))
        scoring_model = scoring.BucketPadded(compiled, scoring.bucket_sizes(largest))
        train_model = compiled if comm is None else torch.compile(train_model, backend=config.compile)  # type: ignore[assignment]
    return {"model": model, "train_model": train_model, "scoring_model": scoring_model,
            "memory_format": memory_format}  # fmt: skip


def build_run(config: TrainConfig, out: Path, *, resume: bool, overwrite: bool) -> tuple[RunParts, bool]:
    """The parts of the run of ``config`` in ``out``, and whether a checkpoint is there to resume.

    Order matters for reproducibility: the model is initialized right after ``torch.manual_seed(config.seed)``;
    compilation and ``--target-time``'s trial steps run before the selector exists and are undone.
    """
    if config.threads:
        torch.set_num_threads(config.threads)
    device = resolve_device(config.device)
    kept = device.type == "cpu" and keep_freed_memory()
    if config.amp == "fp16" and device.type != "cuda":
        raise ValueError("amp fp16 needs CUDA (it trains with a gradient scaler); on CPU use --amp bf16 or off")
    comm = None
    if launched_distributed():
        comm, device = _join_process_group(config, device)
    rank, world_size = (0, 1) if comm is None else (comm.rank, comm.world_size)
    sbdata.locate_dataset(config.dataset, config.data_dir, config.download)  # missing data: refused before the folder
    prepare_folder(out, rank, resume, overwrite, lambda what: comm.barrier(what) if comm is not None else None)
    torch.manual_seed(config.seed)
    data = _load_data(config, device, rank, world_size)
    if rank == 0 and config.label_noise > 0:
        np.save(out / "noisy_indices.npy", data["noisy_indices"].cpu().numpy())
    nets = _networks(config, data["train_set"], device, comm)
    optimizer = torch.optim.SGD(
        nets["model"].parameters(), lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay,
        nesterov=config.nesterov,
    )
    parts = RunParts(
        config, out, device, comm, rank, world_size, **data, **nets, optimizer=optimizer,
        scaler=torch.amp.GradScaler(device.type, enabled=config.amp == "fp16"),
        autocast_dtype={"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}[config.amp],
    )  # fmt: skip
    parts.calibration["malloc_keeps_freed_memory"] = kept
    parts.eval_every = _eval_every(config, len(parts.train_set), len(parts.test_set))
    resuming = resume and has_checkpoint(out, rank, world_size, comm)
    parts.score_precision = _score_precision(parts, resuming)
    if config.compile:
        parts.compile_s = calibrate.compile_forwards(parts)
        parts.warm_graphs = calibrate.compiled_graphs()
        parts.calibration["compiled_graphs"] = parts.warm_graphs
    beta = config.beta
    if config.target_time is not None and not resuming:  # resumed: beta comes back with the policy's state
        beta, found = calibrate.beta_for_target_time(parts)
        parts.calibration.update(found)
    scoring = dataclasses.replace(config, score_precision=parts.score_precision or "fp32")
    parts.selector = build_selector(scoring, parts.scoring_model, len(parts.train_set), beta=beta,
                                    distributed=comm is not None)  # fmt: skip
    parts.loader = _loader(parts)
    return parts, resuming


def _eval_every(config: TrainConfig, train: int, test: int) -> int | None:
    """Examples between evaluations: ``eval_every``, else ``evals_per_epoch`` spread over an epoch (``auto``: 4 when
    the test set has at most 10,000 examples -- finer time-to-target crossings at little cost --, else 1)."""
    if config.eval_every is not None:
        return config.eval_every
    per_epoch = config.evals_per_epoch or (4 if test <= 10_000 else 1)
    return None if per_epoch == 1 else -(-train // per_epoch)


def _score_precision(parts: RunParts, resuming: bool) -> str | None:
    """The scoring forward's precision: as configured, or ``auto`` measured now (:mod:`.scoring`; rank 0's choice
    under torchrun) -- or, resumed, the choice the run made at its start (from ``environment.json``)."""
    c = parts.config
    if not STRATEGIES[c.strategy].scores:
        return None
    if c.score_precision != "auto":
        return c.score_precision
    env = parts.out / "environment.json"
    if resuming and env.exists():
        return json.loads(env.read_text()).get("score_precision", "fp32")  # type: ignore[no-any-return]
    choice, report = scoring.calibrate_precision(parts)
    if parts.comm is not None:
        choice = parts.comm.all_gather_object(choice, "all_gather of the score precisions")[0]
        report["score_precision"] = choice
    parts.calibration.update(report)
    return choice


def _loader(parts: RunParts) -> sbdata.DeviceLoader:
    c = parts.config
    batch = c.score_batch_size or c.batch_size  # one scoring forward per loader batch
    if parts.comm is None:
        return sbdata.DeviceLoader(parts.train_set, batch, shuffle=True, augment=parts.augment, seed=c.seed)
    return sbdata.ShardedLoader(parts.train_set, batch, parts.rank, parts.world_size, seed=c.seed,
                                augment=parts.augment)  # fmt: skip
