"""How a run scores: the scoring forward's precision (``--score-precision``, ``auto`` measured at start-up) and,
with ``--compile``, scoring batches padded to a few bucket sizes so the compiled graph is never rebuilt.

``auto`` times a scoring forward at each candidate precision on the run's own model, device and batch size, and
measures each one's fidelity against fp32 (:func:`selective_backprop.precision.scoring_fidelity`: Spearman rank
correlation of the losses, share of examples whose selection probability moves by more than 0.05). It takes the
cheapest precision that is both measured faster than the reference (by at least :data:`MIN_GAIN`) and faithful
(Spearman >= :data:`MIN_SPEARMAN`), else the reference -- fp32, or the training precision under ``--amp``. The
measurements and the choice go to ``environment.json`` and are printed once.

int8 is not offered: on CPU, PyTorch's dynamic quantization covers only ``nn.Linear`` (measured on the small CNN:
no faster, 999 vs 999 us per example at batch 128), and static quantization of the convolutions needs a calibration
pass and a re-quantized copy after every optimizer step, which costs more than the scoring forward it would save.
"""

from __future__ import annotations

import copy
import itertools
import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..precision import Fidelity, downscale, scoring_autocast, scoring_fidelity
from .data import DeviceLoader

if TYPE_CHECKING:
    from .setup import RunParts

__all__ = ["MIN_SPEARMAN", "MIN_GAIN", "PrecisionTrial", "choose_precision", "calibrate_precision", "BucketPadded",
           "bucket_sizes"]  # fmt: skip

MIN_SPEARMAN = 0.99
"""``auto`` accepts a precision only if its losses rank the examples like fp32's at least this well."""
MIN_GAIN = 0.95
"""... and only if a scoring forward costs at most this fraction of the reference's (measured faster, not noise)."""


@dataclass(frozen=True)
class PrecisionTrial:
    """One candidate's measurements: seconds per example of a scoring forward, and its fidelity (``None`` for the
    reference, which defines fidelity 1)."""

    precision: str
    seconds_per_example: float
    fidelity: Fidelity | None = None


def choose_precision(trials: list[PrecisionTrial], reference: str) -> tuple[str, str]:
    """``(precision, reason)``: the cheapest faithful candidate measured faster than ``reference`` (pure).

    Example:
        >>> trials = [PrecisionTrial("fp32", 1e-4), PrecisionTrial("bf16", 4e-5, Fidelity(0.999, 0.01, 256)),
        ...           PrecisionTrial("fp16", 3e-5, Fidelity(0.95, 0.2, 256))]
        >>> choose_precision(trials, "fp32")[0]   # fp16 is cheaper but does not rank like fp32
        'bf16'
    """
    base = next(t for t in trials if t.precision == reference)
    ok = [
        t for t in trials
        if t.precision != reference and t.fidelity is not None and t.fidelity.spearman >= MIN_SPEARMAN
        and t.seconds_per_example <= MIN_GAIN * base.seconds_per_example
    ]  # fmt: skip
    if not ok:
        return reference, f"no other precision was both faithful (Spearman >= {MIN_SPEARMAN}) and faster than " \
            f"{reference} (<= {MIN_GAIN:g} x its {base.seconds_per_example * 1e6:.1f} us/example)"
    best = min(ok, key=lambda t: t.seconds_per_example)
    return best.precision, (f"{best.precision}: {best.seconds_per_example * 1e6:.1f} vs {reference} "
                            f"{base.seconds_per_example * 1e6:.1f} us/example, Spearman {best.fidelity.spearman:.4f}")  # type: ignore[union-attr]  # fmt: skip


def _time_scoring(parts: RunParts, x: Tensor, y: Tensor, precision: str, repeats: int) -> float:
    """Median seconds per example of a scoring forward at ``precision`` (after one untimed warm-up)."""
    model, scale = parts.model, parts.config.score_scale  # eager: compiling every candidate would cost minutes
    was_training = model.training
    model.eval()
    times = []
    with torch.no_grad():
        for k in range(repeats + 1):
            parts.sync()
            start = time.perf_counter()
            with scoring_autocast(precision, parts.device):
                F.cross_entropy(model(downscale(x, scale)), y, reduction="none")
            parts.sync()
            if k:
                times.append((time.perf_counter() - start) / len(x))
    model.train(was_training)
    return sorted(times)[len(times) // 2]


def calibrate_precision(parts: RunParts, repeats: int = 5, batches: int = 4) -> tuple[str, dict[str, Any]]:
    """Measure every candidate precision on the run's model and data and choose one (:func:`choose_precision`);
    return it with the numbers for ``environment.json``. The model is left as it was."""
    c = parts.config
    reference = {"off": "fp32", "bf16": "bf16", "fp16": "fp16"}[c.amp]
    candidates = ["fp32", "bf16"] + (["fp16"] if parts.device.type == "cuda" else [])
    batch = min(c.score_batch_size or c.batch_size, len(parts.train_set))
    loader = DeviceLoader(parts.train_set, batch, seed=c.seed + 104729)
    sample = [(x.contiguous(memory_format=parts.memory_format), y) for x, y, _ in itertools.islice(loader, batches)]
    state = copy.deepcopy(parts.model.state_dict())  # BatchNorm buffers are untouched in eval mode; be sure anyway
    trials = []
    for precision in candidates:
        seconds = _time_scoring(parts, *sample[0], precision, repeats)
        fidelity = None if precision == reference else scoring_fidelity(
            parts.model, sample, lambda out, t: F.cross_entropy(out.float(), t, reduction="none"),
            precision, c.score_scale, beta=c.beta)  # fmt: skip
        trials.append(PrecisionTrial(precision, seconds, fidelity))
    parts.model.load_state_dict(state)
    choice, reason = choose_precision(trials, reference)
    report = {"score_precision": choice, "score_precision_reason": reason, "score_precision_trials": {
        t.precision: {"us_per_example": t.seconds_per_example * 1e6,
                      **({} if t.fidelity is None else {"spearman": t.fidelity.spearman,
                                                        "changed_share": t.fidelity.changed_share})}
        for t in trials}}  # fmt: skip
    if parts.rank == 0:
        print(f"score precision (auto): {reason}", file=sys.stderr, flush=True)
    return choice, report


def bucket_sizes(largest: int, smallest: int = 8) -> list[int]:
    """Powers of two from ``smallest`` up, then ``largest``: the batch sizes a compiled scoring forward sees.

    Example:
        >>> bucket_sizes(100)
        [8, 16, 32, 64, 100]
    """
    sizes, size = [], smallest
    while size < largest:
        sizes.append(size)
        size *= 2
    return [*sizes, largest]


class BucketPadded(nn.Module):
    """A scoring model whose batches are padded (repeating their rows) up to the next bucket size, so a compiled
    graph of fixed shape serves every batch; the padded rows' outputs are dropped. Eval mode only: padding would
    change BatchNorm's batch statistics in train mode.

    Args:
        module: the (compiled) model.
        sizes: the bucket sizes, ascending (a larger batch runs as it is).
    """

    def __init__(self, module: nn.Module, sizes: list[int]) -> None:
        super().__init__()
        self.module, self.sizes = module, sizes

    def forward(self, x: Tensor) -> Tensor:
        m = len(x)
        size = next((s for s in self.sizes if s >= m), m)
        if size == m or self.training:
            return self.module(x)  # type: ignore[no-any-return]
        rows = torch.arange(size, device=x.device) % m
        padded = x[rows]
        if x.ndim == 4 and x.is_contiguous(memory_format=torch.channels_last):
            padded = padded.contiguous(memory_format=torch.channels_last)  # the layout the graph was compiled for
        return self.module(padded)[:m]  # type: ignore[no-any-return]
