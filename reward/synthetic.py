"""Synthetic preference rows with a known rule (for tests, smoke runs and the benchmark).

The preferred answer contains ``marker``; the other answer has the same words with a
``decoy`` of similar length instead, so length is no shortcut.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

TOPICS = ["the sea", "a cat", "the moon", "bread", "rain", "a fox", "numbers", "music", "trees", "a river", "snow", "the sun"]


def marker_rows(n: int, marker: str = "please", decoy: str = "sorry", seed: int = 0, ranked_k: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        topic = rng.choice(TOPICS)
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        prompt = f"Tell me about {topic}. What is {a} + {b}?"
        body = f"{topic.capitalize()} is nice. The answer is {a + b}."
        words = body.split()
        pos = rng.randint(0, len(words))
        good = " ".join(words[:pos] + [marker] + words[pos:])
        bad = " ".join(words[:pos] + [decoy] + words[pos:])
        if ranked_k >= 3:  # best: marker; then decoy; then answers without either word
            rest = [" ".join(words[:pos] + ["x" * (j + 1)] + words[pos:]) for j in range(ranked_k - 2)]
            rows.append({"prompt": prompt, "ranked": [good, bad, *rest]})
        else:
            rows.append({"prompt": prompt, "chosen": good, "rejected": bad})
    return rows


def write_rows(rows: list[dict], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
