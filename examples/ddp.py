"""Data-parallel Selective-Backprop with global selection: every rank's scoring losses enter one history, so the
percentiles (and the selected fraction) are those of the union of the ranks' batches.

Run: torchrun --standalone --nproc-per-node 2 examples/ddp.py   (gloo on CPU; nccl on CUDA)
"""

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from selective_backprop import SelectiveBackprop
from selective_backprop.distributed import init_distributed

rank, world = init_distributed(timeout_s=60)
X = torch.randn(4096, 20, generator=torch.Generator().manual_seed(0))
Y = (X[:, 0] + 0.5 * X[:, 1] > 0).long()
data = TensorDataset(X, Y, torch.arange(len(X)))
sampler = DistributedSampler(data, num_replicas=world, rank=rank, seed=0)  # pads: every rank yields as many batches
loader = DataLoader(data, batch_size=64, sampler=sampler)
torch.manual_seed(0)  # the same initial parameters on every rank
ddp = DistributedDataParallel(nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 2)))
optimizer = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9)

sb = SelectiveBackprop(ddp, batch_size=64, beta=2, distributed=True)  # + distributed=True
for epoch in range(4):
    sampler.set_epoch(epoch)
    for batch in sb.iterate(loader):
        loss = batch.loss(ddp(batch.inputs))
        optimizer.zero_grad()
        loss.backward()  # DDP averages the gradients over the ranks
        optimizer.step()

with torch.no_grad():
    accuracy = (ddp.module(X).argmax(1) == Y).float().mean().item()
print(f"rank {rank}: accuracy {accuracy:.3f}  steps {sb.counters['steps']:.0f}  selected {sb.counters['selected']:.0f}")
torch.distributed.destroy_process_group()
