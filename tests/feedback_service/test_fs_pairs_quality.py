"""Pure functions on hand-worked examples: rankings → pairs, aggregation, disagreement, quality."""

from __future__ import annotations

import pytest

from feedback_service import pairs, quality


def test_all_pairs_and_best_vs_rest_with_ties() -> None:
    groups = [[3], [1, 2], [4]]  # 3 best, 1 and 2 tie, 4 worst
    assert pairs.pairs_from_order(groups, "all_pairs") == [(3, 1), (3, 2), (3, 4), (1, 4), (2, 4)]
    assert pairs.pairs_from_order(groups, "best_vs_rest") == [(3, 1), (3, 2), (3, 4)]
    # per-ranking margin is the rank difference; tied answers make no pair
    assert pairs.item_pairs([groups], "all_pairs", "none") == [(3, 1, 1.0), (3, 2, 1.0), (3, 4, 2.0), (1, 4, 1.0), (2, 4, 1.0)]


def test_votes_and_disagreement_by_hand() -> None:
    r1, r2, r3 = [[1], [2], [3]], [[1], [3], [2]], [[2], [1], [3]]
    v = pairs.votes([r1, r2, r3])
    assert v == {(1, 2): 2, (2, 1): 1, (1, 3): 3, (2, 3): 2, (3, 2): 1}
    # pairs: (1,2) minority 1/3, (1,3) 0/3, (2,3) 1/3 → mean 2/9
    assert pairs.disagreement([r1, r2, r3]) == pytest.approx(2 / 9)
    assert pairs.disagreement([r1, r1]) == 0.0
    assert pairs.disagreement([[[1], [2]], [[2], [1]]]) == pytest.approx(0.5)


def test_majority_consensus_margins() -> None:
    r1, r2, r3 = [[1], [2], [3]], [[1], [3], [2]], [[2], [1], [3]]
    out = pairs.item_pairs([r1, r2, r3], "all_pairs", "majority")
    # Copeland: 1 beats 2 and 3 (+2), 2 beats 3 (0), 3 (-2). margin = (for - against) / 3
    assert out == [(1, 2, pytest.approx(1 / 3)), (1, 3, pytest.approx(1.0)), (2, 3, pytest.approx(1 / 3))]
    assert pairs.item_pairs([r1, r2, r3], "best_vs_rest", "majority") == [(1, 2, pytest.approx(1 / 3)), (1, 3, pytest.approx(1.0))]


def test_mean_rank_consensus_and_ties() -> None:
    r1, r2 = [[1], [2], [3]], [[2], [1], [3]]
    # mean ranks: 1 → 0.5, 2 → 0.5, 3 → 2: 1 and 2 tie, no pair between them
    assert pairs.item_pairs([r1, r2], "all_pairs", "mean_rank") == [(1, 3, 1.5), (2, 3, 1.5)]


def test_majority_cycle_keeps_only_positive_margins() -> None:
    # Condorcet cycle 1>2>3>1: all Copeland scores 0, one tie group, no pairs at all
    rankings = [[[1], [2], [3]], [[2], [3], [1]], [[3], [1], [2]]]
    assert pairs.item_pairs(rankings, "all_pairs", "majority") == []


def test_krippendorff_alpha_hand_computed() -> None:
    """Two labelers, one item, three answers: A ranks (1,2,3), B ranks (1,3,2).

    Units are answers with rank values; coincidences: o11=2, o23=o32=2; n1=n2=n3=2, n=6.
    Ordinal δ²: δ12=(n1+n2-(n1+n2)/2)²=4, δ23=4, δ13=(n1+n2+n3-(n1+n3)/2)²=16.
    Σ o·δ = 2·4 + 2·4 = 16; Σ n_c n_k δ over ordered pairs = 2·(4·4 + 4·4 + 4·16) = 192.
    α = 1 - (n-1)·16/192 = 1 - 5/12 = 7/12.
    """
    by_item = {1: {10: [[1], [2], [3]], 11: [[1], [3], [2]]}}
    assert quality.krippendorff_alpha(by_item) == pytest.approx(7 / 12)


def test_krippendorff_alpha_perfect_and_undefined() -> None:
    same = {1: {10: [[1], [2], [3]], 11: [[1], [2], [3]]}, 2: {10: [[5], [4], [6]], 11: [[5], [4], [6]]}}
    assert quality.krippendorff_alpha(same) == pytest.approx(1.0)
    assert quality.krippendorff_alpha({1: {10: [[1], [2]]}}) is None  # nobody to agree with
    assert quality.krippendorff_alpha({1: {10: [[1, 2]], 11: [[1, 2]]}}) is None  # one value only: undefined


def test_labeler_agreement_leave_one_out() -> None:
    by_item = {
        1: {10: [[1], [2], [3]], 11: [[1], [2], [3]], 12: [[3], [2], [1]]},
    }
    # labeler 12 disagrees with the others' unanimous majority on all three pairs
    assert quality.labeler_agreement(by_item, 12) == (0.0, 3)
    # labeler 10: others are 11 (1>2>3) and 12 (3>2>1): every pair is 1-1, no majority → nothing judged
    assert quality.labeler_agreement(by_item, 10) == (None, 0)
    by_item[1][13] = [[1], [2], [3]]
    assert quality.labeler_agreement(by_item, 10) == (1.0, 3)


def test_gold_accuracy() -> None:
    assert quality.gold_accuracy([([[1], [2]], 1), ([[2], [1]], 1), ([[1, 2]], 1), ([[7], [8]], 7)]) == (0.5, 4)
    assert quality.gold_accuracy([]) == (None, 0)


def test_krippendorff_library_matches_its_naive_twin_on_random_rankings() -> None:
    import random

    rng = random.Random(3)
    for trial in range(20):
        by_item = {}
        for item in range(rng.randint(1, 6)):
            answers = list(range(item * 10, item * 10 + rng.randint(2, 5)))
            by_item[item] = {}
            for lab in rng.sample(range(6), rng.randint(1, 5)):
                order = answers[:]
                rng.shuffle(order)
                groups: list[list[int]] = []
                for a in order:  # random ties
                    if groups and rng.random() < 0.25:
                        groups[-1].append(a)
                    else:
                        groups.append([a])
                by_item[item][lab] = groups
        lib, ref = quality.krippendorff_alpha(by_item), quality.krippendorff_alpha_reference(by_item)
        assert (lib is None) == (ref is None), (trial, lib, ref)
        if lib is not None:
            assert lib == pytest.approx(ref, abs=1e-9), trial


def test_krippendorff_reference_hand_value() -> None:
    assert quality.krippendorff_alpha_reference({1: {10: [[1], [2], [3]], 11: [[1], [3], [2]]}}) == pytest.approx(7 / 12)
