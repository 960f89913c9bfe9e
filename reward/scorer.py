"""Scoring (prompt, answer) batches with a trained reward model: in process, in a Ray actor, or over HTTP.

``RewardScorer`` is a plain class (no Ray, no web framework) that renders every
(prompt, answer) exactly as training did (chat template, cut from the front to
the training max_length) and reads the score at the last real token with the same
forward pass. ``RewardScorerActor`` is a thin Ray shell around it for PPO;
``HTTPRewardScorer`` calls ``alignloop reward-serve`` with the same ``score`` method.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any, Sequence

Prompt = str | list[dict]  # a user message, or a chat history ending with a user turn


def resolve_reward_dir(path: str | Path) -> Path:
    """A reward model directory: ``final/`` itself or a run directory that holds one."""
    from alignloop.config import ConfigError

    p = Path(path).expanduser()
    if (p / "final" / "config.json").is_file():
        p = p / "final"
    if not (p / "config.json").is_file():
        raise ConfigError(f"reward model: {p} is not a reward model directory (expected a run's final/ with config.json)")
    return p


def conversation(prompt: Prompt, answer: str) -> list[dict]:
    msgs = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else [dict(m) for m in prompt]
    return msgs + [{"role": "assistant", "content": answer}]


class RewardScorer:
    """Scores batches of (prompt, answer) with the reward model in ``path`` (a run's ``final/``).

    ``normalize=True`` returns (r - mean) / std with the statistics saved at training time
    (``reward_stats.json``), the scale PPO expects.
    """

    def __init__(self, path: str | Path, *, batch_size: int = 16, normalize: bool = False, max_length: int | None = None,
                 dtype: str = "float32", device: str | None = None, threads: int | None = None):
        import torch
        from transformers import AutoModelForSequenceClassification

        from alignloop.models import disable_dropout, load_tokenizer, torch_dtype
        from alignloop.strategy import train_device
        from reward.config import resolve_packing
        from reward.model import RewardModel

        if threads:
            torch.set_num_threads(threads)
        self.path = resolve_reward_dir(path)
        self.stats: dict[str, Any] = json.loads((self.path / "reward_stats.json").read_text()) \
            if (self.path / "reward_stats.json").is_file() else {}
        self.max_length = max_length or int(self.stats.get("max_length") or 1024)
        self.batch_size, self.normalize = batch_size, normalize
        self.device = torch.device(device) if device is not None else train_device()  # the GPU when there is one
        if normalize and not self.stats.get("std"):
            from alignloop.config import ConfigError

            raise ConfigError(f"reward model {self.path}: normalize=True needs reward_stats.json with mean and std")
        self.tok = load_tokenizer(str(self.path))
        seq = AutoModelForSequenceClassification.from_pretrained(str(self.path), num_labels=1, dtype=torch_dtype(dtype))
        disable_dropout(seq)
        self.model = RewardModel(seq).to(device).eval()
        # one conversation per answer here: packed rows only where attention has varlen kernels (data.packing=auto)
        self.packing = resolve_packing("auto", seq.config._attn_implementation)
        self._lock = threading.Lock()  # one forward at a time (torch threads are shared)

    def score_conversations(self, conversations: Sequence[list[dict]], normalize: bool | None = None) -> list[float]:
        import torch

        from reward.data import TokenizedPreference, render
        from reward.trainer import collate

        ids = [render(self.tok, c, self.max_length)[0] for c in conversations]
        out: list[float] = []
        with self._lock, torch.no_grad():
            for i in range(0, len(ids), self.batch_size):
                chunk = [TokenizedPreference([s], None, "") for s in ids[i: i + self.batch_size]]
                b = collate(chunk, self.tok.pad_token_id, packing=self.packing)
                out += self.model(**b.to(self.device).model_inputs).cpu().tolist()
        if self.normalize if normalize is None else normalize:
            mean, std = float(self.stats["mean"]), float(self.stats["std"])
            out = [(r - mean) / std for r in out]
        return out

    def score(self, prompts: Sequence[Prompt], answers: Sequence[str], normalize: bool | None = None) -> list[float]:
        """One reward per (prompt, answer); prompts are strings or chat histories."""
        if len(prompts) != len(answers):
            raise ValueError(f"{len(prompts)} prompts but {len(answers)} answers")
        return self.score_conversations([conversation(p, a) for p, a in zip(prompts, answers)], normalize)


class HTTPRewardScorer:
    """The same ``score`` API against ``alignloop reward-serve`` (a reward model living elsewhere)."""

    def __init__(self, url: str, *, timeout: float = 120.0, normalize: bool | None = None, chunk: int = 256):
        import httpx

        self.url = url.rstrip("/")
        self.normalize, self.chunk = normalize, chunk
        self._http = httpx.Client(base_url=self.url, timeout=timeout)

    def score(self, prompts: Sequence[Prompt], answers: Sequence[str], normalize: bool | None = None) -> list[float]:
        if len(prompts) != len(answers):
            raise ValueError(f"{len(prompts)} prompts but {len(answers)} answers")
        normalize = self.normalize if normalize is None else normalize
        out: list[float] = []
        for i in range(0, len(prompts), self.chunk):
            body: dict[str, Any] = {"items": [{"prompt": p, "answer": a} for p, a in
                                              zip(prompts[i: i + self.chunk], answers[i: i + self.chunk])]}
            if normalize is not None:
                body["normalize"] = normalize
            r = self._http.post("/score", json=body)
            if r.status_code != 200:
                raise RuntimeError(f"reward server {self.url} answered HTTP {r.status_code}: {r.text[:500]}")
            out += r.json()["scores"]
        return out

    def close(self) -> None:
        self._http.close()


def reward_scorer_actor(path: str | Path, *, num_cpus: float = 1, **kwargs):
    """A Ray actor holding a :class:`RewardScorer` (typed ``score`` method); ``ray.get(a.score.remote(p, a))``."""
    import ray

    @ray.remote(num_cpus=num_cpus)
    class RewardScorerActor:
        def __init__(self) -> None:
            self.scorer = RewardScorer(path, **kwargs)

        def score(self, prompts: list[Prompt], answers: list[str], normalize: bool | None = None) -> list[float]:
            return self.scorer.score(prompts, answers, normalize)

        def stats(self) -> dict:
            return self.scorer.stats

    return RewardScorerActor.remote()
