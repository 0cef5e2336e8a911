"""The paper's randomized-label experiment."""

from __future__ import annotations

import torch
from torch import Tensor


def apply_label_noise(labels: Tensor, fraction: float, num_classes: int, seed: int) -> tuple[Tensor, Tensor]:
    """Randomize the labels of a seeded random subset, as in the paper's noisy-label experiment.

    Exactly ``round(fraction * N)`` examples are chosen (without replacement); each gets a label drawn
    uniformly from all ``num_classes`` classes. As in the paper, labels are *randomized*, not forced to
    change: about ``1 / num_classes`` of the chosen examples keep their true label by chance.

    Args:
        labels: 1-D integer labels; not modified.
        fraction: share of examples to randomize, in ``[0, 1]``.
        num_classes: labels are drawn from ``[0, num_classes)``.
        seed: seeds a private ``torch.Generator``; the global RNG is not touched.

    Returns:
        ``(noisy_labels, noisy_indices)``: a new label tensor, and the sorted int64 indices of the randomized
        examples, both on ``labels.device``.

    Raises:
        ValueError: when ``fraction`` is outside ``[0, 1]``, ``num_classes < 1`` or ``labels`` is not 1-D.

    Example:
        >>> labels = torch.arange(10)
        >>> noisy, idx = apply_label_noise(labels, 0.3, num_classes=10, seed=0)
        >>> len(idx), bool((noisy != labels).sum() <= 3), labels.tolist() == list(range(10))
        (3, True, True)
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}; e.g. 0.1 randomizes 10% of labels")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if labels.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {tuple(labels.shape)}")
    generator = torch.Generator().manual_seed(seed)
    count = round(fraction * len(labels))
    chosen = torch.randperm(len(labels), generator=generator)[:count]
    random_labels = torch.randint(0, num_classes, (count,), generator=generator)
    noisy = labels.clone()
    noisy[chosen.to(labels.device)] = random_labels.to(labels.device, labels.dtype)
    return noisy, chosen.sort().values.to(labels.device)
