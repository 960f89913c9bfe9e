"""Rankings → preference pairs: pure functions, no database.

A ranking is a list of tie groups of answer ids, best first: ``[[3], [1, 2]]`` says 3 is best and
1 and 2 tie. An answer's *rank* is the index of its group (0 = best). Tied answers make no pair.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from itertools import combinations
from typing import Literal

Groups = list[list[int]]
Strategy = Literal["all_pairs", "best_vs_rest"]
Aggregation = Literal["none", "majority", "mean_rank"]


def ranks(groups: Groups) -> dict[int, int]:
    return {a: r for r, group in enumerate(groups) for a in group}


def pairs_from_order(groups: Groups, strategy: Strategy) -> list[tuple[int, int]]:
    """(chosen, rejected) pairs of answer ids from one order, best pairs first."""
    firsts = groups[:1] if strategy == "best_vs_rest" else groups
    out = []
    for i, better in enumerate(firsts):
        for worse in groups[i + 1 :]:
            out += [(a, b) for a in better for b in worse]
    return out


def votes(rankings: Sequence[Groups]) -> dict[tuple[int, int], int]:
    """votes[(a, b)] = how many rankings put a strictly above b."""
    out: dict[tuple[int, int], int] = {}
    for groups in rankings:
        r = ranks(groups)
        for a, b in combinations(r, 2):
            if r[a] != r[b]:
                key = (a, b) if r[a] < r[b] else (b, a)
                out[key] = out.get(key, 0) + 1
    return out


def disagreement(rankings: Sequence[Groups]) -> float:
    """Share of pairwise votes against the majority on that pair, averaged over answer pairs.

    0 when all labelers agree on every pair they order, 0.5 when every pair is split evenly.
    """
    v = votes(rankings)
    shares = []
    for a, b in {tuple(sorted(k)) for k in v}:
        x, y = v.get((a, b), 0), v.get((b, a), 0)
        shares.append(min(x, y) / (x + y))
    return sum(shares) / len(shares) if shares else 0.0


def _group_by(answer_ids: Sequence[int], key: Callable[[int], float]) -> Groups:
    out: dict[float, list[int]] = {}
    for a in sorted(answer_ids, key=key):
        out.setdefault(round(key(a), 9), []).append(a)
    return [sorted(g) for _, g in sorted(out.items())]


def consensus(rankings: Sequence[Groups], method: Literal["majority", "mean_rank"]) -> tuple[Groups, Callable[[int, int], float]]:
    """One order for an item from several labelers' rankings, and the margin of a pair in it.

    mean_rank: answers sorted by mean rank; margin = mean_rank(rejected) - mean_rank(chosen).
    majority: Copeland order (pairwise majority wins minus losses); margin = (votes for - votes
    against) / number of rankings, so a unanimous pair has margin 1.
    """
    answer_ids = sorted(ranks(rankings[0]))
    n = len(rankings)
    if method == "mean_rank":
        mean = {a: sum(ranks(g)[a] for g in rankings) / n for a in answer_ids}
        return _group_by(answer_ids, lambda a: mean[a]), lambda a, b: mean[b] - mean[a]
    v = votes(rankings)
    score = {a: sum((v.get((a, b), 0) > v.get((b, a), 0)) - (v.get((b, a), 0) > v.get((a, b), 0)) for b in answer_ids if b != a) for a in answer_ids}
    return _group_by(answer_ids, lambda a: -score[a]), lambda a, b: (v.get((a, b), 0) - v.get((b, a), 0)) / n


def item_pairs(rankings: Sequence[Groups], strategy: Strategy, aggregation: Aggregation) -> list[tuple[int, int, float]]:
    """(chosen, rejected, margin) for one item. With aggregation 'none' pass exactly one ranking."""
    if aggregation == "none":
        (groups,) = rankings
        r = ranks(groups)
        return [(a, b, float(r[b] - r[a])) for a, b in pairs_from_order(groups, strategy)]
    order, margin = consensus(rankings, aggregation)
    # A Copeland order can contradict the pairwise majority inside a cycle: keep positive margins only.
    return [(a, b, m) for a, b in pairs_from_order(order, strategy) if (m := margin(a, b)) > 0]
