"""Evaluation of a run's model: test error and loss (sharded over ranks under torchrun), and the final true-class
confidence of every training example. Neither counts as training time; the model's mode is restored."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .data import ArrayDataset, DeviceLoader

if TYPE_CHECKING:
    from .setup import RunParts

__all__ = ["evaluate", "confidences", "write_views"]


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
def confidences(parts: RunParts, dataset: ArrayDataset) -> tuple[Tensor, Tensor]:
    """``(true-class softmax probability, predicted class)`` of every example of ``dataset`` (eval mode, no
    augmentation; the model's mode is restored)."""
    model = parts.model
    was_training = model.training
    model.eval()
    conf = torch.empty(len(dataset), device=parts.device)
    pred = torch.empty(len(dataset), dtype=torch.int64, device=parts.device)
    for x, y, idx in DeviceLoader(dataset, 256, shuffle=False):
        logits = model(x.contiguous(memory_format=parts.memory_format)).float()
        conf[idx] = torch.softmax(logits, 1).gather(1, y[:, None]).squeeze(1)
        pred[idx] = logits.argmax(1)
    model.train(was_training)
    return conf, pred


def write_views(parts: RunParts, epoch: int, final: bool = False) -> None:
    """The per-example views the report needs (rank 0): after epoch ``hard_epoch`` (or the last, when the budget is
    shorter) ``test_confidence_e<E>.npy`` / ``test_prediction_e<E>.npy`` (paper §5.2, Figs. 8-9); at the end
    ``test_confidence.npy``, ``test_prediction.npy`` and ``train_confidence.npy``; and ``test_labels.npy``."""
    c = parts.config
    if parts.rank != 0 or not (final or epoch == min(c.hard_epoch, c.epochs)):
        return
    conf, pred = confidences(parts, parts.test_set)
    tag = "" if final else f"_e{epoch}"
    np.save(parts.out / f"test_confidence{tag}.npy", conf.cpu().numpy())
    np.save(parts.out / f"test_prediction{tag}.npy", pred.cpu().numpy())
    np.save(parts.out / "test_labels.npy", parts.test_set.labels.cpu().numpy())
    if final:
        np.save(parts.out / "train_confidence.npy", confidences(parts, parts.train_set)[0].cpu().numpy())
