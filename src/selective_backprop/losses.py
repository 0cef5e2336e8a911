"""Per-example losses for what is not plain classification: the selectors need one loss per example, ``(N,)``.

A sequence model's loss is a mean over tokens; Selective-Backprop ranks *examples*, so each sequence's token
losses are reduced to one number first. Pair :func:`per_sequence_cross_entropy` with :func:`token_counts` as the
selector's ``example_weights`` to make ``Batch.loss`` equal the usual token-level mean over the batch.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

__all__ = ["per_sequence_cross_entropy", "token_counts"]


def per_sequence_cross_entropy(logits: Tensor, labels: Tensor, ignore_index: int = -100) -> Tensor:
    """The mean cross-entropy of each sequence's scored tokens: ``(N, T, V)`` logits, ``(N, T)`` labels -> ``(N,)``.

    Tokens whose label is ``ignore_index`` (padding, prompt) count for nothing. A fully padded sequence has no token
    to average: its loss is ``0`` (it then ranks lowest, so SB rarely picks it, and contributes no gradient).
    For causal language modelling shift first, as the model's own loss does:
    ``per_sequence_cross_entropy(logits[:, :-1], labels[:, 1:])``.

    Args:
        logits: float ``(N, T, V)``.
        labels: integer ``(N, T)``, ``ignore_index`` where a token is not scored.
        ignore_index: the label of tokens to leave out. Default: ``-100`` (PyTorch's and Hugging Face's).

    Returns:
        float ``(N,)``, the per-sequence mean token loss.

    Raises:
        ValueError: when the shapes do not match ``(N, T, V)`` and ``(N, T)``.

    Example:
        >>> import torch
        >>> logits = torch.zeros(2, 3, 4)                       # uniform: every token costs log(4) = 1.386
        >>> labels = torch.tensor([[1, 2, -100], [-100, -100, -100]])
        >>> [round(v, 3) for v in per_sequence_cross_entropy(logits, labels).tolist()]
        [1.386, 0.0]
    """
    if logits.ndim != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(
            f"per_sequence_cross_entropy needs (N, T, V) logits and (N, T) labels, got {tuple(logits.shape)} and "
            f"{tuple(labels.shape)}; for classification use per_example_cross_entropy"
        )
    tokens = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=ignore_index, reduction="none")
    tokens = tokens.view(labels.shape)
    counts = token_counts(labels, ignore_index)
    return tokens.sum(dim=1) / counts.clamp_min(1)


def token_counts(labels: Tensor, ignore_index: int = -100) -> Tensor:
    """The number of scored tokens of each sequence, float ``(N,)``: the ``example_weights`` that turn the mean of
    per-sequence means into the token-level mean.

    Example:
        >>> import torch
        >>> token_counts(torch.tensor([[1, 2, -100], [-100, -100, -100]])).tolist()
        [2.0, 0.0]
    """
    return (labels != ignore_index).sum(dim=1).float()
