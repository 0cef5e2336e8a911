"""Scoring cost: what a scoring forward (F) costs per example at each precision, input scale and compilation,
against a training step (T), and how faithfully each ranks the examples (Spearman vs fp32, share of selection
probabilities moved by more than 0.05).

The issue's target: F/T <= 0.15 on the small CNN with Spearman >= 0.99. A scoring forward only has to rank losses,
so it may be cheaper than the training precision; whether it is depends on the hardware (bf16 pays with
AVX512-BF16/AMX or on a GPU, not on an AVX2-only CPU). First the model trains for ``--warm-epochs`` (Traditional,
fp32), so the losses ranked are those of a model that has learned something; then every variant is timed
round-robin (``--repeats`` rounds, medians: the variants share the machine's noise) on the same batches.

Run by hand:  .venv/bin/python benchmarks/scoring_cost.py [--train-limit 12800] [--precisions fp32,bf16]
              [--scales 1,0.5] [--compile inductor] [--amp bf16]
"""

from __future__ import annotations

import argparse
import itertools
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from selective_backprop.experiments import calibrate
from selective_backprop.experiments.config import TrainConfig
from selective_backprop.experiments.data import DeviceLoader
from selective_backprop.experiments.scoring import MIN_GAIN, MIN_SPEARMAN
from selective_backprop.experiments.trainer import Trainer
from selective_backprop.precision import downscale, fidelity, scoring_autocast


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def losses(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, precision: str, scale: float) -> torch.Tensor:
    with torch.no_grad(), scoring_autocast(precision, x.device):
        return F.cross_entropy(model(downscale(x, scale)).float(), y, reduction="none")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-limit", type=int, default=12800)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--precisions", default="fp32,bf16", help="comma-separated: fp32, bf16, fp16")
    parser.add_argument("--scales", default="1,0.5", help="comma-separated input scales of the scoring forward")
    parser.add_argument("--compile", default=None, help="also time the scoring forward compiled with this backend")
    parser.add_argument("--amp", default="off", help="the training precision T is measured at: off | bf16")
    parser.add_argument("--warm-epochs", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="sb-scoring-"))
    try:
        config = TrainConfig(strategy="traditional", epochs=args.warm_epochs, batch_size=args.batch_size,
                             train_limit=args.train_limit, test_limit=1000, device=args.device, amp=args.amp,
                             lr_schedule="constant")  # fmt: skip
        trainer = Trainer(config, work / "warm", progress=False)
        trainer.run()
        parts = trainer.parts
        _, step = calibrate.measure_costs(trainer.parts, repeats=args.repeats, warmup=5)  # T as the run does it
        model = parts.model.eval()
        loader = DeviceLoader(parts.train_set, args.batch_size, seed=5)
        batches = [(x.contiguous(memory_format=parts.memory_format), y) for x, y, _ in itertools.islice(loader, 8)]
        variants = {(p, float(s), False): model for p in args.precisions.split(",") for s in args.scales.split(",")}
        if args.compile:
            compiled = torch.compile(model, backend=args.compile)
            variants.update({(p, s, True): compiled for p, s, _ in list(variants)})
        reference = torch.cat([losses(model, x, y, "fp32", 1.0) for x, y in batches])
        rows = {}
        for key, net in variants.items():  # warm up (compiles) and fidelity on all 8 batches
            precision, scale, _ = key
            rows[key] = {"fidelity": fidelity(reference, torch.cat([losses(net, x, y, precision, scale)
                                                                    for x, y in batches])), "times": []}  # fmt: skip
        x, y = batches[0]
        for _ in range(args.repeats):
            for key, net in variants.items():
                sync(x.device)
                start = time.perf_counter()
                losses(net, x, y, key[0], key[1])
                sync(x.device)
                rows[key]["times"].append((time.perf_counter() - start) / len(x))
        base = statistics.median(rows["fp32", 1.0, False]["times"])
        print(f"device={parts.device} torch={torch.__version__} threads={torch.get_num_threads()} "
              f"cpu capability={torch.backends.cpu.get_cpu_capability()} batch={args.batch_size} "
              f"T (train step, amp {args.amp}) = {step * 1e6:.1f} us/example")  # fmt: skip
        print(f"{'precision':>9} {'scale':>5} {'compiled':>8} {'F us/ex':>8} {'F/T':>5} {'vs fp32':>7} "
              f"{'Spearman':>8} {'moved>0.05':>10}  auto would take it")  # fmt: skip
        for (precision, scale, compiled), row in rows.items():
            f = statistics.median(row["times"])
            fid = row["fidelity"]
            ok = fid.spearman >= MIN_SPEARMAN and f <= MIN_GAIN * base
            print(f"{precision:>9} {scale:>5g} {str(compiled):>8} {f * 1e6:8.1f} {f / step:5.2f} {f / base:6.2f}x "
                  f"{fid.spearman:8.4f} {fid.changed_share:10.1%}  {'yes' if ok else 'no'}")  # fmt: skip
        print(f"target: F/T <= 0.15 with Spearman >= {MIN_SPEARMAN} (auto also needs F <= {MIN_GAIN:g} x fp32's)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
