"""Online (iterative) DPO: each round 1 sample k answers per prompt from the current policy (vLLM with the
current LoRA adapter) -> 2 score them -> 3 best vs worst become pairs -> 4 train on them (reference: the
base with the adapter disabled) -> 5 save the adapter and load it into the engine for the next round.

Scorers: a rule callable ``module:function`` taking ``(prompt, answer) -> float`` (the prompt is the user's text,
or the chat history when there is more than one turn), the reward stage's model (``reward.scorer.RewardScorer``), or -- the human path -- the feedback service: the k answers are pushed to a
campaign as items for labelers to rank, and the run stops; the rankings come back as a feedback export that
``alignloop dpo data.feedback...`` trains on (docs/dpo.md).

A checkpoint after every round (policy, optimizer, scheduler, RNG, round, prompt position, the adapter the
engine samples from next) lets ``resume=true`` continue a killed run exactly where the uninterrupted one would be.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Callable

import torch

from alignloop import metrics as M
from alignloop import rundir
from alignloop.batching import global_batch_indices
from alignloop.config import ConfigError
from alignloop.data import DataError, iter_rows
from ppo.dpo_config import DPOConfig, RuleScorer
from ppo.dpo_data import DPOExample
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
        logps, n = learner.logps(learner.batch(chunk))  # (2b,), (2b,)
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


class OnlineDPO:
    """Rounds 1-5 (module docstring) with a checkpoint after every round and ``resume=true``.

    Everything a round does is a function of the run's state at its start: the prompts (``position`` in the
    prompt file, cycling), the sampling seed (``train.seed + 1000 * round``), the engine's adapter (the one the
    previous round saved), the training batches (seeded by the round) and the policy, optimizer, scheduler and
    RNG. A checkpoint holds exactly that, so a run killed after round r and resumed samples, scores and trains
    rounds r+1.. as the uninterrupted run does.
    """

    def __init__(self, cfg: DPOConfig, run: Path):
        o = self.o = cfg.online
        self.cfg, self.run = cfg, run
        self.prompts = read_prompts(o.prompts)
        self.human = o.scorer.kind == "feedback"
        self.scorer = None if self.human else make_scorer(o.scorer)
        self.learner = DPOLearner(cfg, total_steps=o.rounds * o.steps_per_round)
        from transformers import AutoConfig

        from alignloop.rollout import make_engine

        max_pos = getattr(AutoConfig.from_pretrained(self.learner.model_path), "max_position_embeddings", None) or 1 << 30
        self.engine = make_engine(o.engine, self.learner.model_path, dtype=cfg.model.dtype, seed=cfg.train.seed,
                                  max_model_len=min(cfg.data.max_length + o.max_new_tokens, max_pos), enable_lora=True,
                                  max_lora_rank=cfg.peft.lora_r, chat_template=cfg.model.chat_template)
        self.logger: M.MetricsLogger | None = None  # opened after a resume has rewound metrics.jsonl
        # the state a round starts from (a checkpoint restores it)
        self.round, self.step, self.position = 0, 0, 0  # rounds done, optimizer steps done, next prompt in the file
        self.adapter: Path | None = None  # what the engine samples from (None: the base, before round 1)

    # 0. resume ------------------------------------------------------------------
    def maybe_resume(self) -> None:
        found = rundir.latest_checkpoint(self.run) if self.cfg.resume else None
        if found is None:
            return
        client = self.learner.strategy.load_checkpoint(found[1])  # LoRA weights, optimizer, scheduler, RNG
        self.round, self.step, self.position = int(client["round"]), int(client["step"]), int(client["position"])
        self.adapter = self.run / client["adapter"] if client["adapter"] else None
        M.rewind(self.run, self.step)  # rows a killed round logged after its last checkpoint are logged again
        print(f"[alignloop] resumed from {found[1]} (round {self.round}, step {self.step})", flush=True)

    def checkpoint(self) -> None:
        path = rundir.checkpoint_path(self.run, self.step)
        adapter = str(self.adapter.relative_to(self.run)) if self.adapter is not None else None
        self.learner.strategy.save_checkpoint(path, {"step": self.step, "round": self.round, "position": self.position,
                                                     "adapter": adapter})
        rundir.mark_done(path)
        rundir.prune(self.run, self.cfg.train.keep_checkpoints)

    def crash_point(self) -> None:
        if os.environ.get("ALIGNLOOP_CRASH_AFTER_STEP") == str(self.step):  # fault injection for the resume test
            raise SystemExit(f"[alignloop] simulated crash after step {self.step} (round {self.round})")

    def run_all(self) -> None:
        o = self.o
        print(f"[alignloop] online dpo: {o.rounds} rounds x {o.prompts_per_round} prompts x k={o.k}, {o.steps_per_round} "
              f"steps per round, engine={self.engine.kind}, scorer={o.scorer.kind}, trainable "
              f"{self.learner.trainable:,} params", flush=True)
        try:
            self.maybe_resume()
            self.logger = M.MetricsLogger(self.run)
            while self.round < o.rounds:
                if not self.one_round():
                    return  # the human path: the answers went to labelers
                self.checkpoint()
                self.crash_point()
            self.learner.save_final(self.run)
        finally:
            self.engine.close()
            if self.logger is not None:
                self.logger.close()

    def one_round(self) -> bool:
        cfg, o, rnd = self.cfg, self.o, self.round
        # 1. sample k answers per prompt from the current policy (round 1: the base, no adapter yet)
        t0 = time.perf_counter()
        chats = [self.prompts[(self.position + i) % len(self.prompts)] for i in range(o.prompts_per_round)]
        self.engine.load_lora(self.adapter)
        from alignloop.rollout import SamplingSettings

        settings = SamplingSettings(max_new_tokens=o.max_new_tokens, temperature=o.temperature, top_p=o.top_p,
                                    n=o.k, seed=cfg.train.seed + 1000 * rnd)
        completions = self.engine.generate_chat(chats, settings)
        t_rollout = time.perf_counter() - t0
        if self.human:  # the human path: hand the answers to labelers and stop
            rec = push_to_feedback(cfg, self.run, chats, completions)
            print(f"[alignloop] pushed {rec['items']} items to campaign {rec['campaign']!r} for ranking; train on "
                  "their export with `alignloop dpo 'data.feedback={url: ..., campaign: ...}'`", flush=True)
            return False
        # 2. score
        t0 = time.perf_counter()
        # a single user turn is passed as its text, a longer history as messages (the reward stage's convention)
        flat_p = [c[0]["content"] if len(c) == 1 else c for c, s in zip(chats, completions) for _ in s]
        flat_a = [x.text for s in completions for x in s]
        flat = self.scorer(flat_p, flat_a)
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
            rec[M.ROLLOUT_LOGPROB_DIFF] = logprob_gap(self.learner, pairs)
        # 4. train on this round's pairs
        t0 = time.perf_counter()
        if pairs:
            G = cfg.train.global_batch_size
            for s in range(o.steps_per_round):
                train = self.learner.step(pairs, global_batch_indices(len(pairs), G, s, cfg.train.seed + rnd))
                self.step += 1
                if s + 1 < o.steps_per_round:
                    self.logger.log(self.step, train)
                    self.crash_point()
            rec.update(train)
            rec[M.TIME_TRAIN] = time.perf_counter() - t0
            # 5. the new adapter goes to the engine for the next round
            t0 = time.perf_counter()
            self.adapter = self.run / "rounds" / f"round-{rnd + 1}" / "adapter"
            self.learner.save_adapter(self.adapter)
            rec[M.TIME_SYNC] = time.perf_counter() - t0
        else:
            print(f"[alignloop] round {rnd + 1}: every prompt tied; no update this round", flush=True)
            self.step += o.steps_per_round
        self.logger.log(self.step, rec)
        out = self.run / "rounds" / f"round-{rnd + 1}"
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "samples.jsonl", "w") as fh:
            for c, s, sc in zip(chats, completions, scores):
                fh.write(json.dumps({"prompt": c, "answers": [x.text for x in s], "scores": sc}) + "\n")
        self.round += 1
        self.position += o.prompts_per_round
        return True


def online_dpo(cfg: DPOConfig, run: Path) -> None:
    OnlineDPO(cfg, run).run_all()
