"""A cheaper scoring forward: its own autocast, downscaled inputs, and the fidelity numbers that judge it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from selective_backprop import SelectiveBackprop
from selective_backprop.precision import downscale, fidelity, scoring_fidelity, spearman


class Spy(nn.Module):
    """Records (autocast on, autocast dtype, input shape) of each forward; logits from the mean pixel."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(1, 3)
        self.calls: list[tuple[bool, torch.dtype, tuple[int, ...]]] = []

    def forward(self, x):
        self.calls.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"), tuple(x.shape)))
        return self.head(x.mean(dim=(1, 2, 3))[:, None])


def test_fidelity_by_hand():
    ref = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5])
    assert fidelity(ref, ref * 3).spearman == pytest.approx(1.0)  # any increasing map keeps the ranking
    assert fidelity(ref, ref * 3).changed_share == 0.0
    assert fidelity(ref, -ref).spearman == pytest.approx(-1.0)
    swapped = torch.tensor([0.2, 0.1, 0.3, 0.4, 0.5])  # ranks of the two smallest exchanged
    f = fidelity(ref, swapped, beta=1.0)
    assert f.spearman == pytest.approx(1 - 6 * 2 / (5 * 24))  # 1 - 6 sum d^2 / (n (n^2 - 1)), d = (1, 1)
    assert f.changed_share == pytest.approx(2 / 5)  # P moves by 1/5 for those two (percentiles 0 and 1/5)
    assert fidelity(ref, swapped, beta=1.0, tolerance=0.25).changed_share == 0.0
    assert spearman(torch.tensor([1.0, 1.0, 2.0]), torch.tensor([1.0, 2.0, 3.0])) == pytest.approx(0.8660254)


def test_fidelity_refuses_mismatched_losses():
    with pytest.raises(ValueError, match=r"two \(N,\) loss tensors"):
        fidelity(torch.zeros(3), torch.zeros(4))


def test_scoring_autocast_is_the_scoring_forwards_own_whatever_the_callers():
    model = Spy()
    x = torch.rand(8, 1, 4, 4)
    for precision, expected in (("bf16", (True, torch.bfloat16)), ("fp32", (False, None)), (None, (True, None))):
        sb = SelectiveBackprop(model, batch_size=8, beta=1, prime_epochs=0, score_precision=precision)
        model.calls.clear()
        with torch.autocast("cpu", dtype=torch.bfloat16):  # the caller trains under bf16 autocast
            sb.select(x, torch.zeros(8, dtype=torch.long))
        on, dtype, _ = model.calls[0]
        assert on == expected[0] and (expected[1] is None or dtype == expected[1]), precision


def test_score_scale_downscales_images_for_the_scoring_forward_only():
    model = Spy()
    sb = SelectiveBackprop(model, batch_size=4, beta=1, prime_epochs=0, score_scale=0.5, seed=0)
    x, y = torch.rand(8, 1, 8, 8), torch.zeros(8, dtype=torch.long)
    batches = sb.select(x, y) + sb.flush()
    assert model.calls[0][2] == (8, 1, 4, 4)  # scored at half size
    for batch in batches:
        batch.loss(batch.forward(model))
    assert all(shape[2:] == (8, 8) for _, _, shape in model.calls[1:])  # trained at full size
    assert downscale({"img": x, "meta": torch.ones(8)}, 0.25)["img"].shape == (8, 1, 2, 2)
    with pytest.raises(ValueError, match=r"no floating \(N, C, H, W\) tensor"):
        SelectiveBackprop(nn.Linear(3, 2), batch_size=2, prime_epochs=0, score_scale=0.5).select(
            torch.rand(4, 3), torch.zeros(4, dtype=torch.long))  # fmt: skip
    with pytest.raises(ValueError, match="score_scale must be a finite number in"):
        SelectiveBackprop(model, score_scale=1.5)
    with pytest.raises(ValueError, match="score_precision must be one of"):
        SelectiveBackprop(model, score_precision="int8")


def test_scoring_fidelity_of_fp32_is_exact_and_of_a_coarse_scale_is_measured():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(4, 3))  # fmt: skip
    gen = torch.Generator().manual_seed(1)
    data = [(torch.rand(64, 1, 8, 8, generator=gen), torch.randint(0, 3, (64,), generator=gen)) for _ in range(2)]

    def loss(out, y):
        return F.cross_entropy(out.float(), y, reduction="none")

    exact = scoring_fidelity(model, data, loss, precision="fp32")
    assert exact.spearman == pytest.approx(1.0) and exact.changed_share == 0.0 and exact.examples == 128
    coarse = scoring_fidelity(model, data, loss, precision="fp32", scale=0.25)
    assert coarse.spearman < 0.999 and coarse.changed_share > 0  # an 8x8 image at 2x2 ranks differently
    assert model.training  # the mode is restored
