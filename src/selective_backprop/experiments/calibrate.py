"""Before training: what a scoring forward (F) and a training step (T) cost per example, compilation, and the
beta that makes a selective epoch cost a chosen fraction of a Traditional one. Neither counts as training time.

The cost model (paper §3): after priming, an SB epoch over N examples costs ``N (F + s T)`` against
Traditional's ``N T`` (StaleSB: ``N (F / n + s T)``), where ``s`` is the selected fraction.
"""

from __future__ import annotations

import copy
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from ..precision import downscale, scoring_autocast
from .data import DeviceLoader

if TYPE_CHECKING:
    from .setup import RunParts

__all__ = ["measure_costs", "compile_forwards", "compiled_graphs", "beta_for_target_time", "beta_for_cost"]


def _score(parts: RunParts, x: Tensor, y: Tensor) -> None:
    """One scoring forward as the selector runs it: eval mode, no autograd, its precision (else the training one)."""
    with parts.autocast(), scoring_autocast(parts.score_precision, parts.device), torch.no_grad():
        parts.scoring_model.eval()
        F.cross_entropy(parts.scoring_model(downscale(x, parts.config.score_scale)), y, reduction="none")
        parts.scoring_model.train()


def _step(parts: RunParts, x: Tensor, y: Tensor) -> None:
    """One training step as the trainer runs it (forward under the training autocast, backward, optimizer)."""
    with parts.autocast():
        loss = F.cross_entropy(parts.train_model(x), y)
    parts.optimizer.zero_grad(set_to_none=True)
    parts.scaler.scale(loss).backward()
    parts.scaler.step(parts.optimizer)
    parts.scaler.update()


def _trial(parts: RunParts, x: Tensor, y: Tensor) -> tuple[float, float]:
    """Seconds of one scoring forward and one training step on ``(x, y)``, as the run does them."""
    parts.sync()
    t0 = time.perf_counter()
    _score(parts, x, y)
    parts.sync()
    t1 = time.perf_counter()
    _step(parts, x, y)
    parts.sync()
    return t1 - t0, time.perf_counter() - t1


@contextmanager
def _undone(parts: RunParts, rows: int) -> Iterator[tuple[Tensor, Tensor]]:
    """A batch of ``rows`` training examples to try things on; afterwards the model, optimizer, scaler and RNGs are
    put back, so the run is the same as without the trials."""
    saved = copy.deepcopy((parts.model.state_dict(), parts.optimizer.state_dict(), parts.scaler.state_dict()))
    rng = torch.get_rng_state(), torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    x, y, _ = next(iter(DeviceLoader(parts.train_set, rows, seed=parts.config.seed + 7919)))
    try:
        yield x.contiguous(memory_format=parts.memory_format), y
    finally:
        parts.model.load_state_dict(saved[0])
        parts.optimizer.load_state_dict(saved[1])
        parts.scaler.load_state_dict(saved[2])
        parts.optimizer.zero_grad(set_to_none=True)
        torch.set_rng_state(rng[0])
        if rng[1] is not None:
            torch.cuda.set_rng_state_all(rng[1])


def _trials(parts: RunParts, shapes: list[int], repeats: int) -> list[tuple[int, float, float]]:
    """``(batch, forward s, step s)`` of ``repeats`` trials per batch size in ``shapes``, undone afterwards."""
    with _undone(parts, max(shapes)) as (x, y):
        return [(m, *_trial(parts, x[:m], y[:m])) for m in shapes for _ in range(repeats)]


def measure_costs(parts: RunParts, repeats: int = 5, warmup: int = 1) -> tuple[float, float]:
    """``(F, T)``: seconds per example of a scoring forward (at the loader batch size) and of a training step
    (forward, backward, SGD step at ``batch_size``), done as the run does them (compiled, autocast, channels
    last); means of ``repeats`` trials after ``warmup`` ones. The trial steps are undone afterwards."""
    c, n = parts.config, len(parts.train_set)
    b, score_b = min(c.batch_size, n), min(c.score_batch_size or c.batch_size, n)
    trials = _trials(parts, sorted({b, score_b}), repeats=warmup + repeats)
    fwd = [f / m for m, f, _ in trials if m == score_b][warmup:]
    step = [t / m for m, _, t in trials if m == b][warmup:]
    return sum(fwd) / len(fwd), sum(step) / len(step)


def compiled_graphs() -> int:
    """Graphs torch.compile has built in this process so far (``torch._dynamo`` counters)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def compile_forwards(parts: RunParts) -> float:
    """Compile every graph the run will need, before training; return the seconds it took (never training time).

    The scoring forward at each of its bucket sizes (:class:`~.scoring.BucketPadded`), the training step at the
    full and at the smallest batch (the training model has a dynamic batch dimension: flushes and remainders of
    any size reuse it), and the run's very last step (BatchNorm in eval mode). After this, a run compiles nothing
    more: its ``recompiles`` (graphs built during training) stay 0."""
    t = time.perf_counter()
    c = parts.config
    b = min(c.batch_size, len(parts.train_set))
    sizes = getattr(parts.scoring_model, "sizes", [min(c.score_batch_size or b, len(parts.train_set))])
    with _undone(parts, max(*sizes, b)) as (x, y):
        for m in sizes:
            _score(parts, x[:m], y[:m])
        for m in sorted({b, min(2, b)}):
            _step(parts, x[:m], y[:m])
        parts.train_model.eval()  # the last leftover examples of a run train with BatchNorm in eval mode
        _step(parts, x[:1], y[:1])
        parts.train_model.train()
    return time.perf_counter() - t


def beta_for_cost(f: float, t: float, target_time: float, staleness: int = 1) -> tuple[float, float]:
    """``(beta, selected fraction)`` at which a selective epoch costs ``target_time`` x a Traditional one.

    ``s = target_time - F / (n T)`` (capped at 1) and ``beta = 1/s - 1`` (the percentile rule selects
    ``1 / (beta + 1)`` of i.i.d. losses); ``n`` is StaleSB's staleness (1 for SB).

    Raises:
        ValueError: when the scoring forwards alone cost ``target_time`` or more.

    Example:
        >>> beta_for_cost(f=1.0, t=4.0, target_time=0.5)   # s = 0.5 - 0.25
        (3.0, 0.25)
    """
    fraction = target_time - f / (staleness * t)
    if fraction <= 0:
        raise ValueError(
            f"--target-time {target_time} is not reachable: the scoring forwards alone cost {f / (staleness * t):.2f} "
            f"of a Traditional epoch here (F/T = {f / t:.2f}{'' if staleness == 1 else f', n = {staleness}'}); raise "
            "--target-time, use stale-sb or a larger --staleness"
        )
    selected = min(1.0, fraction)
    return 1 / selected - 1, selected


def beta_for_target_time(parts: RunParts) -> tuple[float, dict[str, float]]:
    """Measure F and T (:func:`measure_costs`; under torchrun the mean over ranks) and return the beta of
    :func:`beta_for_cost` for ``config.target_time``, with the numbers for ``environment.json``."""
    c = parts.config
    f, t = measure_costs(parts)
    if parts.comm is not None:  # one beta for all ranks: the mean of their measurements
        costs = torch.tensor([f, t], dtype=torch.float64)
        f, t = (parts.comm.all_reduce_sum(costs, "all_reduce(SUM) of the measured costs") / parts.world_size).tolist()
    assert c.target_time is not None
    beta, selected = beta_for_cost(f, t, c.target_time, c.staleness if c.strategy == "stale-sb" else 1)
    if parts.rank == 0:
        print(f"target_time {c.target_time}: F = {f * 1e6:.1f} us, T = {t * 1e6:.1f} us per example (F/T = "
              f"{f / t:.2f}) -> backprop {selected:.1%} -> beta = {beta:.3f}", file=sys.stderr)  # fmt: skip
    return beta, {"scoring_forward_s_per_example": f, "train_step_s_per_example": t,
                  "target_time": c.target_time, "selected_fraction": selected, "beta": beta}  # fmt: skip
