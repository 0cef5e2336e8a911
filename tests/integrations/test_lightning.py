"""The Lightning integration end to end, with the real library: a LightningModule trained through
SelectiveBackpropCallback trains exactly the selected examples (each epoch's remainder within the epoch), resumes from
a Lightning checkpoint with identical selections and weights, never selects during validation, stops at max_steps,
refuses what it cannot do, and runs under DDP with global selection (this file is also the DDP script:
``torchrun --standalone --nproc-per-node 2 tests/integrations/test_lightning.py --ddp FOLDER``)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Sampler, TensorDataset

L = pytest.importorskip("lightning")
from lightning.pytorch.callbacks import Callback, ModelCheckpoint  # noqa: E402
from lightning.pytorch.utilities.exceptions import MisconfigurationException  # noqa: E402

from selective_backprop import Kath18  # noqa: E402
from selective_backprop.integrations.lightning import SelectiveBackpropCallback, selected_batches  # noqa: E402

N, D = 768, 10
X = torch.randn(N, D, generator=torch.Generator().manual_seed(0))
Y = (X[:, 0] - X[:, 1] > 0).long()
QUIET = dict(accelerator="cpu", logger=False, enable_model_summary=False, enable_progress_bar=False)


class EpochShuffle(Sampler[int]):
    """A shuffle seeded by the epoch (Lightning calls set_epoch), so a resumed run sees the same order."""

    def __init__(self) -> None:
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return N

    def __iter__(self):
        return iter(torch.randperm(N, generator=torch.Generator().manual_seed(self.epoch)).tolist())


def loader(batch_size: int = 32, ddp: bool = False) -> DataLoader:
    """Under DDP a plain shuffle, which Lightning replaces with a DistributedSampler (seeded, set_epoch too)."""
    data = TensorDataset(X, Y, torch.arange(N))
    return DataLoader(data, batch_size=batch_size, shuffle=True) if ddp else DataLoader(
        data, batch_size=batch_size, sampler=EpochShuffle())  # fmt: skip


class Net(L.LightningModule):
    """Trains what selected_batches yields and records it: the indices of each trained batch, in order."""

    def __init__(self, select: bool = True, automatic: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(D, 32), nn.ReLU(), nn.Linear(32, 2))
        self.automatic_optimization = automatic
        self.select, self.trained, self.modes, self.steps = select, [], [], 0

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        if not self.select:
            return
        optimizer = self.optimizers()
        batches = selected_batches(self, batch)
        self.modes.append(self.training)  # the scoring forward ran in eval mode and must have restored train mode
        for selected in batches:
            loss = selected.loss(selected.forward(self))
            optimizer.zero_grad()
            self.manual_backward(loss)
            optimizer.step()
            self.trained.append(selected.indices.clone())
            self.steps += 1

    def validation_step(self, batch, batch_idx):
        self.log("val_loss", F.cross_entropy(self(batch[0]), batch[1]))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1, momentum=0.9)


class Queued(Callback):
    """The selector's queue length at each epoch end (after the SB callback's own hook)."""

    def __init__(self, sb: SelectiveBackpropCallback) -> None:
        self.sb, self.lengths = sb, []

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.lengths.append(len(self.sb.selector.queue))


def test_trains_exactly_the_selected_examples_and_each_epochs_remainder_within_it():
    model, sb = Net(), SelectiveBackpropCallback(batch_size=32, beta=2, seed=1)
    queued = Queued(sb)
    val = DataLoader(TensorDataset(X[:256], Y[:256], torch.arange(256)), batch_size=64)
    trainer = L.Trainer(**{**QUIET, "enable_progress_bar": True}, max_epochs=3, enable_checkpointing=False,
                        callbacks=[sb, queued], num_sanity_val_steps=2)  # fmt: skip
    trainer.fit(model, loader(), val)
    c = sb.selector.counters
    assert c["seen"] == 3 * N  # the sanity check and 3 validations (256 examples each) selected nothing
    assert c["backpropagated"] == sum(len(t) for t in model.trained)
    assert c["steps"] == len(model.trained) == model.steps == trainer.global_step
    assert N < c["selected"] < N + 0.6 * 2 * N  # primed epoch, then about a third (beta 2)
    assert len(queued.lengths) == 3 and max(queued.lengths) < 2  # each epoch's remainder was trained in it
    assert c["selected"] == c["backpropagated"] + queued.lengths[-1]
    assert all(len(t) <= 32 for t in model.trained) and sum(len(t) < 32 for t in model.trained) <= 3
    assert all(model.modes) and len(model.modes) == 3 * N // 32
    assert trainer.callback_metrics["sb/seen"] == 3 * N
    assert trainer.callback_metrics["sb/backpropagated"] == c["backpropagated"]


def test_any_selector_class_kath18_trains_what_it_draws():
    model, sb = Net(), SelectiveBackpropCallback(Kath18, batch_size=32, presample=3, seed=0)
    trainer = L.Trainer(**QUIET, max_epochs=2, enable_checkpointing=False, callbacks=[sb])
    trainer.fit(model, loader())
    c = sb.selector.counters
    assert isinstance(sb.selector, Kath18) and c["seen"] == 2 * N
    assert c["backpropagated"] == sum(len(t) for t in model.trained) and c["steps"] == trainer.global_step
    assert 2 * N // 96 <= trainer.global_step <= 2 * N // 32  # uniform batches, or one per presample of 96


def test_resume_from_a_lightning_checkpoint_continues_with_identical_selections(tmp_path):
    def run(ckpt_path=None):
        model = Net()
        sb = SelectiveBackpropCallback(batch_size=32, beta=2, staleness=2, dataset_size=N, seed=3)
        every_epoch = ModelCheckpoint(dirpath=tmp_path / ("resumed" if ckpt_path else "whole"), save_top_k=-1)
        trainer = L.Trainer(**QUIET, max_epochs=4, callbacks=[sb, every_epoch])
        trainer.fit(model, loader(), ckpt_path=ckpt_path)
        return model, sb.selector.counters

    whole, counters = run()
    ckpt = next((tmp_path / "whole").glob("epoch=1-*.ckpt"))
    steps_before = torch.load(ckpt, weights_only=True)["global_step"]
    resumed, resumed_counters = run(ckpt)
    assert 0 < steps_before < len(whole.trained)
    assert len(resumed.trained) == len(whole.trained) - steps_before
    assert all(torch.equal(a, b) for a, b in zip(resumed.trained, whole.trained[steps_before:], strict=True))
    assert all(torch.equal(a, b) for a, b in zip(resumed.parameters(), whole.parameters(), strict=True))
    assert resumed_counters["skipped_forwards"] > 0  # StaleSB's cache came through the checkpoint
    drop_times = {k: v for k, v in counters.items() if not k.endswith("_s")}
    assert {k: v for k, v in resumed_counters.items() if not k.endswith("_s")} == drop_times


def test_max_steps_counts_the_optimizer_steps_taken():
    """Loader batches of 32, training batches of 16: two steps per loader batch while priming, and step 7 falls
    inside a loader batch; the eighth must not be taken."""
    model, sb = Net(), SelectiveBackpropCallback(batch_size=16, beta=2)
    trainer = L.Trainer(**QUIET, max_steps=7, enable_checkpointing=False, callbacks=[sb])
    trainer.fit(model, loader())
    assert model.steps == trainer.global_step == sb.selector.counters["steps"] == 7


def test_limit_train_batches_ends_the_epoch_and_flushes_at_the_limit():
    model, sb = Net(), SelectiveBackpropCallback(batch_size=32, beta=2, prime_epochs=0)
    queued = Queued(sb)
    trainer = L.Trainer(**QUIET, max_epochs=2, limit_train_batches=5, enable_checkpointing=False,
                        callbacks=[sb, queued])  # fmt: skip
    trainer.fit(model, loader())
    c = sb.selector.counters
    assert c["seen"] == 2 * 5 * 32 and sb.selector.epoch == 2 and max(queued.lengths) < 2
    assert c["selected"] == c["backpropagated"] + queued.lengths[-1] == sum(len(t) for t in model.trained)


@pytest.mark.parametrize(
    ("module", "callback", "trainer_args", "error", "match"),
    [
        (lambda: Net(automatic=True), None, {}, RuntimeError, r"automatic_optimization = False"),
        (Net, None, {"accumulate_grad_batches": 2}, MisconfigurationException, r"accumulate_grad_batches=2"),
        (Net, None, {"gradient_clip_val": 1.0}, MisconfigurationException, r"gradient_clip_val=1.0"),
        (lambda: Net(select=False), None, {}, RuntimeError, r"never called selected_batches"),
        (Net, [], {}, RuntimeError, r"exactly one SelectiveBackpropCallback"),
    ],
    ids=["automatic-optimization", "accumulation", "clipping", "no-selection", "no-callback"],
)
def test_what_cannot_work_is_refused_at_fit_naming_the_fix(module, callback, trainer_args, error, match):
    model = module()
    callbacks = [SelectiveBackpropCallback(batch_size=32)] if callback is None else callback
    trainer = L.Trainer(**QUIET, max_epochs=1, enable_checkpointing=False, callbacks=callbacks, **trainer_args)
    with pytest.raises(error, match=match):
        trainer.fit(model, loader())


def test_bad_arguments_and_the_state_key():
    with pytest.raises(TypeError, match="distributed"):
        SelectiveBackpropCallback(distributed=True)
    with pytest.raises(TypeError, match="Selector class"):
        SelectiveBackpropCallback("sb")
    key = SelectiveBackpropCallback(batch_size=32, beta=2, loss_fn=lambda o, t: F.cross_entropy(o, t, reduction="none"))
    assert key.state_key == SelectiveBackpropCallback(batch_size=32, beta=2, loss_fn=lambda o, t: o).state_key
    assert "0x" not in key.state_key and "<lambda>" in key.state_key  # the same text in every run
    assert SelectiveBackpropCallback(beta=2).state_key != SelectiveBackpropCallback(beta=3).state_key


def test_ddp_selects_globally_steps_in_lockstep_and_resumes_identically(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    proc = subprocess.run([*torchrun, __file__, "--ddp", str(tmp_path)], capture_output=True, text=True, timeout=300,
                          env=env)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    ranks = re.findall(r"rank (\d): distributed (\d) steps (\d+) selected (\d+) seen (\d+) logged (\d+) "
                       r"weights (\S+) resumed identical (True|False)", proc.stdout)  # fmt: skip
    assert sorted(r[0] for r in ranks) == ["0", "1"], proc.stdout
    assert all(r[1] == r[0] for r in ranks)  # each selector knows its rank: global selection is on
    assert len({r[2] for r in ranks}) == 1  # lockstep: the same number of optimizer steps
    assert all(int(r[4]) == 2 * N // 2 and int(r[5]) == 2 * N for r in ranks)  # logged counts summed over ranks
    assert all(int(r[3]) < int(r[4]) for r in ranks)
    assert len({r[6] for r in ranks}) == 1  # DDP kept one model
    assert all(r[7] == "True" for r in ranks)


def ddp_main(folder: Path) -> None:
    """Two CPU ranks: two epochs checkpointed every epoch, then a resume from the first epoch's checkpoint."""

    def run(ckpt_path=None):
        model, sb = Net(), SelectiveBackpropCallback(batch_size=16, beta=2, seed=0)
        every_epoch = ModelCheckpoint(dirpath=folder / ("resumed" if ckpt_path else "whole"), save_top_k=-1)
        trainer = L.Trainer(**QUIET, devices=2, strategy="ddp", max_epochs=2, callbacks=[sb, every_epoch])
        trainer.fit(model, loader(16, ddp=True), ckpt_path=ckpt_path)
        return trainer, model, sb

    trainer, whole, sb = run()
    _, resumed, _ = run(next((folder / "whole").glob("epoch=0-*.ckpt")))
    same = all(torch.equal(a, b) for a, b in zip(resumed.parameters(), whole.parameters(), strict=True))
    c, weights = sb.selector.counters, sum(p.double().sum().item() for p in whole.parameters())
    line = (f"rank {trainer.global_rank}: distributed {sb.selector.rank} steps {trainer.global_step} "
            f"selected {c['selected']:.0f} seen {c['seen']:.0f} logged {trainer.callback_metrics['sb/seen']:.0f} "
            f"weights {weights!r} resumed identical {same}\n")  # fmt: skip
    sys.stdout.write(line)  # one write: the two ranks' lines do not interleave


if __name__ == "__main__" and sys.argv[1:2] == ["--ddp"]:
    ddp_main(Path(sys.argv[2]))
