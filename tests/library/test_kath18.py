"""Katharopoulos & Fleuret 2018: scores, sampling distribution, unbiasedness, switch-on rule, state."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from scipy import stats
from torch import nn

from selective_backprop import Kath18
from selective_backprop.kath18 import importance_weights, upper_bound_scores, variance_reduction


class Logits(nn.Module):
    """The inputs are the logits: scores and losses of every example are known exactly."""

    def forward(self, x):
        return x


def pool(b: int, k: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(k * b, 5, generator=gen) * 2
    y = torch.randint(0, 5, (k * b,), generator=gen)
    return x, y, torch.arange(k * b)


def test_upper_bound_score_by_hand():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 0.0, 0.0]])
    targets = torch.tensor([1, 2])
    p = torch.softmax(logits, 1)
    expected = [
        math.sqrt(p[0, 0] ** 2 + (p[0, 1] - 1) ** 2 + p[0, 2] ** 2),
        math.sqrt(2 * (1 / 3) ** 2 + (2 / 3) ** 2),
    ]
    assert upper_bound_scores(logits, targets).tolist() == pytest.approx(expected, rel=1e-6)


def test_variance_reduction_closed_form_equals_definition():
    g = torch.rand(37, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    g /= g.sum()
    u = torch.full_like(g, 1 / len(g))
    definition = (1 - ((g - u) ** 2).sum() / (g**2).sum()) ** -0.5
    assert float(variance_reduction(g)) == pytest.approx(float(definition), rel=1e-12)


def test_default_threshold():
    assert Kath18(Logits(), batch_size=8, presample=3).tau_th == pytest.approx(2.0)
    assert Kath18(Logits(), batch_size=8, presample=4).tau_th == pytest.approx(7 / 3)


@pytest.mark.parametrize("score", ["upper-bound", "loss"])
def test_sampling_distribution_is_proportional_to_score(score):
    b, k, reps = 4, 3, 4000
    x, y, idx = pool(b, k)
    kath = Kath18(Logits(), batch_size=b, presample=k, score=score, tau_th=-1.0, seed=0)
    counts = torch.zeros(b * k)
    for _ in range(reps):
        (batch,) = kath.select(x, y, idx)
        assert len(batch) == b
        counts += torch.bincount(batch.indices, minlength=b * k)
    s = upper_bound_scores(x, y) if score == "upper-bound" else F.cross_entropy(x, y, reduction="none")
    expected = (s / s.sum()).double() * reps * b
    chi2 = float(((counts.double() - expected) ** 2 / expected).sum())
    assert chi2 < stats.chi2.ppf(1 - 1e-6, df=b * k - 1)


def test_weighted_loss_is_unbiased_for_presample_mean():
    b, k, reps = 8, 3, 3000
    x, y, idx = pool(b, k, seed=2)
    model = Logits()
    kath = Kath18(model, batch_size=b, presample=k, tau_th=-1.0, seed=1)
    estimates = torch.tensor(
        [float(batch.loss(model(batch.inputs))) for _ in range(reps) for batch in kath.select(x, y, idx)],
        dtype=torch.float64,
    )
    target = float(F.cross_entropy(x, y))
    se = float(estimates.std()) / math.sqrt(reps)
    assert abs(float(estimates.mean()) - target) < 6 * se
    # the plain (unweighted) mean of drawn losses is biased towards high scores: the weights matter
    plain = F.cross_entropy(x, y, reduction="none")
    assert float((plain * upper_bound_scores(x, y)).sum() / upper_bound_scores(x, y).sum()) > target + 6 * se


def test_importance_weights():
    g = torch.tensor([0.5, 0.25, 0.25], dtype=torch.float64)
    assert importance_weights(g, torch.tensor([0, 1, 1])).tolist() == [2 / 3, 4 / 3, 4 / 3]


def test_duplicates_are_each_trained_on():
    b = 8
    x = torch.full((3 * b, 2), 0.0)
    x[:, 0] = 20.0  # confident and right for target 0 ...
    x[0] = torch.tensor([-20.0, 20.0])  # ... except example 0, which holds almost all of the score mass
    y = torch.zeros(3 * b, dtype=torch.long)
    kath = Kath18(Logits(), batch_size=b, tau_th=-1.0)
    (batch,) = kath.select(x, y, torch.arange(3 * b))
    assert len(batch) == b and (batch.indices == 0).sum() >= b - 1  # drawn repeatedly, kept every time
    assert batch.weights.shape == (b,)


def test_uniform_until_variance_reduction_is_large_enough():
    b = 8
    model = Logits()
    kath = Kath18(model, batch_size=b)
    x = torch.zeros(b, 3)  # uniform scores: tau -> 1 < tau_th = 2
    y = torch.zeros(b, dtype=torch.long)
    for _ in range(30):
        (batch,) = kath.select(x, y, torch.arange(b))
        assert batch.weights is None and batch.inputs is x  # the loader batch itself
        batch.loss(model(batch.inputs))
    assert not kath.importance_sampling and kath.tau == pytest.approx(1 - 0.9**30, rel=1e-6)
    assert kath.counters["selection_forwards"] == 0
    hard = torch.full((b, 3), 0.0)
    hard[:, 0] = 30.0
    hard[0] = torch.tensor([-30.0, 30.0, 0.0])  # one example dominates: tau -> sqrt(b) ~ 2.83
    for _ in range(40):
        for batch in kath.select(hard, y, torch.arange(b)):
            batch.loss(model(batch.inputs))
    assert kath.importance_sampling
    c = kath.counters
    assert c["selection_forwards"] > 0 and c["selection_forwards"] % (3 * b) == 0


@pytest.mark.parametrize(
    "kwargs,match",
    [({"presample": 0}, "presample"), ({"score": "grad"}, "score"), ({"tau_ema": 1.0}, "tau_ema")],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Kath18(Logits(), **kwargs)


def test_a_presample_cut_short_when_importance_sampling_stops_is_trained_and_counted():
    b, k = 2, 3
    x, y, idx = pool(b, k, seed=7)
    model = Logits()
    kath = Kath18(model, batch_size=b, presample=k, seed=1)
    kath.tau = kath.tau_th + 1  # importance sampling on
    assert kath.select(x[:4], y[:4], idx[:4]) == []  # 4 of a presample of 6: waiting
    kath.tau = 0.0  # variance reduction fell: back to uniform batches
    batches = kath.select(x[4:6], y[4:6], idx[4:6])
    assert sorted(torch.cat([batch.indices for batch in batches]).tolist()) == list(range(6))
    assert all(batch.weights is None for batch in batches)
    for batch in batches:
        batch.loss(model(batch.inputs))
    c = kath.counters
    assert c["selected"] == c["backpropagated"] == 6 and c["seen"] == 6 and len(kath.pool) == 0


def test_tau_takes_one_ema_step_per_presample_and_none_for_its_weighted_batch():
    b, k = 4, 3
    x, y, idx = pool(b, k, seed=3)
    model = Logits()
    kath = Kath18(model, batch_size=b, presample=k, seed=0)
    kath.tau = tau0 = kath.tau_th + 0.5
    (batch,) = kath.select(x, y, idx)
    g = upper_bound_scores(x, y).double()
    expected = 0.9 * tau0 + 0.1 * float(variance_reduction(g / g.sum()))
    assert kath.tau == pytest.approx(expected, rel=1e-12)
    batch.loss(model(batch.inputs))  # a weighted batch: tau follows presamples, not training batches
    assert kath.tau == pytest.approx(expected, rel=1e-12)


def test_importance_sampling_starts_strictly_above_the_default_threshold():
    kath = Kath18(Logits(), batch_size=8, presample=4)  # tau_th = (32 + 24) / 24 = 7/3
    kath.tau = 7 / 3
    assert not kath.importance_sampling
    kath.tau = math.nextafter(7 / 3, math.inf)
    assert kath.importance_sampling


def test_a_uniform_batch_moves_tau_one_ema_step_toward_its_variance_reduction():
    b = 4
    x, y, idx = pool(b, 1, seed=9)
    model = Logits()
    kath = Kath18(model, batch_size=b, presample=3)
    (batch,) = kath.select(x, y, idx)
    assert batch.weights is None  # uniform phase: tau starts at 0
    batch.loss(model(batch.inputs))
    g = upper_bound_scores(x, y).double()
    assert kath.tau == pytest.approx(0.1 * float(variance_reduction(g / g.sum())), rel=1e-12)
    assert float(variance_reduction(g / g.sum())) > 1.01  # not uniform: a squared or skipped term would show


def test_without_reweighting_the_drawn_examples_train_on_their_plain_mean_loss():
    """The SB paper's Kath18 (§5.1, "no bias reweighting"): the same draw as with weights, each weight 1, and tau
    still follows presamples only."""
    b, k = 4, 3
    x, y, idx = pool(b, k, seed=5)
    model = Logits()
    weighted, plain = (Kath18(model, batch_size=b, presample=k, score="loss", reweight=r, seed=0)
                       for r in (True, False))  # fmt: skip
    for kath in (weighted, plain):
        kath.tau = kath.tau_th + 0.5
    (a,), (p,) = weighted.select(x, y, idx), plain.select(x, y, idx)
    assert torch.equal(a.indices, p.indices)  # the same seeded draw
    assert not torch.allclose(a.weights, torch.ones(b)) and torch.equal(p.weights, torch.ones(b))
    tau = plain.tau
    loss = p.loss(model(p.inputs))
    torch.testing.assert_close(loss, F.cross_entropy(x[p.indices], y[p.indices]))
    assert plain.tau == tau  # an importance-sampled batch leaves tau alone, weighted or not
    with pytest.raises(TypeError, match="reweight must be True or False, got 'off'"):
        Kath18(model, reweight="off")
