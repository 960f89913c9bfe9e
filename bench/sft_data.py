"""A small, varied instruction data set for the SFT benchmark, written by the project.

Records follow the brief's schema (``instruction``, optional ``input``,
``output``). Answers range from one line to a dozen list items, so a micro-batch
mixes short and long rows and right-padding wastes a realistic share of compute
(instruction corpora have a long-tailed length distribution).
Deterministic for a seed; no network, no third-party text.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

TOPICS = [
    ("composting", "kitchen scraps", "a garden bed"), ("version control", "a commit", "a shared repository"),
    ("bread baking", "dough", "an oven"), ("bicycle maintenance", "a chain", "a repair stand"),
    ("budgeting", "monthly expenses", "a spreadsheet"), ("unit testing", "a function", "a test suite"),
    ("houseplants", "a fern", "a north-facing window"), ("running", "a training plan", "a 10 km race"),
    ("public speaking", "a short talk", "a small audience"), ("SQL indexes", "a query", "a large table"),
    ("note taking", "a lecture", "a notebook"), ("rainwater harvesting", "a barrel", "a roof gutter"),
    ("learning a language", "new vocabulary", "a daily routine"), ("home networking", "a router", "a small flat"),
    ("camping", "a tent", "a windy ridge"), ("code review", "a pull request", "a busy team"),
    ("meal planning", "a weekly menu", "a tight budget"), ("time management", "a to-do list", "a long project"),
    ("photography", "natural light", "a portrait"), ("first aid", "a small cut", "a hiking trip"),
    ("backups", "family photos", "an external drive"), ("beekeeping", "a hive", "early spring"),
    ("job interviews", "a common question", "a video call"), ("recycling", "plastic packaging", "a city scheme"),
]

VERBS = ["check", "prepare", "clean", "measure", "write down", "compare", "schedule", "review", "label", "test"]
ADJ = ["simple", "careful", "steady", "small", "regular", "clear", "patient", "practical", "quiet", "short"]
REASONS = [
    "it prevents most of the common mistakes", "it saves time later", "it makes problems visible early",
    "it keeps the result predictable", "it is easy to repeat", "beginners often skip it",
    "it costs almost nothing", "it builds a habit that lasts",
]


def _sentence(rng: random.Random, topic: str, thing: str, place: str) -> str:
    return (f"{rng.choice(ADJ).capitalize()} attention to {thing} matters in {topic}: "
            f"{rng.choice(VERBS)} it before you move on to {place}, because {rng.choice(REASONS)}.")


def _steps(rng: random.Random, n: int, thing: str, place: str) -> str:
    out = []
    for i in range(1, n + 1):
        out.append(f"{i}. {rng.choice(VERBS).capitalize()} {thing} with a {rng.choice(ADJ)} routine near {place}; "
                   f"{rng.choice(REASONS)}.")
    return "\n".join(out)


def make_records(n: int = 200, seed: int = 0) -> list[dict]:
    """``n`` instruction records of seven kinds with answer lengths from ~10 to ~170 tokens."""
    rng = random.Random(seed)
    recs: list[dict] = []
    for i in range(n):
        topic, thing, place = TOPICS[i % len(TOPICS)]
        kind = rng.randrange(7)
        if kind == 0:  # one-line definition
            recs.append({"instruction": f"In one sentence, what is {topic}?",
                         "output": f"{topic.capitalize()} is the practice of handling {thing} so that {place} works well."})
        elif kind == 1:  # step list, 3-9 steps
            k = rng.randint(3, 8)
            recs.append({"instruction": f"Give me {k} steps to get started with {topic}.",
                         "output": f"Here are {k} steps for {topic}:\n" + _steps(rng, k, thing, place)})
        elif kind == 2:  # explain with paragraphs, 2-7 sentences
            k = rng.randint(2, 6)
            recs.append({"instruction": f"Explain why {thing} matters in {topic}.",
                         "output": " ".join(_sentence(rng, topic, thing, place) for _ in range(k))})
        elif kind == 3:  # summarise an input passage (long prompt, short answer)
            passage = " ".join(_sentence(rng, topic, thing, place) for _ in range(rng.randint(2, 5)))
            recs.append({"instruction": "Summarise the following notes in one sentence.", "input": passage,
                         "output": f"The notes say that {thing} deserves {rng.choice(ADJ)} care in {topic}."})
        elif kind == 4:  # yes/no with a reason
            recs.append({"instruction": f"Should a beginner in {topic} worry about {thing}?",
                         "output": f"Yes, a little: {rng.choice(REASONS)}."})
        elif kind == 5:  # compare two topics
            other = TOPICS[(i * 7 + 3) % len(TOPICS)]
            k = rng.randint(1, 4)
            body = " ".join(_sentence(rng, t[0], t[1], t[2]) for t in (rng.choice([(topic, thing, place), other])
                                                                        for _ in range(k)))
            recs.append({"instruction": f"Compare {topic} with {other[0]}.",
                         "output": f"Both reward {rng.choice(ADJ)} habits. {body}"})
        else:  # rewrite an input (medium prompt and answer)
            text = " ".join(_sentence(rng, topic, thing, place) for _ in range(rng.randint(1, 3)))
            recs.append({"instruction": "Rewrite this text in a friendlier tone.", "input": text,
                         "output": "Good news! " + text.replace("matters", "really helps").replace("because", "since")})
    return recs


def write_jsonl(records: list[dict], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as fh:
        for r in records:
            fh.write(json.dumps(r) + "\n")
    return path
