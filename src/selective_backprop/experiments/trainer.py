"""One experiment from one config: the training loop, evaluation rows, checkpoints and the final summary.

The training step, top to bottom (:meth:`Trainer._epoch`)::

    for inputs, targets, indices in loader:             # data on the device, augmented per batch
        for batch in selector.select(inputs, targets, indices):   # scoring forward + coins + queue
            set the LR from the schedule (counted in examples seen or examples backpropagated)
            loss = batch.loss(model(batch.inputs)); zero_grad; backward; step
    for batch in selector.end_epoch(): (same step)      # the queue's remainder
    evaluate on the test set (not counted as training time), log a row, checkpoint

The parts of a run are built by :mod:`~selective_backprop.experiments.setup`; the run folder's files are described
in :mod:`~selective_backprop.experiments.runfolder`, resuming in :mod:`~selective_backprop.experiments.checkpoints`.

Faults: a non-finite loss (NaN/inf, training or scoring) stops with :class:`TrainingDiverged` naming the step, the
epoch, the dataset indices and the last good checkpoint, before the optimizer steps (``nonfinite="skip"`` drops
that step instead, counted as ``skipped_steps``); parameters that are no longer finite when a checkpoint is due
always stop the run. SIGINT/SIGTERM write a checkpoint and raise :class:`Interrupted`; under torchrun the stop
is agreed on at the next loader batch, so all ranks checkpoint the same position.
"""

from __future__ import annotations

import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from .. import Batch
from . import checkpoints, evaluation, progress, runfolder
from .config import TrainConfig, budget_done, lr_at
from .errors import (
    INTERRUPT_EXIT_CODES,
    CheckpointError,
    Interrupted,
    RunExistsError,
    TrainingDiverged,
    capped,
    nonfinite_indices,
    nonfinite_parameters,
)
from .evaluation import evaluate
from .meters import Meters
from .setup import build_run

__all__ = ["Trainer", "train", "Interrupted", "RunExistsError", "TrainingDiverged", "CheckpointError"]

OUT_OF_TIME = -1
"""What ``_stop_requested`` returns when ``--time-budget`` seconds of training are spent (signals are positive)."""


class Trainer:
    """Runs one :class:`TrainConfig` into ``out_dir``; :meth:`run` trains to the end of the budget."""

    def __init__(self, config: TrainConfig, out_dir: str | Path, *, resume: bool = False, overwrite: bool = False,
                 progress: bool = True) -> None:  # fmt: skip
        self.config, self.out = config, Path(out_dir)
        self.parts, resuming = build_run(config, self.out, resume=resume, overwrite=overwrite)
        p = self.parts
        self.model, self.train_model, self.optimizer = p.model, p.train_model, p.optimizer
        self.selector, self.loader, self.device, self.rank = p.selector, p.loader, p.device, p.rank
        self.progress = progress and self.rank == 0
        self.meters = Meters(len(p.train_set), p.device, p.noisy_indices)
        self.epoch = 0
        self.batches_done = 0  # loader batches consumed in the current epoch (non-zero only mid-epoch)
        self.loader_state = self.loader.state_dict()  # the loader as at the start of the current epoch
        self.metrics_rows, self.next_eval = 0, p.eval_every
        self.last_row: dict[str, Any] | None = None
        self.last_checkpoint: Path | None = None
        self._stop_signal: int | None = None
        if resuming:
            self._load_checkpoint()
        elif self.rank == 0:
            (self.out / runfolder.METRICS).unlink(missing_ok=True)  # rows of a run that never checkpointed
            runfolder.write_json(self.out / "config.json", config.to_json())
            env = {**runfolder.environment(p.device), "world_size": p.world_size, "compile_s": p.compile_s}
            runfolder.write_json(self.out / "environment.json", {**env, **p.calibration})

    # ----- checkpoints ---------------------------------------------------------------------------------------
    def save_checkpoint(self) -> Path:
        """Write this rank's checkpoint (the previous one is kept as ``*.prev.pt``); return its path."""
        p = self.parts
        path, previous = checkpoints.checkpoint_paths(self.out, p.rank, p.world_size)
        state = {
            "config": self.config.to_json(), "epoch": self.epoch, "batches_done": self.batches_done,
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "selector": self.selector.state_dict(), "loader": self.loader_state, **self.meters.state_dict(),
            "metrics_rows": self.metrics_rows, "next_eval": self.next_eval, "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None, "rank": p.rank,
            "world_size": p.world_size, "scaler": p.scaler.state_dict(), "compile_s": p.compile_s,
        }  # fmt: skip
        runfolder.write_checkpoint(path, state, backup=previous)
        self.last_checkpoint = path
        return path

    def _load_checkpoint(self) -> None:
        p = self.parts
        state, path = checkpoints.read_latest(self.out, p.rank, p.world_size, p.comm, p.device)
        if path != checkpoints.checkpoint_paths(self.out, p.rank, p.world_size)[0]:
            print(f"warning: resuming from the previous checkpoint {path} (epoch {state['epoch']})", file=sys.stderr)
        checkpoints.check_compatible(state, path, self.config.to_json(), p.rank, p.world_size)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.selector.load_state_dict(state["selector"])
        self.loader_state = state["loader"]
        self.loader.load_state_dict(self.loader_state)
        self.epoch, self.batches_done = state["epoch"], state["batches_done"]
        self.meters.load_state_dict(state)
        self.metrics_rows, self.next_eval = state["metrics_rows"], state["next_eval"]
        p.scaler.load_state_dict(state.get("scaler", {}))
        p.compile_s += state.get("compile_s", 0.0)
        self.last_checkpoint = path
        torch.set_rng_state(state["torch_rng"].cpu())
        if state["cuda_rng"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        if self.rank == 0:  # drop rows logged after the checkpoint (they will be redone)
            runfolder.keep_rows(self.out, self.metrics_rows)

    # ----- the loop ------------------------------------------------------------------------------------------
    def _progress(self) -> float:
        return budget_done(self.config, self.selector.counters, self.parts.world_size, len(self.parts.train_set))

    def _train_step(self, batch: Batch) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(self.config, self._progress())
        outputs = None
        try:
            with self.parts.autocast():
                outputs = self.train_model(batch.inputs)
                loss = batch.loss(outputs)  # raises ValueError on a NaN/inf loss, before anything is recorded
        except ValueError as e:
            if outputs is None:  # the forward itself failed
                raise
            bad = nonfinite_indices(self.model, self.selector.loss_fn, outputs, batch.targets, batch.indices)
            if not bad:
                raise
            if self.config.nonfinite == "raise":
                raise self._diverged("non-finite training loss", bad) from e
            self.meters.skipped_steps += 1
            return
        self.optimizer.zero_grad(set_to_none=True)
        self.parts.scaler.scale(loss).backward()  # without fp16 the scaler is off: loss.backward(); step()
        self.parts.scaler.step(self.optimizer)
        self.parts.scaler.update()
        self.meters.step(loss, len(batch), batch.indices)

    def _diverged(self, what: str, indices: list[int] | None) -> TrainingDiverged:
        step = int(self.selector.counters["steps"]) + self.meters.skipped_steps + 1
        return TrainingDiverged(what, step, self.epoch, self.config.epochs, indices, self.last_checkpoint)

    def _check_parameters(self) -> None:
        """Refuse to log or checkpoint a model whose parameters are no longer finite."""
        bad = nonfinite_parameters(self.model)
        if bad:
            raise self._diverged(f"non-finite parameters {capped(bad, 3)}", None)

    def _timed(self, key: str, start: float) -> None:
        self.parts.sync()
        self.meters.times[key] += time.perf_counter() - start

    def _timed_steps(self, batches: list[Batch]) -> None:
        t = time.perf_counter()
        for batch in batches:
            self._train_step(batch)
        self._timed("train_s", t)

    def _epoch_batches(self) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        """The loader's batches for the current epoch, skipping those a mid-epoch checkpoint already did; each
        one's loading time goes to ``data_s``."""
        self.loader_state = self.loader.state_dict()
        items, k = iter(self.loader), 0
        while True:
            t = time.perf_counter()
            item = next(items, None)
            self._timed("data_s", t)
            if item is None:
                self.loader_state = self.loader.state_dict()  # an end-of-epoch checkpoint starts the next epoch
                return
            if k >= self.batches_done:
                yield item
            k += 1

    def _select(self, inputs: Tensor, targets: Tensor, indices: Tensor) -> list[Batch]:
        """``selector.select`` under autocast, timed into scoring forward and bookkeeping; a non-finite scoring
        loss becomes :class:`TrainingDiverged`."""
        before, t = self.selector.counters, time.perf_counter()
        inputs = inputs.contiguous(memory_format=self.parts.memory_format)
        try:
            with self.parts.autocast():
                batches = self.selector.select(inputs, targets, indices)
        except ValueError as e:  # a NaN/inf scoring loss (nonfinite="raise"), or a genuine bad input
            bad = nonfinite_indices(self.model, self.selector.loss_fn, None, targets, indices, inputs)
            if not bad:
                raise
            raise self._diverged("non-finite scoring loss", bad) from e
        self._timed("bookkeeping_s", t)
        score = self.selector.counters["score_time_s"] - before["score_time_s"]
        self.meters.times["select_forward_s"] += score
        self.meters.times["bookkeeping_s"] -= score
        self.meters.offered(len(inputs), self.selector.counters["selected"] - before["selected"])
        return batches

    def _out_of_time(self) -> bool:
        return self.config.time_budget is not None and sum(self.meters.times.values()) >= self.config.time_budget

    def _stop_requested(self) -> int | None:
        """The signal to stop on, or ``OUT_OF_TIME`` (agreed by all ranks under torchrun: one stopping alone would
        hang the others)."""
        stop, comm = self._stop_signal or (OUT_OF_TIME if self._out_of_time() else None), self.parts.comm
        if comm is not None:
            stop = comm.all_reduce_int(stop or 0, "max", "all_reduce(MAX) of the stop signal") or None
        return stop

    def _epoch(self, bar: Any) -> None:
        for inputs, targets, indices in self._epoch_batches():
            self._timed_steps(self._select(inputs, targets, indices))
            self.batches_done += 1
            if bar is not None:
                bar.update(len(inputs))
            stop = self._stop_requested()
            if stop == OUT_OF_TIME:
                return  # the time budget is spent: run() logs this position, checkpoints it and finishes
            if stop is not None:
                self._check_parameters()
                raise Interrupted(stop, self.save_checkpoint())
            if self.next_eval is not None and self.selector.counters["seen"] * self.parts.world_size >= self.next_eval:
                self.next_eval += self.parts.eval_every  # type: ignore[operator]
                if self.batches_done < len(self.loader):  # the epoch's end logs its own row
                    self._log(bar)
        self._timed_steps(self.selector.end_epoch())
        if self.epoch + 1 == self.config.epochs:  # the very end: the examples min_batch_size held back, trained
            self.train_model.eval()  # with BatchNorm's running statistics (it cannot take one example in train mode)
            self._timed_steps(self.selector.flush())
            self.train_model.train()
        self.epoch += 1
        self.batches_done = 0

    def _log(self, bar: Any = None) -> dict[str, Any]:
        """Evaluate and append a row to ``metrics.jsonl`` (rank 0); counts are sums over ranks, times rank 0's."""
        error, test_loss = self.meters.timed("eval_s", lambda: evaluate(self.parts))  # timed, not training time
        counts = self.meters.row(self.selector.counters, self.parts.comm)
        row = {"epoch": self.epoch + self.batches_done / max(1, len(self.loader)), **counts, "compile_s":
               self.parts.compile_s, "recompiles": self.parts.recompiles(), "test_error": error, "test_loss": test_loss,
               "lr": lr_at(self.config, self._progress())}  # fmt: skip
        if self.rank == 0:
            runfolder.append_row(self.out, row)
        self.metrics_rows += 1
        self.last_row = row
        if bar is not None:
            bar.set_postfix(err=f"{error:.4f}", sel=f"{row['selected_fraction'] or 1:.0%}")
        return row

    def run(self) -> dict[str, Any]:
        """Train to the end of the budget (or resume and finish); returns the final summary."""
        c = self.config
        if self.metrics_rows == 0:
            self._log()  # the starting point of every curve: error before training, at time 0
        handlers = {s: signal.signal(s, lambda signum, _: setattr(self, "_stop_signal", signum))
                    for s in INTERRUPT_EXIT_CODES}  # fmt: skip
        try:
            while self.epoch < c.epochs and not self._out_of_time():
                per_epoch = getattr(self.loader, "shard_length", len(self.parts.train_set))  # this rank's share
                bar = progress.open_bar(self.progress, f"{c.strategy} epoch {self.epoch + 1}/{c.epochs}", per_epoch,
                                        self.batches_done * self.loader.batch_size)  # fmt: skip
                try:
                    self._epoch(bar)
                finally:
                    if bar is not None:
                        bar.close()
                self._check_parameters()
                row = self._log()
                evaluation.write_views(self.parts, self.epoch)  # the test set's view at the paper's epoch (10)
                self.save_checkpoint()
                if self.rank == 0 and not progress.shows_bar(self.progress):  # quiet, or no terminal for a bar
                    print(progress.epoch_line(c.strategy, c.epochs, row), flush=True)
        finally:
            for s, h in handlers.items():
                signal.signal(s, h)
        return self._finish()

    def _finish(self) -> dict[str, Any]:
        p = self.parts
        counts = self.meters.selection_counts
        if p.comm is not None:  # every rank backpropagated its own shard's examples
            counts = p.comm.all_reduce_sum(counts, "all_reduce(SUM) of the selection counts")
        last = self.last_row or runfolder.last_row(self.out)  # resumed after the last checkpoint: row on disk
        summary = {
            "strategy": self.config.strategy, "final_test_error": last["test_error"],
            "wall_train_s": last["wall_train_s"], "compile_s": p.compile_s, "recompiles": p.recompiles(),
            "backprops": last["backprops"], "selection_forwards": last["selection_forwards"],
            "examples_seen": last["examples_seen"], "epochs": self.epoch, "label_noise_examples": len(p.noisy_indices),
        }  # fmt: skip
        if self.rank == 0:
            np.save(self.out / "selection_counts.npy", counts.cpu().numpy())
            evaluation.write_views(p, self.epoch, final=True)
            runfolder.write_json(self.out / "final.json", summary)
        if progress.shows_bar(self.progress):  # the bars are gone: the last epoch's line stays on the terminal
            print(progress.epoch_line(self.config.strategy, self.config.epochs, last), flush=True)
        return summary


def train(config: TrainConfig, out_dir: str | Path, **kwargs: Any) -> dict[str, Any]:
    """Run one experiment; see :class:`Trainer`."""
    return Trainer(config, out_dir, **kwargs).run()
