"""A cheaper scoring forward: its own precision and input scale, and how faithfully it ranks the examples.

The scoring forward only has to *rank* losses, so it may run below the training precision (``bf16`` / ``fp16``
autocast) or on downscaled images (Composer's ``scale_factor``). Whether that is cheaper depends on the hardware
(bf16 pays on CPUs with AVX512-BF16/AMX and on GPUs; on an AVX2-only CPU it is several times slower), and whether
it is faithful depends on the model: :func:`scoring_fidelity` measures both numbers the selection cares about --
the Spearman rank correlation with fp32 losses and the share of examples whose selection probability moves by more
than 0.05.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils._pytree import tree_map

from .batching import default_forward, device_of
from .policies import percentile_probabilities

__all__ = ["SCORE_PRECISIONS", "scoring_autocast", "downscale", "spearman", "Fidelity", "fidelity",
           "scoring_fidelity"]  # fmt: skip

SCORE_PRECISIONS = ("fp32", "bf16", "fp16")
"""Precisions of the scoring forward: ``fp32`` (autocast off), ``bf16`` or ``fp16`` autocast."""

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def scoring_autocast(precision: str | None, device: torch.device) -> AbstractContextManager[Any]:
    """The autocast context of a scoring forward on ``device``: ``None`` leaves the caller's as it is, ``"fp32"``
    turns autocast off (also inside a bf16 training loop), ``"bf16"`` / ``"fp16"`` turn it on with that dtype."""
    if precision is None:
        return nullcontext()
    if precision == "fp32":
        return torch.autocast(device.type, enabled=False)
    return torch.autocast(device.type, dtype=_DTYPES[precision])


def downscale(inputs: Any, scale: float | None) -> Any:
    """Every floating ``(N, C, H, W)`` tensor of ``inputs`` resized by ``scale`` (bilinear, as Composer's
    ``scale_factor``); ``None`` or ``1`` leaves the inputs as they are.

    Raises:
        ValueError: when ``scale`` is set and ``inputs`` hold no floating 4-D tensor (nothing to downscale).
    """
    if scale is None or scale == 1:
        return inputs
    found = []

    def resize(t: Any) -> Any:
        if isinstance(t, Tensor) and t.ndim == 4 and t.is_floating_point():
            found.append(t)
            return F.interpolate(t, scale_factor=scale, mode="bilinear", align_corners=False)
        return t

    out = tree_map(resize, inputs)
    if not found:
        raise ValueError(f"score_scale={scale} downscales images, but the inputs hold no floating (N, C, H, W) "
                         "tensor; leave score_scale unset for other inputs")  # fmt: skip
    return out


def spearman(a: Tensor, b: Tensor) -> float:
    """Spearman's rank correlation of two 1-D tensors (ties get their average rank).

    Example:
        >>> round(spearman(torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.tensor([10.0, 20.0, 40.0, 30.0])), 12)
        0.8
    """
    ranks = [_ranks(v.detach().to(torch.float64).cpu()) for v in (a, b)]
    return float(torch.corrcoef(torch.stack(ranks))[0, 1])


def _ranks(v: Tensor) -> Tensor:
    values, inverse, counts = torch.unique(v, return_inverse=True, return_counts=True)
    ends = torch.cumsum(counts, 0).to(torch.float64)
    average: Tensor = ends - (counts.to(torch.float64) - 1) / 2  # 1-based average rank of each distinct value
    return average[inverse]


@dataclass(frozen=True)
class Fidelity:
    """How faithfully a cheaper scoring forward ranks examples, against fp32 on the same examples.

    Attributes:
        spearman: rank correlation of the per-example losses (1 = the same ranking).
        changed_share: share of examples whose selection probability ``P = percentile ** beta`` (the percentile
            taken among the sample's own losses) moves by more than ``tolerance``.
        examples: how many examples were compared.
    """

    spearman: float
    changed_share: float
    examples: int


def fidelity(reference: Tensor, cheaper: Tensor, beta: float = 3.0, tolerance: float = 0.05) -> Fidelity:
    """Compare per-example losses from a cheaper scoring forward with the fp32 ones (pure).

    Example:
        >>> f = fidelity(torch.tensor([0.1, 0.2, 0.3, 0.4]), torch.tensor([0.1, 0.2, 0.3, 0.4]) * 0.9)
        >>> f.spearman, f.changed_share
        (1.0, 0.0)
    """
    if reference.shape != cheaper.shape or reference.ndim != 1:
        raise ValueError(f"fidelity compares two (N,) loss tensors, got {tuple(reference.shape)} and "
                         f"{tuple(cheaper.shape)}")  # fmt: skip
    ref, low = reference.to(torch.float64), cheaper.to(torch.float64)
    p_ref = percentile_probabilities(ref, ref, beta)
    p_low = percentile_probabilities(low, low, beta)
    changed = float(((p_ref - p_low).abs() > tolerance).double().mean())
    return Fidelity(spearman(ref, low), changed, len(ref))


def scoring_fidelity(
    model: nn.Module,
    batches: Iterable[tuple[Any, Any]],
    loss_fn: Callable[[Any, Any], Tensor],
    precision: str = "bf16",
    scale: float | None = None,
    forward: Callable[[nn.Module, Any], Any] = default_forward,
    beta: float = 3.0,
) -> Fidelity:
    """Score ``batches`` (``(inputs, targets)`` pairs) in eval mode twice -- fp32 at full scale, then at
    ``precision`` and ``scale`` -- and compare the losses with :func:`fidelity`. The model's mode is restored.

    Example:
        >>> model = nn.Linear(4, 3)
        >>> data = [(torch.randn(64, 4), torch.randint(0, 3, (64,)))]
        >>> loss = lambda out, y: F.cross_entropy(out.float(), y, reduction="none")
        >>> scoring_fidelity(model, data, loss, precision="fp32").spearman
        1.0
    """
    was_training = model.training
    model.eval()
    reference, cheaper = [], []
    try:
        with torch.no_grad():
            for inputs, targets in batches:
                device = device_of(inputs)
                with scoring_autocast("fp32", device):
                    reference.append(loss_fn(forward(model, inputs), targets).float())
                with scoring_autocast(precision, device):
                    cheaper.append(loss_fn(forward(model, downscale(inputs, scale)), targets).float())
    finally:
        model.train(was_training)
    return fidelity(torch.cat(reference), torch.cat(cheaper), beta)
