"""The PPO reward: rule callables, a learned reward model and/or a remote HTTP scorer, summed with weights.

Everything that scores is duck-typed as ``score(prompts: list[str], answers:
list[str]) -> list[float]``, so the reward stage's scorer (``reward.scorer``)
plugs in as it is. Rule callables are ``module:function`` import paths with
``fn(prompt, answer, **kwargs) -> float``; a few ready ones live at the end of
this module (they are what the tests and the shipped configs train on).
"""

from __future__ import annotations

import importlib
import json
import math
import urllib.request
from pathlib import Path
from typing import Callable, Protocol, Sequence

from alignloop.config import ConfigError

STATS_FILE = "reward_stats.json"  # {"mean": float, "std": float} of the reward model's scores on its training data


class Scorer(Protocol):
    def score(self, prompts: list[str], answers: list[str]) -> list[float]: ...


def import_callable(path: str) -> Callable:
    """``package.module:function`` -> the function; errors name the path."""
    if ":" not in path:
        raise ConfigError(f"reward rule {path!r}: expected 'module:function'")
    mod, name = path.split(":", 1)
    try:
        fn = getattr(importlib.import_module(mod), name)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"reward rule {path!r}: cannot import ({e})") from None
    if not callable(fn):
        raise ConfigError(f"reward rule {path!r} is not callable")
    return fn


class RuleScorer:
    """One rule callable applied per (prompt, answer)."""

    def __init__(self, fn: Callable[..., float], kwargs: dict | None = None, name: str = "rule"):
        self.fn, self.kwargs, self.name = fn, dict(kwargs or {}), name

    def score(self, prompts: list[str], answers: list[str]) -> list[float]:
        return [float(self.fn(p, a, **self.kwargs)) for p, a in zip(prompts, answers)]


class HTTPScorer:
    """A remote scorer speaking ``alignloop reward-serve``'s protocol (raw scores; normalisation happens here).

    POST {url}/score {"items": [{"prompt": str, "answer": str}, ...], "normalize": false} -> {"scores": [...]}
    """

    def __init__(self, url: str, timeout: float = 120.0, chunk: int = 256):
        self.url, self.timeout, self.chunk = url.rstrip("/"), timeout, chunk

    def score(self, prompts: list[str], answers: list[str]) -> list[float]:
        out: list[float] = []
        for i in range(0, len(prompts), self.chunk):
            items = [{"prompt": p, "answer": a} for p, a in zip(prompts[i:i + self.chunk], answers[i:i + self.chunk])]
            body = json.dumps({"items": items, "normalize": False}).encode()
            req = urllib.request.Request(self.url + "/score", data=body, headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=self.timeout) as r:
                scores = json.loads(r.read())["scores"]
            if len(scores) != len(items) or any(s is None for s in scores):
                raise RuntimeError(f"{self.url}/score returned {scores!r} for {len(items)} answers")
            out += [float(s) for s in scores]
        return out


class RewardModelScorer:
    """A reward-stage model directory (``AutoModelForSequenceClassification``, num_labels=1) scoring chat pairs.

    Prefers the reward stage's own ``reward.scorer.RewardScorer`` when that module exists;
    this fallback renders [user prompt, assistant answer] with the chat template and reads
    the score at the last real token (right padding, so the last 1 of the attention mask).
    """

    def __init__(self, path: str, batch_size: int = 8):
        import torch
        from transformers import AutoModelForSequenceClassification

        from alignloop.models import disable_dropout, load_tokenizer

        self.tok = load_tokenizer(path)
        self.model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, dtype=torch.float32)
        self.model.eval()
        disable_dropout(self.model)
        self.batch_size = batch_size
        self._torch = torch

    def score(self, prompts: list[str], answers: list[str]) -> list[float]:
        torch = self._torch
        out: list[float] = []
        for i in range(0, len(prompts), self.batch_size):
            texts = [self.tok.apply_chat_template([{"role": "user", "content": p}, {"role": "assistant", "content": a}],
                                                  tokenize=False)
                     for p, a in zip(prompts[i:i + self.batch_size], answers[i:i + self.batch_size])]
            enc = self.tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
            mask = enc["attention_mask"]
            pos = (mask.cumsum(-1) - 1).clamp(min=0)
            with torch.no_grad():
                base = getattr(self.model, self.model.base_model_prefix)
                hidden = base(input_ids=enc["input_ids"], attention_mask=mask, position_ids=pos).last_hidden_state
                T = mask.shape[1]
                last = T - 1 - mask.flip(-1).argmax(-1)  # (N,) last real token, any padding side
                s = self.model.score(hidden[torch.arange(hidden.shape[0]), last]).squeeze(-1)
            out.extend(float(x) for x in s)
        return out


def load_reward_stats(model_dir: str) -> tuple[float, float]:
    path = Path(model_dir) / STATS_FILE
    if not path.is_file():
        raise ConfigError(f"reward.normalize=stored: {path} not found (the reward stage writes the mean and std of its "
                          "scores there); use reward.normalize=fixed with reward.mean/reward.std instead")
    st = json.loads(path.read_text())
    mean, std = float(st["mean"]), float(st["std"])
    if not std > 0:
        raise ConfigError(f"{path}: std must be > 0, got {std}")
    return mean, std


class CombinedReward:
    """Σ_i w_i · scorer_i(prompts, answers), then EOS penalty, normalisation and clipping (in that order)."""

    def __init__(self, parts: Sequence[tuple[Scorer, float]], *, mean: float = 0.0, std: float = 1.0,
                 normalize: bool = False, clip: float | None = None, no_eos_penalty: float | None = None):
        if not parts:
            raise ConfigError("reward: nothing to score with")
        self.parts = list(parts)
        self.mean, self.std, self.normalize, self.clip, self.no_eos_penalty = mean, std, normalize, clip, no_eos_penalty

    def raw(self, prompts: list[str], answers: list[str]) -> list[float]:
        total = [0.0] * len(prompts)
        for scorer, w in self.parts:
            for i, s in enumerate(scorer.score(prompts, answers)):
                total[i] += w * s
        return total

    def shape(self, raw: Sequence[float], has_eos: Sequence[bool]) -> list[float]:
        """The score PPO optimises: EOS penalty replaces the score, then (s - mean)/std, then clip."""
        out = []
        for s, eos in zip(raw, has_eos):
            if not eos and self.no_eos_penalty is not None:
                s = self.no_eos_penalty
            if self.normalize:
                s = (s - self.mean) / self.std
            if self.clip is not None:
                s = min(max(s, -self.clip), self.clip)
            out.append(float(s))
        return out


def build_reward(cfg) -> CombinedReward:
    """From a ``RewardSectionConfig``; imports every rule up front so a typo fails before training."""
    parts: list[tuple[Scorer, float]] = []
    for rule in cfg.rules:
        parts.append((RuleScorer(import_callable(rule.fn), rule.kwargs, rule.fn), rule.weight))
    if cfg.model is not None:
        if not (Path(cfg.model) / "config.json").is_file():
            raise ConfigError(f"reward.model: {cfg.model} is not a model directory (no config.json)")
        try:
            from reward.scorer import RewardScorer  # the reward stage's scorer, when present

            scorer: Scorer = RewardScorer(cfg.model, normalize=False)  # raw: CombinedReward normalises once
        except ImportError:
            scorer = RewardModelScorer(cfg.model)
        parts.append((scorer, cfg.model_weight))
    if cfg.url is not None:
        parts.append((HTTPScorer(cfg.url), cfg.url_weight))  # reward-serve protocol; scores come back raw
    mean, std = 0.0, 1.0
    if cfg.normalize == "stored":
        mean, std = load_reward_stats(cfg.model)
    elif cfg.normalize == "fixed":
        mean, std = cfg.mean, cfg.std
    return CombinedReward(parts, mean=mean, std=std, normalize=cfg.normalize != "none", clip=cfg.clip,
                          no_eos_penalty=cfg.no_eos_penalty)


# ---------------------------------------------------------------- ready rules

def char_fraction(prompt: str, answer: str, chars: str = "e") -> float:
    """Fraction of the answer's characters that are in ``chars`` (0 for an empty answer)."""
    return sum(c in chars for c in answer) / len(answer) if answer else 0.0


def length_target(prompt: str, answer: str, target: int = 40, scale: float | None = None) -> float:
    """1 at ``target`` characters, falling linearly to 0 at distance ``scale`` (default: target)."""
    scale = scale or target
    return max(0.0, 1.0 - abs(len(answer) - target) / scale)


def contains(prompt: str, answer: str, text: str = "", case: bool = False) -> float:
    """1 if ``text`` occurs in the answer."""
    return float(text in answer) if case else float(text.lower() in answer.lower())


def brevity(prompt: str, answer: str, words: int = 20) -> float:
    """1 for answers of at most ``words`` words, decaying as exp(-(extra words)/words) beyond."""
    n = len(answer.split())
    return 1.0 if n <= words else math.exp(-(n - words) / words)
