"""Online (iterative) DPO: each round 1 sample k answers per prompt from the current policy (vLLM with the
current LoRA adapter) -> 2 score them -> 3 best vs worst become pairs -> 4 train on them (reference: the
base with the adapter disabled) -> 5 save the adapter and load it into the engine for the next round.

Scorers: a rule callable ``module:function`` taking ``(prompt, answer) -> float`` (the prompt is the user's text,
or the chat history when there is more than one turn), the reward stage's model (``reward.scorer.RewardScorer``), or -- the human path -- the feedback service: the k answers are pushed to a
campaign as items for labelers to rank, and the run stops; the rankings come back as a feedback export that
``alignloop dpo data.feedback...`` trains on (docs/dpo.md).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

import torch

from alignloop import metrics as M
from alignloop.batching import global_batch_indices
from alignloop.config import ConfigError
from alignloop.data import DataError, iter_rows
from ppo.dpo_config import DPOConfig, RuleScorer
from ppo.dpo_data import DPOExample, sequence_logps
from ppo.dpo_trainer import DPOLearner

Scorer = Callable[[list[str], list[str]], list[float]]  # (prompts, answers) -> scores, one per answer


def read_prompts(path: str) -> list[list[dict]]:
    """Chat histories ending with a user turn, from rows with ``prompt`` (string or messages) or ``messages``."""
    from reward.data import _prompt

    out = []
    for row, where in iter_rows(path):
        if row.get("prompt") is None and not row.get("messages"):
            raise DataError(f"{where}: missing field 'prompt' (a string or a list of messages)")
        msgs = _prompt(row, where)
        if msgs[-1]["role"] != "user":
            raise DataError(f"{where}: the prompt must end with a user turn")
        out.append(msgs)
    if not out:
        raise DataError(f"{path}: no prompts")
    return out


def make_scorer(sc: RuleScorer) -> Scorer:
    """The reward stage's pieces: a rule by import path (``reward.rules.load_callable``) or ``RewardScorer``."""
    if sc.kind == "rule":
        from reward.rules import load_callable

        fn = load_callable(sc.function)
        return lambda prompts, answers: [float(fn(p, a)) for p, a in zip(prompts, answers)]
    if sc.kind == "reward_model":
        from reward.scorer import RewardScorer

        scorer = RewardScorer(sc.reward_model)
        return lambda prompts, answers: [float(x) for x in scorer.score(prompts, answers)]
    raise ConfigError(f"online.scorer.kind={sc.kind} has no in-loop scorer")


def check_online(cfg: DPOConfig) -> None:
    """Everything that can be checked before a model loads: prompt rows, the scorer."""
    read_prompts(cfg.online.prompts)
    sc = cfg.online.scorer
    if sc.kind == "rule":
        from reward.rules import load_callable

        load_callable(sc.function)
    elif sc.kind == "reward_model":
        from reward.scorer import resolve_reward_dir

        resolve_reward_dir(sc.reward_model)


def best_vs_worst(completions, scores: list[list[float]], min_gap: float) -> tuple[list[DPOExample], int]:
    """One pair per prompt from its k samples: highest score chosen, lowest rejected (first on ties);
    prompts whose best and worst differ by no more than ``min_gap`` teach nothing and are counted, not paired."""
    pairs, tied = [], 0
    for i, (samples, sc) in enumerate(zip(completions, scores)):
        best = max(range(len(sc)), key=lambda j: sc[j])
        worst = min(range(len(sc)), key=lambda j: sc[j])
        if sc[best] - sc[worst] <= min_gap or samples[best].token_ids == samples[worst].token_ids:
            tied += 1
            continue
        p = samples[best].prompt_token_ids
        w, l = samples[best].token_ids, samples[worst].token_ids
        pairs.append(DPOExample(p + w, [-100] * len(p) + w, p + l, [-100] * len(p) + l, f"round sample {i}",
                                (samples[best].cumulative_logprob, samples[worst].cumulative_logprob)))
    return pairs, tied


@torch.no_grad()
def logprob_gap(learner: DPOLearner, pairs: list[DPOExample]) -> float:
    """Σ_seq |Σ_t log π_trainer - Σ_t log π_engine| / answer tokens, on the sampled pairs before training.

    The engine sampled with the adapter the trainer saved last round, so this is ~0 when the weight sync
    took effect (float32 on CPU: ~1e-6) and large when the engine samples from a stale policy.
    """
    gap = tokens = 0.0
    mb = learner.cfg.reference.micro_batch_size
    for i in range(0, len(pairs), mb):
        chunk = pairs[i:i + mb]
        logps, n = sequence_logps(learner.model, learner.batch(chunk))  # (2b,), (2b,)
        engine = torch.tensor([x for e in chunk for x in e.engine_logps], dtype=torch.float64)  # (2b,)
        gap += float((logps.double().cpu() - engine).abs().sum())
        tokens += float(n.sum())
    return gap / max(tokens, 1.0)


def push_to_feedback(cfg: DPOConfig, run: Path, prompts: list[list[dict]], completions) -> dict:
    """The human path: the k answers of each prompt become one item of the campaign, for labelers to rank."""
    import os

    from feedback_service.client import FeedbackClient
    from reward.feedback import _campaign_id

    src = cfg.online.scorer.feedback
    token = src.token.get_secret_value() if src.token is not None else os.environ.get(src.token_env)
    if not token:
        raise ConfigError(f"online.scorer.feedback: no token (set online.scorer.feedback.token or ${src.token_env})")
    o = cfg.online
    items, unpushable = [], 0
    for msgs, samples in zip(prompts, completions):
        # Labelers rank distinct, non-empty answers; the service refuses NUL characters (counted, not pushed).
        texts = list(dict.fromkeys(s.text for s in samples if s.text.strip()))
        unpushable += sum("\x00" in t for t in texts)
        texts = [t for t in texts if "\x00" not in t]
        if len(texts) < 2:
            continue
        item = {"prompt": msgs[0]["content"]} if len(msgs) == 1 else {"messages": msgs}
        item["answers"] = [{"text": t, "model_id": cfg.model.path, "model_version": cfg.run_name,
                            "sampling": {"temperature": o.temperature, "top_p": o.top_p}} for t in texts]
        items.append(item)
    from feedback_service.client import FeedbackError

    try:
        with FeedbackClient(src.url, token) as fc:
            out = fc.add_items(_campaign_id(fc, src.campaign), items)
    except FeedbackError as e:
        raise ConfigError(f"online.scorer.feedback: the service at {src.url} refused the items: {e}") from None
    rec = {"campaign": src.campaign, "items": len(items), "created": out["created"], "duplicates": out["duplicates"],
           "prompts": len(prompts), "answers_with_nul_not_pushed": unpushable}
    (run / "feedback_items.json").write_text(json.dumps(rec, indent=1) + "\n")
    return rec


def online_dpo(cfg: DPOConfig, run: Path) -> None:
    o = cfg.online
    prompts = read_prompts(o.prompts)
    human = o.scorer.kind == "feedback"
    scorer = None if human else make_scorer(o.scorer)
    learner = DPOLearner(cfg, total_steps=o.rounds * o.steps_per_round)
    from alignloop.rollout import SamplingSettings, make_engine

    from transformers import AutoConfig

    max_pos = getattr(AutoConfig.from_pretrained(learner.model_path), "max_position_embeddings", None) or 1 << 30
    engine = make_engine(o.engine, learner.model_path, dtype=cfg.model.dtype, seed=cfg.train.seed,
                         max_model_len=min(cfg.data.max_length + o.max_new_tokens, max_pos), enable_lora=True,
                         max_lora_rank=cfg.peft.lora_r, chat_template=cfg.model.chat_template)
    logger = M.MetricsLogger(run)
    G = cfg.train.global_batch_size
    step = 0
    adapter: Path | None = None
    print(f"[alignloop] online dpo: {o.rounds} rounds x {o.prompts_per_round} prompts x k={o.k}, {o.steps_per_round} "
          f"steps per round, engine={engine.kind}, scorer={o.scorer.kind}, trainable {learner.trainable:,} params",
          flush=True)
    try:
        for rnd in range(o.rounds):
            # 1. sample k answers per prompt from the current policy (round 0: the base, no adapter yet)
            t0 = time.perf_counter()
            start = rnd * o.prompts_per_round
            chats = [prompts[(start + i) % len(prompts)] for i in range(o.prompts_per_round)]
            engine.load_lora(adapter)
            settings = SamplingSettings(max_new_tokens=o.max_new_tokens, temperature=o.temperature, top_p=o.top_p,
                                        n=o.k, seed=cfg.train.seed + 1000 * rnd)
            completions = engine.generate_chat(chats, settings)
            t_rollout = time.perf_counter() - t0
            if human:  # the human path: hand the answers to labelers and stop
                rec = push_to_feedback(cfg, run, chats, completions)
                print(f"[alignloop] pushed {rec['items']} items to campaign {rec['campaign']!r} for ranking; train on "
                      "their export with `alignloop dpo 'data.feedback={url: ..., campaign: ...}'`", flush=True)
                return
            # 2. score
            t0 = time.perf_counter()
            # a single user turn is passed as its text, a longer history as messages (the reward stage's convention)
            flat_p = [c[0]["content"] if len(c) == 1 else c for c, s in zip(chats, completions) for _ in s]
            flat_a = [x.text for s in completions for x in s]
            flat = scorer(flat_p, flat_a)
            if len(flat) != len(flat_a):
                raise ConfigError(f"online.scorer returned {len(flat)} scores for {len(flat_a)} answers")
            scores = [flat[i * o.k:(i + 1) * o.k] for i in range(len(chats))]
            t_score = time.perf_counter() - t0
            # 3. best vs worst
            pairs, tied = best_vs_worst(completions, scores, o.min_score_gap)
            rec = {M.DPO_ROUND: rnd + 1, M.REWARD_MEAN: sum(flat) / len(flat), M.DPO_PAIRS: len(pairs), M.DPO_TIED: tied,
                   M.DPO_SCORE_BEST: sum(max(s) for s in scores) / len(scores),
                   M.DPO_SCORE_WORST: sum(min(s) for s in scores) / len(scores),
                   M.ROLLOUT_ANSWER_LENGTH: sum(len(x.token_ids) for s in completions for x in s) / len(flat),
                   M.TIME_ROLLOUT: t_rollout, M.TIME_SCORE: t_score}
            if pairs:  # the sync check: the engine's sampled log-probs against the trainer's current policy
                rec[M.ROLLOUT_LOGPROB_DIFF] = logprob_gap(learner, pairs)
            # 4. train on this round's pairs
            t0 = time.perf_counter()
            if not pairs:
                print(f"[alignloop] round {rnd + 1}: every prompt tied; no update this round", flush=True)
                step += o.steps_per_round
                logger.log(step, rec)
                continue
            for s in range(o.steps_per_round):
                idx = global_batch_indices(len(pairs), G, s, cfg.train.seed + rnd)
                train = learner.step(pairs, idx)
                step += 1
                if s + 1 < o.steps_per_round:
                    logger.log(step, train)
            rec.update(train)
            rec[M.TIME_TRAIN] = time.perf_counter() - t0
            # 5. the new adapter goes to the engine for the next round
            t0 = time.perf_counter()
            adapter = run / "rounds" / f"round-{rnd + 1}" / "adapter"
            learner.save_adapter(adapter)
            rec[M.TIME_SYNC] = time.perf_counter() - t0
            logger.log(step, rec)
            with open(run / "rounds" / f"round-{rnd + 1}" / "samples.jsonl", "w") as fh:
                for c, s, sc in zip(chats, completions, scores):
                    fh.write(json.dumps({"prompt": c, "answers": [x.text for x in s], "scores": sc}) + "\n")
        learner.save_final(run)
    finally:
        engine.close()
        logger.close()
