"""Quality metrics over rankings: pure functions, no database.

- Krippendorff's alpha (ordinal) per campaign. Units are (item, answer) pairs, coders are
  labelers, a value is the answer's rank in that labeler's order (tie groups share a rank).
  Computed by the ``krippendorff`` package (pinned); see the hand-worked value in the tests.
- Per labeler: agreement with the leave-one-out majority on each answer pair the labeler
  ordered, and accuracy on gold items (the gold answer alone in the top group).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from itertools import combinations

from feedback_service.pairs import Groups, ranks, votes


def krippendorff_alpha(rankings_by_item: Mapping[int, Mapping[int, Groups]]) -> float | None:
    """rankings_by_item[item_id][labeler_id] = groups. None when alpha is undefined (too little data)."""
    import numpy as np  # lazy: keeps `import feedback_service` light
    import krippendorff

    multi = {item: by_lab for item, by_lab in sorted(rankings_by_item.items()) if len(by_lab) >= 2}
    if not multi:  # a unit rated once carries no agreement information
        return None
    labelers = sorted({lab for by_lab in multi.values() for lab in by_lab})
    units = [(item, a) for item, by_lab in multi.items() for a in sorted(ranks(next(iter(by_lab.values()))))]
    col = {u: j for j, u in enumerate(units)}
    data = np.full((len(labelers), len(units)), np.nan)  # (coders, units)
    for i, lab in enumerate(labelers):
        for item, by_lab in multi.items():
            for a, r in ranks(by_lab.get(lab, [])).items():
                data[i, col[(item, a)]] = r + 1
    try:
        value = float(krippendorff.alpha(reliability_data=data, level_of_measurement="ordinal"))
    except ValueError:  # one value in the whole domain: alpha is undefined
        return None
    return None if np.isnan(value) else value


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
