"""Selector: coin flips, queue, priming, StaleSB cache, counters, state, errors."""

from __future__ import annotations

import pytest
import torch
from scipy import stats
from torch import nn

from selective_backprop import (
    BackpropQueue,
    ClampPolicy,
    PercentilePolicy,
    SelectiveBackprop,
    Traditional,
    UniformPolicy,
)
from selective_backprop.policies import Policy, percentile_probabilities


class IndexLossModel(nn.Module):
    """A 'model' whose cross-entropy on example i is a known function of i (inputs carry the index).

    logits = [0, x] with target 0 gives loss softplus(x); x = (index * 7919 % 101) / 10 scrambles the order.
    It counts how many examples each forward saw and in which mode.
    """

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(()))
        self.calls: list[tuple[int, bool]] = []

    @staticmethod
    def value(index: torch.Tensor) -> torch.Tensor:
        return (index * 7919 % 101).float() / 10

    @staticmethod
    def loss_of(index: torch.Tensor) -> torch.Tensor:
        return nn.functional.softplus(IndexLossModel.value(index)).double()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append((len(x), self.training))
        v = self.scale * x[:, 0]
        return torch.stack([torch.zeros_like(v), v], dim=1)


def index_data(n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    idx = torch.arange(n)
    return IndexLossModel.value(idx)[:, None], torch.zeros(n, dtype=torch.long), idx


class Spy:
    """Wraps a policy and records the losses it is asked about."""

    def __init__(self, inner: Policy) -> None:
        self.inner, self.seen = inner, []
        self.needs_loss, self.selects_all = inner.needs_loss, inner.selects_all

    def __call__(self, losses):
        self.seen.append(losses.clone())
        return self.inner(losses)

    def record(self, losses):
        self.inner.record(losses)

    def state_dict(self):
        return self.inner.state_dict()

    def load_state_dict(self, s):
        self.inner.load_state_dict(s)


def batches_of(n: int, size: int, perm_seed: int | None = None):
    x, y, idx = index_data(n)
    order = (
        torch.arange(n) if perm_seed is None else torch.randperm(n, generator=torch.Generator().manual_seed(perm_seed))
    )
    for s in range(0, n, size):
        o = order[s : s + size]
        yield x[o], y[o], idx[o]


class TestQueue:
    def test_exactly_once_in_order_across_random_pushes(self):
        gen = torch.Generator().manual_seed(0)
        q, out, pushed = BackpropQueue(7), [], 0
        for _ in range(50):
            m = int(torch.randint(0, 20, (1,), generator=gen))
            for (b,) in q.push(torch.arange(pushed, pushed + m)):
                assert len(b) == 7
                out.append(b)
            pushed += m
            assert len(q) == pushed - 7 * len(out) < 7
        rest = q.flush()
        got = torch.cat(out + ([rest[0]] if rest is not None else []))
        assert got.tolist() == list(range(pushed))
        assert q.flush() is None and len(q) == 0

    def test_carries_several_fields_and_none(self):
        q = BackpropQueue(3)
        assert q.push(torch.arange(2), torch.arange(2) * 10, None) == []
        ((a, b, c),) = q.push(torch.arange(2, 4), torch.arange(2, 4) * 10, None)
        assert a.tolist() == [0, 1, 2] and b.tolist() == [0, 10, 20] and c is None

    def test_state_round_trip(self):
        q = BackpropQueue(4)
        q.push(torch.arange(3))
        r = BackpropQueue(1)
        r.load_state_dict(q.state_dict())
        assert [b[0].tolist() for b in r.push(torch.arange(3, 5))] == [[0, 1, 2, 3]]
        assert r.flush()[0].tolist() == [4]

    def test_bad_batch_size(self):
        with pytest.raises(ValueError, match="batch_size must be an int >= 1"):
            BackpropQueue(0)


class TestSelection:
    def test_scoring_forward_is_eval_no_grad_and_mode_restored(self):
        model = IndexLossModel()
        sb = SelectiveBackprop(model, batch_size=4, beta=1, prime_epochs=0)
        x, y, idx = index_data(8)
        model.train()
        sb.select(x, y, idx)
        assert model.calls == [(8, False)] and model.training
        model.eval()
        sb.select(x, y, idx)
        assert not model.training

    def test_train_score_mode(self):
        model = IndexLossModel()
        sb = SelectiveBackprop(model, batch_size=4, beta=1, prime_epochs=0, score_mode="train")
        sb.select(*index_data(8))
        assert model.calls == [(8, True)]

    def test_selected_examples_are_those_whose_coin_is_below_p(self):
        model = IndexLossModel()
        sb = SelectiveBackprop(model, batch_size=1, beta=1.5, prime_epochs=0, seed=7)
        x, y, idx = index_data(64)
        batches = sb.select(x, y, idx)
        ref = PercentilePolicy(1.5)
        p = ref(IndexLossModel.loss_of(idx))
        u = torch.rand(64, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
        expected = idx[u < p]
        assert torch.cat([b.indices for b in batches]).tolist() == expected.tolist()

    def test_p_zero_never_and_p_one_always(self):
        x, y, idx = index_data(500)
        losses = IndexLossModel.loss_of(idx)
        thr = float(losses.median())
        sb = SelectiveBackprop(IndexLossModel(), batch_size=1, policy=_Threshold(thr), prime_epochs=0)
        got = torch.cat([b.indices for b in sb.select(x, y, idx)])
        assert got.tolist() == idx[losses >= thr].tolist()

    @pytest.mark.parametrize("beta", [1.0, 2.0, 3.0])
    def test_selected_fraction_for_iid_losses(self, beta):
        """i.i.d. continuous losses: the selected fraction -> 1/(beta+1) (binomial bound at 1e-6)."""
        n, bs = 40 * 128, 128
        gen = torch.Generator().manual_seed(11)
        model = _RandomLossModel(gen)
        sb = SelectiveBackprop(model, batch_size=bs, beta=beta, prime_epochs=0, seed=5)
        sb.policy.record(torch.rand(1024, generator=gen))  # start from a full history
        for _ in range(n // bs):
            sb.select(torch.zeros(bs, 1), torch.zeros(bs, dtype=torch.long))
        q = float(((torch.arange(1024, dtype=torch.float64) / 1024) ** beta).mean())  # exact E[p]
        lo, hi = stats.binom.interval(1 - 1e-6, n, q)
        assert lo <= sb.counters["selected"] <= hi

    def test_selection_frequency_matches_p_per_level(self):
        """Each example selected with its own p: per-group frequencies within binomial bounds."""
        levels = torch.tensor([0.1, 0.5, 0.8]).repeat_interleave(100)
        sb = SelectiveBackprop(
            _ConstModel(), batch_size=1, policy=ClampPolicy(), loss_fn=_feature_loss, prime_epochs=0, seed=3
        )
        counts = torch.zeros(300)
        x, y, idx = levels[:, None], torch.zeros(300, dtype=torch.long), torch.arange(300)
        reps = 200
        for _ in range(reps):
            for b in sb.select(x, y, idx):
                counts[b.indices] += 1
        for k, p in enumerate((0.1, 0.5, 0.8)):
            total = int(counts[k * 100 : (k + 1) * 100].sum())
            lo, hi = stats.binom.interval(1 - 1e-6, 100 * reps, p)
            assert lo <= total <= hi


class _Threshold:
    needs_loss = True
    selects_all = False

    def __init__(self, t):
        self.t = t

    def record(self, losses):
        pass

    def __call__(self, losses):
        return (losses >= self.t).double()

    def state_dict(self):
        return {}

    def load_state_dict(self, s):
        pass


class _RandomLossModel(nn.Module):
    """Outputs random logits so cross-entropy losses are i.i.d. and continuous."""

    def __init__(self, gen):
        super().__init__()
        self.gen = gen

    def forward(self, x):
        return torch.stack([torch.zeros(len(x)), torch.randn(len(x), generator=self.gen) * 3], 1)


class _ConstModel(nn.Module):
    """loss_fn below returns the input feature as the loss."""

    def forward(self, x):
        return x


def _feature_loss(outputs, targets):
    return outputs[:, 0]


class TestQueueAndPriming:
    def test_every_selected_example_backpropagated_once_per_epoch(self):
        sb = SelectiveBackprop(IndexLossModel(), batch_size=16, beta=1, prime_epochs=1, seed=1)
        for epoch in range(3):
            got = []
            for b in sb.iterate(batches_of(200, 24, perm_seed=epoch)):
                b.loss(sb.model(b.inputs))
                got.append(b.indices)
            assert {len(g) for g in got[:-1]} == {16} and 0 < len(got[-1]) <= 16  # only the flush is short
            got = torch.cat(got)
            assert len(set(got.tolist())) == len(got)  # no example twice within an epoch
            if epoch == 0:
                assert sorted(got.tolist()) == list(range(200))  # priming: every example
        c = sb.counters
        assert c["backpropagated"] == c["selected"] and len(sb.queue) == 0

    def test_only_full_batches_until_flush(self):
        sb = SelectiveBackprop(IndexLossModel(), batch_size=16, beta=1, prime_epochs=0, flush="never")
        sizes = [len(b) for data in batches_of(300, 10) for b in sb.select(*data)]
        assert set(sizes) == {16}
        assert sb.end_epoch() == []  # flush="never": carried over
        rest = sb.flush()
        assert sum(sizes) + sum(len(b) for b in rest) == sb.counters["selected"]

    def test_priming_skips_scoring_and_fills_history_with_train_losses(self):
        model = IndexLossModel()
        sb = SelectiveBackprop(model, batch_size=8, beta=1, prime_epochs=1)
        for b in sb.iterate(batches_of(32, 8)):
            assert b.primed
            b.loss(model(b.inputs))
        assert model.calls == [(8, True)] * 4  # only training forwards
        assert sb.counters["selection_forwards"] == 0
        history = sb.policy.history.sort().values
        assert torch.allclose(history, IndexLossModel.loss_of(torch.arange(32)).sort().values)
        assert not sb.priming

    def test_the_first_selective_batch_is_ranked_against_the_primed_losses(self):
        model, n = IndexLossModel(), 40
        spy = Spy(PercentilePolicy(beta=1.0))
        sb = SelectiveBackprop(model, batch_size=1, policy=spy, prime_epochs=1, seed=4)
        for b in sb.iterate(batches_of(n, 8)):
            b.loss(model(b.inputs))
        x, y, idx = index_data(n)
        before = sb.generator(torch.device("cpu")).get_state()
        chosen = torch.cat([b.indices for b in sb.select(x[:8], y[:8], idx[:8])] + [idx[:0]])
        primed = IndexLossModel.loss_of(torch.arange(n))  # the history: 40 primed losses, then this batch's 8
        expected = percentile_probabilities(torch.cat([primed, primed[:8]]), primed[:8], beta=1.0)
        coins = torch.rand(8, generator=torch.Generator().set_state(before), dtype=torch.float64)
        assert chosen.tolist() == idx[:8][coins < expected].tolist() and 0 < len(chosen) < 8
        assert len(spy.seen[-1]) == 8 and len(sb.policy.inner) == n + 8

    def test_prime_epochs_zero(self):
        model = IndexLossModel()
        sb = SelectiveBackprop(model, batch_size=8, beta=1, prime_epochs=0)
        sb.select(*index_data(8))
        assert model.calls == [(8, False)]

    def test_traditional_yields_loader_batches_untouched(self):
        model = IndexLossModel()
        sb = SelectiveBackprop(model, batch_size=8, policy=Traditional(), prime_epochs=0)
        data = list(batches_of(20, 8))
        out = list(sb.iterate(data))
        assert [len(b) for b in out] == [8, 8, 4]
        assert out[0].inputs is data[0][0]  # same tensor: no copy, no scoring forward
        assert model.calls == []

    def test_uniform_policy_runs_no_forward(self):
        model = IndexLossModel()
        sb = SelectiveBackprop(model, batch_size=8, policy=UniformPolicy(0.5), prime_epochs=0)
        sb.select(*index_data(64))
        assert model.calls == [] and 0 < sb.counters["selected"] < 64


class TestStaleSB:
    @pytest.mark.parametrize("staleness,prime", [(3, 1), (3, 0), (2, 1), (1, 0)])
    def test_forward_schedule(self, staleness, prime):
        n, epochs = 48, 8
        model = IndexLossModel()
        sb = SelectiveBackprop(
            model, batch_size=8, beta=1, staleness=staleness, dataset_size=n, prime_epochs=prime, seed=2
        )
        per_epoch = []
        for epoch in range(epochs):
            before = sb.counters
            for b in sb.iterate(batches_of(n, 12, perm_seed=epoch)):
                b.loss(model(b.inputs))
            after = sb.counters
            per_epoch.append(
                (
                    after["selection_forwards"] - before["selection_forwards"],
                    after["skipped_forwards"] - before["skipped_forwards"],
                )
            )
        expected = []
        for epoch in range(epochs):
            if epoch < prime:
                expected.append((0, 0))
            else:  # fresh at visits 0, n, 2n, ... counted from the first visit that had a loss
                fresh = epoch % staleness == 0
                expected.append((n, 0) if fresh else (0, n))
        assert per_epoch == expected

    def test_only_stale_examples_are_forwarded_and_losses_stay_aligned(self):
        model = IndexLossModel()
        spy = Spy(PercentilePolicy(1.0))
        sb = SelectiveBackprop(model, batch_size=4, policy=spy, staleness=3, dataset_size=64, prime_epochs=0)
        x, y, idx = index_data(64)
        sb.select(x[:8], y[:8], idx[:8])  # scores 0..7
        model.calls.clear()
        order = torch.tensor([8, 0, 9, 1, 10, 2, 11, 3])  # stale (cached) items interleaved with new ones
        sb.select(x[order], y[order], idx[order])
        assert model.calls == [(4, False)]  # only 8..11 forwarded
        assert torch.allclose(spy.seen[-1], IndexLossModel.loss_of(order))
        assert sb.counters["selection_forwards"] == 12 and sb.counters["skipped_forwards"] == 4

    def test_backprop_refreshes_cached_loss_but_not_age(self):
        model = IndexLossModel()
        sb = SelectiveBackprop(model, batch_size=2, policy=Traditional(), staleness=3, dataset_size=4, prime_epochs=1)
        for b in sb.iterate(batches_of(4, 2)):
            b.loss(model(b.inputs))
        assert sb.cache.valid.all() and (sb.cache.age == 0).all()
        assert torch.allclose(sb.cache.loss, IndexLossModel.loss_of(torch.arange(4)))

    def test_needs_indices_and_dataset_size(self):
        with pytest.raises(ValueError, match="dataset_size"):
            SelectiveBackprop(IndexLossModel(), staleness=3)
        sb = SelectiveBackprop(IndexLossModel(), batch_size=4, staleness=3, dataset_size=8, prime_epochs=0)
        x, y, _ = index_data(8)
        with pytest.raises(ValueError, match="needs dataset indices"):
            sb.select(x, y)
        with pytest.raises(ValueError, match=r"dataset index 8 at batch position 0 is out of range"):
            sb.select(x[:1], y[:1], torch.tensor([8]))

    def test_bad_staleness(self):
        with pytest.raises(ValueError, match="staleness must be an int >= 1"):
            SelectiveBackprop(IndexLossModel(), staleness=0, dataset_size=4)


class TestCountersAndState:
    def test_counters_consistent_and_resettable(self):
        model = IndexLossModel()
        sb = SelectiveBackprop(model, batch_size=8, beta=2, prime_epochs=1)
        for _ in range(3):
            for b in sb.iterate(batches_of(64, 16, perm_seed=0)):
                b.loss(model(b.inputs))
        c = sb.counters
        assert c["seen"] == 192 and c["selection_forwards"] == 128
        assert c["backpropagated"] + len(sb.queue) == c["selected"] and c["steps"] >= c["backpropagated"] / 8
        assert len(sb.queue) < sb.min_batch_size
        assert c["select_time_s"] > 0 and c["score_time_s"] > 0
        sb.reset_counters()
        assert all(v == 0 for v in sb.counters.values())

    def test_state_for_another_policy_is_refused(self):
        a = SelectiveBackprop(IndexLossModel(), policy=UniformPolicy(0.5))
        b = SelectiveBackprop(IndexLossModel(), beta=2)
        with pytest.raises(ValueError, match="UniformPolicy"):
            b.load_state_dict(a.state_dict())


class TestBadInput:
    def test_length_mismatch(self):
        sb = SelectiveBackprop(IndexLossModel(), prime_epochs=0)
        x, y, idx = index_data(4)
        with pytest.raises(ValueError, match="inputs 4, targets 3, indices 4"):
            sb.select(x, y[:3], idx)

    def test_float_indices(self):
        sb = SelectiveBackprop(IndexLossModel(), prime_epochs=0)
        x, y, idx = index_data(4)
        with pytest.raises(ValueError, match="indices must be a 1-D integer tensor"):
            sb.select(x, y, idx.float())

    def test_empty_batch_is_a_no_op_and_batch_of_one_works(self):
        model = IndexLossModel()
        sb = SelectiveBackprop(model, batch_size=1, beta=1, prime_epochs=0, seed=0)
        x, y, idx = index_data(4)
        assert sb.select(x[:0], y[:0], idx[:0]) == [] and sb.counters["seen"] == 0 and model.calls == []
        sb.select(x[:1], y[:1], idx[:1])  # a lone example has p = 0 (nothing below it)
        assert sb.counters["seen"] == 1 and sb.counters["selected"] == 0

    def test_nonfinite_selection_loss_raise_and_skip(self):
        x = torch.tensor([[0.5], [float("nan")], [2.0]])
        y = torch.zeros(3, dtype=torch.long)
        sb = SelectiveBackprop(_ConstModel(), batch_size=1, policy=ClampPolicy(), loss_fn=_feature_loss, prime_epochs=0)
        with pytest.raises(ValueError, match="batch position 1"):
            sb.select(x, y)
        sb = SelectiveBackprop(
            _ConstModel(),
            batch_size=1,
            policy=PercentilePolicy(1.0),
            loss_fn=_feature_loss,
            prime_epochs=0,
            nonfinite="skip",
        )
        sb.select(x, y, torch.arange(3))
        assert sb.policy.history.tolist() == [0.5, 2.0]  # the NaN was not recorded
        sb2 = SelectiveBackprop(
            _ConstModel(),
            batch_size=1,
            policy=ClampPolicy(),
            loss_fn=_feature_loss,
            prime_epochs=0,
            nonfinite="skip",
        )
        got = [int(b.indices) for _ in range(50) for b in sb2.select(x, y, torch.arange(3))]
        assert 1 not in got and 2 in got

    def test_nonfinite_training_loss_names_indices(self):
        sb = SelectiveBackprop(_ConstModel(), batch_size=3, policy=Traditional(), loss_fn=_feature_loss)
        x = torch.tensor([[0.5], [float("inf")], [2.0]])
        (b,) = sb.select(x, torch.zeros(3, dtype=torch.long), torch.tensor([10, 11, 12]))
        with pytest.raises(ValueError, match=r"dataset indices \[11\]"):
            b.loss(b.inputs)

    def test_loss_fn_must_be_per_example(self):
        sb = SelectiveBackprop(IndexLossModel(), prime_epochs=0, loss_fn=nn.CrossEntropyLoss())
        with pytest.raises(ValueError, match="reduction='none'"):
            sb.select(*index_data(4))

    @pytest.mark.parametrize(
        "kwargs,match",
        [
            ({"beta": 0}, "beta must be"),
            ({"beta": float("nan")}, "beta must be"),
            ({"prime_epochs": -1}, "prime_epochs"),
            ({"score_mode": "test"}, "score_mode"),
            ({"nonfinite": "ignore"}, "nonfinite"),
            ({"flush": "sometimes"}, "flush"),
            ({"batch_size": 0}, "batch_size"),
        ],
    )
    def test_bad_arguments(self, kwargs, match):
        with pytest.raises(ValueError, match=match):
            SelectiveBackprop(IndexLossModel(), **kwargs)

    def test_loader_must_yield_tuples(self):
        sb = SelectiveBackprop(IndexLossModel())
        with pytest.raises(TypeError, match=r"\(inputs, targets\) or \(inputs, targets, indices\)"):
            list(sb.iterate([torch.zeros(3)]))


def test_state_taken_before_the_first_coin_carries_the_seed():
    x, y, idx = index_data(64)
    a = SelectiveBackprop(IndexLossModel(), batch_size=4, beta=1, prime_epochs=0, seed=5)
    b = SelectiveBackprop(IndexLossModel(), batch_size=4, beta=1, prime_epochs=0, seed=99)
    b.load_state_dict(a.state_dict())
    assert [t.indices.tolist() for t in a.select(x, y, idx)] == [t.indices.tolist() for t in b.select(x, y, idx)]


class _Fixed:
    """A policy that returns given probabilities, whatever the losses (the coin boundary is then known)."""

    needs_loss, selects_all = False, False

    def __init__(self, p: torch.Tensor) -> None:
        self.p = p

    def __call__(self, losses):
        return self.p[: len(losses)]

    def record(self, losses):
        pass

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


def test_an_example_is_selected_iff_its_coin_is_strictly_below_p():
    """p equal to the selector's own coin is not selected; the next float64 above it is (u < p, not u <= p)."""
    seed, m = 11, 64
    x, y, idx = index_data(m)
    coins = torch.rand(m, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)  # the selector's draws
    at = SelectiveBackprop(IndexLossModel(), batch_size=1, policy=_Fixed(coins), prime_epochs=0, seed=seed)
    assert at.select(x, y, idx) == [] and at.counters["selected"] == 0
    above = _Fixed(torch.nextafter(coins, torch.ones_like(coins)))
    sb = SelectiveBackprop(IndexLossModel(), batch_size=1, policy=above, prime_epochs=0, seed=seed)
    assert torch.cat([b.indices for b in sb.select(x, y, idx)]).tolist() == idx.tolist()
    below = _Fixed(torch.nextafter(coins, torch.zeros_like(coins)))
    sb = SelectiveBackprop(IndexLossModel(), batch_size=1, policy=below, prime_epochs=0, seed=seed)
    assert sb.select(x, y, idx) == []


class _TrainShift(IndexLossModel):
    """Train-mode logits are twice the eval-mode ones: a training loss always differs from its scoring loss."""

    def forward(self, x):
        out = super().forward(x)
        return out * 2 if self.training else out


@pytest.mark.parametrize("refresh", [True, False])
def test_stale_sb_refreshes_a_backpropagated_examples_cached_loss_with_its_training_loss(refresh):
    model = _TrainShift()
    sb = SelectiveBackprop(model, batch_size=4, beta=1, staleness=3, dataset_size=32, prime_epochs=0,
                           refresh_on_backprop=refresh, seed=2)  # fmt: skip
    x, y, idx = index_data(32)
    trained = []
    for batch in sb.select(x, y, idx) + sb.end_epoch():
        batch.loss(model(batch.inputs))
        trained.append(batch.indices)
    trained = torch.cat(trained)
    others = torch.tensor(sorted(set(range(32)) - set(trained.tolist())))
    assert 0 < len(trained) < 32
    scoring = IndexLossModel.loss_of(idx)  # eval mode: the plain losses
    training = nn.functional.softplus(2 * IndexLossModel.value(idx)).double()
    expected = training[trained] if refresh else scoring[trained]
    assert torch.allclose(sb.cache.loss[trained], expected) and not torch.allclose(training[trained], scoring[trained])
    assert torch.allclose(sb.cache.loss[others], scoring[others])
    assert (sb.cache.age == 0).all()  # a refresh is not a fresh scoring forward: ages are untouched
