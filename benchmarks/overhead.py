"""Selection bookkeeping overhead: policy + coin flips + queue (+ StaleSB cache), relative to the model's work.

Claims checked: bookkeeping < 2 % of one training step (forward + backward + SGD step) of the small CNN on the same
batch, for batch sizes 32-1024 (the performance issue's target), and < 2 % of one eval-mode forward at batch 128
(the engine issue's). The scoring forward itself is excluded: it is the algorithm's real cost, measured by
`cost_model` separately. Bookkeeping is a fixed number of small tensor operations per select() call (policy,
coins, queue, cache: about 40 dispatches), so its share shrinks as the batch grows; a trainer with a small
training batch can score larger loader batches (`--score-batch-size`) to pay it less often.

Run by hand:  .venv/bin/python benchmarks/overhead.py [--device cpu|cuda] [--repeats 30]
Prints one row per batch size, all ratios measured side by side in the same process.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from selective_backprop import SelectiveBackprop
from selective_backprop.experiments.models import build_model


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device: torch.device, repeats: int) -> float:
    """Median seconds of ``fn()`` over ``repeats`` runs after two warm-up runs."""
    for _ in range(2):
        fn()
    times = []
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


class Precomputed(torch.nn.Module):
    """Returns prepared logits: isolates the selector's bookkeeping from any model compute."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = logits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits[: len(x)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--sizes", default="32,64,128,256,512,1024")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    # channels_last, as the trainer runs it (the faster layout here, so the ratios are the conservative ones)
    model = build_model("small-cnn", num_classes=10, in_channels=1).to(device, memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    n = 60_000
    print(f"device={device} torch={torch.__version__} threads={torch.get_num_threads()} history=1024")
    print(
        f"{'batch':>6} {'forward ms':>11} {'train step ms':>14} {'SB bookkeeping ms':>18} "
        f"{'/forward':>9} {'/step':>7} {'StaleSB bookkeeping ms':>23} {'/forward':>9} {'/step':>7}"
    )
    for bs in (int(s) for s in args.sizes.split(",")):
        x = torch.randn(bs, 1, 28, 28, device=device).contiguous(memory_format=torch.channels_last)
        y = torch.randint(0, 10, (bs,), device=device)
        idx = torch.randperm(n, device=device)[:bs]

        def forward(x: torch.Tensor = x, y: torch.Tensor = y) -> None:
            model.eval()
            with torch.no_grad():
                F.cross_entropy(model(x), y, reduction="none")
            model.train()

        def step(x: torch.Tensor = x, y: torch.Tensor = y) -> None:
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()

        t_fwd, t_step = timed(forward, device, args.repeats), timed(step, device, args.repeats)
        logits = torch.randn(bs, 10, device=device)
        ratios = []
        for staleness in (None, 3):
            sb = SelectiveBackprop(
                Precomputed(logits),
                batch_size=bs,
                beta=3,
                prime_epochs=0,
                staleness=staleness,
                dataset_size=n,
            )
            sb.policy.record(torch.rand(1024, device=device))
            per_call = []
            for _ in range(args.repeats + 2):
                before = sb.counters["select_time_s"]
                sb.select(x, y, idx)
                sync(device)
                per_call.append(sb.counters["select_time_s"] - before)
            ratios.append(sorted(per_call[2:])[args.repeats // 2])  # median, like timed()
        t_sb, t_stale = ratios
        print(
            f"{bs:>6} {t_fwd * 1e3:>11.3f} {t_step * 1e3:>14.3f} {t_sb * 1e3:>18.3f} "
            f"{t_sb / t_fwd:>9.2%} {t_sb / t_step:>7.2%} {t_stale * 1e3:>23.3f} {t_stale / t_fwd:>9.2%} "
            f"{t_stale / t_step:>7.2%}"
        )


if __name__ == "__main__":
    main()
