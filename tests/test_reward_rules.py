"""Programmatic rewards by import path, combined with the learned reward with weights."""

import json

import pytest
import torch

from alignloop.config import ConfigError
from reward.rules import CombinedReward, RewardFunctionConfig, build_reward, length_penalty, load_callable, non_empty


def shouty(prompt, answer):  # a rule defined in a test module, imported by path like any user rule
    return float(answer.count("!"))


def test_load_callable_and_clear_errors():
    assert load_callable("reward.rules:length_penalty") is length_penalty
    assert load_callable("test_reward_rules:shouty")("p", "a!!") == 2.0
    with pytest.raises(ConfigError, match="expected 'module:function'"):
        load_callable("reward.rules.length_penalty")
    with pytest.raises(ConfigError, match="cannot import module 'no_such_mod'"):
        load_callable("no_such_mod:f")
    with pytest.raises(ConfigError, match="has no attribute 'nope'"):
        load_callable("reward.rules:nope")
    with pytest.raises(ConfigError, match="is not callable"):
        load_callable("reward.rules:math.pi")


def test_rules_only_weighted_sum():
    cfg = RewardFunctionConfig(rules=[{"function": "reward.rules:non_empty", "weight": 2.0},
                                      {"function": "test_reward_rules:shouty", "weight": -0.5}])
    r = build_reward(cfg)
    got = r.score(["q", "q", "q"], ["", "ok!", "wow!!!"])
    assert got == [0.0, 2.0 - 0.5, 2.0 - 1.5]
    assert r.components(["q"], ["hi!"]) == {"reward.rules:non_empty": [1.0], "test_reward_rules:shouty": [1.0]}
    with pytest.raises(Exception, match="give a learned model, rules, or both"):
        RewardFunctionConfig()


def test_non_finite_rule_value_is_an_error():
    r = CombinedReward([("nan", lambda p, a: float("nan"), 1.0)])
    with pytest.raises(ValueError, match="returned nan"):
        r.score(["q"], ["a"])


def test_learned_plus_rules(tiny_model, tmp_path):
    from alignloop.models import load_tokenizer
    from alignloop.sections import ModelConfig, PeftConfig
    from reward.model import load_reward_model
    from reward.scorer import RewardScorer

    tok = load_tokenizer(str(tiny_model))
    torch.manual_seed(0)
    m = load_reward_model(ModelConfig(path=str(tiny_model)), PeftConfig(method="full"), str(tiny_model), tok.pad_token_id)
    final = tmp_path / "final"
    m.seq.save_pretrained(final)
    tok.save_pretrained(final)
    (final / "reward_stats.json").write_text(json.dumps({"mean": 1.0, "std": 4.0, "max_length": 64}))
    cfg = RewardFunctionConfig(model=str(tmp_path), model_weight=0.5, normalize=True,  # a run dir resolves to final/
                               rules=[{"function": "test_reward_rules:shouty", "weight": 3.0}])
    combined = build_reward(cfg)
    prompts, answers = ["Say hi", "Add 2+2"], ["hi!", "4"]
    raw = RewardScorer(final).score(prompts, answers)
    want = [0.5 * (r - 1.0) / 4.0 + 3.0 * a.count("!") for r, a in zip(raw, answers)]
    assert combined.score(prompts, answers) == pytest.approx(want, abs=1e-6)
    assert length_penalty("q", "x" * 500) == -0.5 and non_empty("q", "  ") == 0.0
