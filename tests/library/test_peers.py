"""InfoBatch and Composer's selective backprop: exact rules, sampling frequencies, schedules, state, end to end."""

from __future__ import annotations

import io
import itertools
import math

import numpy as np
import pytest
import torch
from scipy import stats
from torch import nn

from selective_backprop.composer_sb import ComposerSB, composer_probabilities, composer_select, composer_should_select
from selective_backprop.infobatch import InfoBatch, infobatch_prune, mean_score

ALPHA = 1e-6  # false-alarm probability of every statistical bound


class Drifting(nn.Module):
    """Like :class:`Losses`, but each call adds ``0.3 * (calls % 5)``: scores, and so the mean, move over time."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return x + 0.3 * (self.calls % 5)


class Losses(nn.Module):
    """The inputs ``(N, 1)`` are the per-example losses (with :func:`first_column` as ``loss_fn``); counts calls."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return x


def first_column(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return outputs[:, 0]


def data(values) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    x = torch.as_tensor(values, dtype=torch.float32).reshape(-1, 1)
    return x, torch.zeros(len(x), dtype=torch.long), torch.arange(len(x))


def train(model: nn.Module, batches) -> list[tuple[list[int], list[float] | None, float]]:
    """The training step's loss on each batch: (indices, weights, loss) per batch."""
    return [
        (
            b.indices.tolist() if b.indices is not None else [],
            None if b.weights is None else b.weights.tolist(),
            float(b.loss(model(b.inputs))),
        )
        for b in batches
    ]


def save_load(selector, fresh):
    buf = io.BytesIO()
    torch.save(selector.state_dict(), buf)
    buf.seek(0)
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    return fresh


def infobatch(model: nn.Module, n: int, **kwargs) -> InfoBatch:
    options = {"batch_size": 4, "epochs": 10**6, "dataset_size": n, "loss_fn": first_column, "min_batch_size": 1}
    return InfoBatch(model, **{**options, **kwargs})


# ----- InfoBatch -------------------------------------------------------------------------------------------------
class TestInfoBatchRule:
    def test_mean_and_prune_by_hand(self):
        scores = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 0.0], dtype=torch.float64)
        scored = torch.tensor([True, True, True, True, True, False])
        threshold = mean_score(scores, scored)
        assert float(threshold) == 3.0  # the unscored 0.0 is not in the mean
        u = torch.tensor([0.2, 0.7, 0.1, 0.1, 0.1, 0.1], dtype=torch.float64)
        keep, w = infobatch_prune(scores, scored, threshold, 0.25, u)
        # eligible: 1 and 2 (3 is not strictly below the mean; index 5 has no score); pruned iff u < r
        assert keep.tolist() == [False, True, True, True, True, True]
        assert w.dtype == torch.float32 and w.tolist() == pytest.approx([4 / 3, 4 / 3, 1, 1, 1, 1], rel=1e-7)

    def test_nothing_scored_prunes_nothing(self):
        scores, scored = torch.zeros(4, dtype=torch.float64), torch.zeros(4, dtype=torch.bool)
        threshold = mean_score(scores, scored)
        assert math.isnan(float(threshold))
        keep, w = infobatch_prune(scores, scored, threshold, 0.5, torch.zeros(4, dtype=torch.float64))
        assert keep.all() and (w == 1).all()

    @pytest.mark.parametrize("r", [0.3, 0.5, 0.8])
    def test_weighted_sum_is_unbiased_by_enumeration(self, r):
        losses = torch.tensor([0.5, 1.0, 1.5, 4.0, 6.0], dtype=torch.float64)  # mean 2.6: three eligible
        scored = torch.ones(5, dtype=torch.bool)
        threshold = mean_score(losses, scored)
        expectation, plain = 0.0, 0.0
        for coins in itertools.product([True, False], repeat=5):  # True: this example's draw is below r
            prob = math.prod(r if c else 1 - r for c in coins)
            u = torch.tensor([0.0 if c else 0.999 for c in coins], dtype=torch.float64)
            keep, w = infobatch_prune(losses, scored, threshold, r, u)
            expectation += prob * float((keep * w.double() * losses).sum())
            plain += prob * float((keep * losses).sum())
        assert expectation == pytest.approx(float(losses.sum()), rel=1e-7)  # float32 weights
        assert plain == pytest.approx(float(losses.sum()) - r * 3.0, rel=1e-12)  # unweighted: biased


class TestInfoBatchSelector:
    def test_hand_computed_epoch(self):
        model = Losses()
        x, y, idx = data([1, 2, 3, 4, 5] + [0.1] * 21)  # 5..25: low losses, but never scored before epoch 1
        ib = infobatch(model, 26)
        epoch0 = train(model, ib.select(x[:5], y[:5], idx[:5]) + ib.end_epoch())
        assert sorted(sum((i for i, _, _ in epoch0), [])) == [0, 1, 2, 3, 4]
        assert all(w == [1.0] * len(i) for i, w, _ in epoch0)  # nothing scored yet: no pruning
        assert ib.scores[:5].tolist() == [1, 2, 3, 4, 5] and ib.scored.tolist() == [True] * 5 + [False] * 21
        epoch1 = train(model, ib.select(x, y, idx) + ib.end_epoch())
        kept = dict(zip(sum((i for i, _, _ in epoch1), []), sum((w for _, w, _ in epoch1), []), strict=True))
        assert set(range(2, 26)) <= set(kept)  # not below the mean 3.0, or never scored: always kept
        assert all(kept[i] == 1.0 for i in range(2, 26))
        assert all(kept[i] == 2.0 for i in (0, 1) if i in kept)  # r = 0.5: kept eligible weigh 1 / (1 - r)
        c = ib.counters
        assert c["seen"] == 31 and c["selected"] == len(kept) + 5 == c["backpropagated"]
        assert c["selection_forwards"] == c["skipped_forwards"] == 0 and model.calls == c["steps"]

    def test_pruned_fraction_of_eligible_is_r(self):
        model, r, epochs = Losses(), 0.3, 1000
        x, y, idx = data([1, 2, 3, 4, 5])  # mean 3: indices 0 and 1 are eligible every epoch
        ib = infobatch(model, 5, prune_ratio=r, seed=7)
        train(model, ib.select(x, y, idx) + ib.end_epoch())
        pruned = 0
        for _ in range(epochs):
            batches = ib.select(x, y, idx)
            assert float(ib.threshold) == 3.0
            rows = train(model, batches + ib.end_epoch())
            kept = sum((i for i, _, _ in rows), [])
            weights = sum((w for _, w, _ in rows), [])
            assert {2, 3, 4} <= set(kept)
            assert weights == pytest.approx([1 / (1 - r) if i < 2 else 1.0 for i in kept], rel=1e-6)
            pruned += 2 - sum(i < 2 for i in kept)
        low, high = stats.binom.interval(1 - ALPHA, 2 * epochs, r)
        assert low <= pruned <= high
        assert model.calls == ib.counters["steps"] and ib.counters["selection_forwards"] == 0

    def test_threshold_is_fixed_at_the_first_select_of_the_epoch(self):
        model = Losses()
        x, y, idx = data([1, 2, 3, 4, 5])
        ib = infobatch(model, 5, batch_size=1)
        train(model, ib.select(x, y, idx) + ib.end_epoch())
        train(model, ib.select(x[4:], y[4:], idx[4:]))  # epoch 1 starts: threshold = 3
        train(model, ib.select(torch.tensor([[100.0]]), y[:1], idx[3:4]))  # example 3 now scores 100 ...
        assert float(ib.scores[3]) == 100.0
        (batch,) = ib.select(x[2:3], y[2:3], idx[2:3])
        assert float(ib.threshold) == 3.0 and batch.weights.tolist() == [1.0]  # ... but the threshold stays
        ib.end_epoch()
        ib.select(x[:1], y[:1], idx[:1])
        assert float(ib.threshold) == pytest.approx((1 + 2 + 3 + 100 + 5) / 5)

    def test_no_pruning_in_the_last_eighth_of_the_epochs(self):
        model, n = Losses(), 64
        x, y, idx = data(torch.arange(n) / 8)
        ib = InfoBatch(model, batch_size=16, epochs=8, dataset_size=n, loss_fn=first_column, seed=3)
        pruning = []
        for epoch in range(8):
            pruning.append(ib.pruning)
            rows = train(model, ib.select(x, y, idx) + ib.end_epoch())
            kept = sum((i for i, _, _ in rows), [])
            weights = sum((w for _, w, _ in rows), [])
            if epoch in (0, 7):  # epoch 0: nothing scored yet; epoch 7: the annealing epoch
                assert sorted(kept) == list(range(n)) and weights == [1.0] * n
            else:  # 32 eligible examples (values below the mean 3.9375): all kept with probability 2 ** -32
                assert len(kept) < n and 2.0 in weights
        assert pruning == [True] * 7 + [False] and not ib.pruning
        long = InfoBatch(model, epochs=200, dataset_size=1)
        for epoch, expected in [(0, True), (174, True), (175, False), (199, False)]:  # the last 25 of 200: full data
            long.epoch = epoch
            assert long.pruning is expected
        # delta * epochs = 8.75, not an integer: the official IBSampler prunes epoch e only while e + 1 <= 8.75,
        # so epochs 0..7 prune and epoch 8 (which `epoch < 8.75` would also prune) already trains on everything
        odd = InfoBatch(model, epochs=10, dataset_size=1)
        assert [odd.pruning for odd.epoch in range(10)] == [True] * 8 + [False] * 2

    def test_weighted_epoch_loss_is_unbiased_monte_carlo(self):
        model, r, epochs = Losses(), 0.5, 1000
        values = torch.empty(16).exponential_(generator=torch.Generator().manual_seed(0))
        x, y, idx = data(values)
        ib = InfoBatch(model, batch_size=4, epochs=10**6, dataset_size=16, loss_fn=first_column, seed=11)
        train(model, ib.select(x, y, idx) + ib.end_epoch())
        totals = torch.tensor(
            [
                sum(loss * len(i) for i, _, loss in train(model, ib.select(x, y, idx) + ib.end_epoch()))
                for _ in range(epochs)
            ],
            dtype=torch.float64,
        )
        v = values.double()
        eligible = v[v < v.mean()]
        sd = math.sqrt(r / (1 - r) * float((eligible**2).sum()))  # per epoch: sum of w * Bernoulli(1 - r) * L
        bound = stats.norm.isf(ALPHA / 2) * sd / math.sqrt(epochs)
        assert abs(float(totals.mean()) - float(v.sum())) < bound
        # the bound is tight enough to reject the unweighted sum, whose expectation is r * eligible.sum() lower
        assert r * float(eligible.sum()) > 2 * bound

    def test_needs_indices_in_range(self):
        x, y, idx = data([1.0, 2.0])
        ib = infobatch(Losses(), 2)
        with pytest.raises(ValueError, match="needs dataset indices"):
            ib.select(x, y)
        with pytest.raises(ValueError, match="out of range"):
            ib.select(x, y, idx + 1)

    @pytest.mark.parametrize(
        "kwargs,match",
        [
            ({"prune_ratio": 1.0}, "prune_ratio"),
            ({"prune_ratio": -0.1}, "prune_ratio"),
            ({"delta": 1.5}, "delta"),
            ({"epochs": 0}, "epochs"),
            ({"dataset_size": 0}, "dataset_size"),
        ],
    )
    def test_bad_arguments(self, kwargs, match):
        with pytest.raises(ValueError, match=match):
            InfoBatch(Losses(), **{"epochs": 4, "dataset_size": 8, **kwargs})


# ----- Composer's selective backprop -------------------------------------------------------------------------------
class TestComposerRule:
    def test_probabilities_by_hand(self):
        assert composer_probabilities(4, 0.5).tolist() == [1 / 16, 3 / 16, 5 / 16, 7 / 16]
        cubes = torch.tensor([0.125, 0.375, 0.625, 0.875], dtype=torch.float64) ** 3  # keep 0.25: 1 / keep - 1 = 3
        assert composer_probabilities(4, 0.25).tolist() == pytest.approx((cubes / cubes.sum()).tolist(), rel=1e-12)
        assert composer_probabilities(5, 1.0).tolist() == [0.2] * 5

    @pytest.mark.parametrize("n,keep,count", [(4, 0.5, 2), (7, 0.5, 3), (10, 0.3, 3), (3, 0.2, 0), (8, 1.0, 8)])
    def test_selected_count_is_int_keep_n(self, n, keep, count):
        chosen = composer_select(torch.rand(n), keep, torch.Generator().manual_seed(0))
        assert len(chosen) == count == int(keep * n) and len(set(chosen.tolist())) == count

    def test_draw_frequencies_follow_the_multinomial_without_replacement(self):
        losses = torch.tensor([0.4, 0.1, 0.3, 0.2])  # ascending ranks: examples 1, 3, 2, 0
        p = dict(zip([1, 3, 2, 0], composer_probabilities(4, 0.5).tolist(), strict=True))
        gen, draws = torch.Generator().manual_seed(3), 6000
        picks = [composer_select(losses, 0.5, gen).tolist() for _ in range(draws)]
        first = np.bincount([d[0] for d in picks], minlength=4)
        expected_first = np.array([p[i] for i in range(4)]) * draws
        assert stats.chisquare(first, expected_first).pvalue > ALPHA
        pairs = list(itertools.combinations(range(4), 2))
        pair_p = np.array([p[i] * p[j] / (1 - p[i]) + p[j] * p[i] / (1 - p[j]) for i, j in pairs])
        assert pair_p.sum() == pytest.approx(1.0)
        counts = np.array([sum(sorted(d) == [i, j] for d in picks) for i, j in pairs])
        assert stats.chisquare(counts, pair_p * draws).pvalue > ALPHA
        assert first[0] > first[1] and counts[pairs.index((0, 2))] > counts[pairs.index((1, 3))]

    @pytest.mark.parametrize(
        "progress,interrupt,active",
        [
            (0.49, 2, [False] * 6),
            (0.5, 2, [True, False] * 3),
            (0.7, 3, [True, True, False] * 2),
            (0.7, 0, [True] * 6),
            (0.7, 1, [False] * 6),
            (0.9, 0, [False] * 6),
        ],
    )
    def test_schedule(self, progress, interrupt, active):
        assert [composer_should_select(progress, i, 0.5, 0.9, interrupt) for i in range(6)] == active


class TestComposerSelector:
    def test_schedule_and_no_forward_when_inactive(self):
        model = Losses()
        sb = ComposerSB(model, batch_size=8, epochs=2, dataset_size=80, loss_fn=first_column, seed=0)
        x, y, idx = data(torch.rand(8, generator=torch.Generator().manual_seed(0)))
        active, sizes = [], []
        for _ in range(2):
            for _ in range(10):
                before = model.calls
                batches = sb.select(x, y, idx)
                active.append(model.calls - before)
                sizes.append([len(b) for b in batches])
                train(model, batches)
            assert sb.end_epoch() == []
        # progress before global batch k is 8k / 160: the window [0.5, 0.9) is k = 10..17, i.e. batches 0..7 of
        # epoch 1, and interrupt=2 leaves the even batch_in_epoch; at k = 18 progress is exactly 0.9 (excluded)
        assert active == [0] * 10 + [1, 0] * 4 + [0, 0]
        assert sizes == [[8]] * 10 + [[4], [8]] * 4 + [[8], [8]]
        c = sb.counters
        assert c["selection_forwards"] == 32 and c["selected"] == c["backpropagated"] == 160 - 16
        assert c["seen"] == 160 and c["steps"] == 20

    def test_highest_loss_is_picked_more_often_than_lowest(self):
        values = torch.tensor([0.5, 3.0, 0.1, 2.0, 1.0, 0.2, 4.0, 0.3])
        x, y, idx = data(values)
        sb = ComposerSB(Losses(), keep=0.5, epochs=10**6, dataset_size=8, start=0.0, interrupt=0,
                        loss_fn=first_column)  # fmt: skip
        counts = torch.zeros(8)
        for _ in range(1000):
            (batch,) = sb.select(x, y, idx)
            assert len(batch) == 4 and batch.weights is None
            counts += torch.bincount(batch.indices, minlength=8)
        assert counts.sum() == 4000 and counts[6] > 2 * counts[2] and counts[1] > counts[2]

    def test_keep_one_is_never_active(self):
        model = Losses()
        sb = ComposerSB(model, batch_size=4, keep=1.0, epochs=1, dataset_size=4, start=0.0, interrupt=0)
        x, y, idx = data([1.0, 2.0, 3.0, 4.0])
        assert [len(b) for b in sb.select(x, y, idx)] == [4] and model.calls == 0

    @pytest.mark.parametrize(
        "kwargs,match",
        [
            ({"keep": 0.0}, "keep"),
            ({"keep": 1.5}, "keep"),
            ({"start": 0.9, "end": 0.5}, "start"),
            ({"interrupt": -1}, "interrupt"),
            ({"epochs": 0}, "epochs"),
        ],
    )
    def test_bad_arguments(self, kwargs, match):
        with pytest.raises(ValueError, match=match):
            ComposerSB(Losses(), **{"epochs": 4, "dataset_size": 8, **kwargs})


# ----- both --------------------------------------------------------------------------------------------------------
def build(name, model, n, epochs, batch_size):
    if name == "infobatch":
        return InfoBatch(model, batch_size, epochs=epochs, dataset_size=n)
    return ComposerSB(model, batch_size, epochs=epochs, dataset_size=n, start=0.0)


@pytest.mark.parametrize("name", ["infobatch", "composer-sb"])
def test_two_epochs_end_to_end(name):
    torch.manual_seed(0)
    n, loader_batch = 64, 8
    model = nn.Linear(5, 3)  # plain SGD by hand: building a torch.optim optimizer first imports torch._dynamo (~3 s)
    # InfoBatch prunes epoch e only while e + 1 <= 0.875 * epochs, and never the first (all scores equal): plan 4.
    sel = build(name, model, n, epochs=4 if name == "infobatch" else 2, batch_size=8)
    x, y = torch.randn(n, 5), torch.randint(0, 3, (n,))
    lengths = []

    def step(batches):
        for batch in batches:
            batch.loss(model(batch.inputs)).backward()
            with torch.no_grad():
                for p in model.parameters():
                    p -= 0.1 * p.grad
                    p.grad = None
            lengths.append(len(batch))

    for epoch in range(2):
        order = torch.randperm(n, generator=torch.Generator().manual_seed(epoch))
        for s in range(0, n, loader_batch):
            rows = order[s : s + loader_batch]
            step(sel.select(x[rows], y[rows], rows))
        step(sel.end_epoch())
    c = sel.counters
    assert c["seen"] == 2 * n and c["steps"] == len(lengths) and all(0 < k <= 8 for k in lengths)
    assert c["backpropagated"] == sum(lengths) == c["selected"] < c["seen"]
    assert all(torch.isfinite(p).all() for p in model.parameters())
