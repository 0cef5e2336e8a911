"""Property tests: the policy, the queue, the StaleSB cache and selector state against small reference models."""

from __future__ import annotations

import io
import random

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from selective_backprop import SelectiveBackprop
from selective_backprop.policies import PercentilePolicy
from selective_backprop.queue import BackpropQueue, LossCache

FAST = settings(max_examples=100, deadline=None)

# Small integers, halved: many ties, every value exact in float16/32/64.
loss_batches = st.lists(st.lists(st.integers(0, 6), max_size=12), max_size=8)


@FAST
@given(
    batches=loss_batches,
    beta=st.sampled_from([0.5, 1.0, 2.0, 3.0, 4.5]),
    history_size=st.integers(1, 20),
    floor=st.sampled_from([0.0, 0.05, 0.5, 1.0]),
    dtype=st.sampled_from([torch.float16, torch.float32, torch.float64]),
)
def test_percentile_policy_matches_a_naive_reference(batches, beta, history_size, floor, dtype):
    policy, history = PercentilePolicy(beta, history_size, floor), []
    for batch in batches:
        values = [v / 2 for v in batch]
        history = (history + values)[-history_size:]  # the batch is appended first, then the oldest evicted
        expected = [max(floor, (sum(h < v for h in history) / len(history)) ** beta) for v in values]
        got = policy(torch.tensor(values, dtype=dtype))
        assert got.dtype == torch.float64 and np.allclose(got, expected, rtol=1e-12, atol=0)
        assert policy.history.tolist() == history


@FAST
@given(
    batch_size=st.integers(1, 9),
    pushes=st.lists(st.integers(0, 25), max_size=12),
    restore_at=st.integers(0, 12),
)
def test_backprop_queue_is_exactly_once_fifo_in_full_batches(batch_size, pushes, restore_at):
    queue, out, pushed = BackpropQueue(batch_size), [], 0
    for k, n in enumerate(pushes):
        if k == restore_at:  # a state_dict round trip changes nothing
            queue, state = BackpropQueue(1), queue.state_dict()
            queue.load_state_dict(state)
        ids = torch.arange(pushed, pushed + n)
        pushed += n
        for batch in queue.push(ids, -ids, None):
            assert len(batch[0]) == batch_size and torch.equal(batch[1], -batch[0]) and batch[2] is None
            out += batch[0].tolist()
        assert len(queue) == pushed - len(out) < batch_size
    rest = queue.flush()
    if rest is not None:
        assert 0 < len(rest[0]) < batch_size
        out += rest[0].tolist()
    assert out == list(range(pushed)) and queue.flush() is None and len(queue) == 0


@FAST
@given(
    size=st.integers(1, 12),
    staleness=st.integers(1, 4),
    data=st.data(),
)
def test_loss_cache_refreshes_each_index_on_its_own_schedule(size, staleness, data):
    """Reference, per index: fresh iff never validly scored or ``staleness`` visits since the last fresh loss."""
    cache = LossCache(size, staleness)
    visits, last, valid, loss = [0] * size, [0] * size, [False] * size, [0.0] * size
    ever_nan = set()
    for _ in range(data.draw(st.integers(0, 10))):
        idx = data.draw(st.lists(st.integers(0, size - 1), unique=True, max_size=size))
        need = cache.visit(torch.tensor(idx, dtype=torch.int64)).tolist()
        for i, fresh in zip(idx, need, strict=True):
            expected = not valid[i] or visits[i] - last[i] >= staleness
            assert fresh == expected
            if i not in ever_nan:
                assert fresh == (visits[i] % staleness == 0)  # fresh losses at visits 0, n, 2n, ...
            if fresh:
                last[i] = visits[i]
            visits[i] += 1
        scored = [i for i, fresh in zip(idx, need, strict=True) if fresh]
        values = [data.draw(st.sampled_from([0.5, 1.5, float("nan"), float("inf")])) for _ in scored]
        cache.store(torch.tensor(scored, dtype=torch.int64), torch.tensor(values, dtype=torch.float64))
        for i, v in zip(scored, values, strict=True):
            if np.isfinite(v):
                valid[i], loss[i] = True, v
            else:
                ever_nan.add(i)
        backprop = data.draw(st.lists(st.sampled_from(idx), unique=True)) if idx else []
        cache.store(torch.tensor(backprop, dtype=torch.int64), torch.full((len(backprop),), 2.5), fresh=False)
        for i in backprop:  # a training loss refreshes the value, not the age
            valid[i], loss[i] = True, 2.5
    assert cache.valid.tolist() == valid
    assert [cache.loss[i].item() for i in range(size) if valid[i]] == [loss[i] for i in range(size) if valid[i]]


def _run(sb: SelectiveBackprop, model: nn.Module, steps: list, x: torch.Tensor, y: torch.Tensor) -> list[list[int]]:
    """Feed ``steps`` (index lists, or ``None`` for an epoch end); train-loss every batch; the selected indices."""
    picked = []
    for step in steps:
        batches = sb.end_epoch() if step is None else sb.select(x[step], y[step], torch.tensor(step, dtype=torch.int64))
        for batch in batches:
            with torch.no_grad():
                batch.loss(model(batch.inputs))
            picked.append(batch.indices.tolist())
    return picked


@settings(max_examples=60, deadline=None)
@given(
    batch_size=st.integers(1, 10),
    staleness=st.sampled_from([None, 1, 2, 3]),
    prime_epochs=st.integers(0, 1),
    seed=st.integers(0, 2**31 - 1),
    data=st.data(),
)
def test_state_dict_round_trip_continues_identically_and_leaves_global_rngs_alone(batch_size, staleness, prime_epochs,
                                                                                   seed, data):  # fmt: skip
    n = 40
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n, 4, generator=g), torch.randint(0, 3, (n,), generator=g)
    model = nn.Linear(4, 3)
    with torch.no_grad():
        model.weight.copy_(torch.randn(3, 4, generator=g))
    sizes = st.lists(st.integers(0, 2 * batch_size + 3), max_size=5)
    epochs = data.draw(st.lists(sizes, min_size=1, max_size=4))
    steps = []
    for epoch in epochs:
        order = torch.randperm(n, generator=g).tolist()
        steps += [order[:k] for k in epoch] + [None]
    cut = data.draw(st.integers(0, len(steps)))

    def selector(seed_: int) -> SelectiveBackprop:
        return SelectiveBackprop(model, batch_size, beta=1.0, staleness=staleness, dataset_size=n,
                                 prime_epochs=prime_epochs, seed=seed_)  # fmt: skip

    rngs = torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()
    reference = selector(seed)
    expected = _run(reference, model, steps, x, y)
    first = selector(seed)
    before = _run(first, model, steps[:cut], x, y)
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)  # as in a checkpoint file
    buffer.seek(0)
    state = torch.load(buffer, weights_only=False)
    # Another seed: the generator's state (or, before the first coin flip, the seed) must come from the state_dict.
    resumed = selector(seed + 1)
    resumed.load_state_dict(state)
    assert before + _run(resumed, model, steps[cut:], x, y) == expected
    assert resumed.counters | {"select_time_s": 0, "score_time_s": 0} == reference.counters | {
        "select_time_s": 0, "score_time_s": 0}  # fmt: skip
    assert torch.equal(torch.get_rng_state(), rngs[0])
    assert np.array_equal(np.random.get_state()[1], rngs[1]) and random.getstate() == rngs[2]
