"""The run folder on disk: atomic writes, the checkpoint envelope, ``metrics.jsonl`` and the environment record.

Run folder: ``config.json``, ``environment.json``, ``metrics.jsonl`` (one row per evaluation, the first before
any training), ``checkpoint.pt`` (every epoch and on Ctrl-C / SIGTERM) with the one before it kept as
``checkpoint.prev.pt``, and at the end ``selection_counts.npy`` (times each training example was
backpropagated), ``train_confidence.npy`` (final true-class softmax probability of each training example, eval
mode, no augmentation), ``noisy_indices.npy`` (with label noise) and ``final.json``.

**Checkpoint files** are ``torch.save`` of ``{"format": 1, "sha256": hex, "payload": uint8 tensor, "epoch",
"batches_done", "metrics_rows"}``: the payload is the ``torch.save`` bytes of the training state and ``sha256`` its
digest (the other keys are copies for a quick look). Every write goes to a temporary file in the same folder, is
fsynced, and only then renamed over ``checkpoint.pt``, the old one first renamed to ``checkpoint.prev.pt``; a
failed write (disk full, read-only folder) raises ``OSError`` naming the file and leaves both checkpoints and the
results as they were.

**Reading a run folder runs no code from it**, whoever wrote it: checkpoints (envelope and payload) are read with
``torch.load(weights_only=True)`` (:func:`read_checkpoint`), ``.npy`` arrays with ``np.load(allow_pickle=False)``
(the report), and everything else is JSON.
"""

from __future__ import annotations

import datetime
import hashlib
import io
import json
import os
import pickle
import platform
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .errors import CheckpointError, RunExistsError

__all__ = [
    "CHECKPOINT_FORMAT",
    "write_atomic",
    "write_json",
    "write_checkpoint",
    "read_checkpoint",
    "environment",
    "prepare_folder",
    "append_row",
    "keep_rows",
]

CHECKPOINT_FORMAT = 1
METRICS = "metrics.jsonl"


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

    Both the envelope and the payload are read with ``torch.load(weights_only=True)``: only tensors and plain
    values (dicts, lists, tuples, numbers, strings, ``None``) are rebuilt, which is all :meth:`Trainer.save_checkpoint
    <selective_backprop.experiments.trainer.Trainer.save_checkpoint>` writes, so no allowlist of other types is
    needed. A payload naming any other class or function is refused before anything in it is called: the SHA-256
    only proves the payload is intact, not who wrote it.

    Raises:
        CheckpointError: naming ``path`` and the reason when it cannot be read or unpickled, is truncated, is
            not of this format, its payload does not match its SHA-256, or the payload holds anything but
            tensors and plain values (e.g. an object whose ``__reduce__`` would run a command).
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
    try:  # weights_only again: the checksum proves integrity, not authorship; what the trainer saves needs no more
        return torch.load(io.BytesIO(payload), map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:  # weights_only refused a global (a class or function) before calling it
        lines = str(e).splitlines()
        what = next((line.strip() for line in lines if "GLOBAL" in line or "Unsupported" in line), lines[0][:200])
        raise CheckpointError(f"{path}: refused to load: its payload holds more than tensors and plain values "
                              f"({what}); a checkpoint written by selective-backprop never does, so nothing in it "
                              "was run. Was it written by someone else? Start the run again with --overwrite"
                              ) from e  # fmt: skip
    except Exception as e:
        raise CheckpointError(f"{path}: the payload cannot be unpickled ({type(e).__name__}: {e})") from e


def write_json(path: Path, obj: Any) -> None:
    write_atomic(path, lambda f: f.write(json.dumps(obj, indent=2, default=str).encode()))


def git_commit() -> str | None:
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
        "git_commit": git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def prepare_folder(out: Path, rank: int, resume: bool, overwrite: bool, barrier: Callable[[str], None]) -> None:
    """Create the run folder (rank 0), refusing an existing one unless ``resume`` or ``overwrite``; on resume,
    delete torn temporary files of writes that never finished. ``barrier(what)`` waits for every rank."""
    exists = out.exists() and any(out.iterdir())
    if exists and not overwrite and not resume:
        raise RunExistsError(
            f"run folder {out} already exists; pass --resume to continue it or --overwrite to replace it"
        )
    barrier("barrier after checking the run folder")  # every rank looked before rank 0 changes it
    if rank == 0:
        if exists and overwrite:
            shutil.rmtree(out)
        out.mkdir(parents=True, exist_ok=True)
        if resume:
            for leftover in out.glob(".*.tmp"):
                leftover.unlink()
    barrier("barrier after preparing the run folder")


def append_row(out: Path, row: dict[str, Any]) -> None:
    """Append one evaluation row to ``metrics.jsonl``."""
    with open(out / METRICS, "a") as f:
        f.write(json.dumps(row) + "\n")


def keep_rows(out: Path, rows: int) -> None:
    """Cut ``metrics.jsonl`` back to its first ``rows`` rows (those a checkpoint had logged), atomically."""
    metrics = out / METRICS
    lines = metrics.read_text().splitlines(keepends=True)[:rows] if metrics.exists() else []
    write_atomic(metrics, lambda f: f.write("".join(lines).encode()))


def last_row(out: Path) -> dict[str, Any]:
    """The last row of ``metrics.jsonl``."""
    return [json.loads(line) for line in (out / METRICS).read_text().splitlines() if line][-1]
