"""The run's accounting: where the training time goes, what each evaluation interval saw, how often each example
was backpropagated, and the ``metrics.jsonl`` row built from it at each evaluation.

Time is split into ``data_s`` (the loader), ``select_forward_s`` (scoring forwards), ``bookkeeping_s`` (the rest
of ``select()``: policy, coins, queue, cache) and ``train_s`` (training forward, backward, optimizer step);
``wall_train_s`` is their sum. Evaluation is not training time.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ..distributed import Collectives

__all__ = ["Meters", "TIME_KEYS", "TIMED_COLUMNS"]

TIME_KEYS = ("data_s", "select_forward_s", "bookkeeping_s", "train_s")
TIMED_COLUMNS = ("wall_train_s", *(f"time_{k}" for k in TIME_KEYS), "eval_s", "compile_s")
"""The ``metrics.jsonl`` columns that are measured seconds: they differ between two runs that are otherwise equal
(an exact resume matches the uninterrupted run on every other column)."""
_COUNTERS = ("seen", "selection_forwards", "skipped_forwards", "backpropagated")


class Meters:
    """Running totals of one run (one rank); :meth:`row` sums the counts over ranks.

    Args:
        dataset_size: training examples (length of ``selection_counts``).
        device: where the per-example counts and the loss sums live.
        noisy_indices: dataset indices whose label was randomized (empty without label noise).
    """

    def __init__(self, dataset_size: int, device: torch.device, noisy_indices: Tensor) -> None:
        self.device = device
        self.noisy_indices = noisy_indices.to(device)
        self.times = dict.fromkeys(TIME_KEYS, 0.0)
        self.selection_counts = torch.zeros(dataset_size, dtype=torch.int64, device=device)  # this rank's backprops
        self.skipped_steps = 0  # optimizer steps dropped on a non-finite loss (nonfinite="skip")
        self.eval_s = 0.0  # seconds spent evaluating: wall clock of the run, not training time
        self.interval = self._fresh_interval()

    def _fresh_interval(self) -> dict[str, Any]:
        return {"loss_sum": torch.zeros((), device=self.device), "losses": 0, "seen": 0, "selected": 0}

    def step(self, loss: Tensor, size: int, indices: Tensor | None) -> None:
        """Account one optimizer step on ``size`` examples with mean training ``loss``."""
        self.interval["loss_sum"] += loss.detach() * size
        self.interval["losses"] += size
        if indices is not None:
            self.selection_counts.index_add_(0, indices, torch.ones_like(indices))

    def offered(self, seen: int, selected: float) -> None:
        """Account one loader batch: ``seen`` examples offered, ``selected`` of them selected."""
        self.interval["seen"] += seen
        self.interval["selected"] += selected

    def timed(self, name: str, work: Callable[[], Any]) -> Any:
        """Run ``work()`` and add its seconds to the meter ``name`` (``eval_s``); return its result."""
        start = time.perf_counter()
        result = work()
        setattr(self, name, getattr(self, name) + time.perf_counter() - start)
        return result

    def row(self, counters: dict[str, float], comm: Collectives | None) -> dict[str, Any]:
        """The counts and times of a ``metrics.jsonl`` row (sums over ranks; times are this rank's), and start a
        new interval. The caller adds the position, the evaluation and the LR."""
        iv = self.interval
        noisy = self.selection_counts[self.noisy_indices].sum() if len(self.noisy_indices) else 0
        local = [*(counters[k] for k in _COUNTERS), noisy, iv["seen"], iv["selected"], iv["losses"], iv["loss_sum"]]
        totals = torch.stack([torch.as_tensor(v, dtype=torch.float64, device=self.device) for v in local])
        if comm is not None:
            totals = comm.all_reduce_sum(totals, "all_reduce(SUM) of the counters")
        seen, forwards, skipped, backprops, noisy, iv_seen, iv_selected, losses, loss_sum = totals.tolist()
        self.interval = self._fresh_interval()
        return {
            "examples_seen": round(seen),
            "selection_forwards": round(forwards),
            "skipped_forwards": round(skipped),
            "backprops": round(backprops),
            "steps": int(counters["steps"]),
            "skipped_steps": self.skipped_steps,
            # backprops spent so far on examples whose label was randomized (None without label noise)
            "noisy_backprops": round(noisy) if len(self.noisy_indices) else None,
            "wall_train_s": sum(self.times.values()),
            **{f"time_{k}": v for k, v in self.times.items()},
            "eval_s": self.eval_s,
            "train_loss": loss_sum / losses if losses else None,
            "selected_fraction": iv_selected / iv_seen if iv_seen else None,
        }

    def state_dict(self) -> dict[str, Any]:
        return {"times": dict(self.times), "selection_counts": self.selection_counts, "eval_s": self.eval_s,
                "interval": dict(self.interval), "skipped_steps": self.skipped_steps}  # fmt: skip

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.times = state["times"]
        self.selection_counts = state["selection_counts"].to(self.device)
        self.interval = state["interval"]
        self.skipped_steps = state["skipped_steps"]
        self.eval_s = state.get("eval_s", 0.0)
