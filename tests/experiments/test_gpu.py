"""On a CUDA device (skipped without one; run by ``benchmarks/gpu_check.sh`` when a GPU is at hand): the selector's
tensors stay on the device, fp16 AMP trains with its gradient scaler, the scoring precision is honoured there, and
two nccl ranks keep identical models."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from selective_backprop import Kath18, SelectiveBackprop
from selective_backprop.experiments.config import TrainConfig
from selective_backprop.experiments.trainer import Trainer

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_the_selector_keeps_everything_on_the_device():
    model = torch.nn.Linear(8, 3).cuda()
    x, y, idx = torch.randn(64, 8, device="cuda"), torch.randint(0, 3, (64,), device="cuda"), torch.arange(64).cuda()
    for sb in (SelectiveBackprop(model, batch_size=8, beta=1, staleness=2, dataset_size=64, prime_epochs=0, seed=0),
               Kath18(model, batch_size=8, tau_th=-1.0)):  # fmt: skip
        batches = sb.select(x, y, idx) + sb.flush()
        assert batches and all(b.inputs.is_cuda and b.indices.is_cuda for b in batches)
        for batch in batches:
            batch.loss(batch.forward(model)).backward()
        state = sb.state_dict()
        assert state["generator"].device.type == "cpu"  # generator states are CPU byte tensors, saved as such


@pytest.mark.parametrize("amp, score_precision", [("fp16", "fp16"), ("fp16", "fp32"), ("bf16", "bf16")])
def test_amp_on_cuda_trains_with_its_precisions(tiny_fmnist, tmp_path, amp, score_precision):
    config = TrainConfig(strategy="sb", epochs=2, batch_size=32, data_dir=str(tiny_fmnist), device="cuda", amp=amp,
                         score_precision=score_precision)  # fmt: skip
    summary = Trainer(config, tmp_path / "run", progress=False).run()
    assert summary["final_test_error"] < 0.5
    assert json.loads((tmp_path / "run" / "environment.json").read_text())["device"].startswith("cuda")


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="nccl needs one GPU per rank")
def test_two_nccl_ranks_train_identical_models(tiny_fmnist, tmp_path):
    argv = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m",
            "selective_backprop", "train", "--data-dir", str(tiny_fmnist), "--out", str(tmp_path / "run"), "--quiet",
            "--strategy", "sb", "--batch-size", "32", "--epochs", "3"]  # fmt: skip
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=300, env={**os.environ})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    from selective_backprop.experiments.runfolder import read_checkpoint

    a, b = (read_checkpoint(tmp_path / "run" / f"checkpoint-rank{r}.pt")["model"] for r in (0, 1))
    assert all(torch.equal(a[k], b[k]) for k in a)
