"""The paper's measures on hand-made arrays and curves whose right answers were computed by hand."""

from __future__ import annotations

import numpy as np
import pytest

from selective_backprop.experiments.measures import (
    ParetoPoint,
    accuracy_at_percentile,
    accuracy_by_percentile,
    confidence_by_percentile,
    pareto_points,
    pareto_shares,
    target_grid,
)


def rows(*points):
    return [{"wall_train_s": t, "test_error": e} for t, e in points]


class TestHardExamples:
    def test_each_model_ranks_by_its_own_confidence(self):
        # Model A is confident where it is right; model B is confident where it is wrong. Same accuracy (50 %).
        right = np.array([1, 1, 1, 1, 0, 0, 0, 0], bool)
        conf_a = np.array([0.9, 0.8, 0.7, 0.6, 0.4, 0.3, 0.2, 0.1])
        conf_b = conf_a[::-1].copy()
        _, acc_a = accuracy_by_percentile(conf_a, right, bins=2)
        _, acc_b = accuracy_by_percentile(conf_b, right, bins=2)
        assert acc_a.tolist() == [0.0, 1.0] and acc_b.tolist() == [1.0, 0.0]

    def test_the_inverse_cdf_is_the_sorted_confidences(self):
        p, c = confidence_by_percentile(np.array([0.5, 0.2, 0.9, 0.2, 0.7]))
        assert p.tolist() == [0, 20, 40, 60, 80] and c.tolist() == [0.2, 0.2, 0.5, 0.7, 0.9]

    def test_the_paper_number_is_the_bin_around_the_20th_percentile(self):
        conf = np.arange(200) / 200  # rank k has confidence k/200
        right = np.zeros(200, bool)
        right[35:45] = True  # the bin [17.5 %, 22.5 %) holds ranks ceil(0.175 * 200) = 35 .. ceil(0.225 * 200) - 1 = 44
        assert accuracy_at_percentile(conf, right) == 1.0
        right[44] = False
        assert accuracy_at_percentile(conf, right) == pytest.approx(0.9)
        assert accuracy_at_percentile(conf, right, percentile=50) == 0.0

    def test_ties_are_ranked_by_index(self):
        conf = np.array([0.5, 0.5, 0.5, 0.5])
        _, acc = accuracy_by_percentile(conf, np.array([1, 1, 0, 0], bool), bins=2)
        assert acc.tolist() == [1.0, 0.0]

    def test_bad_shapes(self):
        with pytest.raises(ValueError, match="bins=4"):
            accuracy_by_percentile(np.zeros(3), np.zeros(3, bool), bins=4)


class TestParetoFromCurves:
    def test_a_hand_computed_front(self):
        """Three runs, targets 0.6 / 0.4 / 0.2.

        fast (sb):    1.0 -> 0.2 over 0..8 s (0.1 per second): 0.6 at 4 s, 0.4 at 6 s, 0.2 at 8 s
        slow (trad):  1.0 -> 0.1 over 0..18 s (0.05 per second): 0.6 at 8 s, 0.4 at 12 s, 0.2 at 16 s
        noisy (kath): 0.6 at 1 s (a jump), then flat: never 0.4
        Optimal: noisy (1, .6) [the fastest to .6]; fast (6, .4) [no one reaches .4 sooner]; fast (8, .2).
        Dominated: fast (4, .6) by noisy (1, .6); every point of slow by fast's at the same target.
        """
        runs = {("sb", 0): rows((0, 1.0), (8, 0.2)), ("trad", 0): rows((0, 1.0), (18, 0.1)),
                ("kath", 0): rows((0, 1.0), (1, 0.6), (20, 0.6))}  # fmt: skip
        points = pareto_points(runs, [0.6, 0.4, 0.2])
        got = {(p.label, p.target): (round(p.time, 6), p.optimal) for p in points}
        assert got == {
            ("sb", 0.6): (4.0, False), ("sb", 0.4): (6.0, True), ("sb", 0.2): (8.0, True),
            ("trad", 0.6): (8.0, False), ("trad", 0.4): (12.0, False), ("trad", 0.2): (16.0, False),
            ("kath", 0.6): (1.0, True),
        }  # fmt: skip
        shares = pareto_shares(points, {"sb": "SB", "trad": "Traditional", "kath": "Kath18"})
        assert shares == pytest.approx({"SB": 2 / 3, "Kath18": 1 / 3})

    def test_a_run_that_never_reaches_a_target_gives_no_point_and_ties_are_both_optimal(self):
        runs = {("a", 0): rows((0, 1.0), (10, 0.5)), ("b", 0): rows((0, 1.0), (10, 0.5))}
        points = pareto_points(runs, [0.5, 0.3])
        assert [(p.label, p.target, p.time, p.optimal) for p in points] == [("a", 0.5, 10.0, True),
                                                                           ("b", 0.5, 10.0, True)]  # fmt: skip
        assert pareto_shares([], {}) == {}
        assert pareto_shares([ParetoPoint("a", 0, 0.5, 1.0, False)], {"a": "A"}) == {}

    def test_the_grid_runs_from_the_worst_to_the_best_target(self):
        assert target_grid(0.08, 0.16, points=5).tolist() == pytest.approx([0.16, 0.14, 0.12, 0.10, 0.08])


def test_the_bin_around_a_percentile_is_clipped_at_both_ends():
    """A model with no test error puts the error percentile at 0: the bin is the lowest 2.5 %, not an empty slice."""
    conf = np.linspace(0, 1, 200, endpoint=False)
    right = np.zeros(200, bool)
    right[[0, 4, 196, 199]] = True  # ranks 0..4 are the lowest 2.5 %, 195..199 the highest
    assert accuracy_at_percentile(conf, right, percentile=0.0) == pytest.approx(2 / 5)
    assert accuracy_at_percentile(conf, right, percentile=100.0) == pytest.approx(2 / 5)  # ranks 195..199
