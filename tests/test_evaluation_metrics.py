"""Metric code against hand-computed values and a line-by-line port of revisitop's compute_map."""
import math

import numpy as np
import pytest

from evaluation.metrics import (RevisitedTruth, average_precision, positive_ranks, precision_at,
                              revisited_ap, revisited_map, summarise)


def test_plain_ap_is_mean_precision_at_each_positive():
    # positives at ranks 2 and 4: precision 1/2 and 2/4
    assert average_precision([5, 1, 7, 2, 9], {1, 2}) == pytest.approx(0.5)
    assert average_precision([1, 2, 3], {1, 2}) == pytest.approx(1.0)
    assert average_precision([3, 1], {1}) == pytest.approx(0.5)


def test_plain_ap_counts_an_unranked_positive_as_zero():
    assert average_precision([1, 3], {1, 8}) == pytest.approx(0.5)
    assert average_precision([3, 4], {8}) == 0.0


def test_revisited_ap_is_the_trapezoid_rule():
    assert revisited_ap(np.array([0]), 1) == pytest.approx(1.0)
    # one positive at rank 1 (0-based): precision 0 before it, 1/2 at it
    assert revisited_ap(np.array([1]), 1) == pytest.approx(0.25)
    # positives at 0 and 2: (1 + 1)/2 and (1/2 + 2/3)/2, over 2 positives
    assert revisited_ap(np.array([0, 2]), 2) == pytest.approx((1 + (0.5 + 2 / 3) / 2) / 2)
    # two of three positives found
    assert revisited_ap(np.array([0, 1]), 3) == pytest.approx(2 / 3)


def test_junk_is_taken_out_of_the_ranking():
    assert positive_ranks([10, 20, 30, 40], {30}, junk={10, 20}).tolist() == [0]
    assert positive_ranks([10, 20, 30, 40], {30, 40}, junk={20}).tolist() == [1, 2]
    assert revisited_ap(positive_ranks([10, 20, 30], {30}, junk={10, 20}), 1) == pytest.approx(1.0)
    assert revisited_ap(positive_ranks([10, 20, 30], {30}), 1) == pytest.approx(1 / 6)


def test_medium_counts_easy_and_hard_hard_ignores_easy():
    truth = RevisitedTruth(easy=[1], hard=[2], junk=[3])
    result = revisited_map([[3, 1, 4, 2]], [truth])
    # medium: junk 3 removed -> [1, 4, 2], positives at 0 and 2
    assert result["medium"].map == pytest.approx((1 + (0.5 + 2 / 3) / 2) / 2)
    # hard: 3 and easy 1 removed -> [4, 2], the positive at 1
    assert result["hard"].map == pytest.approx(0.25)


def test_queries_without_positives_are_left_out_of_the_mean():
    truths = [RevisitedTruth(easy=[1], hard=[], junk=[]), RevisitedTruth(easy=[], hard=[2], junk=[])]
    result = revisited_map([[1, 2], [1, 2]], truths)
    assert result["hard"].queries == 1 and result["hard"].map == pytest.approx(0.25)
    assert math.isnan(result["hard"].aps[0])
    assert result["medium"].queries == 2
    assert result["medium"].map == pytest.approx((1.0 + 0.25) / 2)


def test_precision_at_k_and_summary():
    assert precision_at([1, 2, 3, 4, 5], {2, 5, 9}, 5) == pytest.approx(0.4)
    assert precision_at([2], {2}, 5) == pytest.approx(0.2)  # a short ranking still divides by k
    s = summarise([[1, 2, 3], [4, 5, 6], [7]], [{1}, {6}, set()], ks=(1, 3))
    assert s.queries == 2
    assert s.map == pytest.approx((1 + 1 / 3) / 2)
    assert s.precision == {1: pytest.approx(0.5), 3: pytest.approx(1 / 3)}


def revisitop_compute_map(ranks, gnd):
    """revisitop's compute_map / compute_ap (Radenovic et al., 2018), ported line by line."""
    aps = []
    for i in range(len(gnd)):
        qgnd = np.array(gnd[i]["ok"])
        if qgnd.shape[0] == 0:
            continue
        qgndj = np.array(gnd[i]["junk"])
        pos = np.arange(ranks.shape[0])[np.isin(ranks[:, i], qgnd)]
        junk = np.arange(ranks.shape[0])[np.isin(ranks[:, i], qgndj)]
        k, ij = 0, 0
        if len(junk):
            ip = 0
            while ip < len(pos):
                while ij < len(junk) and pos[ip] > junk[ij]:
                    k += 1
                    ij += 1
                pos[ip] = pos[ip] - k
                ip += 1
        ap, recall_step = 0.0, 1.0 / len(qgnd)
        for j in range(len(pos)):
            rank = pos[j]
            precision_0 = 1.0 if rank == 0 else float(j) / rank
            precision_1 = float(j + 1) / (rank + 1)
            ap += (precision_0 + precision_1) * recall_step / 2.0
        aps.append(ap)
    return float(np.mean(aps))


def test_revisited_map_matches_revisitop_on_random_rankings():
    rng = np.random.default_rng(3)
    n, nq = 60, 25
    ranks = np.stack([rng.permutation(n) for _ in range(nq)], axis=1)  # (n, nq) as revisitop holds them
    truths = []
    for _ in range(nq):
        items = rng.permutation(n)
        e, h, j = rng.integers(0, 6, 3)
        truths.append(RevisitedTruth(items[:e].tolist(), items[e:e + h].tolist(), items[e + h:e + h + j].tolist()))
    ours = revisited_map([ranks[:, i].tolist() for i in range(nq)], truths)
    medium = [{"ok": t.easy + t.hard, "junk": t.junk} for t in truths]
    hard = [{"ok": t.hard, "junk": t.junk + t.easy} for t in truths]
    assert ours["medium"].map == pytest.approx(revisitop_compute_map(ranks, medium))
    assert ours["hard"].map == pytest.approx(revisitop_compute_map(ranks, hard))
