"""Evaluation of a policy against its parent: reward-model win-rate, KL to the reference, length, property, gold.

- **win-rate**: greedy answers of the policy and of its parent to held-out prompts, both judged by
  the reward model; a win counts 1, a tie 0.5.
- **KL to the reference** (the parent): answers *sampled* from the policy at temperature 1, then
  KL ≈ mean over answers of Σ_t [log π(a_t|s_t) − log π_ref(a_t|s_t)] (the k1 estimator on the
  policy's own samples; unbiased for the sequence KL), plus the per-token mean.
- **length**: mean answer length in tokens and words (greedy answers).
- **property rate** (optional): share of greedy answers for which ``property(prompt, answer)`` is
  true — e.g. the demo's "at most 30 words", what its simulated labelers prefer.
- **gold agreement** (when gold items exist): share of gold items where the policy gives the
  gold-best answer the highest mean token log-probability among the item's answers.

Generation uses a rollout engine (vLLM by default); vLLM's CPU backend pins the process's threads,
so the pipeline runs this in its own worker process.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from alignloop.data import DataError, iter_rows, to_messages


def read_eval_prompts(path: str | Path, limit: int | None = None) -> list[list[dict]]:
    """Prompts as chat messages ending with a user turn, from {prompt}, {messages} or any SFT record format."""
    out: list[list[dict]] = []
    for row, where in iter_rows(path):
        if isinstance(row.get("prompt"), str) and row["prompt"].strip():
            msgs = [{"role": "user", "content": row["prompt"]}]
        elif isinstance(row.get("messages"), list) and row["messages"]:
            msgs = [dict(m) for m in row["messages"]]
            while msgs and msgs[-1].get("role") == "assistant":
                msgs.pop()
        else:
            msgs = to_messages(row, where)[:-1]
        if not msgs or msgs[-1].get("role") != "user":
            raise DataError(f"{where}: the prompt must end with a user turn")
        out.append(msgs)
        if limit and len(out) >= limit:
            break
    if not out:
        raise DataError(f"{path}: no prompts")
    return out


def read_gold(path: str | Path) -> list[dict]:
    """Gold items: {prompt | messages, answers: [str, ...], gold_best: index}."""
    items = []
    for row, where in iter_rows(path):
        answers = row.get("answers")
        if not isinstance(answers, list) or len(answers) < 2:
            raise DataError(f"{where}: 'answers' must list at least two answers")
        texts = [a["text"] if isinstance(a, dict) else a for a in answers]
        if not all(isinstance(t, str) and t.strip() for t in texts):
            raise DataError(f"{where}: every answer must be a non-empty string (or {{text: ...}})")
        best = row.get("gold_best")
        if not isinstance(best, int) or not 0 <= best < len(texts):
            raise DataError(f"{where}: 'gold_best' must be an index into answers (0..{len(texts) - 1})")
        prompt = row.get("prompt")
        msgs = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else row.get("messages")
        if not isinstance(msgs, list) or not msgs:
            raise DataError(f"{where}: needs 'prompt' or 'messages'")
        items.append({"messages": msgs, "answers": texts, "gold_best": best})
    return items


def model_max_len(model_path: str, cap: int = 1024) -> int:
    """The engine context: ``cap`` or the model's own limit when smaller (tiny test models have 512)."""
    from transformers import AutoConfig

    limit = getattr(AutoConfig.from_pretrained(model_path), "max_position_embeddings", cap) or cap
    return min(cap, int(limit))


def _generate(model_path: str, prompts: list[list[dict]], engine: str, *, max_new_tokens: int, temperature: float,
              seed: int, dtype: str):
    from alignloop.rollout import SamplingSettings, make_engine

    with make_engine(engine, model_path, dtype=dtype, seed=seed, max_model_len=model_max_len(model_path)) as eng:
        return [c[0] for c in eng.generate_chat(prompts, SamplingSettings(max_new_tokens=max_new_tokens,
                                                                          temperature=temperature, seed=seed))]


def win_rate(policy_rewards: Sequence[float], parent_rewards: Sequence[float], tol: float = 1e-6) -> float:
    """Share of prompts where the policy's answer scores higher (ties count half)."""
    if len(policy_rewards) != len(parent_rewards) or not policy_rewards:
        raise ValueError("win_rate needs two equally long, non-empty score lists")
    wins = sum(1.0 if a > b + tol else 0.5 if abs(a - b) <= tol else 0.0 for a, b in zip(policy_rewards, parent_rewards))
    return wins / len(policy_rewards)


def sequence_kl(policy_logprobs: Sequence[Sequence[float]], ref_logprobs: Sequence[Sequence[float]]) -> tuple[float, float]:
    """k1 estimate of KL(π‖π_ref) from the policy's own samples: (mean per answer, mean per token)."""
    per_answer, tokens, total = [], 0, 0.0
    for lp, lr in zip(policy_logprobs, ref_logprobs):
        if len(lp) != len(lr):
            raise ValueError(f"log-prob lengths differ: {len(lp)} vs {len(lr)}")
        d = sum(a - b for a, b in zip(lp, lr))
        per_answer.append(d)
        total, tokens = total + d, tokens + len(lp)
    return sum(per_answer) / max(1, len(per_answer)), total / max(1, tokens)


def evaluate_policy(policy: str, parent: str, reward_model: str | None, prompts_path: str, *, limit: int | None = None,
                    max_new_tokens: int = 64, engine: str = "auto", dtype: str = "float32", seed: int = 0,
                    property_fn: str | None = None, gold_path: str | None = None, gold_items: list[dict] | None = None,
                    out_path: str | Path | None = None) -> dict[str, Any]:
    """All evaluation numbers for ``policy`` against ``parent`` (which is also the KL reference)."""
    from alignloop.rollout import HFEngine
    from ppo.rewards import import_callable

    t0 = time.time()
    prompts = read_eval_prompts(prompts_path, limit)
    texts = [p[-1]["content"] for p in prompts]
    prop: Callable[[str, str], Any] | None = import_callable(property_fn) if property_fn else None
    gold = list(gold_items or []) + (read_gold(gold_path) if gold_path else [])
    print(f"[evaluate] {len(prompts)} held-out prompts: greedy answers of the policy and its parent", flush=True)
    pol = _generate(policy, prompts, engine, max_new_tokens=max_new_tokens, temperature=0.0, seed=seed, dtype=dtype)
    par = _generate(parent, prompts, engine, max_new_tokens=max_new_tokens, temperature=0.0, seed=seed, dtype=dtype)
    print("[evaluate] sampled policy answers for the KL estimate", flush=True)
    samples = _generate(policy, prompts, engine, max_new_tokens=max_new_tokens, temperature=1.0, seed=seed + 1, dtype=dtype)

    def side(comps) -> dict[str, Any]:  # noqa: ANN001
        answers = [c.text for c in comps]
        d: dict[str, Any] = {"answers": answers,
                             "length_tokens": sum(len(c.token_ids) for c in comps) / len(comps),
                             "length_words": sum(len(a.split()) for a in answers) / len(answers)}
        if prop is not None:
            d["property_rate"] = sum(bool(prop(t, a)) for t, a in zip(texts, answers)) / len(answers)
        return d

    result: dict[str, Any] = {"prompts": texts, "policy": side(pol), "parent": side(par), "policy_path": policy,
                              "parent_path": parent, "reward_model": reward_model}
    ref = HFEngine(parent, dtype=dtype)
    ref_lps = [ref.score(c.prompt_token_ids, c.token_ids) for c in samples]
    result["kl"], result["kl_per_token"] = sequence_kl([c.logprobs for c in samples], ref_lps)
    if gold:
        pol_hf = HFEngine(policy, dtype=dtype)
        hits = 0
        for g in gold:
            p_ids = pol_hf.apply_chat_template(g["messages"])
            means = []
            for a in g["answers"]:
                a_ids = pol_hf.tokenizer(a, add_special_tokens=False)["input_ids"]
                lp = pol_hf.score(p_ids, a_ids)
                means.append(sum(lp) / max(1, len(lp)))
            hits += int(max(range(len(means)), key=means.__getitem__) == g["gold_best"])
        result["gold_agreement"] = hits / len(gold)
        result["gold_items"] = len(gold)
    if reward_model:
        from reward.scorer import RewardScorer

        scorer = RewardScorer(reward_model)
        rp = scorer.score(prompts, result["policy"]["answers"])
        rq = scorer.score(prompts, result["parent"]["answers"])
        result["policy"]["reward"], result["parent"]["reward"] = sum(rp) / len(rp), sum(rq) / len(rq)
        result["policy"]["rewards"], result["parent"]["rewards"] = rp, rq
        result["win_rate"] = win_rate(rp, rq)
    result["seconds"] = round(time.time() - t0, 1)
    if out_path:
        Path(out_path).write_text(json.dumps(result, indent=1))
    return result


def summary(result: dict) -> dict[str, float]:
    """The scalar metrics of an evaluation (what gates and tables read)."""
    out = {"eval/kl": result["kl"], "eval/kl_per_token": result["kl_per_token"],
           "eval/length_tokens": result["policy"]["length_tokens"], "eval/length_words": result["policy"]["length_words"],
           "eval/parent_length_tokens": result["parent"]["length_tokens"]}
    for key in ("win_rate", "gold_agreement"):
        if key in result:
            out[f"eval/{key}"] = result[key]
    for who in ("policy", "parent"):
        for key in ("reward", "property_rate"):
            if key in result[who]:
                out[f"eval/{who}_{key}" if who == "parent" else f"eval/{key}"] = result[who][key]
    return out
