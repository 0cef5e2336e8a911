"""Policies: exact hand-computed cases, equivalence with the authors' per-example rule, statistics, errors."""

from __future__ import annotations

import collections
import math

import pytest
import torch
from scipy import stats
from torch import nn

from selective_backprop import SelectiveBackprop
from selective_backprop.policies import (
    ClampPolicy,
    PercentilePolicy,
    ThresholdPolicy,
    Traditional,
    UniformPolicy,
    percentile_probabilities,
)


class AuthorsReference:
    """The authors' BatchedRelativeProbabilityCalculator + UnboundedHistogram, one example at a time."""

    def __init__(self, beta: float, history: int, floor: float = 0.0) -> None:
        self.beta, self.floor = beta, floor
        self.history: collections.deque[float] = collections.deque(maxlen=history)

    def __call__(self, losses: list[float]) -> list[float]:
        for loss in losses:
            self.history.append(loss)
        out = []
        for loss in losses:
            below = sum(1 for h in self.history if h < loss)
            percentile = below * 100.0 / len(self.history)
            out.append(max(self.floor, math.pow(percentile / 100.0, self.beta)))
        return out


class TestPercentileExact:
    def test_warm_up_before_history_is_full(self):
        policy = PercentilePolicy(beta=1.0, history_size=8)
        assert policy(torch.tensor([2.0])).tolist() == [0.0]  # own loss in n, never in c
        assert policy(torch.tensor([1.0, 3.0])).tolist() == [0.0, 2 / 3]
        assert len(policy) == 3

    def test_ties_count_for_nothing(self):
        policy = PercentilePolicy(beta=1.0, history_size=16)
        p = policy(torch.tensor([1.0, 1.0, 1.0, 2.0, 2.0]))
        assert p.tolist() == [0.0, 0.0, 0.0, 3 / 5, 3 / 5]

    def test_all_equal_losses_give_floor(self):
        assert PercentilePolicy(beta=2.0)(torch.full((10,), 0.7)).tolist() == [0.0] * 10
        assert PercentilePolicy(beta=2.0, floor=0.05)(torch.full((4,), 0.7)).tolist() == [0.05] * 4

    def test_ring_wraps_at_history_size(self):
        policy = PercentilePolicy(beta=1.0, history_size=4)
        policy(torch.tensor([10.0, 20.0, 30.0]))
        # history after append: [20, 30, 5, 6] (10 evicted); 25 > {20, 5, 6}
        assert policy(torch.tensor([5.0, 6.0])).tolist() == [0.0, 0.25]
        assert policy.history.tolist() == [20.0, 30.0, 5.0, 6.0]
        p = policy(torch.tensor([25.0]))
        assert policy.history.tolist() == [30.0, 5.0, 6.0, 25.0]
        assert p.tolist() == [0.5]

    def test_batch_longer_than_history_evicts_its_own_head(self):
        policy = PercentilePolicy(beta=1.0, history_size=2)
        # history keeps only [1, 2]: the evicted 5 beats both (p = 1 is possible only in this case)
        p = policy(torch.tensor([5.0, 1.0, 2.0]))
        assert p.tolist() == [1.0, 0.0, 0.5]
        assert policy.history.tolist() == [1.0, 2.0]

    def test_beta_and_floor(self):
        policy = PercentilePolicy(beta=3.0, history_size=16, floor=0.01)
        p = policy(torch.tensor([1.0, 2.0, 3.0, 4.0]))
        assert p.tolist() == [0.01, 0.25**3, 0.5**3, 0.75**3]

    def test_record_feeds_history_without_scoring(self):
        policy = PercentilePolicy(beta=1.0, history_size=8)
        policy.record(torch.tensor([1.0, 2.0, 3.0]))
        assert policy(torch.tensor([2.5])).tolist() == [0.5]

    def test_empty_batch_is_a_no_op(self):
        policy = PercentilePolicy(beta=1.0)
        assert policy(torch.empty(0)).numel() == 0
        assert len(policy) == 0

    def test_pure_function_matches_class(self):
        h = torch.tensor([0.3, 0.1, 0.2, 0.2])
        assert percentile_probabilities(h, torch.tensor([0.2, 0.3]), beta=2.0).tolist() == [0.25**2, 0.75**2]


@pytest.mark.parametrize("beta,history,floor", [(1.0, 7, 0.0), (3.0, 64, 0.0), (2.5, 1024, 0.02)])
def test_equivalent_to_authors_per_example_rule(beta, history, floor):
    gen = torch.Generator().manual_seed(1)
    ours, ref = PercentilePolicy(beta, history, floor), AuthorsReference(beta, history, floor)
    for _ in range(60):
        m = int(torch.randint(1, 3 * history // 2 + 2, (1,), generator=gen))
        # rounded values make ties frequent
        losses = (torch.rand(m, generator=gen, dtype=torch.float64) * 20).round() / 4
        expected = ref(losses.tolist())
        got = ours(losses.to(torch.float32)).tolist()
        assert got == pytest.approx(expected, rel=1e-12, abs=0)


def test_float32_losses_keep_exact_ties_and_order():
    policy = PercentilePolicy(beta=1.0, history_size=8)
    a = torch.tensor([0.1], dtype=torch.float32)
    b = torch.nextafter(a, torch.tensor([1.0]))  # the next float32 above 0.1
    assert policy(torch.cat([a, b])).tolist() == [0.0, 0.5]


@pytest.mark.parametrize("beta", [1.0, 2.0, 3.0])
def test_expected_probability_for_iid_losses(beta):
    """For i.i.d. continuous losses with a full history, c_i is uniform on {0..n-1}: E[p] = mean((c/n)^beta)."""
    gen = torch.Generator().manual_seed(int(beta))
    policy = PercentilePolicy(beta, history_size=1024)
    policy.record(torch.rand(1024, generator=gen))
    probs = torch.cat([policy(torch.rand(128, generator=gen)) for _ in range(200)])
    exact = float(((torch.arange(1024, dtype=torch.float64) / 1024) ** beta).mean())
    # p = U^beta on [0, 1] has variance 1/(2b+1) - 1/(b+1)^2; 6-sigma bound on the mean of 25,600 values
    var = 1 / (2 * beta + 1) - 1 / (beta + 1) ** 2
    assert abs(float(probs.mean()) - exact) < 6 * math.sqrt(var / len(probs))


class TestOtherPolicies:
    def test_threshold(self):
        assert ThresholdPolicy(0.5)(torch.tensor([0.4, 0.5, 9.0])).tolist() == [0.0, 1.0, 1.0]

    def test_clamp(self):
        assert ClampPolicy()(torch.tensor([-1.0, 0.3, 2.0])).tolist() == [0.0, pytest.approx(0.3), 1.0]

    def test_uniform_and_traditional_need_no_loss(self):
        assert not UniformPolicy(0.2).needs_loss and not Traditional().needs_loss
        assert PercentilePolicy().needs_loss and ClampPolicy().needs_loss
        assert UniformPolicy(0.2)(torch.zeros(3)).tolist() == [0.2] * 3
        assert Traditional()(torch.zeros(2)).tolist() == [1.0, 1.0]


class TestBadInput:
    @pytest.mark.parametrize("beta", [0, -1.0, float("nan"), float("inf"), True])
    def test_beta(self, beta):
        with pytest.raises(ValueError, match="beta must be a finite number > 0"):
            PercentilePolicy(beta)

    @pytest.mark.parametrize("size", [0, -5, 2.5])
    def test_history_size(self, size):
        with pytest.raises(ValueError, match="history_size must be an int >= 1"):
            PercentilePolicy(1.0, history_size=size)

    @pytest.mark.parametrize("rate", [-0.1, 1.5, float("nan")])
    def test_rate(self, rate):
        with pytest.raises(ValueError, match=r"rate must be a probability in \[0, 1\]"):
            UniformPolicy(rate)

    def test_non_1d_losses(self):
        with pytest.raises(ValueError, match=r"must be 1-D .* got shape \(2, 3\)"):
            PercentilePolicy()(torch.zeros(2, 3))

    @pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
    def test_nonfinite_names_the_position(self, bad):
        policy = PercentilePolicy()
        with pytest.raises(ValueError, match="at batch position 2"):
            policy(torch.tensor([0.1, 0.2, bad, 0.3]))
        assert len(policy) == 0  # nothing recorded

    def test_threshold_must_be_finite(self):
        with pytest.raises(ValueError, match="threshold"):
            ThresholdPolicy(float("nan"))


def test_state_dict_round_trip_gives_identical_probabilities():
    gen = torch.Generator().manual_seed(3)
    a = PercentilePolicy(2.0, history_size=50)
    for _ in range(7):
        a(torch.rand(13, generator=gen))
    b = PercentilePolicy(2.0, history_size=50)
    b.load_state_dict(a.state_dict())
    saved = a.state_dict()
    for _ in range(5):
        x = torch.rand(11, generator=gen)
        assert torch.equal(a(x), b(x))
    assert not torch.equal(saved["_buffer"], a.state_dict()["_buffer"])  # state is a snapshot, not a view


@pytest.mark.parametrize("p", [0.0, 0.05, 0.3, 0.9, 1.0])
def test_the_selectors_coins_select_at_the_policys_rate(p):
    """The selector's coins against a constant p: the selected count is within binomial bounds (1e-6)."""
    n = 20000
    sb = SelectiveBackprop(nn.Identity(), batch_size=n, policy=UniformPolicy(p), prime_epochs=0, seed=int(100 * p))
    sb.select(torch.zeros(n, 2), torch.zeros(n, dtype=torch.long))
    lo, hi = stats.binom.interval(1 - 1e-6, n, p)
    assert lo <= sb.counters["selected"] <= hi
