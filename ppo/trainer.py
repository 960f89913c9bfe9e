"""The PPO loop (and GRPO / RLOO / REINFORCE++), as numbered stages over plain role objects.

One iteration::

    1 prompts     -> 2 generate (rollout engine)  -> 3 score (rules / reward model / HTTP)
    -> 4 old, reference log-probs and values (trainer forward passes)
    -> 5 per-token KL, shaped rewards, advantages (whole batch, so whitening is global)
    -> 6 update: critic and actor, ppo_epochs x num_mini_batches optimizer steps
    -> 7 sync weights into the engine  -> 8 log, checkpoint

``Roles`` hides where the actor, critic and engine live: ``LocalRoles`` keeps
them in this process (tests, one machine), ``ppo.ray_actors.RayRoles`` puts
them in Ray actors (actor and critic as groups of DeepSpeed ranks). The loop is
the same code for both.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch

from alignloop import metrics as M
from alignloop import rundir
from alignloop.batching import global_batch_indices
from alignloop.config import ConfigError
from alignloop.data import DataError
from alignloop.rollout import SamplingSettings, _generation_config, _stop_token_ids
from ppo import losses as L
from ppo.config import PPOConfig
from ppo.experience import Experience, build_experience


# ------------------------------------------------------------------ prompts

def read_prompts(path: str, limit: int | None = None) -> list[dict]:
    """Rows of a prompts .jsonl: {"prompt": str} or {"messages": [{"role", "content"}, ...]}; errors name file:line."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"data.prompts: file not found: {p}")
    rows = []
    with open(p) as fh:
        for i, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{p}:{i}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise DataError(f"{p}:{i}: expected a JSON object")
            if isinstance(row.get("prompt"), str) and row["prompt"].strip():
                rows.append({"messages": [{"role": "user", "content": row["prompt"]}], "text": row["prompt"]})
            elif isinstance(row.get("messages"), list) and row["messages"] and all(
                    isinstance(m, dict) and isinstance(m.get("content"), str) and m.get("role") in ("system", "user", "assistant")
                    for m in row["messages"]):
                if row["messages"][-1]["role"] != "user":
                    raise DataError(f"{p}:{i}: messages must end with a user turn")
                rows.append({"messages": row["messages"], "text": row["messages"][-1]["content"]})
            else:
                raise DataError(f"{p}:{i}: needs a non-empty 'prompt' string or a 'messages' list of {{role, content}}")
            if limit is not None and len(rows) >= limit:
                break
    if not rows:
        raise DataError(f"{p}: no prompts")
    return rows


def tokenize_prompts(rows: list[dict], tok, chat: bool, max_tokens: int) -> list[list[int]]:
    """The same ids the rollout engine would build (rollout.py conventions), keeping the last ``max_tokens``."""
    out = []
    for r in rows:
        if chat:
            text = tok.apply_chat_template(r["messages"], tokenize=False, add_generation_prompt=True)
            ids = tok(text, add_special_tokens=False)["input_ids"]
        else:
            ids = tok("\n".join(m["content"] for m in r["messages"]))["input_ids"]
        out.append(list(ids)[-max_tokens:])
    return out


# --------------------------------------------------------------- advantages

def compute_advantages(cfg: PPOConfig, exp: Experience, kl_coef: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(advantages, returns, token KL) for the whole batch: stage 5. Pure tensor code over ``exp``.

    KL (chosen estimator) of π_θold vs π_ref per answer token; in the reward (-β·KL per
    token, the score at the last real token) when ``algo.kl.in_reward``, else it is left
    to the policy loss. GRPO/RLOO turn the KL into a sequence-level penalty Σ_t β·KL_t.
    """
    a, mask = cfg.algo, exp.mask
    if exp.ref_logprobs is not None:
        kl = L.kl_penalty(exp.old_logprobs, exp.ref_logprobs, a.kl.estimator) * mask  # (B, A)
    else:
        kl = torch.zeros_like(mask)
    beta = kl_coef if a.kl.in_reward else 0.0
    if a.advantage == "gae":
        rewards = L.shaped_rewards(exp.scores, kl, mask, beta)  # (B, A)
        adv, returns = L.gae(rewards, exp.values, mask, gamma=a.gamma, lam=a.lam)
        if a.whiten_advantages:
            adv = L.masked_whiten(adv, mask)
        return adv, returns, kl
    if a.advantage == "reinforce_pp":
        rewards = L.shaped_rewards(exp.scores, kl, mask, beta)
        adv = L.reinforce_pp_advantages(rewards, mask, gamma=a.gamma)
        return adv, adv.clone(), kl
    seq = exp.scores.float() - beta * kl.sum(-1)  # (B,) sequence score net of the KL penalty
    n = cfg.rollout.n_samples
    if a.advantage == "grpo":
        adv = L.grpo_advantages(seq, n, mask, scale=a.grpo_scale)
    else:
        adv = L.rloo_advantages(seq, n, mask)
    return adv, adv.clone(), kl


def make_kl_controller(cfg: PPOConfig):
    k = cfg.algo.kl
    if k.adaptive:
        return L.AdaptiveKLController(k.coef, k.target, k.horizon)
    return L.FixedKLController(k.coef)


# -------------------------------------------------------------------- roles

class Done:
    """A result already computed, with the ``result()`` of a future (the roles' ``*_async`` calls return either);
    ``Done.later(fn)``: computed by ``fn()`` on the first ``result()`` (combining other futures)."""

    def __init__(self, value=None, fn=None):
        self.value, self._fn = value, fn

    @classmethod
    def later(cls, fn) -> "Done":
        return cls(fn=fn)

    def result(self):
        if self._fn is not None:
            self.value, self._fn = self._fn(), None
        return self.value


class _Held:
    """A critic update :class:`LocalRoles` holds back until the actor's first update of the iteration is done (or its
    result is asked for); then it runs on the critic's worker, in order, and this object answers for its future."""

    def __init__(self, release, name, *args):
        self._release, self.name, self.args, self.future = release, name, args, None

    def result(self):
        if self.future is None:
            self._release()
        return self.future.result()


class _CriticThread:
    """The critic's worker thread (``train.critic_worker=thread``): ``submit(name, *args)`` runs
    ``critic.name(*args)`` there, in order, with its own share of torch threads."""

    def __init__(self, critic, threads: int):
        from concurrent.futures import ThreadPoolExecutor

        self.critic = critic
        # torch._C's setter: vLLM's CPU backend replaces torch.set_num_threads with a no-op in its process.
        # The OpenMP thread count is per calling thread: this one's for the critic thread, see LocalRoles.generate().
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="critic", initializer=lambda: torch._C.set_num_threads(threads))

    def submit(self, name: str, *args):
        return self._pool.submit(getattr(self.critic, name), *args)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


class LocalRoles:
    """Actor, critic and engine on this machine (``train.strategy=single``).

    ``train.overlap_critic``: the critic's calls run, in the order they were made, beside the actor's: in a process
    of its own (``train.critic_worker=process``, :mod:`ppo.critic_process`) or a worker thread (torch releases the
    GIL inside its kernels, so on a CPU each role keeps its own cores busy). Rollouts then use all ``train.threads``
    torch threads and each role half of them. An iteration's critic updates are held until the actor's first update
    is done: that update runs on every thread, and the critic's last one runs beside the weight sync (one thread:
    vLLM's reload) instead of leaving a core idle there."""

    def __init__(self, cfg: PPOConfig, model_path: str, run: Path, engine=None):
        from ppo.actor import CriticTrainer, PolicyTrainer

        self.cfg, self.run, self.model_path = cfg, run, model_path
        self._threads = torch.get_num_threads()
        self._half = max(1, self._threads // 2)  # each role's share while they work side by side
        overlap = cfg.uses_critic and cfg.train.overlap_critic
        self._critic_worker = None  # submit(name, *args) -> future; None: the critic's calls run inline
        if overlap and cfg.train.critic_worker == "process":
            from ppo.critic_process import CriticProcess

            self.critic = self._critic_worker = CriticProcess(cfg, model_path, self._half)  # loads beside the actor
        self.engine = None
        try:
            self.actor = PolicyTrainer(cfg, model_path)
            if self._critic_worker is None:
                self.critic = CriticTrainer(cfg, model_path) if cfg.uses_critic else None
            self.engine = engine if engine is not None else make_rollout_engine(cfg, model_path)
            if self._critic_worker is not None:
                self.critic.wait_ready()  # the critic's own errors (a bad critic.init_from) surface here
        except BaseException:
            if self._critic_worker is not None:  # no critic process outlives a failed start
                self._critic_worker.shutdown()
            if self.engine is not None and engine is None:
                self.engine.close()
            raise
        self.sync_dir = run / "sync"
        self._critic_queue: list = []  # the critic calls handed over and not yet seen done
        self._held: list[_Held] = []  # critic updates held back until the actor's next update is done
        if overlap:
            if self._critic_worker is None:
                self._critic_worker = _CriticThread(self.critic, self._half)
            self.actor.on_phase = self._actor_share

    def _critic_call(self, name: str, *args):
        if self._critic_worker is None:
            return Done(getattr(self.critic, name)(*args))
        future = self._critic_worker.submit(name, *args)
        self._critic_queue.append(future)
        return future

    def _actor_share(self) -> None:
        """The actor's torch threads for its next piece of work: half while the critic has work, all of them
        once the critic is idle (it finishes its mini-batches first: it has no LM head). Called before each of the
        actor's calls and, through ``PolicyTrainer.on_phase``, before each forward and each backward inside one, so
        a core the critic frees mid-mini-batch goes to the actor's backward at once instead of idling to its end."""
        if self._critic_worker is not None:
            self._critic_queue = [f for f in self._critic_queue if not f.done()]
            torch._C.set_num_threads(self._half if self._critic_queue else self._threads)

    def values_async(self, exp, keep=False):
        return self._critic_call("values", exp, keep)

    def train_critic_async(self, exp, global_tokens, reuse=False):
        if self._critic_worker is None:
            return Done(self.critic.train_mini_batch(exp, global_tokens, reuse))
        call = _Held(self._release_critic, "train_mini_batch", exp, global_tokens, reuse)
        self._held.append(call)
        return call

    def _release_critic(self) -> None:
        """Hand the held critic updates to the critic's worker (in order)."""
        held, self._held = self._held, []
        for call in held:
            call.future = self._critic_call(call.name, *call.args)

    def generate(self, prompt_ids, settings):
        if self._critic_worker is None:
            return self.engine.generate(prompt_ids, settings)
        torch._C.set_num_threads(self._threads)  # nothing else runs: the rollout takes every thread
        try:
            return self.engine.generate(prompt_ids, settings)
        finally:
            torch._C.set_num_threads(self._half)  # the actor's share; the critic's worker has the rest

    def logprobs(self, exp, reference=False):
        self._actor_share()
        return self.actor.logprobs(exp, reference)

    def train_actor(self, exp, global_tokens, kl_coef, first=False):
        self._actor_share()
        try:
            return self.actor.train_mini_batch(exp, global_tokens, kl_coef, first)
        finally:
            self._release_critic()

    def sync(self) -> None:
        self._actor_share()  # every thread for the merge, or half while the critic finishes its last update
        if self.cfg.syncs_adapter:
            self.engine.load_lora(self.actor.save_adapter(self.sync_dir / "adapter"))
        else:
            self.engine.update_weights(self.actor.engine_weights())

    def save(self, path: Path, client: dict) -> None:
        self.actor.save_checkpoint(path / "actor", client)
        if self.critic is not None:
            self.critic.save_checkpoint(path / "critic", {})

    def load(self, path: Path) -> dict:
        client = self.actor.load_checkpoint(path / "actor")
        if self.critic is not None:
            self.critic.load_checkpoint(path / "critic")
        return client

    def save_final(self, out: Path) -> None:
        if self.cfg.peft.method == "lora":
            self.actor.save_adapter(out / "adapter")
        else:
            self.actor.strategy.unwrap().save_pretrained(out, state_dict=self.actor.full_state_dict(),
                                                         safe_serialization=True)
        if self.critic is not None:
            self.critic.save_final(out / "critic", self.model_path)

    def actor_digest(self) -> dict:
        return self.actor.parameters_digest()

    def close(self) -> None:
        if self._critic_worker is not None:
            self._critic_worker.shutdown()
        self.engine.close()


def make_rollout_engine(cfg: PPOConfig, model_path: str):
    from alignloop.rollout import make_engine

    r = cfg.rollout
    limit = json.loads((Path(model_path) / "config.json").read_text()).get("max_position_embeddings") or r.max_model_len
    return make_engine(r.engine, model_path, dtype=r.dtype or cfg.model.dtype, seed=cfg.train.seed,
                       max_model_len=min(r.max_model_len, int(limit)),
                       enable_lora=cfg.syncs_adapter, max_lora_rank=cfg.peft.lora_r,
                       chat_template=cfg.model.chat_template, batch_size=max(1, cfg.rollout_batch),
                       compile=r.compile)


# --------------------------------------------------------------------- loop

def _sum_dicts(parts: list[dict]) -> dict:
    out: dict = {}
    for d in parts:
        for k, v in d.items():
            out[k] = out.get(k, 0.0) + v
    return out


class PPOLoop:
    """Stages 1-8 for ``train.max_steps`` iterations, with resume and fault injection."""

    def __init__(self, cfg: PPOConfig, roles, tokenizer, run: Path, reward, prompts: list[dict], model_path: str):
        self.cfg, self.roles, self.tok, self.run, self.reward = cfg, roles, tokenizer, run, reward
        self.prompts = prompts
        self.prompt_ids = tokenize_prompts(prompts, tokenizer, cfg.data.chat_template, cfg.data.max_prompt_tokens)
        self.eos_ids = set(_stop_token_ids(tokenizer, _generation_config(model_path)))  # what the engines stop on
        self.kl_ctl = make_kl_controller(cfg)
        self.logger = M.MetricsLogger(run)
        self.start = 0

    # 0. resume ----------------------------------------------------------------
    def maybe_resume(self) -> None:
        if not self.cfg.resume:
            return
        found = rundir.latest_checkpoint(self.run)
        if found is None:
            return
        client = self.roles.load(found[1])
        self.start = int(client["step"])
        self.kl_ctl.load_state_dict(client["kl"])
        if client.get("data_position", self.start) != self.start:
            raise ConfigError(f"checkpoint {found[1]}: data position {client['data_position']} != step {self.start}")
        self.roles.sync()  # the engine must sample from the restored policy
        print(f"[alignloop] resumed from {found[1]} (step {self.start})", flush=True)

    def settings(self, step: int) -> SamplingSettings:
        r = self.cfg.rollout
        # A fresh, reproducible stream per iteration (the engine offsets it per request): a resumed run samples
        # exactly what the uninterrupted one did.
        return SamplingSettings(max_new_tokens=r.max_new_tokens, temperature=r.temperature, top_p=r.top_p,
                                n=r.n_samples, seed=(self.cfg.train.seed * 1_000_003 + step * 10_007) % (2**31))

    def run_all(self) -> list[dict]:
        self.maybe_resume()
        history = []
        for step in range(self.start, self.cfg.train.max_steps):
            rec = self.iteration(step)
            history.append(rec)
            done = step + 1
            if done % self.cfg.train.log_every == 0 or done == self.cfg.train.max_steps:
                self.logger.log(done, rec)
            every = self.cfg.train.save_every
            if (every and done % every == 0) or done == self.cfg.train.max_steps:
                self.checkpoint(done)
            if os.environ.get("ALIGNLOOP_CRASH_AFTER_STEP") == str(done):  # fault injection for the resume test
                raise SystemExit(f"[alignloop] simulated crash after step {done}")
        self.logger.close()
        return history

    def checkpoint(self, done: int) -> None:
        path = rundir.checkpoint_path(self.run, done)
        self.roles.save(path, {"step": done, "kl": self.kl_ctl.state_dict(), "data_position": done})
        rundir.mark_done(path)
        rundir.prune(self.run, self.cfg.train.keep_checkpoints)

    def _values_async(self, exp: Experience, first: torch.Tensor):
        """The critic's value pass (a future of (B, A)). With algo.reuse_values the rows ``first`` (the first
        mini-batch) go last, with their graph kept for its first update (``CriticTrainer.values``); the other rows
        go first, without."""
        if not self.cfg.reuses_values:
            return self.roles.values_async(exp)
        rest = torch.ones(len(exp), dtype=torch.bool)
        rest[first] = False
        parts = [(rest, self.roles.values_async(exp.select(rest)))] if rest.any() else []
        parts.append((first, self.roles.values_async(exp.select(first), keep=True)))

        def assemble():
            out = torch.zeros_like(exp.rollout_logprobs)
            for rows, future in parts:
                out[rows] = future.result()
            return out
        return Done.later(assemble)

    def iteration(self, step: int) -> dict:
        cfg, a = self.cfg, self.cfg.algo
        rec: dict[str, float] = {}

        # 1. prompts: a deterministic function of the step (the data position is the step)
        idx = global_batch_indices(len(self.prompts), cfg.rollout.prompts_per_step, step, cfg.train.seed)
        prompt_ids = [self.prompt_ids[i] for i in idx]

        # 2. generate: n consecutive samples per prompt
        t0 = time.perf_counter()
        outs = self.roles.generate(prompt_ids, self.settings(step))
        t_gen = time.perf_counter() - t0
        comps = [c for samples in outs for c in samples]  # (B,) prompt-major
        p_ids = [p for p in prompt_ids for _ in range(cfg.rollout.n_samples)]
        exp = build_experience(p_ids, [c.token_ids for c in comps], [c.logprobs for c in comps], self.eos_ids,
                               self.tok.pad_token_id)

        # 3. score: raw scores, then EOS penalty / normalisation / clip
        t0 = time.perf_counter()
        texts = [self.prompts[i]["text"] for i in idx for _ in range(cfg.rollout.n_samples)]
        answers = [c.text for c in comps]
        raw = torch.tensor(self.reward.raw(texts, answers), dtype=torch.float32)  # (B,)
        exp.scores = torch.tensor(self.reward.shape(raw.tolist(), exp.has_eos.tolist()), dtype=torch.float32)
        t_score = time.perf_counter() - t0

        # 4. old / reference log-probs and values. The mini-batch order is drawn first: with algo.reuse_logprobs the
        # first mini-batch of epoch 0 gets π_θold from its own training forward (no update has happened yet), so
        # the no-grad pass covers only the other rows (none when ppo_epochs = num_mini_batches = 1). With
        # algo.old_logprobs=rollout π_θold is the engine's log-probs and there is no pass at all.
        g = torch.Generator().manual_seed(cfg.train.seed * 7_919 + step)
        orders = [torch.randperm(len(exp), generator=g) for _ in range(a.ppo_epochs)]
        train_actor = step >= cfg.critic.warmup_steps or not cfg.uses_critic
        from_engine = a.old_logprobs == "rollout"
        # Not when the KL is part of the reward: the advantages need π_θold's log-probs of every row before training.
        kl_in_adv = a.kl.in_reward and cfg.uses_reference and self.kl_ctl.value > 0
        reuse = a.reuse_logprobs and train_actor and not kl_in_adv and not from_engine
        first_mb = orders[0].view(a.num_mini_batches, -1)[0]  # rows of epoch 0's first mini-batch
        reused = torch.zeros(len(exp), dtype=torch.bool)  # rows whose π_θold comes from their training forward
        if reuse:
            reused[first_mb] = True
        passed = ~reused if not from_engine else torch.zeros(len(exp), dtype=torch.bool)  # rows of the no-grad pass
        t0 = time.perf_counter()
        values = self._values_async(exp, first_mb) if cfg.uses_critic else None  # the critic works beside the actor
        exp.old_logprobs = exp.rollout_logprobs.clone() if from_engine else torch.zeros_like(exp.rollout_logprobs)
        if passed.any():
            exp.old_logprobs[passed] = self.roles.logprobs(exp.select(passed))
        exp.ref_logprobs = self.roles.logprobs(exp, reference=True) if cfg.uses_reference else None
        exp.values = values.result() if values is not None else None

        # 5. KL, shaped rewards, advantages over the whole batch
        kl_coef = self.kl_ctl.value
        exp.advantages, exp.returns, kl = compute_advantages(cfg, exp, kl_coef)
        kl = kl * (~reused).unsqueeze(-1)  # reused rows: measured in their training forward (β = 0 in their advantages)
        t_prep = time.perf_counter() - t0
        mask = exp.mask
        n_tok = float(mask.sum())

        # 6. update: critic every iteration; the actor after the critic warm-up. The critic's mini-batches depend
        # only on the experience, so they are all handed over first and run (in order) beside the actor's.
        t0 = time.perf_counter()
        actor_sums = []
        critic_futures = [self.roles.train_critic_async(exp.select(mb_idx), float(mask[mb_idx].sum()),
                                                        cfg.reuses_values and epoch == 0 and j == 0)
                          for epoch, order in enumerate(orders)
                          for j, mb_idx in enumerate(order.view(a.num_mini_batches, -1))] if cfg.uses_critic else []
        measured = None  # the first mini-batch's sums: the engine-vs-trainer gap where no pass measured it
        for epoch, order in enumerate(orders):
            for j, mb_idx in enumerate(order.view(a.num_mini_batches, -1)):
                mb = exp.select(mb_idx)
                tokens = float(mb.mask.sum())
                if train_actor:
                    start = epoch == 0 and j == 0 and (reuse or from_engine)
                    if start and reuse:
                        mb.old_logprobs = None  # π_θold = this forward (PolicyTrainer.train_mini_batch)
                    actor_sums.append(self.roles.train_actor(mb, tokens, kl_coef, start and from_engine))
                    if start:
                        measured = actor_sums[-1]
        t_train = time.perf_counter() - t0

        # 7. sync the new policy into the engine; the critic may still be finishing its last mini-batch meanwhile
        t0 = time.perf_counter()
        if train_actor:
            self.roles.sync()
        t_sync = time.perf_counter() - t0
        t0 = time.perf_counter()
        critic_sums = [f.result() for f in critic_futures]
        t_train += time.perf_counter() - t0  # the critic's work left after the sync counts as training

        seq_kl = (float(kl.sum()) + (measured.get("ppo/kl_old_sum", 0.0) if measured else 0.0)) / len(exp)
        self.kl_ctl.update(seq_kl, len(exp))

        # 8. metrics
        lp_diff = (exp.rollout_logprobs - exp.old_logprobs).abs() * mask * passed.unsqueeze(-1)
        lp_diff_sum, lp_diff_max = float(lp_diff.sum()), float(lp_diff.max())
        lp_diff_tokens = float((mask * passed.unsqueeze(-1)).sum())
        if measured:
            lp_diff_sum += measured["rollout/logprob_diff_sum"]
            lp_diff_max = max(lp_diff_max, measured["rollout/logprob_diff_max"])
            lp_diff_tokens += measured["rollout/logprob_diff_tokens"]
        rec.update({
            M.REWARD_MEAN: float(raw.mean()), M.REWARD_STD: float(raw.std()) if len(raw) > 1 else 0.0,
            M.REWARD_SHAPED_MEAN: float(exp.scores.mean()),
            M.PPO_KL: seq_kl, M.PPO_KL_COEF: kl_coef,
            M.ROLLOUT_ANSWER_LENGTH: float(mask.sum(-1).mean()), M.ROLLOUT_NO_EOS_FRAC: float((~exp.has_eos).float().mean()),
            M.PPO_ADVANTAGE_MEAN: float(L.masked_mean(exp.advantages, mask)),
            M.ROLLOUT_TOKENS_PER_S: n_tok / max(t_gen, 1e-9),
            M.TIME_ROLLOUT: t_gen, M.TIME_SCORE: t_score, M.TIME_PREPARE: t_prep, M.TIME_TRAIN: t_train,
            M.TIME_SYNC: t_sync,
        })
        if lp_diff_tokens:  # not in a critic warm-up step with algo.old_logprobs=rollout: no trainer forward ran
            rec[M.ROLLOUT_LOGPROB_DIFF] = lp_diff_sum / lp_diff_tokens
            rec[M.ROLLOUT_LOGPROB_DIFF_MAX] = lp_diff_max
        T = exp.prompt_ids.shape[1] + exp.response_ids.shape[1]
        passes = (len(actor_sums) > 0) + (len(critic_sums) > 0)
        rec[M.TRAIN_TOKENS_PER_S] = passes * a.ppo_epochs * len(exp) * T / max(t_train, 1e-9)
        if cfg.uses_critic:
            rec[M.PPO_EXPLAINED_VAR] = L.explained_variance(exp.values, exp.returns, mask)
            s = _sum_dicts(critic_sums)
            rec[M.LOSS_VALUE] = s["loss/value"] / s["tokens"]
            rec[M.PPO_VALUE_CLIPFRAC] = s["ppo/value_clipfrac"] / s["tokens"]
            rec[M.CRITIC_GRAD_NORM] = critic_sums[-1]["critic/grad_norm"]
        if actor_sums:
            s = _sum_dicts(actor_sums)
            for k, name in (("loss/policy", M.LOSS_POLICY), ("ppo/clipfrac", M.PPO_CLIPFRAC),
                            ("ppo/approx_kl", M.PPO_APPROX_KL), ("ppo/entropy", M.PPO_ENTROPY),
                            ("ppo/kl_loss", M.PPO_KL_LOSS)):
                rec[name] = s[k] / s["tokens"]
            rec[M.GRAD_NORM] = actor_sums[-1]["optim/grad_norm"]
            rec[M.LR] = actor_sums[-1]["optim/lr"]
        for i in range(min(cfg.rollout.log_samples, len(answers))):
            print(f"[sample] score={raw[i]:.3f} prompt={texts[i][:60]!r} answer={answers[i][:120]!r}", flush=True)
        return rec


# ------------------------------------------------------------------ entry

def run_ppo(cfg: PPOConfig, run: Path, engine=None) -> list[dict]:
    """Build roles (local or Ray), run the loop, write final/. Returns the per-step metric records."""
    from alignloop.models import load_tokenizer, resolve_model_path
    from alignloop.strategy import seed_all
    from ppo.rewards import build_reward

    model_path = resolve_model_path(cfg.model.path)
    tok = load_tokenizer(model_path, cfg.model.chat_template)
    prompts = read_prompts(cfg.data.prompts, cfg.data.limit)
    reward = build_reward(cfg.reward)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    seed_all(cfg.train.seed)
    if cfg.ray.use_ray:
        from ppo.ray_actors import RayRoles

        roles = RayRoles(cfg, model_path, run)
    else:
        roles = LocalRoles(cfg, model_path, run, engine=engine)
    try:
        loop = PPOLoop(cfg, roles, tok, run, reward, prompts, model_path)
        print(f"[alignloop] ppo: advantage={cfg.algo.advantage}, {len(prompts)} prompts, batch {cfg.rollout_batch} "
              f"({cfg.rollout.prompts_per_step} x {cfg.rollout.n_samples}), {cfg.train.max_steps} steps, "
              f"peft={cfg.peft.method}, ray={cfg.ray.use_ray}", file=sys.stderr, flush=True)
        history = loop.run_all()
        final = run / "final"
        final.mkdir(parents=True, exist_ok=True)
        roles.save_final(final)
        if cfg.peft.method == "lora":
            tok.save_pretrained(final / "adapter")
            from alignloop.merge import merge_adapter

            merge_adapter(model_path, final / "adapter", final, cfg.model.dtype)
        else:
            tok.save_pretrained(final)
        return history
    finally:
        if engine is None:
            roles.close()
