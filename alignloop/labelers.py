"""Simulated labelers: scripted HTTP clients that rank items through the feedback service's API.

They stand in for people in the demo and the tests, and go through exactly the path people do
(token, ``next item`` lease, ranking with ties, idempotent submit). Each ranks by a **hidden,
documented preference** — a function ``utility(prompt, answer) -> float``, higher is better — plus
Gaussian noise on every judgement, and some labelers disagree on purpose (a ``contrarian`` share
of their rankings is reversed), so the export's aggregation and the agreement statistics see what
real labeling looks like.

The demo's preference, :func:`concise`: **shorter answers are better** (word count), with a bonus
for ending with the house sign-off. It is learnable by a reward model and visible in the answers:
after RLHF the policy's answers get shorter.
"""

from __future__ import annotations

import random
import threading
import time
from dataclasses import dataclass
from typing import Callable

from feedback_service.client import FeedbackClient

Utility = Callable[[str, str], float]


def word_count(text: str) -> int:
    return len(text.split())


def concise(prompt: str, answer: str) -> float:
    """The demo labelers' hidden preference: fewer words is better (one unit per word)."""
    return -float(word_count(answer))


def concise_property(prompt: str, answer: str, words: int = 30) -> bool:
    """What the demo reports: the answer has at most ``words`` words (what the labelers reward)."""
    return 0 < word_count(answer) <= words


@dataclass(frozen=True)
class LabelerSpec:
    name: str
    noise: float = 2.0  # std of Gaussian noise added to each answer's utility (utility units)
    contrarian: float = 0.0  # probability of reversing a whole ranking
    seed: int = 0


def rank_answers(utility: Utility, prompt: str, answers: list[dict], spec: LabelerSpec, rng: random.Random,
                 tie_tolerance: float = 0.0) -> list[list[int]]:
    """Answer ids best first; answers whose noisy utilities are within ``tie_tolerance`` share a group."""
    scored = sorted(((utility(prompt, a["text"]) + rng.gauss(0.0, spec.noise), a["id"]) for a in answers), reverse=True)
    if rng.random() < spec.contrarian:
        scored.reverse()
    groups: list[list[int]] = []
    last: float | None = None
    for u, aid in scored:
        if groups and last is not None and abs(u - last) <= tie_tolerance:
            groups[-1].append(aid)
        else:
            groups.append([aid])
        last = u
    return groups


def run_labeler(url: str, token: str, campaign_id: int, utility: Utility, spec: LabelerSpec, *,
                max_items: int | None = None, stop: threading.Event | None = None, pause_s: float = 0.0) -> int:
    """Rank items until the campaign has nothing left for this labeler; returns how many were ranked."""
    rng = random.Random(spec.seed)
    done = 0
    with FeedbackClient(url, token, retries=3) as fc:
        while (max_items is None or done < max_items) and not (stop and stop.is_set()):
            assignment = fc.next_item(campaign_id)
            if assignment is None:
                break
            item = assignment["item"]
            prompt = item["prompt"] or (item["messages"] or [{}])[-1].get("content", "")
            ranking = rank_answers(utility, prompt, item["answers"], spec, rng)
            fc.submit_ranking(item["id"], ranking, rationale=f"simulated labeler {spec.name}")
            done += 1
            if pause_s:
                time.sleep(pause_s)
    return done


def run_labelers(url: str, tokens: dict[str, str], campaign_id: int, utility: Utility, specs: list[LabelerSpec],
                 **kwargs) -> dict[str, int]:
    """All labelers at once, one thread each (they race for items like people do); returns rankings per labeler."""
    counts: dict[str, int] = {}
    errors: list[BaseException] = []

    def work(spec: LabelerSpec) -> None:
        try:
            counts[spec.name] = run_labeler(url, tokens[spec.name], campaign_id, utility, spec, **kwargs)
        except BaseException as e:  # noqa: BLE001 - re-raised below in the caller's thread
            errors.append(e)

    threads = [threading.Thread(target=work, args=(s,), name=f"labeler-{s.name}") for s in specs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return counts
