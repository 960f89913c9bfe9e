"""Rule-based and programmatic rewards, alone or added to the learned reward, with weights (for PPO).

A rule is any Python callable ``fn(prompt, answer) -> float`` named by import path
``"module:function"`` (``"module:Class.method"`` and nested attributes work too).
``CombinedReward`` adds ``weight x value`` of each term; the learned term is a
scorer object (``RewardScorer``, ``HTTPRewardScorer``) given by a path or a URL.

    reward:
      model: runs/reward/final       # or http://host:8100, or null for rules only
      model_weight: 1.0
      normalize: true                # learned reward as (r - mean) / std
      rules:
        - {function: "reward.rules:length_penalty", weight: 0.1}
        - {function: "my_pkg.checks:answer_is_json", weight: 1.0}
"""

from __future__ import annotations

import importlib
import math
from typing import Callable, Sequence

from pydantic import Field, model_validator

from alignloop.config import ConfigError, Section

RuleFn = Callable[[object, str], float]


class RuleTerm(Section):
    function: str = Field(..., description="import path 'module:function' of fn(prompt, answer) -> float")
    weight: float = Field(1.0, description="multiplies the rule's value")


class RewardFunctionConfig(Section):
    model: str | None = Field(None, description="learned reward: a reward model directory (run/final) or an http(s):// reward-serve URL; null for rules only")
    model_weight: float = Field(1.0, description="weight of the learned reward")
    normalize: bool = Field(True, description="learned reward as (r - mean) / std from the model's reward_stats.json")
    rules: list[RuleTerm] = Field(default_factory=list, description="programmatic rewards added with their weights")

    @model_validator(mode="after")
    def _something(self):
        if self.model is None and not self.rules:
            raise ValueError("reward: give a learned model, rules, or both")
        return self


def load_callable(spec: str) -> Callable:
    """``"package.module:attr.path"`` -> the object; errors name the spec."""
    if ":" not in spec:
        raise ConfigError(f"reward rule {spec!r}: expected 'module:function'")
    mod_name, attr = spec.split(":", 1)
    try:
        obj = importlib.import_module(mod_name)
    except ImportError as e:
        raise ConfigError(f"reward rule {spec!r}: cannot import module {mod_name!r} ({e})") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ConfigError(f"reward rule {spec!r}: {mod_name} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ConfigError(f"reward rule {spec!r}: {attr!r} is not callable")
    return obj


class CombinedReward:
    """Σ_i w_i · rule_i(prompt, answer) + w_model · learned(prompt, answer)."""

    def __init__(self, rules: Sequence[tuple[str, RuleFn, float]] = (), learned=None, learned_weight: float = 1.0,
                 normalize: bool = True):
        if learned is None and not rules:
            raise ConfigError("reward: give a learned model, rules, or both")
        self.rules, self.learned, self.learned_weight, self.normalize = list(rules), learned, learned_weight, normalize

    def components(self, prompts: Sequence, answers: Sequence[str]) -> dict[str, list[float]]:
        """Each term's unweighted values (for logging: ``reward/<name>``)."""
        out: dict[str, list[float]] = {}
        if self.learned is not None:
            out["model"] = list(self.learned.score(prompts, answers, normalize=self.normalize))
        for name, fn, _ in self.rules:
            vals = []
            for p, a in zip(prompts, answers):
                v = float(fn(p, a))
                if not math.isfinite(v):
                    raise ValueError(f"reward rule {name} returned {v} for answer {a[:60]!r}")
                vals.append(v)
            out[name] = vals
        return out

    def score(self, prompts: Sequence, answers: Sequence[str]) -> list[float]:
        parts = self.components(prompts, answers)
        weights = {name: w for name, _, w in self.rules}
        weights["model"] = self.learned_weight
        return [sum(weights[k] * parts[k][i] for k in parts) for i in range(len(answers))]


def build_reward(cfg: RewardFunctionConfig, **scorer_kwargs) -> CombinedReward:
    """The reward PPO optimises, from its config section."""
    rules = [(t.function, load_callable(t.function), t.weight) for t in cfg.rules]
    learned = None
    if cfg.model is not None:
        if cfg.model.startswith(("http://", "https://")):
            from reward.scorer import HTTPRewardScorer

            learned = HTTPRewardScorer(cfg.model)
        else:
            from reward.scorer import RewardScorer

            learned = RewardScorer(cfg.model, **scorer_kwargs)
    return CombinedReward(rules, learned, cfg.model_weight, cfg.normalize)


# ---- a few ready rules (examples of the signature) ----

def length_penalty(prompt, answer: str) -> float:
    """-1 per 1,000 characters: discourages padding answers out (a common reward hack)."""
    return -len(answer) / 1000.0


def non_empty(prompt, answer: str) -> float:
    """1 for an answer with any non-space character, else 0."""
    return 1.0 if answer.strip() else 0.0
