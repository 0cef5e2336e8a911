"""The trainer's speed options: autocast (AMP), torch.compile, scoring at a larger batch, and the selectivity knobs
(a requested fraction, or a requested epoch time from measured costs). Each must leave the algorithm as it was."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from selective_backprop.experiments import calibrate
from selective_backprop.experiments.analysis import read_metrics
from selective_backprop.experiments.config import TrainConfig
from selective_backprop.experiments.data import DeviceLoader
from selective_backprop.experiments.runfolder import read_checkpoint
from selective_backprop.experiments.trainer import Trainer

QUICK = dict(epochs=2, batch_size=32, test_limit=128, threads=1)


def config(data, **kw) -> TrainConfig:
    return TrainConfig(data_dir=str(data), **{**QUICK, **kw})


def spy_forwards(model: torch.nn.Module) -> list[tuple[bool, bool, int, torch.dtype]]:
    """Record (a training forward, autocast on, batch size, output dtype) of every forward of ``model``; a training
    forward is one with autograd on (the run's last leftover examples train in eval mode, with grad)."""
    calls: list[tuple[bool, bool, int, torch.dtype]] = []

    def hook(module, inputs, output):
        calls.append((torch.is_grad_enabled(), torch.is_autocast_enabled("cpu"), len(inputs[0]), output.dtype))

    model.register_forward_hook(hook)
    return calls


@pytest.mark.parametrize("score_precision", ["bf16", "fp32"])
def test_the_scoring_forward_has_its_own_precision_whatever_the_training_one(tiny_fmnist, tmp_path, score_precision):
    """--amp bf16 trains under bf16 autocast; --score-precision decides the scoring forward's, independently."""
    cfg = config(tiny_fmnist, amp="bf16", strategy="sb", score_precision=score_precision)
    trainer = Trainer(cfg, tmp_path / "bf16", progress=False)
    calls = spy_forwards(trainer.model)
    summary = trainer.run()
    training = [c for c in calls if c[0]]
    scoring = [c for c in calls if not c[0] and c[2] == 32]  # evaluation forwards use batches of 256 or fewer
    assert training and scoring
    assert all(on and dtype == torch.bfloat16 for _, on, _, dtype in training)
    expected = (True, torch.bfloat16) if score_precision == "bf16" else (False, torch.float32)
    assert all((on, dtype) == expected for _, on, _, dtype in scoring)
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    assert summary["final_test_error"] < 0.5  # it learned (random guessing is 0.9)


def test_auto_score_precision_is_measured_recorded_and_kept_on_resume(tiny_fmnist, tmp_path):
    out = tmp_path / "auto"
    cfg = config(tiny_fmnist, strategy="sb", epochs=2)
    trainer = Trainer(cfg, out, progress=False)
    env = json.loads((out / "environment.json").read_text())
    trials = env["score_precision_trials"]
    assert set(trials) == {"fp32", "bf16"} and env["score_precision"] in trials
    assert trials["bf16"]["spearman"] > 0.9 and 0 <= trials["bf16"]["changed_share"] <= 1
    assert trainer.selector.score_precision == env["score_precision"]
    trainer.save_checkpoint()
    env["score_precision"] = "bf16" if env["score_precision"] == "fp32" else "fp32"  # as if measured otherwise
    (out / "environment.json").write_text(json.dumps(env))
    resumed = Trainer(cfg, out, resume=True, progress=False)
    assert resumed.selector.score_precision == env["score_precision"]  # the run's own choice, not re-measured


def test_fp16_on_cpu_is_refused_with_the_alternative(tiny_fmnist, tmp_path):
    with pytest.raises(ValueError, match="amp fp16 needs CUDA .* use --amp bf16"):
        Trainer(config(tiny_fmnist, amp="fp16"), tmp_path / "fp16", progress=False)
    assert not (tmp_path / "fp16").exists()  # refused before anything was written


def test_compiled_run_equals_the_eager_one_and_reports_compile_time_apart(tiny_fmnist, tmp_path):
    plain = Trainer(config(tiny_fmnist, strategy="stale-sb", staleness=2), tmp_path / "plain", progress=False).run()
    compiled_cfg = config(tiny_fmnist, strategy="stale-sb", staleness=2, compile="eager")  # dynamo, no C++ build
    compiled = Trainer(compiled_cfg, tmp_path / "compiled", progress=False).run()
    assert compiled["compile_s"] > 0 and plain["compile_s"] == 0
    env = json.loads((tmp_path / "compiled" / "environment.json").read_text())
    assert env["compile_s"] == compiled["compile_s"] and env["compiled_graphs"] > 0
    # StaleSB scores only its stale examples (a different count every batch), flushes and the last leftover are
    # smaller: after the warm-up nothing is compiled again
    assert compiled["recompiles"] == 0 and {r["recompiles"] for r in read_metrics(tmp_path / "compiled")} == {0}
    assert {r["recompiles"] for r in read_metrics(tmp_path / "plain")} == {0}
    a = read_checkpoint(tmp_path / "plain" / "checkpoint.pt")["model"]
    b = read_checkpoint(tmp_path / "compiled" / "checkpoint.pt")["model"]
    assert a.keys() == b.keys()  # the bare module's names, no "_orig_mod." prefix
    assert all(torch.allclose(a[k].float(), b[k].float(), atol=1e-5) for k in a)
    assert compiled["backprops"] == plain["backprops"]  # the same selections
    assert compiled["final_test_error"] == pytest.approx(plain["final_test_error"], abs=1 / 128)


def test_a_larger_scoring_batch_keeps_training_batches_at_batch_size(tiny_fmnist, tmp_path):
    trainer = Trainer(config(tiny_fmnist, strategy="sb", score_batch_size=128), tmp_path / "big", progress=False)
    calls = spy_forwards(trainer.model)
    summary = trainer.run()
    scoring = [size for training, _, size, _ in calls if not training and size != 256]
    steps = [size for training, _, size, _ in calls if training]
    assert scoring and set(scoring) == {128}  # epoch 2: four loader batches of 128, each one scoring forward
    assert steps[: 512 // 32] == [32] * 16  # the primed epoch, in training batches of 32
    assert max(steps) == 32 and sum(steps) == summary["backprops"]
    assert sum(s == 32 for s in steps) >= len(steps) - 1  # at most one smaller batch: the epoch's flush


def test_selectivity_sets_each_strategys_knob():
    assert TrainConfig(strategy="sb", selectivity=0.2).beta == pytest.approx(4.0)
    assert TrainConfig(strategy="random", selectivity=0.2).rate == 0.2
    assert TrainConfig(strategy="kath18", selectivity=0.2).presample == 5
    with pytest.raises(ValueError, match="cannot be tuned to a selectivity"):
        TrainConfig(strategy="threshold", selectivity=0.2)


def test_target_time_picks_beta_from_the_measured_costs_and_leaves_the_run_untouched(tiny_fmnist, tmp_path):
    auto = Trainer(config(tiny_fmnist, strategy="sb", target_time=0.7), tmp_path / "auto", progress=False)
    cal = json.loads((tmp_path / "auto" / "environment.json").read_text())
    f, t = cal["scoring_forward_s_per_example"], cal["train_step_s_per_example"]
    assert 0 < f < t  # a no-grad forward is cheaper than forward + backward + step
    assert cal["beta"] == pytest.approx(1 / min(1.0, 0.7 - f / t) - 1) and auto.selector.policy.beta == cal["beta"]
    auto.run()
    # The trial steps that measured F and T were undone: the run equals one given that beta directly.
    fixed = config(tiny_fmnist, strategy="sb", beta=cal["beta"])
    Trainer(fixed, tmp_path / "fixed", progress=False).run()
    a = read_checkpoint(tmp_path / "auto" / "checkpoint.pt")["model"]
    b = read_checkpoint(tmp_path / "fixed" / "checkpoint.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_an_unreachable_target_time_says_why(tiny_fmnist, tmp_path):
    with pytest.raises(ValueError, match=r"--target-time 0.01 is not reachable: the scoring forwards alone cost"):
        Trainer(config(tiny_fmnist, strategy="sb", target_time=0.01), tmp_path / "t", progress=False)
    with pytest.raises(ValueError, match="--target-time needs --strategy sb or stale-sb"):
        TrainConfig(strategy="kath18", target_time=0.5)


def test_after_the_warm_up_no_batch_size_of_the_run_compiles_anything(tiny_fmnist, tmp_path):
    """Every batch a run can produce -- scoring 1..32 rows (StaleSB's stale subsets), training 2..32 (flushes), the
    last leftover of one row trained in eval mode -- reuses a graph the warm-up built."""
    trainer = Trainer(config(tiny_fmnist, strategy="stale-sb", compile="eager"), tmp_path / "run", progress=False)
    parts = trainer.parts
    before = calibrate.compiled_graphs()
    x, y, _ = next(iter(DeviceLoader(parts.train_set, 32, seed=0)))
    x = x.contiguous(memory_format=parts.memory_format)
    for m in range(1, 33):
        calibrate._score(parts, x[:m], y[:m])
    for m in range(2, 33):
        calibrate._step(parts, x[:m], y[:m])
    parts.train_model.eval()
    calibrate._step(parts, x[:1], y[:1])
    assert calibrate.compiled_graphs() == before


FAULTS = """
import resource, sys, torch
from selective_backprop.experiments.setup import keep_freed_memory
applied = keep_freed_memory() if sys.argv[1] == "keep" else None
for _ in range(3):  # warm-up: the OpenMP pool's own small allocations may land just above the first block
    torch.empty(16 << 20).fill_(1.0)  # a 64 MiB block, above glibc's largest mmap threshold
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(3):  # the same again: reused, or mapped and zero-filled page by page
    torch.empty(16 << 20).fill_(1.0)
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_large_blocks_are_reused_instead_of_faulted_in_again():
    """The cause of big scoring batches costing more per example in the loop than alone: page faults."""
    runs = {mode: subprocess.run([sys.executable, "-c", FAULTS, mode], capture_output=True, text=True, check=True)
            for mode in ("keep", "default")}  # fmt: skip
    kept, default = (runs[m].stdout.split() for m in ("keep", "default"))
    assert kept[0] == "True" and int(kept[1]) < 100
    assert int(default[1]) > 3 * 10_000  # 3 x 64 MiB / 4 KiB pages: every page faulted in again
