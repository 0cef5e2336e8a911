"""``torchrun --nproc-per-node 2 -m selective_backprop train``: two gloo ranks on CPU, per-rank checkpoints, exact
resume after SIGTERM, and the refusals (another world size, strategies that cannot run distributed).

Every launch has a hard timeout, so a hang fails the test instead of stalling the suite.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from selective_backprop.experiments.analysis import read_metrics
from selective_backprop.experiments.config import TrainConfig
from selective_backprop.experiments.meters import TIMED_COLUMNS
from selective_backprop.experiments.runfolder import read_checkpoint
from selective_backprop.experiments.trainer import Trainer

LAUNCH_TIMEOUT_S = 120
EPOCHS = 6


def torchrun(folder: Path, data: Path, *extra: str) -> subprocess.Popen:
    """Start a 2-rank run of the CLI (stale-sb: the selector, its cache and the loader are all per rank)."""
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
            "-m", "selective_backprop", "train", "--data-dir", str(data), "--out", str(folder), "--quiet",
            "--strategy", "stale-sb", "--staleness", "2", "--batch-size", "32", "--threads", "1",
            "--epochs", str(EPOCHS), "--dist-timeout", "60", *extra]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)


def finish(proc: subprocess.Popen) -> tuple[int, str]:
    try:
        out = proc.communicate(timeout=LAUNCH_TIMEOUT_S)[0]
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail(f"torchrun still running after {LAUNCH_TIMEOUT_S} s (a hang): {proc.communicate()[0][-3000:]}")
    return proc.returncode, out


def untimed(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMED_COLUMNS} for r in rows]


def models(folder: Path) -> list[dict[str, torch.Tensor]]:
    return [read_checkpoint(folder / f"checkpoint-rank{r}.pt")["model"] for r in (0, 1)]


@pytest.fixture(scope="module")
def finished(tiny_fmnist: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("ddp") / "run"
    code, out = finish(torchrun(folder, tiny_fmnist))
    assert code == 0, out[-4000:]
    return folder


def test_two_ranks_train_identical_models_and_rank_0_writes_the_results(finished):
    first, second = models(finished)
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    assert {p.name for p in finished.glob("checkpoint*")} == {
        "checkpoint-rank0.pt", "checkpoint-rank0.prev.pt", "checkpoint-rank1.pt", "checkpoint-rank1.prev.pt",
    }  # fmt: skip
    rows = read_metrics(finished)
    assert [r["epoch"] for r in rows] == list(range(EPOCHS + 1))
    assert [r["examples_seen"] for r in rows] == [512 * e for e in range(EPOCHS + 1)]  # 256 per rank and epoch
    final = json.loads((finished / "final.json").read_text())
    counts = np.load(finished / "selection_counts.npy")
    assert counts.shape == (512,) and counts.sum() == final["backprops"] == rows[-1]["backprops"]
    assert (counts >= 1).all()  # the primed epoch backpropagates every example once, on the rank owning it
    assert final["backprops"] < 512 * EPOCHS and rows[-1]["skipped_forwards"] > 0  # selective and stale
    assert rows[-1]["test_error"] < rows[0]["test_error"] - 0.3  # it learned
    assert json.loads((finished / "environment.json").read_text())["world_size"] == 2


def test_sigterm_checkpoints_every_rank_at_one_position_and_resume_is_exact(finished, tiny_fmnist, tmp_path):
    folder = tmp_path / "interrupted"
    proc = torchrun(folder, tiny_fmnist)
    deadline = time.monotonic() + LAUNCH_TIMEOUT_S
    while time.monotonic() < deadline and proc.poll() is None:  # wait for epoch 1, then stop the launcher
        if (folder / "metrics.jsonl").exists() and len((folder / "metrics.jsonl").read_text().splitlines()) >= 2:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be interrupted"
    proc.send_signal(signal.SIGTERM)  # as a scheduler would; torchrun forwards it to the ranks
    code, out = finish(proc)
    assert code != 0 and "interrupted by SIGTERM" in out, out[-4000:]
    states = [read_checkpoint(folder / f"checkpoint-rank{r}.pt") for r in (0, 1)]
    assert (states[0]["epoch"], states[0]["batches_done"]) == (states[1]["epoch"], states[1]["batches_done"])
    assert states[0]["epoch"] < EPOCHS
    code, out = finish(torchrun(folder, tiny_fmnist, "--resume"))
    assert code == 0, out[-4000:]
    for resumed, uninterrupted in zip(models(folder), models(finished), strict=True):
        assert all(torch.equal(resumed[k], uninterrupted[k]) for k in uninterrupted)
    assert untimed(read_metrics(folder)) == untimed(read_metrics(finished))
    assert np.array_equal(np.load(folder / "selection_counts.npy"), np.load(finished / "selection_counts.npy"))


def test_resuming_with_another_number_of_ranks_says_how(finished, tiny_fmnist):
    config = TrainConfig(strategy="stale-sb", staleness=2, batch_size=32, epochs=EPOCHS, data_dir=str(tiny_fmnist))
    with pytest.raises(ValueError, match=r"written by 2; resume it with torchrun --nproc-per-node 2"):
        Trainer(config, finished, resume=True, progress=False)


@pytest.mark.parametrize("strategy, nonfinite", [("infobatch", "raise"), ("composer-sb", "raise"), ("sb", "skip")])
def test_what_cannot_run_under_torchrun_is_refused_before_joining(strategy, nonfinite, tiny_fmnist, tmp_path,
                                                                   monkeypatch):  # fmt: skip
    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun sets it; no process group is ever started here
    config = TrainConfig(strategy=strategy, nonfinite=nonfinite, data_dir=str(tiny_fmnist))
    with pytest.raises(ValueError, match="cannot run under torchrun"):
        Trainer(config, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


def test_a_failed_peer_exits_4_naming_the_collective(monkeypatch, capsys, tmp_path):
    from selective_backprop.distributed import CollectiveError
    from selective_backprop.experiments import cli

    def peer_died(*args, **kwargs):
        raise CollectiveError("all_gather of the batch losses failed on rank 0 of 2: another rank probably died")

    monkeypatch.setattr(cli, "_run", peer_died)
    assert cli.main(["train", "--out", str(tmp_path / "run"), "--quiet"]) == 4
    assert "all_gather of the batch losses failed on rank 0 of 2" in capsys.readouterr().err


LEAVE = """
import atexit, sys, torch, torch.distributed as dist
from selective_backprop.experiments.cli import leave_distributed
dist.init_process_group("gloo", init_method="file://{store}", rank=0, world_size=1)
ddp = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(2, 2))  # keeps the process group alive in C++
ddp(torch.randn(3, 2)).sum().backward()
atexit.register(lambda: print("interpreter teardown ran"))
print("trained", end="")  # block-buffered into the pipe: lost unless leave_distributed flushes
leave_distributed(7)
print("unreachable")
"""


def test_a_torchrun_rank_leaves_flushed_with_its_code_and_without_interpreter_teardown(tmp_path):
    """The exit path of every torchrun rank (``cli.run``): the gloo threads DDP leaks must not meet the teardown."""
    script = LEAVE.format(store=tmp_path / "store")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONUNBUFFERED": ""})  # fmt: skip
    assert proc.returncode == 7, proc.stderr
    assert proc.stdout == "trained"
