"""Evaluation of a run's model: test error and loss (sharded over ranks under torchrun), and the final true-class
confidence of every training example. Neither counts as training time; the model's mode is restored."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from .data import DeviceLoader

if TYPE_CHECKING:
    from .setup import RunParts

__all__ = ["evaluate", "train_confidence"]


@torch.no_grad()
def evaluate(parts: RunParts) -> tuple[float, float]:
    """(test error, mean test loss) in eval mode. Under torchrun each rank evaluates its share of the test set and
    the sums are all-reduced, after taking rank 0's buffers (BatchNorm statistics: DDP broadcasts them before each
    training forward, so each rank's copy also holds its own last batch)."""
    model, comm = parts.model, parts.comm
    if comm is not None:
        comm.broadcast_(list(model.buffers()), "broadcast of the model buffers")
    was_training = model.training
    model.eval()
    sums = torch.zeros(2, dtype=torch.float64, device=parts.device)  # wrong, loss
    for x, y, _ in DeviceLoader(parts.eval_set, 256, shuffle=False):
        out = model(x.contiguous(memory_format=parts.memory_format))
        sums[0] += (out.argmax(1) != y).sum()
        sums[1] += F.cross_entropy(out, y, reduction="sum")
    model.train(was_training)
    if comm is not None:
        sums = comm.all_reduce_sum(sums, "all_reduce(SUM) of the test error")
    wrong, loss_sum = sums.tolist()
    n = len(parts.test_set)
    return wrong / n, loss_sum / n


@torch.no_grad()
def train_confidence(parts: RunParts) -> Tensor:
    """Final true-class softmax probability of every training example (eval mode, no augmentation)."""
    model = parts.model
    model.eval()
    out = torch.empty(len(parts.train_set), device=parts.device)
    for x, y, idx in DeviceLoader(parts.train_set, 256, shuffle=False):
        logits = model(x.contiguous(memory_format=parts.memory_format)).float()
        out[idx] = torch.softmax(logits, 1).gather(1, y[:, None]).squeeze(1)
    model.train()
    return out
