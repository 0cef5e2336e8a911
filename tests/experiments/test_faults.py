"""The fault matrix: torn and corrupt checkpoints, failed writes, SIGKILL, NaN/inf losses, corrupt data files."""

from __future__ import annotations

import errno
import gzip
import hashlib
import io
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from selective_backprop.experiments.analysis import read_metrics
from selective_backprop.experiments.cli import main
from selective_backprop.experiments.config import TrainConfig
from selective_backprop.experiments.errors import CheckpointError, TrainingDiverged
from selective_backprop.experiments.meters import TIMED_COLUMNS
from selective_backprop.experiments.report import load_runs
from selective_backprop.experiments.runfolder import read_checkpoint, write_atomic
from selective_backprop.experiments.trainer import Trainer

RESULTS = ("metrics.jsonl", "final.json", "checkpoint.pt", "checkpoint.prev.pt")


def config(data: Path, **kw) -> TrainConfig:
    return TrainConfig(**{"strategy": "sb", "epochs": 3, "batch_size": 32, "beta": 1.0, "data_dir": str(data),
                          "seed": 1, "threads": 1, **kw})  # fmt: skip


def untimed(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMED_COLUMNS} for r in rows]


@pytest.fixture(scope="module")
def finished(tiny_fmnist, tmp_path_factory) -> Path:
    """A finished 3-epoch SB run (never modified: tests work on copies)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    Trainer(config(tiny_fmnist), out, progress=False).run()
    return out


@pytest.fixture
def run(finished, tmp_path) -> Path:
    """A private copy of the finished run."""
    return Path(shutil.copytree(finished, tmp_path / "run"))


def snapshot(folder: Path) -> dict[str, bytes]:
    return {name: (folder / name).read_bytes() for name in RESULTS if (folder / name).exists()}


# ----- checkpoint integrity -----------------------------------------------------------------------------------
def test_every_checkpoint_keeps_the_one_before(run):
    assert read_checkpoint(run / "checkpoint.pt")["epoch"] == 3
    assert read_checkpoint(run / "checkpoint.prev.pt")["epoch"] == 2
    envelope = torch.load(run / "checkpoint.pt", weights_only=True)
    assert envelope["format"] == 1 and len(envelope["sha256"]) == 64 and envelope["metrics_rows"] == 4
    assert not list(run.glob(".*.tmp"))


def _flip_payload_byte(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    payload = torch.load(path, weights_only=True)["payload"].numpy().tobytes()
    at = raw.find(payload[:4096]) + len(payload) // 2  # inside the payload record: the zip stays readable
    raw[at] ^= 0xFF
    path.write_bytes(bytes(raw))


CORRUPTIONS = {
    "flipped byte": (_flip_payload_byte, "checksum mismatch"),
    "truncated": (lambda p: p.write_bytes(p.read_bytes()[: p.stat().st_size // 2]), "cannot be read"),
    "garbage": (lambda p: p.write_bytes(os.urandom(1000)), "cannot be read"),
    "empty": (lambda p: p.write_bytes(b""), "cannot be read"),
    "no checksum": (lambda p: torch.save({"epoch": 3, "model": {}}, p), "not a checksummed checkpoint"),
}


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # torch.load's note on random bytes
@pytest.mark.parametrize("kind", CORRUPTIONS)
def test_read_checkpoint_rejects_a_corrupt_file_naming_it(kind, run):
    corrupt, reason = CORRUPTIONS[kind]
    corrupt(run / "checkpoint.pt")
    with pytest.raises(CheckpointError, match=reason) as info:
        read_checkpoint(run / "checkpoint.pt")
    assert str(run / "checkpoint.pt") in str(info.value)


@pytest.mark.parametrize("kind", ["flipped byte", "truncated"])
def test_resume_falls_back_to_the_previous_checkpoint_and_finishes_identically(kind, run, finished, tiny_fmnist,
                                                                               capsys):  # fmt: skip
    CORRUPTIONS[kind][0](run / "checkpoint.pt")
    trainer = Trainer(config(tiny_fmnist), run, resume=True, progress=False)
    err = capsys.readouterr().err
    assert f"rejected checkpoint {run / 'checkpoint.pt'}: " in err and CORRUPTIONS[kind][1] in err
    assert "checkpoint.prev.pt" in err
    assert trainer.epoch == 2 and trainer.last_checkpoint == run / "checkpoint.prev.pt"
    assert len(read_metrics(run)) == 3  # rows 0, 1, 2: epoch 3's row is dropped and redone
    trainer.run()
    assert untimed(read_metrics(run)) == untimed(read_metrics(finished))
    assert read_checkpoint(run / "checkpoint.pt")["epoch"] == 3


def test_resume_when_a_crash_left_only_the_previous_checkpoint(run, tiny_fmnist):
    (run / "checkpoint.pt").unlink()  # killed between the two renames of a checkpoint write
    assert Trainer(config(tiny_fmnist), run, resume=True, progress=False).epoch == 2


def test_resume_without_any_checkpoint_starts_afresh(tiny_fmnist, tmp_path):
    out = tmp_path / "early"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"epoch": 0}\n{"epoch": 0.5')  # killed before its first checkpoint
    (out / ".checkpoint.pt.x.tmp").write_bytes(b"torn")
    Trainer(config(tiny_fmnist, strategy="traditional", epochs=1), out, resume=True, progress=False).run()
    assert [r["epoch"] for r in read_metrics(out)] == [0, 1]
    assert not list(out.glob(".*.tmp"))


def test_no_usable_checkpoint_is_a_clear_error_naming_both_files(run, tiny_fmnist, capsys):
    CORRUPTIONS["truncated"][0](run / "checkpoint.pt")
    CORRUPTIONS["flipped byte"][0](run / "checkpoint.prev.pt")
    with pytest.raises(CheckpointError) as info:
        Trainer(config(tiny_fmnist), run, resume=True, progress=False)
    message = str(info.value)
    assert str(run / "checkpoint.pt") in message and str(run / "checkpoint.prev.pt") in message
    assert "cannot be read" in message and "checksum mismatch" in message and "--overwrite" in message
    rc = main(["train", "--data-dir", str(tiny_fmnist), "--out", str(run), "--resume", "--quiet", "--strategy", "sb",
               "--epochs", "3", "--batch-size", "32", "--beta", "1", "--seed", "1", "--threads", "1"])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2 and "checkpoint.prev.pt" in err and "no usable checkpoint" in err


RESUME_ARGS = ["--quiet", "--strategy", "sb", "--epochs", "3", "--batch-size", "32", "--beta", "1", "--seed", "1",
               "--threads", "1"]  # the config of `finished`  # fmt: skip


def test_resume_with_a_changed_setting_names_the_flag_and_both_values(run, tiny_fmnist, capsys):
    rc = main(["train", "--data-dir", str(tiny_fmnist), "--out", str(run), "--resume", *RESUME_ARGS, "--lr", "0.1",
               "--lr-milestones", "0.6"])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2 and f"cannot resume {run}: the config differs from the checkpoint's: " in err
    assert "--lr 0.05 in the checkpoint, 0.1 now" in err
    assert "--lr-milestones 0.5,0.75 in the checkpoint, 0.6 now" in err
    assert "--overwrite" in err and err.count("\n") == 1


# ----- files from someone else: reading a run folder runs no code from it ---------------------------------------
class WritesAMarker:
    """Unpickling this calls ``os.system("touch <marker>")``: what a crafted checkpoint would do on --resume."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch '{self.marker}'",)


def write_crafted_checkpoint(path: Path, marker: Path) -> None:
    """A valid envelope (format 1, the right SHA-256) around a payload holding :class:`WritesAMarker`: only the
    check of the payload itself can stop it."""
    buffer = io.BytesIO()
    torch.save({"epoch": 3, "batches_done": 0, "metrics_rows": 4, "model": WritesAMarker(marker)}, buffer)
    payload = buffer.getvalue()
    envelope = {"format": 1, "sha256": hashlib.sha256(payload).hexdigest(), "epoch": 3, "batches_done": 0,
                "metrics_rows": 4, "payload": torch.frombuffer(bytearray(payload), dtype=torch.uint8)}  # fmt: skip
    torch.save(envelope, path)


def test_read_checkpoint_refuses_a_payload_that_would_run_code(tmp_path):
    path, marker = tmp_path / "checkpoint.pt", tmp_path / "marker"
    write_crafted_checkpoint(path, marker)
    with pytest.raises(CheckpointError, match="refused to load") as info:
        read_checkpoint(path)
    assert str(path) in str(info.value) and "posix.system" in str(info.value)
    assert "\n" not in str(info.value)  # one line, not torch's advice to retry with weights_only=False
    assert not marker.exists()


@pytest.mark.parametrize("previous", ["missing", "good"])
def test_resume_refuses_a_crafted_checkpoint_through_the_cli(previous, run, tiny_fmnist, tmp_path, capsys):
    marker = tmp_path / "marker"
    write_crafted_checkpoint(run / "checkpoint.pt", marker)
    if previous == "missing":
        (run / "checkpoint.prev.pt").unlink()
    rc = main(["train", "--data-dir", str(tiny_fmnist), "--out", str(run), "--resume", *RESUME_ARGS])
    err = capsys.readouterr().err
    assert not marker.exists()
    assert f"{run / 'checkpoint.pt'}: refused to load" in err
    if previous == "missing":
        assert rc == 2 and "no usable checkpoint" in err
    else:  # warned about, then resumed from the previous checkpoint (epoch 2) and finished
        assert rc == 0 and "resuming from the previous checkpoint" in err
        assert read_checkpoint(run / "checkpoint.pt")["epoch"] == 3


def test_every_checkpoint_the_trainer_writes_loads_with_weights_only(run):
    for name in ("checkpoint.pt", "checkpoint.prev.pt"):  # no allowlist: tensors and plain values only
        envelope = torch.load(run / name, weights_only=True)
        state = torch.load(io.BytesIO(envelope["payload"].numpy().tobytes()), weights_only=True)
        assert {"model", "optimizer", "selector", "loader", "torch_rng", "scaler"} <= set(state)


def test_the_report_refuses_a_npy_holding_pickled_objects(run, tmp_path, capsys):
    marker = tmp_path / "marker"
    np.save(run / "selection_counts.npy", np.array([WritesAMarker(marker)], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="not a plain numeric .npy array") as info:
        load_runs(run)[0].array("selection_counts")
    assert str(run / "selection_counts.npy") in str(info.value) and not marker.exists()
    assert main(["report", str(run), "--no-images"]) == 2
    assert str(run / "selection_counts.npy") in capsys.readouterr().err and not marker.exists()


# ----- failed writes ------------------------------------------------------------------------------------------
def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _erofs(*args, **kwargs):
    raise OSError(errno.EROFS, os.strerror(errno.EROFS))


FAILURES = {  # where a write fails, and how
    "disk full while writing": ("os.fsync", _enospc, errno.ENOSPC),
    "disk full at the rename": ("os.replace", _enospc, errno.ENOSPC),
    "read-only folder": ("tempfile.mkstemp", _erofs, errno.EROFS),
}


@pytest.mark.parametrize("failure", FAILURES)
def test_a_failed_write_names_the_file_and_leaves_the_results_intact(failure, run, tiny_fmnist, monkeypatch):
    target, fail, code = FAILURES[failure]
    trainer = Trainer(config(tiny_fmnist), run, resume=True, progress=False)
    before = snapshot(run)
    monkeypatch.setattr(target, fail)
    with pytest.raises(OSError) as info:
        trainer.save_checkpoint()
    assert info.value.errno == code and str(run / "checkpoint.pt") in str(info.value)
    assert os.strerror(code) in str(info.value)
    with pytest.raises(OSError, match="final.json"):
        write_atomic(run / "final.json", lambda f: f.write(b"{}"))
    monkeypatch.undo()
    assert snapshot(run) == before and not list(run.glob(".*.tmp"))
    assert read_checkpoint(run / "checkpoint.pt")["epoch"] == 3
    assert json.loads((run / "final.json").read_text())["epochs"] == 3


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root ignores folder permissions")
def test_a_real_read_only_folder(run, tiny_fmnist):
    trainer = Trainer(config(tiny_fmnist), run, resume=True, progress=False)
    before = snapshot(run)
    run.chmod(0o555)
    try:
        with pytest.raises(PermissionError, match="checkpoint.pt"):
            trainer.save_checkpoint()
    finally:
        run.chmod(0o755)
    assert snapshot(run) == before


def test_disk_full_mid_run_exits_1_and_resume_finishes_identically(finished, tiny_fmnist, tmp_path, monkeypatch,
                                                                    capsys):  # fmt: skip
    if not Path("/proc/self/fd").exists():
        pytest.skip("needs /proc to see which file is being written")
    out = tmp_path / "full"
    argv = ["train", "--data-dir", str(tiny_fmnist), "--out", str(out), "--quiet", "--strategy", "sb", "--epochs",
            "3", "--batch-size", "32", "--beta", "1", "--seed", "1", "--threads", "1"]  # fmt: skip
    real_fsync, calls = os.fsync, {"checkpoints": 0}

    def fsync(fd):  # the second checkpoint write (end of epoch 2) runs out of space
        if os.readlink(f"/proc/self/fd/{fd}").split("/")[-1].startswith(".checkpoint.pt."):
            calls["checkpoints"] += 1
            if calls["checkpoints"] == 2:
                _enospc()
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert str(out / "checkpoint.pt") in err and "No space left on device" in err
    monkeypatch.undo()
    assert read_checkpoint(out / "checkpoint.pt")["epoch"] == 1 and len(read_metrics(out)) == 3
    assert main([*argv, "--resume"]) == 0
    assert untimed(read_metrics(out)) == untimed(read_metrics(finished))


# ----- SIGKILL ------------------------------------------------------------------------------------------------
def test_sigkill_mid_run_resumes_from_the_last_complete_checkpoint(tiny_fmnist, tmp_path):
    out = tmp_path / "killed"
    argv = ["train", "--data-dir", str(tiny_fmnist), "--out", str(out), "--batch-size", "32", "--quiet",
            "--strategy", "sb", "--threads", "1"]  # fmt: skip
    proc = subprocess.Popen([sys.executable, "-m", "selective_backprop", *argv, "--epochs", "400"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        deadline = time.time() + 90
        while time.time() < deadline and proc.poll() is None:
            if (out / "checkpoint.pt").exists() and (out / "metrics.jsonl").exists():
                if len((out / "metrics.jsonl").read_text().splitlines()) >= 3:  # epochs 0, 1 and 2 logged
                    break
            time.sleep(0.05)
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        proc.kill()  # SIGKILL: no handler runs, whatever was being written is torn
    finally:
        proc.kill()
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    (out / ".checkpoint.pt.torn.tmp").write_bytes(b"half a checkpoint")  # as a kill during a write leaves it
    good = next(p for p in (out / "checkpoint.pt", out / "checkpoint.prev.pt") if p.exists())
    state = read_checkpoint(good)
    epoch, rows = state["epoch"], state["metrics_rows"]
    assert epoch >= 1
    assert main([*argv, "--resume", "--epochs", str(epoch + 1)]) == 0
    assert not list(out.glob(".*.tmp"))
    metrics = read_metrics(out)
    assert rows == epoch + 1 and [r["epoch"] for r in metrics] == list(range(epoch + 2))
    assert read_checkpoint(out / "checkpoint.pt")["epoch"] == epoch + 1
    assert metrics[-1]["examples_seen"] == 512 * (epoch + 1)


# ----- NaN / inf losses ---------------------------------------------------------------------------------------
def poison(trainer: Trainer, step: int, position: int = 3, *, scoring: bool = False) -> dict:
    """Make the model's output NaN at ``position`` of its ``step``-th training forward (or of every scoring
    forward from the ``step``-th on: a broken model stays broken).

    Returns a record of the poisoned batch's dataset indices and the parameters before that step.
    """
    forward, seen = trainer.model.forward, {"n": 0}
    train_step = trainer._train_step

    def spy(batch):
        seen["batch"] = batch
        seen["before"] = [p.detach().clone() for p in trainer.model.parameters()]
        return train_step(batch)

    def poisoned(x):
        out = forward(x)
        is_scoring = not trainer.model.training and len(x) == trainer.config.batch_size  # evaluation uses 256
        if (trainer.model.training and not scoring) or (is_scoring and scoring):
            seen["n"] += 1
            if seen["n"] == step or (scoring and seen["n"] > step):
                out = out.clone()
                out[position] = float("nan")
                if not scoring:
                    seen["indices"], seen["params"] = seen["batch"].indices, seen["before"]
        return out

    trainer.model.forward = poisoned
    trainer._train_step = spy
    return seen


def test_nan_training_loss_stops_before_the_step_naming_step_epoch_indices_checkpoint(tiny_fmnist, tmp_path):
    trainer = Trainer(config(tiny_fmnist), tmp_path / "nan", progress=False)
    seen = poison(trainer, step=20)  # epoch 1 primes 16 full batches; step 20 is in epoch 2
    with pytest.raises(TrainingDiverged) as info:
        trainer.run()
    e = info.value
    bad = int(seen["indices"][3])
    assert e.step == 20 and e.epoch == 1 and e.indices == [bad] and e.checkpoint == tmp_path / "nan/checkpoint.pt"
    for text in ("non-finite training loss", f"dataset indices [{bad}]", "step 20", "epoch 2/3",
                 str(tmp_path / "nan/checkpoint.pt")):  # fmt: skip
        assert text in str(e)
    assert all(torch.equal(a, b) for a, b in zip(seen["params"], trainer.model.parameters(), strict=True))
    assert read_checkpoint(tmp_path / "nan/checkpoint.pt")["epoch"] == 1  # nothing written after the NaN


def test_nan_scoring_loss_stops_naming_the_indices(tiny_fmnist, tmp_path):
    trainer = Trainer(config(tiny_fmnist), tmp_path / "nan", progress=False)
    trainer.selector.select = _spy_select(trainer, seen := {})
    poison(trainer, step=2, position=5, scoring=True)  # SB's second scoring forward: epoch 2, loader batch 2
    with pytest.raises(TrainingDiverged, match="non-finite scoring loss") as info:
        trainer.run()
    assert info.value.epoch == 1 and info.value.indices == [int(seen["indices"][5])]


def _spy_select(trainer: Trainer, seen: dict):
    select = trainer.selector.select

    def spy(inputs, targets, indices):
        seen["indices"] = indices
        return select(inputs, targets, indices)

    return spy


def test_nonfinite_skip_drops_the_step_counts_it_and_trains_on(tiny_fmnist, tmp_path, finished):
    trainer = Trainer(config(tiny_fmnist, strategy="traditional", nonfinite="skip"), tmp_path / "skip",
                      progress=False)  # fmt: skip
    seen = poison(trainer, step=20)  # 16 steps per epoch
    trainer.run()
    rows = read_metrics(tmp_path / "skip")
    assert [r["skipped_steps"] for r in rows] == [0, 0, 1, 1]
    assert [r["steps"] for r in rows] == [0, 16, 31, 47] and rows[-1]["backprops"] == 3 * 512 - 32
    assert rows[-1]["examples_seen"] == 3 * 512 and np.isfinite(rows[-1]["test_loss"])
    counts = np.load(tmp_path / "skip/selection_counts.npy")
    skipped = seen["indices"].numpy()
    assert (counts[skipped] == 2).all() and np.delete(counts, skipped).min() == 3
    assert read_checkpoint(tmp_path / "skip/checkpoint.pt")["skipped_steps"] == 1
    assert [r["skipped_steps"] for r in read_metrics(finished)] == [0, 0, 0, 0]


def test_nonfinite_parameters_stop_the_run_before_a_checkpoint(tiny_fmnist, tmp_path):
    trainer = Trainer(config(tiny_fmnist), tmp_path / "params", progress=False)
    step, calls = trainer.optimizer.step, {"n": 0}

    def step_then_poison(*args, **kwargs):  # the epoch's last step leaves a NaN weight: no later loss sees it
        step(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 16:
            next(trainer.model.parameters()).data[0] = float("nan")

    trainer.optimizer.step = step_then_poison
    with pytest.raises(TrainingDiverged, match="non-finite parameters") as info:
        trainer.run()
    assert info.value.checkpoint is None and "no checkpoint was written yet" in str(info.value)
    assert not (tmp_path / "params/checkpoint.pt").exists() and len(read_metrics(tmp_path / "params")) == 1


def test_cli_exits_3_when_training_diverges(tiny_fmnist, tmp_path, capsys):
    rc = main(["train", "--data-dir", str(tiny_fmnist), "--out", str(tmp_path / "lr"), "--quiet", "--strategy",
               "traditional", "--epochs", "2", "--batch-size", "32", "--lr", "1e12", "--threads", "1"])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 3 and "training diverged" in err and "step" in err and "--nonfinite skip" in err


def test_a_message_listing_dataset_indices_shows_the_first_eight_and_how_many_more():
    e = TrainingDiverged("non-finite training loss", 3, 0, 2, list(range(1000, 1100)), None)
    assert "at dataset indices [1000, 1001, 1002, 1003, 1004, 1005, 1006, 1007] and 92 more at step 3" in str(e)
    assert "1008" not in str(e) and len(str(e)) < 400 and e.indices == list(range(1000, 1100))
    assert "dataset indices [5, 9] at step" in str(TrainingDiverged("x", 1, 0, 1, [5, 9], None))


def test_nonfinite_option_is_checked():
    with pytest.raises(ValueError, match="--nonfinite must be one of raise, skip, got 'ignore'"):
        TrainConfig(nonfinite="ignore")


# ----- corrupt dataset files ----------------------------------------------------------------------------------
def _truncate_gz(folder: Path) -> Path:
    path = folder / "train-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:-200])
    return path


def _edit(path: Path, edit) -> Path:
    """Rewrite the IDX file ``path`` (gzipped) as ``edit(raw bytes)``."""
    path.write_bytes(gzip.compress(edit(gzip.decompress(path.read_bytes()))))
    return path


def _truncate_payload(folder: Path) -> Path:
    return _edit(folder / "t10k-images-idx3-ubyte.gz", lambda raw: raw[:-28])


def _labels_out_of_range(folder: Path) -> Path:  # header: magic + one dim, then one byte per label
    return _edit(folder / "train-labels-idx1-ubyte.gz", lambda raw: raw[:8] + bytes([12]) * (len(raw) - 8))


def _wrong_shape(folder: Path) -> Path:  # 512 x 28 x 28 images declared as 512 x 784
    return _edit(folder / "train-images-idx3-ubyte.gz",
                 lambda raw: raw[:3] + bytes([2]) + struct.pack(">II", 512, 784) + raw[16:])  # fmt: skip


def _count_mismatch(folder: Path) -> Path:
    return _edit(folder / "t10k-labels-idx1-ubyte.gz", lambda raw: raw[:4] + struct.pack(">I", 255) + raw[8:-1])


@pytest.mark.parametrize("break_data,reason", [
    (_truncate_gz, "cannot gunzip"), (_truncate_payload, "bytes but dims"),
    (_labels_out_of_range, "labels span [12, 12]"), (_wrong_shape, "expected uint8 images N x H x W"),
    (_count_mismatch, "255 labels for 256 images"),
])  # fmt: skip
def test_corrupt_dataset_file_exits_2_naming_it_before_training(break_data, reason, tiny_fmnist, tmp_path, capsys):
    data = Path(shutil.copytree(tiny_fmnist, tmp_path / "data"))
    path = break_data(data)
    out = tmp_path / "run"
    assert main(["train", "--data-dir", str(data), "--out", str(out), "--quiet", "--epochs", "1"]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and reason in err
    assert not (out / "metrics.jsonl").exists() and not (out / "checkpoint.pt").exists()
