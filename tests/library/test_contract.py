"""The contract every selector keeps, checked for every strategy (``torch.optim``'s ``optim_db`` style).

Each case below is one strategy of the library, configured so that every phase it has is exercised in a few
epochs (priming and selection, Kath18's uniform and importance-sampling phases and its falls back from one to the
other, Composer's active window, InfoBatch's pruning and annealing epochs). For every case:

* the global torch and numpy RNGs are untouched (a selector draws only from its own generator);
* a ``state_dict`` round trip (through ``torch.save`` / ``torch.load(weights_only=True)``) mid-epoch continues
  with identical batches, weights and counters;
* everything selected is backpropagated by ``end_epoch()`` (``flush="epoch"``), with the counters' invariants:
  ``seen`` = examples offered, ``selected`` = ``backpropagated`` at every epoch end, ``steps`` = batches trained,
  scoring forwards never exceed what was offered, and no example is trained twice in an epoch unless the
  strategy samples with replacement (Kath18);
* an empty batch is a no-op (nothing yielded, state and counters unchanged).

Kinds of mutant these tests (with the per-strategy tests next to them) are meant to kill: a draw from the global
RNG instead of the selector's generator; a state field not saved or not restored (generator, queue, cache, pool,
tau, scores, epoch, progress); a queue remainder dropped or trained twice at the epoch's end; a counter not
incremented on one path (priming, leftover presample, flush); an empty batch that advances an age, an epoch or
a generator; a boundary moved by one (``u < p`` vs ``u <= p``, staleness ages, the LR schedule's progress).
"""

from __future__ import annotations

import copy
import io
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils._pytree import tree_flatten

from selective_backprop import (
    Batch,
    ClampPolicy,
    ComposerSB,
    InfoBatch,
    Kath18,
    SelectiveBackprop,
    Selector,
    ThresholdPolicy,
    Traditional,
    UniformPolicy,
)

N, LOADER_BATCH, BATCH, EPOCHS = 48, 8, 4, 4
TIMES = ("select_time_s", "score_time_s")


@dataclass(frozen=True)
class Case:
    build: Callable[[nn.Module], Selector]
    with_replacement: bool = False


CASES = {
    "traditional": Case(lambda m: SelectiveBackprop(m, BATCH, policy=Traditional(), prime_epochs=0)),
    "sb": Case(lambda m: SelectiveBackprop(m, BATCH, beta=1, seed=3)),
    "stale-sb": Case(lambda m: SelectiveBackprop(m, BATCH, beta=1, staleness=2, dataset_size=N, seed=3)),
    "random": Case(lambda m: SelectiveBackprop(m, BATCH, policy=UniformPolicy(0.4), seed=3)),
    "threshold": Case(lambda m: SelectiveBackprop(m, BATCH, policy=ThresholdPolicy(1.1), seed=3)),
    "clamp": Case(lambda m: SelectiveBackprop(m, BATCH, policy=ClampPolicy(), seed=3)),
    # tau_th 0.3: importance sampling switches on within the first epoch (tau is an EMA from 0 of values >= 1)
    "kath18": Case(lambda m: Kath18(m, BATCH, presample=3, tau_th=0.3, seed=3), with_replacement=True),
    # tau follows the last presample alone (tau_ema 0) around its threshold: it switches on and off 7 times, so
    # presamples cut short fall back to uniform batches (the leftover path)
    "kath18-switching": Case(lambda m: Kath18(m, BATCH, presample=3, tau_ema=0.0, tau_th=1.05, seed=3),
                             with_replacement=True),  # fmt: skip
    "infobatch": Case(lambda m: InfoBatch(m, BATCH, epochs=EPOCHS, dataset_size=N, delta=0.75, seed=3)),
    "composer-sb": Case(
        lambda m: ComposerSB(m, BATCH, keep=0.5, epochs=EPOCHS, dataset_size=N, start=0.25, end=0.75, seed=3)
    ),
}


def data() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return torch.randn(N, 5, generator=gen), torch.randint(0, 3, (N,), generator=gen)


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Linear(5, 3)


def loader_batches(epoch: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    x, y = data()
    order = torch.randperm(N, generator=torch.Generator().manual_seed(100 + epoch))
    return [(x[o], y[o], o) for o in order.split(LOADER_BATCH)]


def step(net: nn.Module, batch: Batch) -> tuple[list[int], list[float] | None, bool]:
    """Train on ``batch`` with plain SGD; return what identifies it (indices, weights, primed)."""
    batch.loss(net(batch.inputs)).backward()
    with torch.no_grad():
        for p in net.parameters():
            p -= 0.5 * p.grad
            p.grad = None
    weights = None if batch.weights is None else batch.weights.tolist()
    return batch.indices.tolist(), weights, batch.primed


def run(selector: Selector, net: nn.Module, epochs: range, skip: int = 0) -> list[tuple]:
    """Offer ``epochs`` (skipping the first ``skip`` loader batches of the first); return every trained batch."""
    trained = []
    for epoch in epochs:
        for k, item in enumerate(loader_batches(epoch)):
            if epoch == epochs[0] and k < skip:
                continue
            trained += [step(net, b) for b in selector.select(*item)]
        trained += [step(net, b) for b in selector.end_epoch()]
    return trained


def same(a: object, b: object) -> bool:
    """Equal pytrees: the same structure, tensors equal in dtype and every element, other leaves ``==``."""
    leaves_a, spec_a = tree_flatten(a)
    leaves_b, spec_b = tree_flatten(b)
    return spec_a == spec_b and all(
        torch.equal(x, y) and x.dtype == y.dtype if isinstance(x, torch.Tensor) else x == y
        for x, y in zip(leaves_a, leaves_b, strict=True)
    )


def untimed(counters: dict[str, float]) -> dict[str, float]:
    return {k: v for k, v in counters.items() if k not in TIMES}


@pytest.fixture(params=sorted(CASES))
def case(request: pytest.FixtureRequest) -> tuple[str, Case]:
    return request.param, CASES[request.param]


def test_the_global_rngs_are_untouched(case):
    name, c = case
    net = model()
    selector = c.build(net)
    torch.manual_seed(1234)
    np.random.seed(1234)
    torch_state, np_state = torch.get_rng_state(), np.random.get_state()
    assert run(selector, net, range(EPOCHS))
    assert torch.equal(torch.get_rng_state(), torch_state)
    assert all(np.array_equal(a, b) for a, b in zip(np.random.get_state(), np_state, strict=True))


def test_a_state_dict_round_trip_mid_epoch_continues_identically(case):
    name, c = case
    net = model()
    original = c.build(net)
    run(original, net, range(1))
    half = len(loader_batches(1)) // 2
    for item in loader_batches(1)[:half]:
        for b in original.select(*item):
            step(net, b)
    buffer = io.BytesIO()
    torch.save(original.state_dict(), buffer)
    buffer.seek(0)
    twin_net = copy.deepcopy(net)
    twin = c.build(twin_net)
    twin.load_state_dict(torch.load(buffer, weights_only=True))
    expected = run(original, net, range(1, EPOCHS), skip=half)
    assert run(twin, twin_net, range(1, EPOCHS), skip=half) == expected
    assert untimed(twin.counters) == untimed(original.counters)
    assert all(torch.equal(a, b) for a, b in zip(net.parameters(), twin_net.parameters(), strict=True))


def queued_indices(selector: Selector) -> list[int]:
    pending = selector.queue.state_dict()["pending"]
    return [] if pending is None else pending[2].tolist()


def test_everything_selected_is_backpropagated_by_end_epoch_and_the_counters_add_up(case):
    """At every epoch's end the queue holds fewer than ``min_batch_size`` examples (carried over, never lost)
    and the counters add up: selected = backpropagated + still queued."""
    name, c = case
    net = model()
    selector = c.build(net)
    steps = backprops = 0
    carried: list[int] = []
    for epoch in range(EPOCHS):
        trained = run(selector, net, range(epoch, epoch + 1))
        steps += len(trained)
        backprops += sum(len(indices) for indices, _, _ in trained)
        counts = selector.counters
        assert counts["seen"] == N * (epoch + 1)
        assert counts["selected"] == counts["backpropagated"] + len(selector.queue)
        assert len(selector.queue) < selector.min_batch_size
        assert counts["steps"] == steps and counts["backpropagated"] == backprops
        assert counts["selection_forwards"] + counts["skipped_forwards"] <= counts["seen"]
        indices = [i for batch, _, _ in trained for i in batch]
        if not c.with_replacement:  # twice only when carried over from the last epoch and selected again
            twice = {i for i in indices if indices.count(i) > 1}
            assert twice <= set(carried), f"{name}: {twice} trained twice in epoch {epoch}"
        assert set(indices) <= set(range(N))
        carried = queued_indices(selector)
    (leftover,) = selector.flush() or [None]  # the very end: flush returns what is still queued
    assert (leftover is None) == (not carried)


def test_an_empty_batch_is_a_no_op(case):
    name, c = case
    net = model()
    selector = c.build(net)
    run(selector, net, range(2))
    before = selector.state_dict()
    x, y = data()
    assert selector.select(x[:0], y[:0], torch.arange(0)) == []
    after = selector.state_dict()
    before["counters"], after["counters"] = untimed(before["counters"]), untimed(after["counters"])
    assert same(after, before)
