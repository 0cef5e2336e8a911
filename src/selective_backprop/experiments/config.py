"""Every setting of one run (:class:`TrainConfig`) and the learning-rate schedule it describes (:func:`lr_at`).

Defaults of the selection methods come from :mod:`selective_backprop.defaults` (named once in the library).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

from .. import defaults
from .options import check_options
from .strategies import STRATEGIES, selectivity_options

__all__ = ["TrainConfig", "lr_at", "budget_done"]

_SB_FAMILY = tuple(name for name, entry in STRATEGIES.items() if entry.family == "sb")


def _h(text: str, **kw: Any) -> Any:
    """A dataclass field with CLI help text."""
    return field(metadata={"help": text}, **kw)


@dataclass
class TrainConfig:
    """Every setting of one run. Defaults: Fashion-MNIST, small CNN, SB with the authors' beta = 3."""

    dataset: str = _h("fashion-mnist | cifar10 | cifar100 | svhn | svhn-extra (SVHN with its extra training split)",
                      default="fashion-mnist")
    model: str = _h("small-cnn | resnet18 | wideresnet | mobilenetv2", default="small-cnn")
    wrn_depth: int = _h("wideresnet: depth, 6n + 4 (28: WRN-28-10 on CIFAR; 16: WRN-16-8 on SVHN)", default=28)
    wrn_width: int = _h("wideresnet: widen factor k", default=10)
    wrn_dropout: float = _h("wideresnet: dropout between the convs of a block (0.3 CIFAR, 0.4 SVHN)", default=0.0)
    strategy: str = _h(" | ".join(STRATEGIES), default="sb")
    epochs: int = _h("training budget in epochs (passes over the training set)", default=8)
    batch_size: int = _h("examples per training step", default=defaults.BATCH_SIZE)
    lr: float = _h("initial learning rate", default=0.05)
    momentum: float = _h("SGD momentum", default=0.9)
    nesterov: bool = _h("SGD with Nesterov momentum (the SB authors' example optimizer)", default=False)
    weight_decay: float = _h("SGD weight decay", default=5e-4)
    lr_schedule: str = _h("step | cosine | constant", default="step")
    lr_milestones: tuple[float, ...] = _h(
        "step schedule: LR x gamma at these points, fractions of the budget or epochs (--lr-milestone-unit), "
        "counted in --lr-unit", default=(0.5, 0.75)
    )
    lr_milestone_unit: str = _h("what --lr-milestones are: budget (fractions of --epochs) | epochs (absolute, as "
                                "the paper's schedules: 60,120,160)", default="budget")  # fmt: skip
    lr_gamma: float = _h("step schedule factor", default=0.1)
    lr_unit: str = _h("what the schedule counts: examples (seen) | backprops (backpropagated)", default="examples")
    beta: float = _h("SB / StaleSB selectivity exponent (authors' default 3)", default=defaults.BETA)
    selectivity: float | None = _h(
        "set the strategy's knob to backprop about this fraction (SB/StaleSB beta = 1/S - 1, random rate, Kath18 "
        "presample, composer-sb keep)", default=None)  # fmt: skip
    target_time: float | None = _h(
        "SB/StaleSB: pick beta so a selective epoch costs about this fraction of a Traditional one, from the "
        "scoring-forward and train-step costs measured before training", default=None)  # fmt: skip
    history_size: int = _h("SB / StaleSB: losses in the percentile's history (R)", default=defaults.HISTORY_SIZE)
    staleness: int = _h("StaleSB: reuse a cached loss for this many epochs", default=defaults.STALENESS)
    prime_epochs: int = _h(
        "epochs of unconditional backprop before selecting (SB family)", default=defaults.PRIME_EPOCHS
    )
    rate: float | None = _h("random strategy: selection rate (default 1/(beta+1))", default=None)
    threshold: float = _h("threshold strategy: backprop iff loss >= threshold", default=0.5)
    presample: int = _h("Kath18: presample B = presample * batch size", default=defaults.KATH18_PRESAMPLE)
    kath_score: str = _h("Kath18 score: upper-bound | loss", default="upper-bound")
    kath_reweight: str = _h("Kath18 importance weights 1/(B g_i) on the drawn examples: on | off (the SB paper's "
                            "runs: no bias reweighting)", default="on")  # fmt: skip
    prune_ratio: float = _h(
        "InfoBatch: probability of pruning a below-mean-loss example", default=defaults.INFOBATCH_PRUNE_RATIO
    )
    infobatch_delta: float = _h("InfoBatch: fraction of the epochs with pruning", default=defaults.INFOBATCH_DELTA)
    keep: float = _h("composer-sb: fraction of each selective batch kept", default=defaults.COMPOSER_KEEP)
    composer_start: float = _h("composer-sb: training progress at which selection starts",
                               default=defaults.COMPOSER_START)  # fmt: skip
    composer_end: float = _h("composer-sb: training progress at which selection stops", default=defaults.COMPOSER_END)
    composer_interrupt: int = _h("composer-sb: a whole batch every this many loader batches (0: never)",
                                 default=defaults.COMPOSER_INTERRUPT)  # fmt: skip
    score_mode: str | None = _h("scoring forward in eval | train mode (default: the strategy's: train for "
                                "composer-sb, as Composer scores; eval otherwise, as the SB authors)",
                                default=None)  # fmt: skip
    label_noise: float = _h("fraction of training labels replaced by random labels", default=0.0)
    crop_padding: int | None = _h("random-crop padding (default: the dataset's)", default=None)
    flip: bool | None = _h("random horizontal flips (default: the dataset's)", default=None)
    cutout: int | None = _h("cutout square side (default: the dataset's)", default=None)
    hard_epoch: int = _h("save each test example's true-class confidence and prediction after this epoch "
                         "(paper Figs. 8-9; the last epoch when the budget is shorter)", default=10)  # fmt: skip
    evals_per_epoch: int | None = _h("evaluations per epoch (unless --eval-every): default 1 for train; compare "
                                     "uses 4 when the test set has at most 10,000 examples", default=1)  # fmt: skip
    time_budget: float | None = _h("stop after this many seconds of training (evaluation excluded), as the paper's "
                                   "equal-time comparisons; --epochs stays the upper bound", default=None)  # fmt: skip
    eval_every: int | None = _h("also evaluate every this many examples seen", default=None)
    train_limit: int | None = _h("use only the first N training examples (quick runs)", default=None)
    test_limit: int | None = _h("use only the first N test examples (quick runs)", default=None)
    seed: int = _h("seed of the model init, the data order, label noise and the coins", default=0)
    device: str = _h("auto | cpu | cuda | cuda:N", default="auto")
    channels_last: bool = _h("NHWC memory format for model and batches (faster convolutions here)", default=True)
    score_batch_size: int | None = _h(
        "examples per loader batch, i.e. per scoring forward (default: batch_size); training batches stay "
        "batch_size", default=None)  # fmt: skip
    score_precision: str = _h(
        "the scoring forward's own precision: auto (measured at start-up: the cheapest one both faster and ranking "
        "like fp32, Spearman >= 0.99) | fp32 | bf16 | fp16", default="auto")  # fmt: skip
    score_scale: float | None = _h("downscale images by this factor for the scoring forward only (Composer's "
                                   "scale_factor), in (0, 1]", default=None)  # fmt: skip
    amp: str = _h("autocast for the scoring and training forwards: off | bf16 | fp16 (CUDA, with a gradient scaler)",
                  default="off")  # fmt: skip
    compile: str | None = _h("torch.compile the model with this backend (e.g. inductor); compile time is measured "
                             "before training and reported as compile_s, apart from training time",
                             default=None)  # fmt: skip
    threads: int | None = _h("torch CPU threads (default: torch's choice)", default=None)
    data_dir: str | None = _h("folder with the dataset's official files, the only one searched (--download fills it)",
                              default=None)  # fmt: skip
    download: bool = _h("download the dataset if it is not found", default=False)
    nonfinite: str = _h("on a NaN/inf loss: raise (stop, exit code 3) | skip (drop that optimizer step)",
                        default="raise")  # fmt: skip
    dist_timeout: float = _h("torchrun: seconds a rank waits for the others before failing", default=300.0)

    def __post_init__(self) -> None:
        """Check every option (see :mod:`~selective_backprop.experiments.options`), then apply ``selectivity``.

        Raises:
            ValueError: one line naming the option's flag, the value and what is allowed, e.g.
                ``--lr must be a finite number > 0, got nan``.
        """
        check_options({f.name: getattr(self, f.name) for f in dataclasses.fields(self)}, _SB_FAMILY)
        self.lr_milestones = tuple(float(m) for m in self.lr_milestones)
        if self.score_mode is None:  # the strategy's own; config.json records the mode the run used
            self.score_mode = STRATEGIES[self.strategy].score_mode
        if self.selectivity is not None:  # raises ValueError naming the strategies that have a knob
            try:
                options = selectivity_options(self.strategy, self.selectivity)
            except ValueError as e:
                raise ValueError(f"--selectivity {self.selectivity:g}: {e}") from None
            for name, value in options.items():
                setattr(self, name, value)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def lr_at(config: TrainConfig, progress: float) -> float:
    """The learning rate at ``progress`` = fraction of the budget done, counted in ``config.lr_unit``.

    Example:
        >>> c = TrainConfig(lr=1.0, lr_milestones=(0.5, 0.75), lr_gamma=0.1)
        >>> [round(lr_at(c, p), 4) for p in (0.0, 0.5, 0.8, 2.0)]
        [1.0, 0.1, 0.01, 0.01]
    """
    if config.lr_schedule == "constant":
        return config.lr
    if config.lr_schedule == "cosine":
        return config.lr * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
    per = config.epochs if config.lr_milestone_unit == "epochs" else 1.0  # epochs -> fractions of the budget
    return config.lr * config.lr_gamma ** sum(progress >= m / per for m in config.lr_milestones)


def budget_done(config: TrainConfig, counters: dict[str, float], world_size: int, dataset_size: int) -> float:
    """Fraction of the budget done, in ``config.lr_unit``, over all ranks (the same value on every rank).

    Under torchrun, examples seen = this rank's x world size (every rank sees as many), and backprops are
    counted as steps x batch size x world size (the ranks' own counts differ; a count every rank knows keeps
    their learning rates, hence their parameters, identical).

    Example:
        >>> c = TrainConfig(epochs=2, batch_size=4, lr_unit="backprops")
        >>> budget_done(c, {"seen": 10, "backpropagated": 5, "steps": 2}, world_size=1, dataset_size=10)
        0.25
    """
    if config.lr_unit == "examples":
        done = counters["seen"] * world_size
    elif world_size == 1:
        done = counters["backpropagated"]
    else:
        done = counters["steps"] * config.batch_size * world_size
    return done / (config.epochs * dataset_size)
