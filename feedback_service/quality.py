"""Quality metrics over rankings: pure functions, no database.

- Krippendorff's alpha (ordinal) per campaign. Units are (item, answer) pairs, coders are
  labelers, a value is the answer's rank in that labeler's order (tie groups share a rank).
  Computed by the ``krippendorff`` package (pinned), checked against a plain-Python twin of the
  definition and a hand-worked value in the tests.
- Per labeler: agreement with the leave-one-out majority on each answer pair the labeler
  ordered, and accuracy on gold items (the gold answer alone in the top group).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from itertools import combinations

from feedback_service.pairs import Groups, ranks, votes


def _reliability(rankings_by_item: Mapping[int, Mapping[int, Groups]]) -> dict[tuple[int, int], dict[int, int]]:
    """unit (item, answer) → {labeler: rank + 1}, for items ranked by at least two labelers
    (a unit rated once carries no agreement information)."""
    units: dict[tuple[int, int], dict[int, int]] = {}
    for item, by_lab in sorted(rankings_by_item.items()):
        if len(by_lab) < 2:
            continue
        for lab, groups in by_lab.items():
            for a, r in ranks(groups).items():
                units.setdefault((item, a), {})[lab] = r + 1
    return units


def krippendorff_alpha(rankings_by_item: Mapping[int, Mapping[int, Groups]]) -> float | None:
    """rankings_by_item[item_id][labeler_id] = groups. None when alpha is undefined (too little data).

    Uses the pinned ``krippendorff`` package; ``krippendorff_alpha_reference`` is its naive twin
    (the test oracle), used only if the package is not installed.
    """
    units = _reliability(rankings_by_item)
    if not units:
        return None
    try:
        import krippendorff
        import numpy as np  # lazy: keeps `import feedback_service` light
    except ImportError:
        return krippendorff_alpha_reference(rankings_by_item)
    labelers = sorted({lab for by_lab in units.values() for lab in by_lab})
    row = {lab: i for i, lab in enumerate(labelers)}
    data = np.full((len(labelers), len(units)), np.nan)  # (coders, units)
    for j, by_lab in enumerate(units.values()):
        for lab, value in by_lab.items():
            data[row[lab], j] = value
    try:
        value = float(krippendorff.alpha(reliability_data=data, level_of_measurement="ordinal"))
    except ValueError:  # one value in the whole domain: alpha is undefined
        return None
    return None if np.isnan(value) else value


def krippendorff_alpha_reference(rankings_by_item: Mapping[int, Mapping[int, Groups]]) -> float | None:
    """Ordinal alpha straight from Krippendorff's coincidence-matrix definition, in plain Python:

        o_ck = Σ_u (pairs of values c, k within unit u) / (m_u - 1),   n_c = Σ_k o_ck,
        δ²_ck = (Σ_{g=c..k} n_g - (n_c + n_k) / 2)²,
        α = 1 - (n - 1) Σ o_ck δ²_ck / Σ n_c n_k δ²_ck.
    """
    o: dict[tuple[int, int], float] = {}
    for by_lab in _reliability(rankings_by_item).values():
        values = list(by_lab.values())
        m = len(values)
        if m < 2:
            continue
        for i, c in enumerate(values):
            for j, k in enumerate(values):
                if i != j:
                    o[(c, k)] = o.get((c, k), 0.0) + 1.0 / (m - 1)
    domain = sorted({c for c, _ in o})
    if len(domain) < 2:
        return None
    n_c = {c: sum(o.get((c, k), 0.0) for k in domain) for c in domain}
    n = sum(n_c.values())

    def delta2(c: int, k: int) -> float:
        lo, hi = min(c, k), max(c, k)
        return (sum(n_c[g] for g in domain if lo <= g <= hi) - (n_c[lo] + n_c[hi]) / 2) ** 2

    observed = sum(o.get((c, k), 0.0) * delta2(c, k) for c in domain for k in domain)
    expected = sum(n_c[c] * n_c[k] * delta2(c, k) for c in domain for k in domain)
    return 1.0 - (n - 1) * observed / expected if expected else None


def labeler_agreement(rankings_by_item: Mapping[int, Mapping[int, Groups]], labeler_id: int) -> tuple[float | None, int]:
    """(share of agreeing pairs, number of pairs judged) against the other labelers' majority."""
    agree = total = 0
    for by_lab in rankings_by_item.values():
        if labeler_id not in by_lab or len(by_lab) < 2:
            continue
        others = votes([g for lab, g in by_lab.items() if lab != labeler_id])
        mine = ranks(by_lab[labeler_id])
        for a, b in combinations(mine, 2):
            if mine[a] == mine[b]:
                continue
            hi, lo = (a, b) if mine[a] < mine[b] else (b, a)
            x, y = others.get((hi, lo), 0), others.get((lo, hi), 0)
            if x != y:  # no majority among the others: nothing to agree with
                total += 1
                agree += x > y
    return (agree / total if total else None), total


def gold_accuracy(rankings: Sequence[tuple[Groups, int]]) -> tuple[float | None, int]:
    """rankings: (groups, gold answer id) for one labeler's gold items → (accuracy, count)."""
    if not rankings:
        return None, 0
    correct = sum(groups[0] == [gold] for groups, gold in rankings)
    return correct / len(rankings), len(rankings)
