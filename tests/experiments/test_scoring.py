"""The lab's scoring choices: auto's pick from measured timings and fidelity, and bucket-padded compiled scoring."""

from __future__ import annotations

import torch
from torch import nn

from selective_backprop.experiments.scoring import BucketPadded, PrecisionTrial, bucket_sizes, choose_precision
from selective_backprop.precision import Fidelity

GOOD, POOR = Fidelity(0.999, 0.01, 512), Fidelity(0.98, 0.3, 512)


def test_auto_takes_the_cheapest_precision_that_is_faithful_and_measured_faster():
    trials = [PrecisionTrial("fp32", 100e-6), PrecisionTrial("bf16", 45e-6, GOOD), PrecisionTrial("fp16", 30e-6, POOR)]
    assert choose_precision(trials, "fp32")[0] == "bf16"  # fp16 is cheaper but ranks unlike fp32 (0.98 < 0.99)
    trials[2] = PrecisionTrial("fp16", 30e-6, GOOD)
    assert choose_precision(trials, "fp32")[0] == "fp16"


def test_auto_keeps_the_reference_when_nothing_is_faster_or_faithful():
    slow = [PrecisionTrial("fp32", 100e-6), PrecisionTrial("bf16", 370e-6, GOOD)]  # bf16 on an AVX2-only CPU
    choice, reason = choose_precision(slow, "fp32")
    assert choice == "fp32" and "faster than fp32" in reason
    noise = [PrecisionTrial("fp32", 100e-6), PrecisionTrial("bf16", 97e-6, GOOD)]  # 3 % is within timing noise
    assert choose_precision(noise, "fp32")[0] == "fp32"
    under_amp = [PrecisionTrial("bf16", 157e-6), PrecisionTrial("fp32", 127e-6, GOOD)]  # training in bf16
    assert choose_precision(under_amp, "bf16")[0] == "fp32"


def test_bucket_padding_returns_exactly_the_unpadded_outputs_in_eval_mode():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3)).eval()
    sizes = []
    padded = BucketPadded(_Recorder(model, sizes), bucket_sizes(32)).eval()
    x = torch.randn(32, 4)
    for m in (1, 3, 8, 9, 31, 32):
        assert torch.allclose(padded(x[:m]), model(x[:m]), atol=1e-6)
    assert sizes == [8, 8, 8, 16, 32, 32]
    assert bucket_sizes(100) == [8, 16, 32, 64, 100] and bucket_sizes(8) == [8]


class _Recorder(nn.Module):
    def __init__(self, inner: nn.Module, sizes: list[int]) -> None:
        super().__init__()
        self.inner, self.sizes = inner, sizes

    def forward(self, x):
        self.sizes.append(len(x))
        return self.inner(x)
