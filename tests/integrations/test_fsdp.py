"""FSDP (torch's ``fully_shard``, FSDP2) with the library's loop and ``distributed=True``: the scoring forward runs
through the sharded model (its all-gathers run on every rank in step with the selector's own collectives), and two
ranks train in lockstep to the same full model. CPU, gloo. FSDP1 (``FullyShardedDataParallel``) needs an accelerator
in torch 2.13 and is not tested here. This file is also the script:
``torchrun --standalone --nproc-per-node 2 tests/integrations/test_fsdp.py FOLDER`` (each rank writes its line to
``FOLDER/rank<r>.txt``: the ranks' prints would interleave on one stdout)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import torch

fsdp = pytest.importorskip("torch.distributed.fsdp")
if not hasattr(fsdp, "fully_shard"):
    pytest.skip("this torch has no torch.distributed.fsdp.fully_shard", allow_module_level=True)


def main(folder: str) -> None:
    import torch.distributed as dist
    from torch import nn
    from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

    from selective_backprop import SelectiveBackprop
    from selective_backprop.distributed import init_distributed

    rank, world = init_distributed(timeout_s=60)
    X = torch.randn(1024, 10, generator=torch.Generator().manual_seed(0))
    Y = (X[:, 0] - X[:, 1] > 0).long()
    data = TensorDataset(X, Y, torch.arange(len(X)))
    sampler = DistributedSampler(data, num_replicas=world, rank=rank, seed=0)
    loader = DataLoader(data, batch_size=32, sampler=sampler)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 2))
    for layer in (model[0], model[2]):
        fsdp.fully_shard(layer)
    fsdp.fully_shard(model)  # the model is now the FSDP module: its forward all-gathers the shards
    scoring = []
    model.register_forward_pre_hook(lambda m, args: scoring.append(len(args[0])) if not torch.is_grad_enabled()
                                    else None)  # fmt: skip
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    sb = SelectiveBackprop(model, batch_size=32, beta=2, distributed=True)
    assert sb.model is model  # not unwrapped (only DDP is): the scoring forward goes through FSDP
    for epoch in range(3):
        sampler.set_epoch(epoch)
        for batch in sb.iterate(loader):
            loss = batch.loss(batch.forward(model))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    scored = sum(scoring)  # before the evaluation forward below
    full = torch.cat([p.full_tensor().flatten() for p in model.parameters()])  # every rank gathers the full model
    with torch.no_grad():
        accuracy = (model(X).argmax(1) == Y).float().mean().item()
    c = sb.counters
    line = (f"rank {rank}: accuracy {accuracy:.3f}  steps {c['steps']:.0f}  scored {scored}  "
          f"selection_forwards {c['selection_forwards']:.0f}  checksum {full.double().sum().item():.10f}")
    with open(os.path.join(folder, f"rank{rank}.txt"), "w") as f:
        f.write(line)
    dist.destroy_process_group()


def test_fsdp2_scores_through_the_sharded_model_and_ranks_train_in_lockstep(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           __file__, str(tmp_path)], capture_output=True, text=True, timeout=120, env=env)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    lines = "\n".join(p.read_text() for p in sorted(tmp_path.glob("rank*.txt")))
    ranks = re.findall(r"rank (\d): accuracy ([0-9.]+)  steps (\d+)  scored (\d+)  selection_forwards (\d+)  "
                       r"checksum (\S+)", lines)  # fmt: skip
    assert sorted(r[0] for r in ranks) == ["0", "1"]
    (_, acc0, steps0, scored0, forwards0, sum0), (_, acc1, steps1, scored1, forwards1, sum1) = ranks
    assert steps0 == steps1 and sum0 == sum1 and acc0 == acc1 and float(acc0) > 0.9  # lockstep, one model
    assert scored0 == forwards0 == scored1 == str(2 * 512)  # epochs 2 and 3 scored, through the FSDP module


if __name__ == "__main__":
    main(sys.argv[1])
