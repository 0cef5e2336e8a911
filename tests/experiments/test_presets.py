"""The paper's setups (issue 14 §5): presets, absolute-epoch schedules, Nesterov, Wide ResNet options, Kath18 as the
paper ran it, Composer scored in train mode, SVHN's extra split."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from selective_backprop.experiments.cli import _config, build_parser, main
from selective_backprop.experiments.config import TrainConfig, lr_at
from selective_backprop.experiments.presets import PAPER_SETUPS, preset_values
from selective_backprop.experiments.strategies import build_selector
from selective_backprop.experiments.trainer import Trainer

GRID = {"strategy": "sb", "seed": 0, "label_noise": 0.0}  # what compare's grid sets per run


def parsed(*argv: str):
    """Parse as ``main`` does: a second pass with the preset's values as defaults."""
    args = build_parser().parse_args(argv)
    if args.preset:
        args = build_parser(preset_values(args.preset, args.dataset)).parse_args(argv)
    return args


@pytest.mark.parametrize("dataset,beta,presample,milestones,gamma,wrn", [
    ("cifar10", 2.0, 3, (60, 120, 160), 0.2, (28, 10, 0.3)),  # 33 %, /5 at 60/120/160
    ("cifar100", 1.0, 2, (60, 120), 0.1, (28, 10, 0.3)),  # 50 %
    ("svhn", 3.0, 3, (60, 120), 0.1, (16, 8, 0.4)),  # SB 25 %, Kath18 33 %
    ("svhn-extra", 3.0, 3, (60, 120), 0.1, (16, 8, 0.4)),
])  # fmt: skip
def test_compare_preset_paper_is_the_papers_setup_per_dataset(dataset, beta, presample, milestones, gamma, wrn):
    args = parsed("compare", "--preset", "paper", "--dataset", dataset)
    assert args.strategies == "traditional,sb,stale-sb,kath18" and args.betas == f"{beta:g}" and args.seeds == "0,1,2"
    c = _config(args, **GRID)
    assert (c.beta, c.presample, c.lr_milestones, c.lr_gamma, c.lr_milestone_unit) == (beta, presample, milestones,
                                                                                        gamma, "epochs")  # fmt: skip
    assert (c.model, c.wrn_depth, c.wrn_width, c.wrn_dropout) == ("wideresnet", *wrn)
    assert (c.lr, c.momentum, c.nesterov, c.weight_decay) == (0.1, 0.9, True, 5e-4)
    assert (c.kath_score, c.kath_reweight) == ("loss", "off")


def test_explicit_flags_win_over_the_preset_and_compressed_schedules():
    args = parsed("compare", "--preset", "paper", "--dataset", "cifar10", "--lr", "0.05", "--betas", "1,3",
                  "--model", "resnet18", "--kath-reweight", "on", "--strategies", "sb")  # fmt: skip
    c = _config(args, **GRID)
    assert (c.lr, c.model, c.kath_reweight, args.betas, args.strategies) == (0.05, "resnet18", "on", "1,3", "sb")
    assert c.nesterov and c.lr_milestones == (60, 120, 160)  # the rest of the preset stays
    c = _config(parsed("train", "--preset", "paper-compressed", "--dataset", "cifar10"))
    assert c.lr_milestones == (48, 96, 128) and c.beta == 2.0 and c.strategy == "sb"
    assert _config(parsed("train", "--preset", "paper-compressed", "--dataset", "svhn")).lr_milestones == (48, 96)


def test_a_dataset_the_paper_did_not_run_keeps_its_model_and_schedule():
    c = _config(parsed("train", "--preset", "paper"))  # Fashion-MNIST
    assert (c.model, c.lr_milestones, c.lr_milestone_unit) == ("small-cnn", (0.5, 0.75), "budget")
    assert (c.beta, c.presample) == (PAPER_SETUPS["cifar10"].beta, PAPER_SETUPS["cifar10"].presample)
    assert c.nesterov and c.kath_reweight == "off"
    c = _config(parsed("train", "--preset", "static-1-5", "--strategy", "kath18"))
    assert c.presample == 5  # selectivity 1/5
    with pytest.raises(SystemExit):  # a grid, not a run's options
        build_parser().parse_args(["train", "--preset", "beta-sweep"])
    with pytest.raises(ValueError, match="unknown preset 'nope'"):
        preset_values("nope", "cifar10")


def test_absolute_epoch_milestones():
    c = TrainConfig(lr=0.1, epochs=200, lr_milestones=(60, 120, 160), lr_gamma=0.2, lr_milestone_unit="epochs")
    lrs = [lr_at(c, e / 200) for e in (0, 59.9, 60, 119, 120, 160, 199)]
    assert lrs == pytest.approx([0.1, 0.1, 0.02, 0.02, 0.004, 0.0008, 0.0008])
    short = TrainConfig(lr=0.1, epochs=100, lr_milestones=(60, 120), lr_milestone_unit="epochs")
    assert lr_at(short, 0.6) == pytest.approx(0.01) and lr_at(short, 0.99) == pytest.approx(0.01)  # 120 not reached
    with pytest.raises(ValueError, match=r"fractions in \(0, 1\) of the budget, or absolute epochs with "
                       "--lr-milestone-unit epochs, got 60,120"):
        TrainConfig(lr_milestones=(60, 120))
    with pytest.raises(ValueError, match="--lr-milestones must be ascending numbers > 0"):
        TrainConfig(lr_milestones=(120, 60), lr_milestone_unit="epochs")


def test_nesterov_and_wide_resnet_options_reach_the_run(tiny_fmnist, tmp_path):
    config = TrainConfig(strategy="traditional", model="wideresnet", wrn_depth=10, wrn_width=1, wrn_dropout=0.3,
                         nesterov=True, data_dir=str(tiny_fmnist), epochs=1, threads=1)  # fmt: skip
    parts = Trainer(config, tmp_path / "run", progress=False).parts
    assert parts.optimizer.param_groups[0]["nesterov"] is True
    dropouts = [m.p for m in parts.model.modules() if isinstance(m, nn.Dropout)]
    assert dropouts == [0.3] * 3  # WRN-10: one block in each of the three groups
    assert max(m.out_channels for m in parts.model.modules() if isinstance(m, nn.Conv2d)) == 64  # 64 k, k = 1
    with pytest.raises(ValueError, match=r"--wrn-depth must be 6n \+ 4 with n >= 1.*got 12"):
        TrainConfig(wrn_depth=12)
    with pytest.raises(ValueError, match="--nesterov needs --momentum > 0"):
        TrainConfig(nesterov=True, momentum=0.0)


@pytest.mark.parametrize("strategy,score_mode,expected", [
    ("composer-sb", None, "train"),  # as Composer scores
    ("composer-sb", "eval", "eval"),
    ("sb", None, "eval"),  # as the SB authors score
    ("kath18", "train", "train"),
])  # fmt: skip
def test_each_strategy_scores_in_its_own_mode_unless_told(strategy, score_mode, expected):
    config = TrainConfig(strategy=strategy, score_mode=score_mode, score_scale=0.5)
    selector = build_selector(config, nn.Linear(4, 3), 64, beta=config.beta, distributed=False)
    assert selector.score_mode == expected and selector.score_scale == 0.5  # Composer's scale_factor


def test_kath_reweight_off_reaches_the_selector():
    on, off = (build_selector(TrainConfig(strategy="kath18", kath_reweight=r), nn.Linear(4, 3), 64, beta=3.0,
                              distributed=False) for r in ("on", "off"))  # fmt: skip
    assert on.reweight is True and off.reweight is False
    with pytest.raises(ValueError, match="--kath-reweight must be one of on, off, got 'no'"):
        TrainConfig(kath_reweight="no")


def test_cli_train_with_a_preset_records_the_presets_values(tiny_fmnist, tmp_path):
    import json

    out = tmp_path / "run"
    assert main(["train", "--preset", "paper", "--data-dir", str(tiny_fmnist), "--out", str(out), "--epochs", "1",
                 "--quiet", "--threads", "1", "--strategy", "kath18", "--score-precision", "fp32"]) == 0  # fmt: skip
    saved = json.loads((out / "config.json").read_text())
    assert (saved["nesterov"], saved["kath_reweight"], saved["kath_score"], saved["lr"]) == (True, "off", "loss", 0.1)
    assert torch.load(out / "checkpoint.pt", weights_only=True)["epoch"] == 1
