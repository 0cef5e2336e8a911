"""One experiment from one config: data on the device, a model, a strategy, SGD, evaluation, checkpoints.

The training step, top to bottom (``Trainer._epoch``)::

    for inputs, targets, indices in loader:             # data on the device, augmented per batch
        for batch in selector.select(inputs, targets, indices):   # scoring forward + coins + queue
            set the LR from the schedule (counted in examples seen or examples backpropagated)
            loss = batch.loss(model(batch.inputs)); zero_grad; backward; step
    for batch in selector.end_epoch(): (same step)      # the queue's remainder
    evaluate on the test set (not counted as training time), log a row, checkpoint

Run folder: ``config.json``, ``environment.json``, ``metrics.jsonl`` (one row per evaluation, the first before
any training), ``checkpoint.pt`` (every epoch and on Ctrl-C / SIGTERM) with the one before it kept as
``checkpoint.prev.pt``, and at the end ``selection_counts.npy`` (times each training example was
backpropagated), ``train_confidence.npy`` (final true-class softmax probability of each training example, eval
mode, no augmentation), ``noisy_indices.npy`` (with label noise) and ``final.json``.

Faults:

* **Checkpoint files** are ``torch.save`` of ``{"format": 1, "sha256": hex, "payload": uint8 tensor, "epoch",
  "batches_done", "metrics_rows"}``: the payload is the ``torch.save`` bytes of the training state and
  ``sha256`` its digest (the other keys are copies for a quick look). Every write goes to a temporary file in
  the same folder, is fsynced, and only then renamed over ``checkpoint.pt``, the old one first renamed to
  ``checkpoint.prev.pt``; a failed write (disk full, read-only folder) raises ``OSError`` naming the file and
  leaves both checkpoints and the results as they were. Resume takes ``checkpoint.pt`` unless it fails to
  load or its checksum, then ``checkpoint.prev.pt`` (with a warning naming the file and the reason), cuts
  ``metrics.jsonl`` back to the rows the checkpoint had logged and deletes leftover temporary files.
* **Non-finite losses** (NaN/inf, training or scoring): ``nonfinite="raise"`` (default) stops with
  :class:`TrainingDiverged` naming the step, the epoch, the dataset indices and the last good checkpoint,
  before the optimizer steps; ``"skip"`` drops that optimizer step (counted as ``skipped_steps`` in the metrics
  rows) and scoring losses that are not finite count as not selected. Parameters that are no longer finite
  when a checkpoint is due always stop the run: no checkpoint is written from them.

Exit codes of ``selective-backprop train`` / ``compare``: ``0`` done; ``1`` a file could not be written (disk
full, read-only folder: the message names the file); ``2`` bad configuration, data or checkpoint (the message
names the value or file and the fix); ``3`` training diverged (:class:`TrainingDiverged`); ``4`` another rank
failed or stalled (torchrun; :class:`~selective_backprop.distributed.CollectiveError`); ``130`` / ``143``
interrupted by SIGINT / SIGTERM after writing a checkpoint (continue with ``--resume``).

Distributed (``torchrun --nproc-per-node N -m selective_backprop train ...``; ``$WORLD_SIZE`` > 1): the ranks join
a process group (gloo on CPU, nccl on CUDA with rank r on ``cuda:$LOCAL_RANK``), each trains on its static shard
of the training set (:class:`~selective_backprop.distributed.ShardedLoader`) through
``DistributedDataParallel`` with global selection (:mod:`selective_backprop.distributed`), so a step's gradient
averages ``N`` batches of ``batch_size``. The LR schedule counts examples over all ranks (backprops as steps x
batch size x N). Each rank writes its own ``checkpoint-rank<r>.pt`` (+ ``.prev.pt``); rank 0 writes everything
else; the test set is evaluated in shares and the counts in ``metrics.jsonl`` are sums over ranks (times are rank
0's). A stop signal is agreed on at the next loader batch, so all ranks checkpoint the same position; resume
needs the same ``N`` and picks the newest position every rank has a usable checkpoint for. Not under torchrun:
``infobatch``, ``composer-sb``, ``--nonfinite skip``.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import hashlib
import io
import json
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from . import data as sbdata
from .distributed import Collectives, ShardedLoader
from .models import build_model
from .selector import Batch, _SelectorBase
from .strategies import SINGLE_PROCESS_ONLY, STRATEGIES, build_selector, selectivity_options

__all__ = [
    "TrainConfig",
    "Trainer",
    "train",
    "Interrupted",
    "RunExistsError",
    "TrainingDiverged",
    "CheckpointError",
    "lr_at",
    "write_atomic",
    "write_checkpoint",
    "read_checkpoint",
]

INTERRUPT_EXIT_CODES = {signal.SIGINT: 130, signal.SIGTERM: 143}
CHECKPOINT, PREVIOUS_CHECKPOINT = "checkpoint.pt", "checkpoint.prev.pt"
CHECKPOINT_FORMAT = 1


def _h(text: str, **kw: Any) -> Any:
    """A dataclass field with CLI help text."""
    return field(metadata={"help": text}, **kw)


@dataclass
class TrainConfig:
    """Every setting of one run. Defaults: Fashion-MNIST, small CNN, SB with the authors' beta = 3."""

    dataset: str = _h("fashion-mnist | cifar10 | cifar100 | svhn", default="fashion-mnist")
    model: str = _h("small-cnn | resnet18 | wideresnet | mobilenetv2", default="small-cnn")
    strategy: str = _h(" | ".join(STRATEGIES), default="sb")
    epochs: int = _h("training budget in epochs (passes over the training set)", default=8)
    batch_size: int = _h("examples per training step", default=128)
    lr: float = _h("initial learning rate", default=0.05)
    momentum: float = _h("SGD momentum", default=0.9)
    weight_decay: float = _h("SGD weight decay", default=5e-4)
    lr_schedule: str = _h("step | cosine | constant", default="step")
    lr_milestones: tuple[float, ...] = _h(
        "step schedule: LR x gamma at these fractions of the budget (in --lr-unit)", default=(0.5, 0.75)
    )
    lr_gamma: float = _h("step schedule factor", default=0.1)
    lr_unit: str = _h("what the schedule counts: examples (seen) | backprops (backpropagated)", default="examples")
    beta: float = _h("SB / StaleSB selectivity exponent (authors' default 3)", default=3.0)
    selectivity: float | None = _h(
        "set the strategy's knob to backprop about this fraction (SB/StaleSB beta = 1/S - 1, random rate, Kath18 "
        "presample, composer-sb keep)", default=None)  # fmt: skip
    target_time: float | None = _h(
        "SB/StaleSB: pick beta so a selective epoch costs about this fraction of a Traditional one, from the "
        "scoring-forward and train-step costs measured before training", default=None)  # fmt: skip
    staleness: int = _h("StaleSB: reuse a cached loss for this many epochs", default=3)
    prime_epochs: int = _h("epochs of unconditional backprop before selecting (SB family)", default=1)
    rate: float | None = _h("random strategy: selection rate (default 1/(beta+1))", default=None)
    threshold: float = _h("threshold strategy: backprop iff loss >= threshold", default=0.5)
    presample: int = _h("Kath18: presample B = presample * batch size", default=3)
    kath_score: str = _h("Kath18 score: upper-bound | loss", default="upper-bound")
    prune_ratio: float = _h("InfoBatch: probability of pruning a below-mean-loss example", default=0.5)
    keep: float = _h("composer-sb: fraction of each selective batch kept", default=0.5)
    score_mode: str = _h("scoring forward in eval | train mode", default="eval")
    label_noise: float = _h("fraction of training labels replaced by random labels", default=0.0)
    crop_padding: int | None = _h("random-crop padding (default: the dataset's)", default=None)
    flip: bool | None = _h("random horizontal flips (default: the dataset's)", default=None)
    cutout: int | None = _h("cutout square side (default: the dataset's)", default=None)
    eval_every: int | None = _h("also evaluate every this many examples seen", default=None)
    train_limit: int | None = _h("use only the first N training examples (quick runs)", default=None)
    test_limit: int | None = _h("use only the first N test examples (quick runs)", default=None)
    seed: int = _h("seed of the model init, the data order, label noise and the coins", default=0)
    device: str = _h("auto | cpu | cuda | cuda:N", default="auto")
    channels_last: bool = _h("NHWC memory format for model and batches (faster convolutions here)", default=True)
    score_batch_size: int | None = _h(
        "examples per loader batch, i.e. per scoring forward (default: batch_size); training batches stay "
        "batch_size", default=None)  # fmt: skip
    amp: str = _h("autocast for the scoring and training forwards: off | bf16 | fp16 (CUDA, with a gradient scaler)",
                  default="off")  # fmt: skip
    compile: str | None = _h("torch.compile the model with this backend (e.g. inductor); compile time is measured "
                             "before training and reported as compile_s, apart from training time",
                             default=None)  # fmt: skip
    threads: int | None = _h("torch CPU threads (default: torch's choice)", default=None)
    data_dir: str | None = _h("folder with the dataset's official files", default=None)
    download: bool = _h("download the dataset if it is not found", default=False)
    nonfinite: str = _h("on a NaN/inf loss: raise (stop, exit code 3) | skip (drop that optimizer step)",
                        default="raise")  # fmt: skip
    dist_timeout: float = _h("torchrun: seconds a rank waits for the others before failing", default=300.0)

    def __post_init__(self) -> None:
        checks = [
            (self.strategy in STRATEGIES, f"strategy must be one of {', '.join(STRATEGIES)}"),
            (self.epochs >= 1, "epochs must be >= 1"),
            (self.lr_schedule in ("step", "cosine", "constant"), "lr_schedule must be step, cosine or constant"),
            (self.lr_unit in ("examples", "backprops"), "lr_unit must be examples or backprops"),
            (0.0 <= self.label_noise <= 1.0, "label_noise must be a fraction in [0, 1]"),
            (all(0 < m < 1 for m in self.lr_milestones), "lr_milestones must be fractions in (0, 1)"),
            (self.eval_every is None or self.eval_every > 0, "eval_every must be > 0"),
            (self.nonfinite in ("raise", "skip"), "nonfinite must be raise or skip"),
            (self.dist_timeout > 0, "dist_timeout must be > 0 seconds"),
            (self.amp in ("off", "bf16", "fp16"), "amp must be off, bf16 or fp16"),
            (self.score_batch_size is None or self.score_batch_size >= 1, "score_batch_size must be >= 1"),
            (self.target_time is None or self.strategy in ("sb", "stale-sb"), "target_time needs sb or stale-sb"),
            (self.target_time is None or 0 < self.target_time <= 1, "target_time must be a fraction in (0, 1]"),
            (self.target_time is None or self.selectivity is None, "give selectivity or target_time, not both"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"{message}; got {self}")
        self.lr_milestones = tuple(float(m) for m in self.lr_milestones)
        if self.selectivity is not None:  # raises ValueError naming the strategies that have a knob
            for name, value in selectivity_options(self.strategy, self.selectivity).items():
                setattr(self, name, value)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class Interrupted(Exception):
    """Training stopped by SIGINT/SIGTERM after writing a checkpoint; ``exit_code`` is 130 or 143."""

    def __init__(self, signum: int, checkpoint: Path) -> None:
        self.exit_code = INTERRUPT_EXIT_CODES.get(signal.Signals(signum), 1)
        self.checkpoint = checkpoint
        super().__init__(f"interrupted by {signal.Signals(signum).name}; checkpoint saved to {checkpoint}")


class RunExistsError(FileExistsError):
    pass


class TrainingDiverged(ValueError):
    """A loss or the parameters became NaN/inf; training stopped before the optimizer stepped on it.

    Attributes:
        step: the 1-based training step (optimizer steps taken or skipped before it, plus one).
        epoch: the 0-based epoch it happened in (shown 1-based in the message, as in the progress bar).
        indices: dataset indices of the examples with a non-finite loss (``None`` for non-finite parameters).
        checkpoint: the last good checkpoint to go back to, or ``None`` if none was written yet.
    """

    exit_code = 3  # of the command line

    def __init__(self, what: str, step: int, epoch: int, epochs: int, indices: list[int] | None,
                 checkpoint: Path | None) -> None:  # fmt: skip
        self.step, self.epoch, self.indices, self.checkpoint = step, epoch, indices, checkpoint
        where = "" if indices is None else f" at dataset indices {indices}"
        last = f"last good checkpoint: {checkpoint}" if checkpoint else "no checkpoint was written yet"
        super().__init__(
            f"training diverged: {what}{where} at step {step} (epoch {epoch + 1}/{epochs}); {last}. Lower --lr, "
            "check those examples, or pass --nonfinite skip to drop such steps"
        )


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used: unreadable, truncated, of an unknown format or failing its checksum."""


def lr_at(config: TrainConfig, progress: float) -> float:
    """The learning rate at ``progress`` = fraction of the budget done, counted in ``config.lr_unit``.

    Example:
        >>> c = TrainConfig(lr=1.0, lr_milestones=(0.5, 0.75), lr_gamma=0.1)
        >>> [round(lr_at(c, p), 4) for p in (0.0, 0.5, 0.8, 2.0)]
        [1.0, 0.1, 0.01, 0.01]
    """
    if config.lr_schedule == "constant":
        return config.lr
    if config.lr_schedule == "cosine":
        return config.lr * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    return config.lr * config.lr_gamma ** sum(progress >= m for m in config.lr_milestones)


def write_atomic(path: Path, write: Any, backup: Path | None = None) -> None:
    """Write a file via a temporary file in the same folder, fsync and rename: readers never see a torn file.

    Args:
        path: the file to (re)place.
        write: ``write(f)`` writes the content to the binary file object ``f``.
        backup: if given and ``path`` exists, ``path`` is first renamed to ``backup`` (after the new content is
            safely on disk, so a failed write leaves both as they were).

    Raises:
        OSError: naming ``path`` and the cause (``errno`` kept) when the folder is full, read-only, ...; the
            temporary file is removed and ``path`` (and ``backup``) are left untouched.
    """
    path = Path(path)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if backup is not None and path.exists():
            os.replace(path, backup)
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except OSError as e:
        cause = e.strerror or str(e)
        raise OSError(e.errno, f"could not write {path} ({cause}); the previous file was left as it was") from e
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


def _fsync_dir(folder: Path) -> None:
    """Make the renames in ``folder`` durable where the OS allows it (best effort: not on Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_checkpoint(path: Path, state: dict[str, Any], backup: Path | None = None) -> None:
    """Save ``state`` atomically with its SHA-256 (format in the module docstring); see :func:`write_atomic`."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    payload = buffer.getvalue()
    envelope = {
        "format": CHECKPOINT_FORMAT,
        "sha256": hashlib.sha256(payload).hexdigest(),
        "payload": torch.frombuffer(bytearray(payload), dtype=torch.uint8),
        **{k: state[k] for k in ("epoch", "batches_done", "metrics_rows") if k in state},
    }
    write_atomic(path, lambda f: torch.save(envelope, f), backup=backup)


def read_checkpoint(path: Path, map_location: Any = None) -> dict[str, Any]:
    """The state saved by :func:`write_checkpoint` at ``path``, its checksum verified.

    Raises:
        CheckpointError: naming ``path`` and the reason when it cannot be read or unpickled, is truncated, is
            not of this format, or its payload does not match its SHA-256.
    """
    try:  # weights_only: the envelope holds plain values and one tensor; reading it runs no pickled code
        envelope = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch.load raises many types on a torn or foreign file
        raise CheckpointError(f"{path}: cannot be read ({type(e).__name__}: {e})") from e
    if not isinstance(envelope, dict) or envelope.get("format") != CHECKPOINT_FORMAT or "payload" not in envelope:
        raise CheckpointError(f"{path}: not a checksummed checkpoint (format {CHECKPOINT_FORMAT}); was it written "
                              "by an older version?")  # fmt: skip
    payload = envelope["payload"].numpy().tobytes()
    digest = hashlib.sha256(payload).hexdigest()
    if digest != envelope.get("sha256"):
        raise CheckpointError(f"{path}: checksum mismatch (sha256 of the payload is {digest}, the file says "
                              f"{envelope.get('sha256')}): the file is corrupt")  # fmt: skip
    try:
        return torch.load(io.BytesIO(payload), map_location=map_location, weights_only=False)
    except Exception as e:
        raise CheckpointError(f"{path}: the payload cannot be unpickled ({type(e).__name__}: {e})") from e


def _write_json(path: Path, obj: Any) -> None:
    write_atomic(path, lambda f: f.write(json.dumps(obj, indent=2, default=str).encode()))


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def environment(device: torch.device) -> dict[str, Any]:
    """Where and with what a run ran."""
    return {
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "threads": torch.get_num_threads(),
        "git_commit": _git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def launched_distributed() -> bool:
    """Whether this process is one of several ranks started by torchrun (``$WORLD_SIZE`` > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available; use --device cpu")
    return device


class Trainer:
    """Runs one :class:`TrainConfig` into ``out_dir`` (see the module docstring for the folder's contents)."""

    def __init__(
        self,
        config: TrainConfig,
        out_dir: str | Path,
        *,
        resume: bool = False,
        overwrite: bool = False,
        progress: bool = True,
    ) -> None:
        self.config, self.out = config, Path(out_dir)
        if config.threads:
            torch.set_num_threads(config.threads)
        self.device = resolve_device(config.device)
        if config.amp == "fp16" and self.device.type != "cuda":
            raise ValueError("amp fp16 needs CUDA (it trains with a gradient scaler); on CPU use --amp bf16 or off")
        self.comm: Collectives | None = None  # set when started by torchrun (WORLD_SIZE > 1)
        self.rank, self.world_size = 0, 1
        if launched_distributed():
            self._join_process_group()
        self.progress = progress and self.rank == 0
        self._prepare_folder(resume, overwrite)
        torch.manual_seed(config.seed)
        self._load_data()
        self.model = build_model(
            config.model, num_classes=self.train_set.num_classes, in_channels=self.train_set.images.shape[1]
        ).to(self.device)
        self.memory_format = torch.channels_last if config.channels_last else torch.contiguous_format
        self.model = self.model.to(memory_format=self.memory_format)  # type: ignore[call-arg]
        self.train_model: torch.nn.Module = self.model  # what the training forward calls (DDP-wrapped: torchrun)
        if self.comm is not None:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.train_model = torch.nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
        self.scoring_model: torch.nn.Module = self.model  # what the selector's scoring forward calls
        if config.compile:
            self.scoring_model = torch.compile(self.model, backend=config.compile)  # type: ignore[assignment]
            self.train_model = (
                self.scoring_model if self.comm is None else torch.compile(self.train_model, backend=config.compile)
            )  # type: ignore[assignment]
        self.autocast_dtype = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}[config.amp]
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=config.amp == "fp16")
        self.optimizer = torch.optim.SGD(
            self.model.parameters(), lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay
        )
        resuming = resume and self._has_checkpoint()
        self.compile_s = 0.0  # seconds spent compiling before training (this process and, resumed, earlier ones)
        if config.compile:
            self.compile_s = self._compile()
        self.calibration: dict[str, float] = {}
        beta = config.beta
        if config.target_time is not None and not resuming:  # resumed: beta comes back with the policy's state
            beta = self._beta_for_target_time()
        self.selector: _SelectorBase = build_selector(
            config.strategy, self.scoring_model, len(self.train_set),
            batch_size=config.batch_size, beta=beta, staleness=config.staleness,
            prime_epochs=config.prime_epochs, rate=config.rate, threshold=config.threshold,
            presample=config.presample, kath_score=config.kath_score, score_mode=config.score_mode, seed=config.seed,
            epochs=config.epochs, prune_ratio=config.prune_ratio, keep=config.keep, distributed=self.comm is not None,
        )  # fmt: skip
        loader_batch = config.score_batch_size or config.batch_size  # one scoring forward per loader batch
        self.loader: sbdata.DeviceLoader = (
            sbdata.DeviceLoader(self.train_set, loader_batch, shuffle=True, augment=self.augment, seed=config.seed)
            if self.comm is None
            else ShardedLoader(
                self.train_set, loader_batch, self.rank, self.world_size, seed=config.seed, augment=self.augment
            )
        )
        n = len(self.train_set)
        self.epoch = 0
        self.batches_done = 0  # loader batches consumed in the current epoch (non-zero only mid-epoch)
        self.loader_state = self.loader.state_dict()  # the loader as at the start of the current epoch
        self.times = dict.fromkeys(("data_s", "select_forward_s", "bookkeeping_s", "train_s"), 0.0)
        self.selection_counts = torch.zeros(n, dtype=torch.int64, device=self.device)  # this rank's backprops
        self.interval = {"loss_sum": torch.zeros((), device=self.device), "losses": 0, "seen": 0, "selected": 0}
        self.metrics_rows = 0
        self.last_row: dict[str, Any] | None = None
        self.skipped_steps = 0  # optimizer steps dropped on a non-finite loss (nonfinite="skip")
        self.next_eval = config.eval_every
        self.last_checkpoint: Path | None = None
        self._stop_signal: int | None = None
        if config.nonfinite == "skip" and hasattr(self.selector, "nonfinite"):
            self.selector.nonfinite = "skip"  # NaN/inf scoring losses: not selected (SelectiveBackprop's option)
        if resuming:
            self._load_checkpoint()
        elif self.rank == 0:
            (self.out / "metrics.jsonl").unlink(missing_ok=True)  # rows of a run that never checkpointed
            _write_json(self.out / "config.json", config.to_json())
            env = {**environment(self.device), "world_size": self.world_size, "compile_s": self.compile_s}
            _write_json(self.out / "environment.json", {**env, **self.calibration})

    # ----- before training: compilation and cost calibration (neither counts as training time) --------------
    def autocast(self) -> Any:
        """The autocast context of both forwards (disabled with ``amp='off'``)."""
        dtype = self.autocast_dtype or torch.bfloat16
        return torch.autocast(self.device.type, dtype=dtype, enabled=self.autocast_dtype is not None)

    def _trial(self, x: Tensor, y: Tensor) -> tuple[float, float]:
        """Seconds of one scoring forward and one training step on ``(x, y)``, as the run does them."""
        self._sync()
        t0 = time.perf_counter()
        with self.autocast(), torch.inference_mode():
            self.scoring_model.eval()
            F.cross_entropy(self.scoring_model(x), y, reduction="none")
            self.scoring_model.train()
        self._sync()
        t1 = time.perf_counter()
        with self.autocast():
            loss = F.cross_entropy(self.train_model(x), y)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self._sync()
        return t1 - t0, time.perf_counter() - t1

    def _trials(self, shapes: list[int], repeats: int) -> list[tuple[int, float, float]]:
        """``(batch, forward s, step s)`` of ``repeats`` trials per batch size in ``shapes``; the model, optimizer,
        scaler and RNGs are put back afterwards, so the run is the same as without trials."""
        saved = copy.deepcopy((self.model.state_dict(), self.optimizer.state_dict(), self.scaler.state_dict()))
        rng = torch.get_rng_state(), torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
        x, y, _ = next(iter(sbdata.DeviceLoader(self.train_set, max(shapes), seed=self.config.seed + 7919)))
        x = x.contiguous(memory_format=self.memory_format)
        out = [(m, *self._trial(x[:m], y[:m])) for m in shapes for _ in range(repeats)]
        self.model.load_state_dict(saved[0])
        self.optimizer.load_state_dict(saved[1])
        self.scaler.load_state_dict(saved[2])
        self.optimizer.zero_grad(set_to_none=True)
        torch.set_rng_state(rng[0])
        if rng[1] is not None:
            torch.cuda.set_rng_state_all(rng[1])
        return out

    def measure_costs(self, repeats: int = 5, warmup: int = 1) -> tuple[float, float]:
        """``(F, T)``: seconds per example of a scoring forward (at the loader batch size) and of a training step
        (forward, backward, SGD step at ``batch_size``), done as the run does them (compiled, autocast, channels
        last); means of ``repeats`` trials after ``warmup`` ones. The trial steps are undone afterwards."""
        c = self.config
        b = min(c.batch_size, len(self.train_set))
        score_b = min(c.score_batch_size or c.batch_size, len(self.train_set))
        trials = self._trials(sorted({b, score_b}), repeats=warmup + repeats)
        fwd = [f / m for m, f, _ in trials if m == score_b][warmup:]
        step = [t / m for m, _, t in trials if m == b][warmup:]
        return sum(fwd) / len(fwd), sum(step) / len(step)

    def _compile(self) -> float:
        """Compile both forwards and the backward before training; return the seconds it took.

        Two batch sizes per mode, so later odd-sized batches (the epoch's last, StaleSB's partial scoring
        forwards, flushes) reuse a dynamic-shape graph instead of recompiling during training."""
        t = time.perf_counter()
        b = min(self.config.score_batch_size or self.config.batch_size, len(self.train_set))
        self._trials([b, max(2, b // 2)] if b > 2 else [b], repeats=1)
        return time.perf_counter() - t

    def _beta_for_target_time(self) -> float:
        """The beta at which a selective epoch costs ``target_time`` x a Traditional one, per the cost model.

        An SB epoch costs N (F + s T) against Traditional's N T (StaleSB: N (F/n + s T)), and the percentile rule
        selects s = 1 / (beta + 1) of the examples, so s = target_time - F / (n T) and beta = 1/s - 1. F and T
        are measured here (:meth:`measure_costs`)."""
        c = self.config
        f, t = self.measure_costs()
        if self.comm is not None:  # one beta for all ranks: the mean of their measurements
            costs = torch.tensor([f, t], dtype=torch.float64)
            f, t = (self.comm.all_reduce_sum(costs, "all_reduce(SUM) of the measured costs") / self.world_size).tolist()
        n = c.staleness if c.strategy == "stale-sb" else 1
        fraction = c.target_time - f / (n * t)  # type: ignore[operator]
        if fraction <= 0:
            raise ValueError(
                f"target_time {c.target_time} is not reachable: the scoring forwards alone cost {f / (n * t):.2f} of "
                f"a Traditional epoch here (F/T = {f / t:.2f}{'' if n == 1 else f', n = {n}'}); raise target_time, "
                "use stale-sb or a larger --staleness"
            )
        selected = min(1.0, fraction)
        beta = 1 / selected - 1
        self.calibration = {"scoring_forward_s_per_example": f, "train_step_s_per_example": t,
                            "target_time": c.target_time, "selected_fraction": selected, "beta": beta}  # fmt: skip
        if self.rank == 0:
            print(f"target_time {c.target_time}: F = {f * 1e6:.1f} us, T = {t * 1e6:.1f} us per example (F/T = "
                  f"{f / t:.2f}) -> backprop {selected:.1%} -> beta = {beta:.3f}", file=sys.stderr)  # fmt: skip
        return beta

    # ----- setup -------------------------------------------------------------------------------------------
    def _join_process_group(self) -> None:
        """Started by torchrun: join the process group (gloo on CPU, nccl on CUDA) and check the config."""
        from .distributed import Collectives, init_distributed

        c = self.config
        if c.strategy in SINGLE_PROCESS_ONLY:
            raise ValueError(f"strategy {c.strategy!r} cannot run under torchrun (its pruning is per process); "
                             "run it in one process or pick another strategy")  # fmt: skip
        if c.nonfinite == "skip":
            raise ValueError("nonfinite='skip' cannot run under torchrun (a rank skipping a step would desync DDP); "
                             "use --nonfinite raise")  # fmt: skip
        init_distributed("nccl" if self.device.type == "cuda" else "gloo", timeout_s=c.dist_timeout)
        self.comm = Collectives()
        self.rank, self.world_size = self.comm.rank, self.comm.world_size
        if self.device.type == "cuda":  # each rank on its own GPU ($LOCAL_RANK, set by init_distributed)
            self.device = torch.device("cuda", torch.cuda.current_device())

    def _barrier(self, what: str) -> None:
        if self.comm is not None:
            self.comm.barrier(what)

    def _prepare_folder(self, resume: bool, overwrite: bool) -> None:
        exists = self.out.exists() and any(self.out.iterdir())
        if exists and not overwrite and not resume:
            raise RunExistsError(
                f"run folder {self.out} already exists; pass --resume to continue it or --overwrite to replace it"
            )
        self._barrier("barrier after checking the run folder")  # every rank looked before rank 0 changes it
        if self.rank == 0:
            if exists and overwrite:
                shutil.rmtree(self.out)
            self.out.mkdir(parents=True, exist_ok=True)
            if resume:
                for leftover in self.out.glob(".*.tmp"):  # torn temporary files of writes that never finished
                    leftover.unlink()
        self._barrier("barrier after preparing the run folder")

    def _load_data(self) -> None:
        c = self.config
        train, test = sbdata.load_dataset(c.dataset, c.data_dir, c.download, device=self.device)
        if c.train_limit:
            train = dataclasses.replace(
                train, images=train.images[: c.train_limit], labels=train.labels[: c.train_limit]
            )
        if c.test_limit:
            test = dataclasses.replace(test, images=test.images[: c.test_limit], labels=test.labels[: c.test_limit])
        self.noisy_indices = torch.empty(0, dtype=torch.int64)
        if c.label_noise > 0:
            labels, self.noisy_indices = sbdata.apply_label_noise(
                train.labels, c.label_noise, train.num_classes, c.seed
            )
            train = dataclasses.replace(train, labels=labels)
            if self.rank == 0:
                np.save(self.out / "noisy_indices.npy", self.noisy_indices.cpu().numpy())
        self.train_set, self.test_set = train, test
        self.eval_set = test  # this rank's share of the test set (every world_size-th example under torchrun)
        if self.world_size > 1:
            w, r = self.world_size, self.rank
            self.eval_set = dataclasses.replace(test, images=test.images[r::w], labels=test.labels[r::w])
        aug = sbdata.default_augment(c.dataset)
        self.augment = sbdata.Augment(
            crop_padding=aug.crop_padding if c.crop_padding is None else c.crop_padding,
            flip=aug.flip if c.flip is None else c.flip,
            cutout=aug.cutout if c.cutout is None else c.cutout,
        )

    # ----- checkpoints ---------------------------------------------------------------------------------------
    def _state(self) -> dict[str, Any]:
        return {
            "config": self.config.to_json(),
            "epoch": self.epoch,
            "batches_done": self.batches_done,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "selector": self.selector.state_dict(),
            "loader": self.loader_state,
            "times": dict(self.times),
            "selection_counts": self.selection_counts,
            "interval": dict(self.interval),
            "metrics_rows": self.metrics_rows,
            "skipped_steps": self.skipped_steps,
            "next_eval": self.next_eval,
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            "rank": self.rank,
            "world_size": self.world_size,
            "scaler": self.scaler.state_dict(),
            "compile_s": self.compile_s,
        }

    def checkpoint_paths(self) -> tuple[Path, Path]:
        """This rank's (checkpoint, previous checkpoint): ``checkpoint.pt`` / ``checkpoint.prev.pt`` in one
        process, ``checkpoint-rank<r>.pt`` / ``checkpoint-rank<r>.prev.pt`` under torchrun."""
        if self.world_size == 1:
            return self.out / CHECKPOINT, self.out / PREVIOUS_CHECKPOINT
        return self.out / f"checkpoint-rank{self.rank}.pt", self.out / f"checkpoint-rank{self.rank}.prev.pt"

    def save_checkpoint(self) -> Path:
        """Write this rank's checkpoint (the previous one is kept as ``*.prev.pt``); return its path."""
        path, previous = self.checkpoint_paths()
        write_checkpoint(path, self._state(), backup=previous)
        self.last_checkpoint = path
        return path

    def _has_checkpoint(self) -> bool:
        """Whether there is a checkpoint to resume from; refuses one written with another number of ranks."""
        mine = any(path.exists() for path in self.checkpoint_paths())
        others = sorted(self.out.glob("checkpoint-rank*.pt") if self.world_size == 1 else self.out.glob(CHECKPOINT))
        if not mine and others:
            ranks = len({p.name.split(".")[0] for p in others}) if self.world_size == 1 else 1
            how = f"torchrun --nproc-per-node {ranks} -m selective_backprop train ..." if ranks > 1 else "one process"
            raise ValueError(f"cannot resume {self.out} with {self.world_size} process(es): its checkpoints "
                             f"({others[0].name}, ...) were written by {ranks}; resume it with {how}")  # fmt: skip
        found = mine if self.comm is None else self.comm.all_gather_object(mine, "all_gather of 'has a checkpoint'")
        if isinstance(found, list) and len(set(found)) > 1:
            missing = [r for r, has in enumerate(found) if not has]
            raise CheckpointError(f"cannot resume {self.out}: ranks {missing} have no checkpoint; start it again with "
                                  "--overwrite")  # fmt: skip
        return mine

    def _read_latest_checkpoint(self) -> tuple[dict[str, Any], Path]:
        """The newest checkpoint that loads and passes its checksum; warns about each one rejected.

        Under torchrun the ranks agree on the newest (epoch, batch) position for which every rank has a usable
        checkpoint (a crash during the writes can leave ranks one checkpoint apart)."""
        problems, usable = [], []
        for path in self.checkpoint_paths():
            if not path.exists():
                problems.append(f"{path}: missing")
                continue
            try:
                usable.append((read_checkpoint(path, map_location=self.device), path))
            except CheckpointError as e:
                problems.append(str(e))
                print(f"warning: rejected checkpoint {e}", file=sys.stderr, flush=True)
            if self.comm is None and usable:
                return usable[0]
        positions = [(state["epoch"], state["batches_done"]) for state, _ in usable]
        if self.comm is not None:
            everyone = self.comm.all_gather_object(positions, "all_gather of the checkpoint positions")
            common = sorted(set.intersection(*(set(p) for p in everyone)), reverse=True)
            if common:
                return next(item for item, position in zip(usable, positions, strict=True) if position == common[0])
            problems.append(f"no (epoch, batch) position has a usable checkpoint on every rank: {everyone}")
        raise CheckpointError(
            f"cannot resume {self.out}: no usable checkpoint ({'; '.join(problems)}); start it again with --overwrite"
        )

    def _load_checkpoint(self) -> None:
        state, path = self._read_latest_checkpoint()
        if path != self.checkpoint_paths()[0]:
            print(f"warning: resuming from the previous checkpoint {path} (epoch {state['epoch']})", file=sys.stderr)
        if (state.get("rank", 0), state.get("world_size", 1)) != (self.rank, self.world_size):
            raise ValueError(f"{path} is rank {state.get('rank', 0)} of {state.get('world_size', 1)}, not rank "
                             f"{self.rank} of {self.world_size}: resume with the same number of ranks")  # fmt: skip
        skip = ("epochs", "device", "threads", "nonfinite", "dist_timeout")  # may change on resume
        saved = {k: v for k, v in state["config"].items() if k not in skip}
        ours = {k: v for k, v in self.config.to_json().items() if k in saved}
        if json.loads(json.dumps(saved)) != json.loads(json.dumps(ours)):
            diff = sorted(k for k in saved if json.dumps(saved[k]) != json.dumps(ours.get(k)))
            raise ValueError(f"cannot resume {self.out}: the config differs from the checkpoint's in {diff}")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.selector.load_state_dict(state["selector"])
        self.loader_state = state["loader"]
        self.loader.load_state_dict(self.loader_state)
        self.epoch, self.batches_done = state["epoch"], state["batches_done"]
        self.times = state["times"]
        self.selection_counts = state["selection_counts"].to(self.device)
        self.interval = state["interval"]
        self.metrics_rows, self.next_eval = state["metrics_rows"], state["next_eval"]
        self.skipped_steps = state["skipped_steps"]
        self.scaler.load_state_dict(state.get("scaler", {}))
        self.compile_s += state.get("compile_s", 0.0)
        self.last_checkpoint = path
        torch.set_rng_state(state["torch_rng"].cpu())
        if state["cuda_rng"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        if self.rank == 0:  # drop rows logged after the checkpoint (they will be redone)
            metrics = self.out / "metrics.jsonl"
            lines = metrics.read_text().splitlines(keepends=True)[: self.metrics_rows] if metrics.exists() else []
            write_atomic(metrics, lambda f: f.write("".join(lines).encode()))

    # ----- the loop ------------------------------------------------------------------------------------------
    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _progress(self) -> float:
        """Fraction of the budget done, in ``lr_unit``, over all ranks (the same value on every rank).

        Under torchrun, examples seen = this rank's x world size (every rank sees as many), and backprops are
        counted as steps x batch size x world size (the ranks' own counts differ; a count every rank knows
        keeps their learning rates, hence their parameters, identical)."""
        c, counters = self.config, self.selector.counters
        if c.lr_unit == "examples":
            done = counters["seen"] * self.world_size
        elif self.world_size == 1:
            done = counters["backpropagated"]
        else:
            done = counters["steps"] * c.batch_size * self.world_size
        return done / (c.epochs * len(self.train_set))

    def _train_step(self, batch: Batch) -> None:
        c = self.config
        lr = lr_at(c, self._progress())
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        try:
            with self.autocast():
                outputs = self.train_model(batch.inputs)
                loss = batch.loss(outputs)  # raises ValueError on a NaN/inf loss, before anything is recorded
        except ValueError as e:
            bad = self._nonfinite(outputs, batch.targets, batch.indices)
            if not bad:
                raise
            if c.nonfinite == "raise":
                raise self._diverged("non-finite training loss", bad) from e
            self.skipped_steps += 1
            return
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()  # without fp16 the scaler is off: loss.backward(); optimizer.step()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.interval["loss_sum"] += loss.detach() * len(batch)
        self.interval["losses"] += len(batch)
        if batch.indices is not None:
            self.selection_counts.index_add_(0, batch.indices, torch.ones_like(batch.indices))

    @torch.no_grad()
    def _nonfinite(self, outputs: Tensor | None, targets: Tensor, indices: Tensor | None, inputs: Any = None
                   ) -> list[int]:  # fmt: skip
        """Dataset indices (batch positions without indices) whose loss is NaN/inf. Error path only: it syncs.

        Without ``outputs`` the scoring forward is redone on ``inputs`` in eval mode.
        """
        if outputs is None:
            was_training = self.model.training
            self.model.eval()
            outputs = self.model(inputs)
            self.model.train(was_training)
        where = (~torch.isfinite(self.selector.loss_fn(outputs.detach(), targets))).nonzero().squeeze(1)
        return (where if indices is None else indices[where]).tolist()

    def _diverged(self, what: str, indices: list[int] | None) -> TrainingDiverged:
        step = int(self.selector.counters["steps"]) + self.skipped_steps + 1
        return TrainingDiverged(what, step, self.epoch, self.config.epochs, indices, self.last_checkpoint)

    def _check_parameters(self) -> None:
        """Refuse to log or checkpoint a model whose parameters are no longer finite."""
        bad = [name for name, p in self.model.named_parameters() if not bool(torch.isfinite(p).all())]
        if bad:
            raise self._diverged(f"non-finite parameters {bad[:3]}{' ...' if len(bad) > 3 else ''}", None)

    def _timed_steps(self, batches: list[Batch]) -> None:
        t = time.perf_counter()
        for batch in batches:
            self._train_step(batch)
        self._sync()
        self.times["train_s"] += time.perf_counter() - t

    def _epoch_batches(self) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        """The loader's batches for the current epoch, skipping those a mid-epoch checkpoint already did."""
        self.loader_state = self.loader.state_dict()
        for k, item in enumerate(self.loader):
            if k >= self.batches_done:
                yield item

    def _epoch(self, bar: Any) -> None:
        it = self._epoch_batches()
        while True:
            t = time.perf_counter()
            item = next(it, None)
            self._sync()
            self.times["data_s"] += time.perf_counter() - t
            if item is None:
                self.loader_state = self.loader.state_dict()  # an end-of-epoch checkpoint starts the next epoch
                break
            before = self.selector.counters
            t = time.perf_counter()
            inputs, targets, indices = item
            inputs = inputs.contiguous(memory_format=self.memory_format)
            try:
                with self.autocast():
                    batches = self.selector.select(inputs, targets, indices)
            except ValueError as e:  # a NaN/inf scoring loss (nonfinite="raise"), or a genuine bad input
                bad = self._nonfinite(None, targets, indices, inputs)
                if not bad:
                    raise
                raise self._diverged("non-finite scoring loss", bad) from e
            self._sync()
            elapsed = time.perf_counter() - t
            score = self.selector.counters["score_time_s"] - before["score_time_s"]
            self.times["select_forward_s"] += score
            self.times["bookkeeping_s"] += elapsed - score
            self._timed_steps(batches)
            self.batches_done += 1
            self.interval["seen"] += len(item[0])
            self.interval["selected"] += self.selector.counters["selected"] - before["selected"]
            if bar is not None:
                bar.update(len(item[0]))
            stop = self._stop_signal
            if self.comm is not None:  # stop together: a rank that stopped alone would hang the others
                stop = self.comm.all_reduce_int(stop or 0, "max", "all_reduce(MAX) of the stop signal") or None
            if stop is not None:
                self._check_parameters()
                raise Interrupted(stop, self.save_checkpoint())
            if self.next_eval is not None and self.selector.counters["seen"] * self.world_size >= self.next_eval:
                self.next_eval += self.config.eval_every  # type: ignore[operator]
                self._log(bar)
        self._timed_steps(self.selector.end_epoch())
        self.epoch += 1
        self.batches_done = 0

    @torch.no_grad()
    def evaluate(self) -> tuple[float, float]:
        """(test error, mean test loss) in eval mode; the model's mode is restored. Under torchrun each rank
        evaluates its share of the test set and the sums are all-reduced, after taking rank 0's buffers
        (BatchNorm statistics: DDP broadcasts them before each training forward, so each rank's copy also holds
        its own last batch)."""
        if self.comm is not None:
            self.comm.broadcast_(list(self.model.buffers()), "broadcast of the model buffers")
        was_training = self.model.training
        self.model.eval()
        sums = torch.zeros(2, dtype=torch.float64, device=self.device)  # wrong, loss
        for x, y, _ in sbdata.DeviceLoader(self.eval_set, 256, shuffle=False):
            out = self.model(x.contiguous(memory_format=self.memory_format))
            sums[0] += (out.argmax(1) != y).sum()
            sums[1] += F.cross_entropy(out, y, reduction="sum")
        self.model.train(was_training)
        if self.comm is not None:
            sums = self.comm.all_reduce_sum(sums, "all_reduce(SUM) of the test error")
        wrong, loss_sum = sums.tolist()
        n = len(self.test_set)
        return wrong / n, loss_sum / n

    @torch.no_grad()
    def train_confidence(self) -> Tensor:
        """Final true-class softmax probability of every training example (eval mode, no augmentation)."""
        self.model.eval()
        out = torch.empty(len(self.train_set), device=self.device)
        for x, y, idx in sbdata.DeviceLoader(self.train_set, 256, shuffle=False):
            logits = self.model(x.contiguous(memory_format=self.memory_format)).float()
            out[idx] = torch.softmax(logits, 1).gather(1, y[:, None]).squeeze(1)
        self.model.train()
        return out

    def _log(self, bar: Any = None) -> dict[str, Any]:
        """Evaluate and append a row to ``metrics.jsonl`` (rank 0); counts are sums over ranks, times rank 0's."""
        error, test_loss = self.evaluate()
        c, iv = self.selector.counters, self.interval
        noisy = self.selection_counts[self.noisy_indices.to(self.device)].sum() if len(self.noisy_indices) else 0
        names = ("seen", "selection_forwards", "skipped_forwards", "backpropagated")
        local = [*(c[k] for k in names), noisy, iv["seen"], iv["selected"], iv["losses"], iv["loss_sum"]]
        totals = torch.stack([torch.as_tensor(v, dtype=torch.float64, device=self.device) for v in local])
        if self.comm is not None:
            totals = self.comm.all_reduce_sum(totals, "all_reduce(SUM) of the counters")
        seen, forwards, skipped, backprops, noisy, iv_seen, iv_selected, losses, loss_sum = totals.tolist()
        row = {
            "epoch": self.epoch + self.batches_done / max(1, len(self.loader)),
            "examples_seen": round(seen),
            "selection_forwards": round(forwards),
            "skipped_forwards": round(skipped),
            "backprops": round(backprops),
            "steps": int(c["steps"]),
            "skipped_steps": self.skipped_steps,
            # backprops spent so far on examples whose label was randomized (None without label noise)
            "noisy_backprops": round(noisy) if len(self.noisy_indices) else None,
            "wall_train_s": sum(self.times.values()),
            **{f"time_{k}": v for k, v in self.times.items()},
            "compile_s": self.compile_s,
            "test_error": error,
            "test_loss": test_loss,
            "train_loss": loss_sum / losses if losses else None,
            "selected_fraction": iv_selected / iv_seen if iv_seen else None,
            "lr": lr_at(self.config, self._progress()),
        }
        self.interval = {"loss_sum": torch.zeros((), device=self.device), "losses": 0, "seen": 0, "selected": 0}
        if self.rank == 0:
            with open(self.out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")
        self.metrics_rows += 1
        self.last_row = row
        if bar is not None:
            bar.set_postfix(err=f"{error:.4f}", sel=f"{row['selected_fraction'] or 1:.0%}")
        return row

    def run(self) -> dict[str, Any]:
        """Train to the end of the budget (or resume and finish); returns the final summary."""
        c = self.config
        if self.metrics_rows == 0:
            self._log()  # the starting point of every curve: error before training, at time 0
        handlers = {s: signal.signal(s, self._on_signal) for s in INTERRUPT_EXIT_CODES}
        try:
            while self.epoch < c.epochs:
                bar = self._bar()
                try:
                    self._epoch(bar)
                finally:
                    if bar is not None:
                        bar.close()
                self._check_parameters()
                row = self._log()
                self.save_checkpoint()
                if not self.progress and self.rank == 0:
                    print(self._line(row), flush=True)
        finally:
            for s, h in handlers.items():
                signal.signal(s, h)
        return self._finish()

    def _on_signal(self, signum: int, frame: Any) -> None:
        self._stop_signal = signum

    def _bar(self) -> Any:
        if not self.progress:
            return None
        from tqdm.auto import tqdm

        per_epoch = getattr(self.loader, "shard_length", len(self.train_set))  # this rank's examples per epoch
        return tqdm(
            total=per_epoch, initial=min(per_epoch, self.batches_done * self.loader.batch_size),
            desc=f"{self.config.strategy} epoch {self.epoch + 1}/{self.config.epochs}", unit="ex", leave=False,
        )  # fmt: skip

    def _line(self, row: dict[str, Any]) -> str:
        sel = row["selected_fraction"]
        return (
            f"[{self.config.strategy}] epoch {row['epoch']:.0f}/{self.config.epochs}"
            f"  test error {row['test_error']:.4f}"
            f"  train time {row['wall_train_s']:.1f}s  backprops {row['backprops']}"
            f"  selected {'-' if sel is None else f'{sel:.1%}'}"
        )

    def _finish(self) -> dict[str, Any]:
        counts = self.selection_counts
        if self.comm is not None:  # every rank backpropagated its own shard's examples
            counts = self.comm.all_reduce_sum(counts, "all_reduce(SUM) of the selection counts")
        last = self.last_row
        if last is None:  # resumed after the last epoch's checkpoint: the row is on disk
            last = [json.loads(line) for line in (self.out / "metrics.jsonl").read_text().splitlines() if line][-1]
        summary = {
            "strategy": self.config.strategy,
            "final_test_error": last["test_error"],
            "wall_train_s": last["wall_train_s"],
            "compile_s": self.compile_s,
            "backprops": last["backprops"],
            "selection_forwards": last["selection_forwards"],
            "examples_seen": last["examples_seen"],
            "epochs": self.epoch,
            "label_noise_examples": len(self.noisy_indices),
        }
        if self.rank == 0:
            np.save(self.out / "selection_counts.npy", counts.cpu().numpy())
            np.save(self.out / "train_confidence.npy", self.train_confidence().cpu().numpy())
            _write_json(self.out / "final.json", summary)
        if self.progress:
            print(self._line(last), flush=True)
        return summary


def train(config: TrainConfig, out_dir: str | Path, **kwargs: Any) -> dict[str, Any]:
    """Run one experiment; see :class:`Trainer`."""
    return Trainer(config, out_dir, **kwargs).run()
