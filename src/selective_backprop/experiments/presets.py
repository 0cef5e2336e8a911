"""The paper's setups as presets: ``--preset paper`` (and ``paper-compressed``) for ``train`` and ``compare``.

Sources: Jiang et al. 2019 (arXiv 1910.00762 v1) §5.1 and appendix A for the per-dataset selectivity and learning-
rate schedules; the authors' example optimizer (SGD, lr 0.1, momentum 0.9, Nesterov, weight decay 5e-4,
``examples/train.py:196-197``, see ``original-code-notes.md`` §2); the Wide ResNets the paper's setups cite
(Zagoruyko & Komodakis 2016: WRN-28-10 with dropout 0.3 on CIFAR; DeVries & Taylor 2017: WRN-16-8 with dropout 0.4
and cutout on SVHN). Kath18 as the paper ran it (§5.1): "variable starting, no bias reweighting, and loss as the
importance score".

Where the paper is silent, and what we chose:

* Kath18's selectivity is given for SVHN only (33 %); elsewhere it gets SB's (presample ``round(1 / selectivity)``).
* Datasets the paper did not run (Fashion-MNIST) take CIFAR-10's selectivity (beta 2: ten classes, the paper's
  main benchmark) and keep their own model and schedule (the paper's absolute-epoch schedules assume 160+ epochs).
* The paper trains for a wall-clock budget (12 h CIFAR, 96 h SVHN), not epochs: pass ``--time-budget`` with a
  large ``--epochs``; the schedules are in absolute epochs, so they do not depend on ``--epochs``.

Explicit flags win over a preset's values.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["PaperSetup", "PAPER_SETUPS", "PRESETS", "preset_values"]


@dataclass(frozen=True)
class PaperSetup:
    """One dataset as the paper ran it.

    Args:
        beta: SB / StaleSB selectivity exponent (selectivity ``1 / (beta + 1)``).
        presample: Kath18's presample ``k`` (it backprops ``1 / k`` of what it scores).
        milestones: step schedule, absolute epochs (LR x ``gamma`` at each).
        compressed: the compressed schedule's milestones (``paper-compressed``), absolute epochs.
        gamma: the step factor.
        wrn: Wide ResNet ``(depth, width, dropout)``; ``None`` keeps the model chosen.
    """

    beta: float
    presample: int
    milestones: tuple[float, ...]
    compressed: tuple[float, ...]
    gamma: float
    wrn: tuple[int, int, float] | None


PAPER_SETUPS: dict[str, PaperSetup] = {
    "cifar10": PaperSetup(2.0, 3, (60, 120, 160), (48, 96, 128), 0.2, (28, 10, 0.3)),  # 33 %
    "cifar100": PaperSetup(1.0, 2, (60, 120), (48, 96), 0.1, (28, 10, 0.3)),  # 50 %
    "svhn": PaperSetup(3.0, 3, (60, 120), (48, 96), 0.1, (16, 8, 0.4)),  # SB 25 %, Kath18 33 %
}
"""The paper's datasets (``svhn-extra`` uses ``svhn``'s)."""

PRESETS: dict[str, str] = {
    "paper": "the paper's setup for --dataset: Traditional, SB, StaleSB and Kath18 at the paper's selectivity, its "
    "LR schedule (absolute epochs), SGD with Nesterov, its Wide ResNet, Kath18 with loss scores and no reweighting; "
    "compare: seeds 0,1,2",
    "paper-compressed": "as paper, with the compressed LR schedule (milestones at 48/96(/128) epochs)",
    "beta-sweep": "compare: every strategy, beta 1,2,3, seeds 0,1,2 (this project's broader grid)",
    "static-1-5": "compare: the slides' static selectivity 1/5 for every strategy with a knob, seeds 0,1,2",
}
"""Preset name -> what it sets (shown by ``--help``)."""


def preset_values(name: str, dataset: str) -> dict[str, Any]:
    """The argument defaults preset ``name`` gives for ``dataset`` (config fields, and ``compare``'s ``strategies``,
    ``betas``, ``seeds``).

    Example:
        >>> v = preset_values("paper", "svhn")
        >>> v["beta"], v["presample"], v["lr_milestones"], v["wrn_depth"], v["kath_reweight"]
        (3.0, 3, (60, 120), 16, 'off')

    Raises:
        ValueError: on an unknown preset name.
    """
    if name == "beta-sweep":
        return {"strategies": "traditional,sb,stale-sb,kath18,random,infobatch,composer-sb", "betas": "1,2,3",
                "seeds": "0,1,2"}  # fmt: skip
    if name == "static-1-5":
        return {"strategies": "traditional,sb,stale-sb,kath18,random,composer-sb", "selectivity": 0.2,
                "seeds": "0,1,2"}  # fmt: skip
    if name not in ("paper", "paper-compressed"):
        raise ValueError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}")
    setup = PAPER_SETUPS.get(dataset.removesuffix("-extra"))
    selectivity = setup or PAPER_SETUPS["cifar10"]  # a dataset the paper did not run: CIFAR-10's
    values: dict[str, Any] = {
        "strategies": "traditional,sb,stale-sb,kath18", "seeds": "0,1,2",
        "lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 5e-4,
        "kath_score": "loss", "kath_reweight": "off",
        "beta": selectivity.beta, "betas": f"{selectivity.beta:g}", "presample": selectivity.presample,
    }  # fmt: skip
    if setup is not None:
        milestones = setup.compressed if name == "paper-compressed" else setup.milestones
        values.update(lr_schedule="step", lr_milestones=milestones, lr_milestone_unit="epochs", lr_gamma=setup.gamma)
        if setup.wrn is not None:
            values.update(model="wideresnet", wrn_depth=setup.wrn[0], wrn_width=setup.wrn[1], wrn_dropout=setup.wrn[2])
    return values
