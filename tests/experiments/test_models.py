"""Tests for the model zoo: shapes, gradients, determinism, parameter counts and registry errors."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from selective_backprop.experiments.models import MODELS, SmallCNN, build_model

# Smallest options each constructor allows, so the whole file runs in seconds on 2 CPU cores.
# resnet18 takes no width option, so it is tested at full size with tiny batches.
TINY: dict[str, dict[str, Any]] = {
    "small-cnn": {"width": 4, "hidden": 16},
    "resnet18": {},
    "wideresnet": {"depth": 10, "widen_factor": 1, "dropout": 0.3},
    "mobilenetv2": {"width_mult": 0.25},
}
NAMES = sorted(MODELS)
INPUTS = [(1, 28), (3, 32)]  # (channels, side): Fashion-MNIST and CIFAR/SVHN.


@pytest.fixture(autouse=True)
def seeded() -> Iterator[None]:
    """Seed weight init and inputs without leaking the seed into other tests."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        yield


def tiny(name: str, num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    return build_model(name, num_classes=num_classes, in_channels=in_channels, **TINY[name])


def count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_every_registered_model_has_a_tiny_config() -> None:
    assert set(TINY) == set(MODELS)


class TestForward:
    @pytest.mark.parametrize("num_classes", [10, 100])
    @pytest.mark.parametrize(("in_channels", "side"), INPUTS)
    @pytest.mark.parametrize("name", NAMES)
    def test_logits_shape(self, name: str, in_channels: int, side: int, num_classes: int) -> None:
        model = tiny(name, num_classes, in_channels)
        assert model.training
        out = model(torch.randn(3, in_channels, side, side))
        assert out.shape == (3, num_classes)
        assert out.dtype == torch.float32
        assert torch.isfinite(out).all()

    @pytest.mark.parametrize("name", NAMES)
    def test_backward_reaches_every_parameter(self, name: str) -> None:
        model = tiny(name)
        x, y = torch.randn(2, 3, 32, 32), torch.tensor([1, 7])
        F.cross_entropy(model(x), y).backward()
        for pname, p in model.named_parameters():
            assert p.grad is not None, f"{name}.{pname} got no gradient"
            assert torch.isfinite(p.grad).all(), f"{name}.{pname} has a non-finite gradient"
            assert p.grad.abs().sum() > 0, f"{name}.{pname} has an all-zero gradient"

    @pytest.mark.parametrize("name", NAMES)
    def test_eval_mode_is_deterministic(self, name: str) -> None:
        model = tiny(name).eval()
        x = torch.randn(2, 3, 32, 32)
        with torch.no_grad():
            assert torch.equal(model(x), model(x))

    @pytest.mark.parametrize("name", NAMES)
    def test_channels_last_matches_contiguous(self, name: str) -> None:
        model = tiny(name).eval()
        x = torch.randn(2, 3, 32, 32)
        with torch.no_grad():
            expected = model(x)
            model = model.to(memory_format=torch.channels_last)
            got = model(x.to(memory_format=torch.channels_last))
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)

    @pytest.mark.parametrize(("name", "side"), [("resnet18", 4), ("mobilenetv2", 4), ("wideresnet", 8)])
    def test_cifar_variants_downsample_32_to(self, name: str, side: int) -> None:
        """The CIFAR stems keep resolution: 32 x 32 reaches the global pool at 4 x 4 (WRN: 8 x 8)."""
        model = tiny(name).eval()
        seen: list[torch.Size] = []
        model.pool.register_forward_hook(lambda _m, inputs, _out: seen.append(inputs[0].shape))
        with torch.no_grad():
            model(torch.randn(1, 3, 32, 32))
        assert seen[0][-2:] == (side, side)


class TestParameterCounts:
    @pytest.mark.parametrize(
        ("name", "kwargs", "expected"),
        [
            ("resnet18", {}, 11_173_962),  # kuangliu/pytorch-cifar ResNet18
            ("wideresnet", {"depth": 28, "widen_factor": 10}, 36_479_194),  # WRN-28-10, "36.5M"
            ("mobilenetv2", {}, 2_296_922),  # kuangliu/pytorch-cifar MobileNetV2
        ],
    )
    def test_reference_architectures(self, name: str, kwargs: dict[str, Any], expected: int) -> None:
        with torch.device("meta"):  # no memory, no init cost
            model = build_model(name, num_classes=10, **kwargs)
        assert count(model) == expected

    @pytest.mark.parametrize(("num_classes", "in_channels", "width", "hidden"), [(10, 1, 32, 128), (100, 3, 8, 16)])
    def test_small_cnn_by_hand(self, num_classes: int, in_channels: int, width: int, hidden: int) -> None:
        conv1 = in_channels * width * 3 * 3  # no bias: BatchNorm follows
        bn1 = 2 * width  # weight + bias
        conv2 = width * (2 * width) * 3 * 3
        bn2 = 2 * (2 * width)
        fc1 = (2 * width * 7 * 7) * hidden + hidden  # two 2x max-pools take 28 x 28 to 7 x 7
        fc2 = hidden * num_classes + num_classes
        expected = conv1 + bn1 + conv2 + bn2 + fc1 + fc2
        model = SmallCNN(num_classes=num_classes, in_channels=in_channels, width=width, hidden=hidden)
        assert count(model) == expected

    def test_small_cnn_default_for_fashion_mnist(self) -> None:
        assert count(build_model("small-cnn", in_channels=1)) == 421_738


class TestInit:
    @pytest.mark.parametrize("name", NAMES)
    def test_batchnorm_starts_at_identity_affine(self, name: str) -> None:
        norms = [m for m in tiny(name).modules() if isinstance(m, nn.BatchNorm2d)]
        assert norms  # every model normalizes: an empty list would make this test vacuous
        for m in norms:
            assert torch.equal(m.weight, torch.ones_like(m.weight))
            assert torch.equal(m.bias, torch.zeros_like(m.bias))

    def test_convs_use_kaiming_fan_out(self) -> None:
        conv = build_model("resnet18").layers[-1].conv1[0]
        expected_std = (2.0 / (conv.out_channels * 3 * 3)) ** 0.5
        assert conv.weight.std().item() == pytest.approx(expected_std, rel=0.05)


class TestErrors:
    def test_unknown_name_lists_known_models(self) -> None:
        with pytest.raises(ValueError, match="unknown model 'resnet50'") as err:
            build_model("resnet50")
        for name in MODELS:
            assert name in str(err.value)

    @pytest.mark.parametrize("depth", [0, 4, 17, 27])
    def test_wideresnet_bad_depth(self, depth: int) -> None:
        with pytest.raises(ValueError, match=rf"WideResNet: depth must be 6n \+ 4 .* got depth={depth}"):
            build_model("wideresnet", depth=depth, widen_factor=1)

    def test_unexpected_option_names_model_and_accepted_options(self) -> None:
        with pytest.raises(
            TypeError, match="model 'small-cnn' got unexpected option.* depth; it accepts: width, hidden"
        ):
            build_model("small-cnn", depth=10)
        with pytest.raises(TypeError, match="model 'resnet18' got unexpected option.* width; it accepts: no options"):
            build_model("resnet18", width=32)

    @pytest.mark.parametrize(
        ("name", "kwargs", "match"),
        [
            ("small-cnn", {"width": 0}, "SmallCNN: width and hidden must be >= 1"),
            ("mobilenetv2", {"width_mult": 0.0}, "MobileNetV2: width_mult must be > 0"),
            ("wideresnet", {"dropout": 1.0}, r"WideResNet: dropout must be in \[0, 1\)"),
            ("wideresnet", {"widen_factor": 0}, "WideResNet: widen_factor must be >= 1"),
            ("resnet18", {"num_classes": 0}, "ResNet18: num_classes must be >= 1"),
            ("resnet18", {"in_channels": 0}, "ResNet18: in_channels must be >= 1"),
        ],
    )
    def test_invalid_values(self, name: str, kwargs: dict[str, Any], match: str) -> None:
        with pytest.raises(ValueError, match=match):
            build_model(name, **kwargs)
