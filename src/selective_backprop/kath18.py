"""Katharopoulos & Fleuret 2018 importance sampling, the paper's main competitor.

"Not All Samples Are Created Equal: Deep Learning with Importance Sampling" (ICML 2018,
https://arxiv.org/abs/1803.00942), Algorithm 1:

* While the variance-reduction estimate ``tau`` is at most ``tau_th = (B + 3b) / (3b)``, train on plain
  uniform batches of ``b`` and update ``tau`` from their training outputs.
* Once ``tau > tau_th``: gather a presample of ``B = k * b`` examples, score each in a no-grad forward, draw
  ``b`` of them **with replacement** with probability ``g_i ∝ score_i``, and weight each drawn example's loss by
  ``1 / (B * g_i)`` -- an unbiased estimate of the presample's mean loss. Duplicates are each trained on.
* ``tau`` is an exponential moving average (factor 0.9, starting at 0) of
  ``(1 - ||g - u||^2 / ||g||^2) ** -0.5 = sqrt(B * sum(g_i^2))`` for the normalized scores ``g`` and uniform
  ``u``: 1 when the scores are uniform, up to ``sqrt(B)`` when one example dominates.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import defaults
from .base import Selector
from .batch import Batch, ForwardFn, LossFn
from .batching import rows_of, take
from .queue import BackpropQueue
from .validation import check_choice, check_int, check_number

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

__all__ = ["Kath18", "upper_bound_scores", "importance_weights", "variance_reduction"]


def upper_bound_scores(outputs: Tensor, targets: Tensor) -> Tensor:
    """Katharopoulos & Fleuret's gradient-norm upper bound: ``||softmax(outputs) - onehot(targets)||_2``.

    Example:
        >>> upper_bound_scores(torch.tensor([[0.0, 0.0]]), torch.tensor([0])).tolist()   # sqrt(0.25 + 0.25)
        [0.7071067690849304]
    """
    probs = torch.softmax(outputs.float(), dim=1)
    scores: Tensor = (probs - F.one_hot(targets, probs.shape[1]).to(probs.dtype)).norm(dim=1)
    return scores


def _shape(value: Any) -> str:
    return f"of shape {tuple(value.shape)} ({value.dtype})" if isinstance(value, Tensor) else type(value).__name__


def _normalize(scores: Tensor, valid: Tensor | None = None) -> Tensor:
    """Scores -> sampling distribution; all-zero scores give the uniform distribution (no host sync).

    Rows where ``valid`` is ``False`` (non-finite scores under ``nonfinite='skip'``) get probability 0."""
    scores = scores.to(torch.float64)
    if valid is not None:
        scores = torch.where(valid, scores, torch.zeros_like(scores))
    scores = scores.clamp_min(0)
    total = scores.sum()
    uniform = torch.ones_like(scores) if valid is None else valid.to(scores.dtype)
    uniform = uniform / uniform.sum().clamp_min(1)
    return torch.where(total > 0, scores / total.clamp_min(torch.finfo(scores.dtype).tiny), uniform)


def variance_reduction(g: Tensor) -> Tensor:
    """``(1 - ||g - u||^2 / ||g||^2) ** -0.5`` for a distribution ``g`` over ``B`` examples, = ``sqrt(B * sum g^2)``.

    Example:
        >>> variance_reduction(torch.tensor([0.25, 0.25, 0.25, 0.25])).item()
        1.0
        >>> variance_reduction(torch.tensor([1.0, 0.0, 0.0, 0.0])).item()
        2.0
    """
    return (len(g) * (g.to(torch.float64) ** 2).sum()).sqrt()


def importance_weights(g: Tensor, drawn: Tensor) -> Tensor:
    """Loss weights ``1 / (B * g_i)`` of the drawn positions: unbiased for the presample's mean loss."""
    return 1.0 / (len(g) * g[drawn])


class Kath18(Selector):
    """Importance sampling with a presample, as a drop-in selector (same interface as ``SelectiveBackprop``).

    Args:
        model: the network, used for the scoring forward of the presample.
        batch_size: ``b``, examples per training batch. Default: ``128``.
        presample: ``k``; the presample is ``B = k * b``. Default: ``3`` (Katharopoulos & Fleuret; the SB
            authors used 4).
        score: ``"upper-bound"`` (default, the paper's) or ``"loss"`` (per-example loss, as the SB authors' port).
        reweight: weight each drawn example's loss by ``1 / (B * g_i)`` (default ``True``, Algorithm 1). ``False``
            trains on the drawn examples' plain mean loss (their weights are all 1): "no bias reweighting", how the
            SB paper ran Kath18 (§5.1, with ``score="loss"``; the authors' ``Backpropper``, not their
            ``ReweightedBackpropper``). Biased towards high-score examples, like SB itself.
        loss_fn: per-example loss. Default: cross-entropy.
        tau_ema: EMA factor for ``tau``. Default: ``0.9``.
        tau_th: switch-on threshold; default ``(B + 3b) / (3b)``.
        forward, min_batch_size, score_precision, score_scale, score_mode, nonfinite, flush, seed: see
            :class:`~selective_backprop.Selector`;
            with ``nonfinite='skip'`` a presample example with a NaN/inf score is never drawn.
        distributed: ``True`` (default group) or a process group: ``tau`` from the scores of every rank, so the
            ranks switch to importance sampling together (see :mod:`selective_backprop.distributed`).
            Default: ``False``.

    A loader epoch of ``N`` examples costs ``N`` scoring forwards and ``N / k`` backprops once importance sampling
    is on; before that, ``N`` backprops and no scoring forward.
    """

    def __init__(
        self,
        model: nn.Module,
        batch_size: int = defaults.BATCH_SIZE,
        presample: int = defaults.KATH18_PRESAMPLE,
        *,
        score: Literal["upper-bound", "loss"] = "upper-bound",
        reweight: bool = True,
        loss_fn: LossFn | None = None,
        tau_ema: float = defaults.KATH18_TAU_EMA,
        tau_th: float | None = None,
        forward: ForwardFn | None = None,
        min_batch_size: int | None = None,
        score_precision: Literal["fp32", "bf16", "fp16"] | None = None,
        score_scale: float | None = None,
        score_mode: Literal["eval", "train"] = "eval",
        nonfinite: Literal["raise", "skip"] = "raise",
        flush: Literal["epoch", "never"] = "epoch",
        seed: int = 0,
        distributed: bool | ProcessGroup = False,
    ) -> None:
        super().__init__(
            model, batch_size, loss_fn=loss_fn, forward=forward, min_batch_size=min_batch_size,
            score_precision=score_precision, score_scale=score_scale, score_mode=score_mode, nonfinite=nonfinite,
            flush=flush, seed=seed, distributed=distributed,
        )  # fmt: skip
        self.presample = check_int("presample", presample, 1, "the presample is B = presample * batch_size")
        self.pool_size = presample * batch_size
        self.score = check_choice("score", score, ("upper-bound", "loss"))
        if not isinstance(reweight, bool):
            raise TypeError(f"reweight must be True or False, got {reweight!r}")
        self.reweight = reweight
        self.tau_ema = check_number("tau_ema", tau_ema, 0.0, 1.0, high_open=True)
        default_th = (self.pool_size + 3 * batch_size) / (3 * batch_size)
        self.tau_th = default_th if tau_th is None else check_number(
            "tau_th", tau_th, fix=f"the default (B + 3b) / (3b) is {default_th:g}")  # fmt: skip
        self.tau = 0.0
        self.pool = BackpropQueue(self.pool_size)

    @property
    def importance_sampling(self) -> bool:
        """Whether importance sampling is on (``tau > tau_th``)."""
        return self.tau > self.tau_th

    def _scores(self, outputs: Any, targets: Any, losses: Tensor) -> Tensor:
        """Per-example scores ``(N,)``: the upper bound ``||softmax - onehot||`` of ``(N, C)`` logits and integer
        class targets, or the loss (``score="loss"``, for any loss)."""
        if self.score == "loss":
            return losses
        n = rows_of(targets, "targets")
        logits = isinstance(outputs, Tensor) and outputs.ndim == 2 and outputs.is_floating_point()
        classes = isinstance(targets, Tensor) and targets.shape == (n,) and not targets.is_floating_point()
        if not (logits and classes and outputs.shape == (n, outputs.shape[1]) and outputs.shape[1] > 1):
            got = f"outputs {_shape(outputs)} and targets {_shape(targets)}"
            raise ValueError(
                f"Kath18's score='upper-bound' needs (N, C) class logits and (N,) integer class targets, got {got}; "
                "for regression, multi-label or sequence losses pass score='loss' (the per-example loss)"
            )  # fmt: skip
        return upper_bound_scores(outputs, targets)

    def _update_tau(self, scores: Tensor) -> None:
        """EMA of the variance reduction of ``scores``; distributed, of every rank's scores together."""
        g = _normalize(self.gather(scores)[0])
        self.tau = self.tau_ema * self.tau + (1 - self.tau_ema) * float(variance_reduction(g))  # host sync

    def choose(self, inputs: Any, targets: Any, indices: Tensor | None) -> list[Batch]:
        if not self.importance_sampling:
            leftover = self.pool.flush()  # a presample cut short when tau fell back: train it uniformly
            ready = [] if leftover is None else self.queue.push(*leftover, None, None)  # same size on every rank
            ready += self.enqueue(inputs, targets, indices)
            self.count(selected=rows_of(inputs) + (0 if leftover is None else rows_of(leftover[0])))
            return [self.make_batch(f) for f in ready]
        batches = []
        for px, py, pidx in self.pool.push(inputs, targets, indices):
            outputs, losses = self.scoring_forward(px, py)
            scores = self._scores(outputs, py, losses)
            finite = self.finite_rows(scores)  # nonfinite="skip": never drawn, no weight in tau
            scores = torch.where(finite, scores, torch.zeros_like(scores))
            g = _normalize(scores, finite)
            self._update_tau(scores)
            drawn = torch.multinomial(g, self.batch_size, replacement=True, generator=self.generator(g.device))
            # Unweighted batches still carry weights (all 1): observe() tells importance-sampled batches by them.
            weights = importance_weights(g, drawn) if self.reweight else torch.ones_like(drawn, dtype=g.dtype)
            weights = weights.to(torch.float32)
            self.count(selection_forwards=len(g), selected=len(drawn))
            batches.append(self.make_batch((*take((px, py, pidx), drawn), weights, None)))
        return batches

    def observe(self, batch: Batch, outputs: Any, losses: Tensor) -> None:
        """Uniform phase: ``tau`` follows each training batch's scores. Importance-sampled batches (weighted)
        leave it alone; distributed padding batches join the gather with no scores of their own."""
        if batch.padding:
            self._update_tau(losses[:0])
        elif batch.weights is None:
            self._update_tau(self._scores(outputs, batch.targets, losses))

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "tau": self.tau, "pool": self.pool.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.tau = state["tau"]
        self.pool.load_state_dict(state["pool"])
