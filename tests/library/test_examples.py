"""Every file in ``examples/`` runs as a user would run it, and says what it promises."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def run(*argv: str, timeout: int = 180) -> str:
    proc = subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=timeout, env=ENV)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc.stdout


def number(text: str, name: str) -> float:
    return float(re.search(rf"{name} ([0-9.]+)", text).group(1))


def test_plain_loop_learns_while_backpropagating_a_fraction():
    out = run(str(EXAMPLES / "plain_loop.py"))
    assert number(out, "accuracy") > 0.95
    backprops, seen = map(float, re.search(r"backpropagated (\d+) of (\d+)", out).groups())
    assert seen == 5 * 4096 and 4096 < backprops < 0.6 * seen  # primed epoch, then about a third


def test_stale_sb_skips_two_of_every_three_scoring_forwards():
    out = run(str(EXAMPLES / "stale_sb.py"))
    assert number(out, "accuracy") > 0.95
    assert number(out, "scoring forwards") == 2 * 4096 and number(out, "skipped") == 4 * 4096


def test_resume_continues_identically(tmp_path):
    out = run(str(EXAMPLES / "resume.py"), str(tmp_path / "ckpt.pt"))
    assert "identical to the uninterrupted one: True" in out and (tmp_path / "ckpt.pt").exists()


def test_ddp_under_torchrun_trains_both_ranks_in_lockstep():
    out = run("-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(EXAMPLES / "ddp.py"))
    ranks = re.findall(r"rank (\d): accuracy ([0-9.]+)  steps (\d+)  selected (\d+)", out)
    assert sorted(r for r, *_ in ranks) == ["0", "1"]
    assert len({steps for *_, steps, _ in ranks}) == 1  # lockstep: the same number of optimizer steps
    assert len({acc for _, acc, *_ in ranks}) == 1 and float(ranks[0][1]) > 0.95  # identical models


def test_lightning_module_trains_on_the_selected_batches():
    pytest.importorskip("lightning")  # the [lightning] extra
    out = run(str(EXAMPLES / "lightning_module.py"))
    assert number(out, "accuracy") > 0.95
    backprops, seen = map(float, re.search(r"backpropagated (\d+) of (\d+)", out).groups())
    assert seen == 5 * 4096 and 4096 < backprops < 0.6 * seen and number(out, "logged") == seen
    assert backprops / 128 <= number(out, "steps") <= backprops / 128 + 5  # full batches, one remainder per epoch


def test_accelerate_loop_trains_the_selected_batches_and_resumes_identically(tmp_path):
    pytest.importorskip("accelerate")  # the [hf] extra
    out = run(str(EXAMPLES / "accelerate_loop.py"), str(tmp_path / "state"))
    assert number(out, "accuracy") > 0.95 and "identical to the uninterrupted one: True" in out
    backprops, seen = map(float, re.search(r"backpropagated (\d+) of (\d+)", out).groups())
    assert seen == 5 * 4096 and 4096 < backprops < 0.6 * seen and number(out, "skipped") == 2 * 4096
    assert (tmp_path / "state" / "custom_checkpoint_0.pkl").exists()  # the selector's state


def test_hf_trainer_trains_the_selected_batches():
    pytest.importorskip("transformers")  # the [hf] extra
    out = run(str(EXAMPLES / "hf_trainer.py"))
    assert number(out, "accuracy") > 0.95 and number(out, "loader batches") == 4 * 2048 // 64
    backprops, seen = map(float, re.search(r"backpropagated (\d+) of (\d+)", out).groups())
    assert seen == 4 * 2048 and 2048 < backprops < 0.6 * seen  # primed epoch, then a fraction
    assert backprops / 64 <= number(out, "steps") <= backprops / 64 + 4  # full batches, one remainder per epoch


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.py")), ids=lambda p: p.name)
def test_every_example_is_tested_here(path):
    assert path.stem in Path(__file__).read_text(), f"{path.name} has no test in {Path(__file__).name}"
