"""Cost model: is an SB epoch as cheap as F + s*T predicts, and does Traditional cost what a bare loop costs?

F = seconds per example of a scoring forward (eval mode, no autograd, at the loader batch size), T = seconds
per example of a training step (forward + backward + SGD step at the training batch size), both measured by
``calibrate.measure_costs`` exactly as the run does them (means over trials after a warm-up: an epoch is a sum, so
a mean predicts it and a median would not), and D = seconds per epoch of the data pipeline (the same for every
strategy). For a measured selected fraction s, an SB epoch
should cost D + N*(F + s*T) and a StaleSB epoch D + N*(F/n + s*T) (averaged over the n-epoch staleness cycle).
Targets: actual / predicted <= 1.10, and Traditional through the trainer / a bare
hand-written loop <= 1.05 (both over the same number of epochs, the trainer's first excluded as warm-up).
Where the prediction misses, the SB run's own timers say which term: the scoring forward per example scored vs F,
the train step per example backpropagated vs T, and the bookkeeping / data seconds per epoch.

Run by hand:  .venv/bin/python benchmarks/cost_model.py [--train-limit 12800] [--beta 3] [--device cpu]
              [--score-batch-size 512] [--amp bf16] [--compile inductor] [--score-precision fp32]
All numbers come from the same process, measured one after the other on the same machine.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from selective_backprop.experiments import calibrate
from selective_backprop.experiments import data as sbdata
from selective_backprop.experiments.analysis import read_metrics
from selective_backprop.experiments.config import TrainConfig
from selective_backprop.experiments.trainer import Trainer


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


WARMUP = 10  # trials before F and T are measured (allocator, caches, CPU clocks settle)


def data_epoch(trainer: Trainer) -> float:
    """D: seconds to draw one epoch of batches (shuffle, gather, augment, normalize) with no model work."""
    parts = trainer.parts
    loader = sbdata.DeviceLoader(parts.train_set, trainer.config.batch_size, augment=parts.augment, seed=11)
    sync(trainer.device)
    t = time.perf_counter()
    for x, _, _ in loader:
        x.contiguous(memory_format=trainer.parts.memory_format)
    sync(trainer.device)
    return time.perf_counter() - t


def bare_epochs(trainer: Trainer, epochs: int) -> list[float]:
    """Epochs of the plainest loop over the same on-device loader (same model wrapper, autocast and memory format):
    the floor Traditional is held to."""
    model, opt, device = trainer.train_model, trainer.optimizer, trainer.device
    loader = sbdata.DeviceLoader(trainer.parts.train_set, trainer.config.batch_size, seed=7)
    times = []
    for _ in range(epochs):
        sync(device)
        t = time.perf_counter()
        for x, y, _ in loader:
            with trainer.parts.autocast():
                loss = F.cross_entropy(model(x.contiguous(memory_format=trainer.parts.memory_format)), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        sync(device)
        times.append(time.perf_counter() - t)
    return times


PARTS = ("data_s", "select_forward_s", "bookkeeping_s", "train_s")
COUNTS = ("selection_forwards", "backprops", "examples_seen")


def epoch_times(rows: list[dict]) -> list[dict[str, float]]:
    """Per epoch, from consecutive end-of-epoch rows: seconds, selected fraction, the time parts and counts."""
    ends = [r for r in rows if float(r["epoch"]).is_integer()]
    return [
        {"s": b["wall_train_s"] - a["wall_train_s"], "selected": b["selected_fraction"],
         **{k: b[f"time_{k}"] - a[f"time_{k}"] for k in PARTS}, **{k: b[k] - a[k] for k in COUNTS}}
        for a, b in zip(ends, ends[1:], strict=False)
    ]  # fmt: skip


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-limit", type=int, default=12800)
    parser.add_argument("--beta", type=float, default=3.0)
    parser.add_argument("--staleness", type=int, default=3)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dataset", default="fashion-mnist")
    parser.add_argument("--model", default="small-cnn")
    parser.add_argument("--score-batch-size", type=int, default=None, help="scoring batch (default: 128)")
    parser.add_argument("--amp", default="off", help="off | bf16 | fp16")
    parser.add_argument("--compile", default=None, help="torch.compile backend (default: none)")
    parser.add_argument("--score-precision", default="fp32", help="auto | fp32 | bf16 | fp16 (default: fp32)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="sb-cost-"))
    common = dict(dataset=args.dataset, model=args.model, train_limit=args.train_limit, test_limit=1000,
                  beta=args.beta, staleness=args.staleness, device=args.device, lr_schedule="constant",
                  score_batch_size=args.score_batch_size, amp=args.amp, compile=args.compile,
                  score_precision=args.score_precision)  # fmt: skip
    try:
        epochs = 1 + args.staleness  # priming, then one full staleness cycle
        results = {}
        for strategy in ("traditional", "sb", "stale-sb"):
            trainer = Trainer(TrainConfig(strategy=strategy, epochs=epochs, **common), work / strategy, progress=False)
            if strategy == "traditional":
                fwd, step = calibrate.measure_costs(trainer.parts, repeats=60, warmup=WARMUP)  # as the run does them
                bare = mean(bare_epochs(trainer, epochs)[1:])
                data_s = min(data_epoch(trainer) for _ in range(3))
            trainer.run()
            results[strategy] = epoch_times(read_metrics(work / strategy))
        n = args.train_limit
        device = trainer.device
        print(f"device={device} torch={torch.__version__} threads={torch.get_num_threads()} "
              f"N={n} batch={trainer.config.batch_size} beta={args.beta} staleness={args.staleness}")  # fmt: skip
        print(f"F (scoring forward) = {fwd * 1e6:.1f} us/example, T (train step) = {step * 1e6:.1f} us/example, "
              f"F/T = {fwd / step:.2f}, D (data pipeline) = {data_s:.2f}s/epoch")  # fmt: skip
        trad_epoch = mean([e["s"] for e in results["traditional"][1:]])  # the first epoch warms up
        print(f"Traditional epoch via trainer {trad_epoch:.2f}s vs bare loop {bare:.2f}s: ratio {trad_epoch / bare:.3f}"
              f" (target <= 1.05); predicted D + N*T = {data_s + n * step:.2f}s")  # fmt: skip
        for strategy, scoring in (("sb", fwd), ("stale-sb", fwd / args.staleness)):
            sel = results[strategy][1:]  # skip the primed epoch
            actual = mean([e["s"] for e in sel])
            s = mean([e["selected"] for e in sel])
            predicted = data_s + n * (scoring + s * step)
            formula = "F" if strategy == "sb" else "F/n"
            print(f"{strategy:>9}: selected s = {s:.3f}, epoch {actual:.2f}s, predicted D + N*({formula} + s*T) = "
                  f"{predicted:.2f}s, actual/predicted = {actual / predicted:.3f} (target <= 1.10), "
                  f"per-epoch speedup vs Traditional {trad_epoch / actual:.2f}x")  # fmt: skip
            total = {k: sum(e[k] for e in sel) for k in (*PARTS, *COUNTS)}
            f_run = total["select_forward_s"] / max(1, total["selection_forwards"])
            t_run = total["train_s"] / max(1, total["backprops"])
            book, data = total["bookkeeping_s"] / len(sel), total["data_s"] / len(sel)
            print(f"{'':>11}in the run: scoring forward {f_run * 1e6:.1f} us/example scored ({f_run / fwd:.2f}x F), "
                  f"train step {t_run * 1e6:.1f} us/example backpropagated ({t_run / step:.2f}x T), bookkeeping "
                  f"{book:.2f}s/epoch, data {data:.2f}s/epoch")  # fmt: skip
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
