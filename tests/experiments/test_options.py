"""Every TrainConfig option is checked up front; a refusal is one line naming the flag, the value and the fix."""

from __future__ import annotations

import dataclasses
import math

import pytest

from selective_backprop.experiments.cli import main
from selective_backprop.experiments.config import TrainConfig
from selective_backprop.experiments.options import OPTIONS

NAN, INF = math.nan, math.inf

BAD = [  # (option, value, what the message must say after "--flag must be ")
    ("lr", NAN, "a finite number > 0, got nan"), ("lr", 0.0, "> 0, got 0.0"), ("lr", INF, "> 0, got inf"),
    ("momentum", 1.0, "in [0, 1), got 1.0"), ("momentum", -0.1, "in [0, 1)"),
    ("weight_decay", -1e-4, ">= 0"), ("weight_decay", NAN, ">= 0, got nan"),
    ("lr_gamma", 0.0, "> 0"), ("lr_gamma", INF, "> 0, got inf"),
    ("lr_milestones", (0.75, 0.5), "ascending numbers > 0, comma-separated (e.g. 0.5,0.75), got 0.75,0.5"),
    ("lr_milestones", (0.5, 0.5), "ascending"), ("lr_milestones", (0.5, 1.0), "in (0, 1)"),
    ("lr_milestones", (NAN,), "got nan"),
    ("label_noise", 1.5, "in [0, 1], got 1.5"), ("label_noise", NAN, "in [0, 1], got nan"),
    ("beta", 0.0, "a finite number > 0"), ("beta", INF, "> 0, got inf"),
    ("staleness", 0, "an integer >= 1, got 0"), ("prime_epochs", -1, "an integer >= 0, got -1"),
    ("presample", 0, ">= 1"), ("batch_size", 0, ">= 1"), ("epochs", 0, ">= 1"), ("epochs", 2.5, "got 2.5"),
    ("batch_size", True, "an integer >= 1, got True"), ("history_size", 0, ">= 1"), ("composer_interrupt", -1, ">= 0"),
    ("rate", 0.0, "in (0, 1], got 0.0"), ("rate", 1.5, "in (0, 1]"), ("keep", 0.0, "in (0, 1]"),
    ("prune_ratio", 1.0, "in [0, 1)"), ("infobatch_delta", 1.5, "in [0, 1]"), ("composer_start", -0.1, "in [0, 1]"),
    ("composer_end", 2.0, "in [0, 1]"), ("selectivity", 0.0, "in (0, 1]"), ("selectivity", NAN, "got nan"),
    ("target_time", 1.5, "in (0, 1]"), ("threshold", NAN, "a finite number, got nan"),
    ("eval_every", 0, ">= 1"), ("score_batch_size", 0, ">= 1"), ("train_limit", 0, ">= 1"), ("test_limit", -5, ">= 1"),
    ("threads", 0, ">= 1"), ("dist_timeout", 0.0, "> 0"), ("dist_timeout", NAN, "> 0, got nan"),
    ("crop_padding", -1, ">= 0"), ("cutout", -2, ">= 0"), ("seed", -1, ">= 0"),
    ("dataset", "mnist", "one of fashion-mnist, cifar10, cifar100, svhn, svhn-extra, got 'mnist'"),
    ("lr_milestone_unit", "steps", "one of budget, epochs, got 'steps'"), ("kath_reweight", True, "one of on, off"),
    ("score_mode", "inference", "one of eval, train, got 'inference'"), ("wrn_width", 0, "an integer >= 1"),
    ("wrn_depth", 27, "6n + 4 with n >= 1"), ("wrn_dropout", 1.0, "a number in [0, 1)"), ("nesterov", 1, "true or"),
    ("model", "resnet50", "one of small-cnn, resnet18"), ("strategy", "nope", "one of traditional, sb, stale-sb"),
    ("lr_schedule", "linear", "one of step, cosine, constant"), ("lr_unit", "steps", "one of examples, backprops"),
    ("kath_score", "grad", "one of upper-bound, loss"), ("score_mode", "test", "one of eval, train"),
    ("amp", "fp8", "one of off, bf16, fp16"), ("nonfinite", "ignore", "one of raise, skip, got 'ignore'"),
    ("device", "gpu", "auto, cpu, cuda or cuda:N, got 'gpu'"), ("flip", "yes", "true or false"),
]  # fmt: skip


def test_every_option_has_a_rule():
    assert set(OPTIONS) == {f.name for f in dataclasses.fields(TrainConfig)}


@pytest.mark.parametrize(("name", "value", "says"), BAD, ids=[f"{n}={v!r}" for n, v, _ in BAD])
def test_a_bad_value_is_one_line_naming_the_flag_the_value_and_the_range(name, value, says):
    with pytest.raises(ValueError) as info:
        TrainConfig(**{name: value})
    message = str(info.value)
    assert message.startswith(f"--{name.replace('_', '-')} must be ") and says in message
    assert "TrainConfig(" not in message and "\n" not in message and len(message) < 200


def test_rules_between_options():
    with pytest.raises(ValueError, match=r"^--composer-start must be <= --composer-end, got 0.95 > 0.9$"):
        TrainConfig(composer_start=0.95)
    with pytest.raises(ValueError, match=r"^--target-time needs --strategy sb or stale-sb, got --strategy kath18$"):
        TrainConfig(strategy="kath18", target_time=0.5)
    with pytest.raises(ValueError, match=r"^--selectivity 0.2: strategy 'clamp' cannot be tuned"):
        TrainConfig(strategy="clamp", selectivity=0.2)


def test_the_edges_of_each_range_are_accepted():
    TrainConfig(momentum=0.0, weight_decay=0, label_noise=1.0, rate=1.0, keep=1.0, prune_ratio=0.0, infobatch_delta=1,
                composer_start=0.9, composer_end=0.9, composer_interrupt=0, prime_epochs=0, threshold=-3,
                crop_padding=0, cutout=0, seed=0, lr_milestones=(), device="cuda:1", selectivity=1.0,
                strategy="random", flip=False)  # fmt: skip
    assert TrainConfig(lr_milestones=[0.3, 0.6], lr=1).lr_milestones == (0.3, 0.6)  # JSON lists, ints for floats


CLI_BAD = [  # (argv after the command, the start of the one line on stderr)
    (["train", "--lr", "nan"], "error: --lr must be a finite number > 0, got nan"),
    (["train", "--momentum", "1"], "error: --momentum must be a number in [0, 1), got 1.0"),
    (["train", "--lr-milestones", "0.75,0.5"], "error: --lr-milestones must be ascending numbers > 0"),
    (["train", "--lr-milestones", "60,120"], "error: --lr-milestones must be fractions in (0, 1) of the budget"),
    (["train", "--dist-timeout", "inf"], "error: --dist-timeout must be a finite number > 0, got inf"),
    (["train", "--label-noise", "-0.1"], "error: --label-noise must be a number in [0, 1], got -0.1"),
    (["train", "--threads", "0"], "error: --threads must be an integer >= 1, got 0"),
    (["train", "--strategy", "nope"], "error: --strategy must be one of traditional, sb"),
    (["train", "--device", "gpu"], "error: --device must be auto, cpu, cuda or cuda:N, got 'gpu'"),
    (["train", "--train-limit", "0"], "error: --train-limit must be an integer >= 1, got 0"),
    (["train", "--composer-start", "0.95"], "error: --composer-start must be <= --composer-end"),
    (["compare", "--lr", "0"], "error: --lr must be a finite number > 0, got 0.0"),
    (["compare", "--betas", "1,nan"], "error: --betas must be a finite number > 0, got nan"),
    (["compare", "--label-noise", "0,2"], "error: --label-noise must be a number in [0, 1], got 2.0"),
    (["compare", "--seeds", "0,x"], "error: --seeds must be comma-separated integers (e.g. 0,1,2), got '0,x'"),
    (["compare", "--strategies", "sb,nope"], "error: --strategies must be one of traditional, sb"),
]


@pytest.mark.parametrize(("argv", "line"), CLI_BAD, ids=[" ".join(a) for a, _ in CLI_BAD])
def test_the_cli_exits_2_at_once_with_one_line(argv, line, tmp_path, capsys):
    out = tmp_path / "run"
    assert main([*argv, "--out", str(out), "--data-dir", str(tmp_path / "no-data"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(line) and err.count("\n") == 1 and "TrainConfig(" not in err
    assert not out.exists()  # refused before any folder is made or any data is looked for


def test_a_value_argparse_cannot_convert_is_one_line_too(capsys):
    with pytest.raises(SystemExit) as info:
        main(["train", "--epochs", "2.5"])
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.count("\n") == 1
    assert "argument --epochs: invalid int value: '2.5'" in err and "--help" in err and "usage:" not in err

