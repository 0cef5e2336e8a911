"""Hugging Face Accelerate needs no adapter: the selector is built on the prepared model, iterates the prepared
loader (which still yields the indices, on the device) and rides in ``save_state``/``load_state`` through
``register_for_checkpointing``. Checked here: only selected examples train, a resume continues with identical
selections and weights, and under ``mixed_precision="bf16"`` the scoring forward runs in the Accelerator's autocast."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

accelerate = pytest.importorskip("accelerate")
from accelerate.state import AcceleratorState  # noqa: E402
from accelerate.utils import set_seed  # noqa: E402

from selective_backprop import SelectiveBackprop  # noqa: E402

N, D = 768, 10
X = torch.randn(N, D, generator=torch.Generator().manual_seed(0))
Y = (X[:, 0] - X[:, 1] > 0).long()


def build(mixed_precision: str = "no", **kwargs):
    AcceleratorState._reset_state(reset_partial_state=True)  # one process, Accelerators of different precisions
    set_seed(0)
    accelerator = accelerate.Accelerator(mixed_precision=mixed_precision, cpu=True)
    model = nn.Sequential(nn.Linear(D, 32), nn.ReLU(), nn.Linear(32, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    loader = DataLoader(TensorDataset(X, Y, torch.arange(N)), batch_size=32, shuffle=True)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    sb = SelectiveBackprop(model, batch_size=32, beta=2, seed=1, **kwargs)
    accelerator.register_for_checkpointing(sb)
    return accelerator, model, optimizer, loader, sb


def train(accelerator, model, optimizer, loader, sb, epochs):
    trained = []
    for _ in epochs:
        for batch in sb.iterate(loader):
            loss = batch.loss(model(batch.inputs))
            optimizer.zero_grad()
            accelerator.backward(loss)
            optimizer.step()
            trained.append(batch.indices.clone())
    return trained


def test_the_prepared_loader_yields_indices_and_only_selected_examples_train():
    accelerator, model, optimizer, loader, sb = build()
    x, y, i = next(iter(loader))
    assert i.dtype == torch.int64 and i.device == accelerator.device and len(i) == len(x) == 32
    trained = train(accelerator, model, optimizer, loader, sb, range(3))
    c = sb.counters
    assert c["seen"] == 3 * N and c["selection_forwards"] == 2 * N  # primed epoch, then one scoring forward each
    assert c["backpropagated"] == sum(len(t) for t in trained) and c["steps"] == len(trained)
    assert N < c["selected"] < N + 0.6 * 2 * N  # everything in the primed epoch, then about a third (beta 2)
    assert torch.cat(trained[: N // 32]).sort().values.equal(torch.arange(N))  # primed: every example once
    with torch.no_grad():
        assert (model(X).argmax(1) == Y).float().mean() > 0.9


def test_save_state_load_state_resume_continues_with_identical_selections(tmp_path):
    whole = build(staleness=2, dataset_size=N)
    train(*whole, range(2))
    whole[0].save_state(tmp_path / "state")
    after = train(*whole, range(2, 5))

    resumed = build(staleness=2, dataset_size=N)
    resumed[0].load_state(tmp_path / "state")
    assert resumed[4].epoch == 2 and resumed[4].counters["seen"] == 2 * N
    again = train(*resumed, range(2, 5))
    assert len(again) == len(after) > 0
    assert all(torch.equal(a, b) for a, b in zip(again, after, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(whole[1].parameters(), resumed[1].parameters(), strict=True))
    assert resumed[4].counters["skipped_forwards"] > 0  # StaleSB's cache came through the checkpoint


def test_bf16_scores_and_trains_under_the_accelerators_autocast():
    accelerator, model, optimizer, loader, sb = build("bf16")
    seen = []  # (grad enabled, dtype) of the hidden layer's output at every forward
    accelerator.unwrap_model(model)[0].register_forward_hook(
        lambda module, args, out: seen.append((torch.is_grad_enabled(), out.dtype)))
    train(accelerator, model, optimizer, loader, sb, range(2))
    assert sb.counters["selection_forwards"] == N  # the second epoch was scored ...
    scoring = [dtype for grad, dtype in seen if not grad]
    assert len(scoring) == N // 32 and set(scoring) == {torch.bfloat16}  # ... through the prepared model's autocast
    assert {dtype for grad, dtype in seen if grad} == {torch.bfloat16}  # and so was every training forward
    assert all(p.dtype == torch.float32 for p in model.parameters())  # the weights stay fp32
