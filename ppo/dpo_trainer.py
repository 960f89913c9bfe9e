"""The DPO training loop on alignloop's strategies (one process, or each Ray Train worker under ZeRO / FSDP).

:class:`DPOLearner` is a plain class (no Ray): it owns the policy, the strategy and
the reference, and takes one optimizer step on a global batch of pairs. The offline
worker and the online loop both drive it.

Offline numbered stages: 1 distributed setup -> 2 tokenizer and pairs -> 3 model and
PEFT -> 4 strategy -> 5 reference log-probs (precomputed and cached, or the adapter
disabled per batch) -> 6 resume -> 7 steps -> 8 final save.
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from pathlib import Path

import torch

warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")

from alignloop import metrics as M
from alignloop import rundir
from alignloop.batching import global_batch_indices, to_device
from alignloop.models import apply_peft, count_parameters, load_causal_lm, load_tokenizer, resolve_model_path
from alignloop.strategy import make_strategy, seed_all
from ppo.dpo_config import DPOConfig
from ppo.dpo_data import (DPOExample, fingerprint, pair_batch, pair_width, read_pairs, sequence_logps, split_pairs,
                          tokenize_pairs)
from ppo.dpo_losses import dpo_loss

SOFT_PROMPTS = ("prompt_tuning", "prefix_tuning")  # virtual tokens are prepended per row: plain padded rows only
REFERENCE_CACHE = "reference_logps.pt"
EVAL_REFERENCE_CACHE = "reference_logps_eval.pt"
FEEDBACK_EXPORT = "feedback_export.jsonl"


def train_source(cfg: DPOConfig, run: Path) -> str:
    return cfg.data.train if cfg.data.train is not None else str(run / FEEDBACK_EXPORT)


class DPOLearner:
    """Policy + strategy + reference; ``step`` is one optimizer update on one global batch of pairs."""

    def __init__(self, cfg: DPOConfig, total_steps: int):
        self.cfg = cfg
        world = cfg.ray.num_workers
        self.strategy_name = cfg.train.resolved_strategy(world)
        self.model_path = resolve_model_path(cfg.model.path)
        self.tok = load_tokenizer(self.model_path, cfg.model.chat_template)
        self.strategy = make_strategy(self.strategy_name, optim=cfg.optim, ds=cfg.deepspeed, total_steps=total_steps,
                                      micro_batch_size=cfg.train.micro_batch_size, grad_accum=cfg.grad_accum,
                                      dtype=cfg.model.dtype, use_gpu=cfg.ray.use_gpu)
        if self.strategy.world_size != world:
            raise RuntimeError(f"expected {world} ranks, the process group has {self.strategy.world_size}")
        seed_all(cfg.train.seed)
        with self.strategy.model_init_context():  # ZeRO-3 partitions weights while loading
            model = load_causal_lm(cfg.model, cfg.peft, path=self.model_path)
            model = apply_peft(model, cfg.peft, self.model_path)
        self.trainable, self.total = count_parameters(model)
        self.model = self.strategy.prepare(model)
        self.model.train()
        # Batch layout (ppo.dpo_data.pair_batch): on CPU / sdpa, one right-padded row per pair with its prompt
        # computed once; flash-attention packs instead (no 4D masks, cheap varlen kernels). The LM head runs only
        # at answer positions unless soft prompts shift the positions.
        from reward.config import resolve_packing, shared_prefix_supported

        attn, soft = cfg.model.attn_implementation, cfg.peft.method in SOFT_PROMPTS
        self.packing = not soft and resolve_packing(cfg.data.packing, attn)
        self.shared_prefix = not soft and cfg.data.shared_prefix and shared_prefix_supported(attn)
        self.only_labelled = not soft
        self.pad_id = self.tok.pad_token_id

    @property
    def rank0(self) -> bool:
        return self.strategy.is_rank0

    def batch(self, examples: list[DPOExample]) -> dict[str, torch.Tensor]:
        """The pairs' batch on the model's device."""
        return to_device(pair_batch(examples, self.pad_id, self.packing, self.shared_prefix), self.strategy.device)

    def logps(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """(N,) answer log-probs under the current policy and (N,) answer token counts."""
        return sequence_logps(self.model, batch, self.only_labelled)

    def by_length(self, examples: list[DPOExample], indices: list[int]) -> list[int]:
        """``indices`` reordered so that micro-batches hold pairs of similar row width (the same pairs; a no-op
        for packed rows, which have no padding)."""
        if self.packing or not self.cfg.data.group_by_length:
            return indices
        return sorted(indices, key=lambda i: pair_width(examples[i], self.shared_prefix))

    # ------------------------------------------------------------ reference
    @torch.no_grad()
    def reference_logps(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """(N,) answer log-probs under the reference: the base with the adapter disabled (no second copy)."""
        with self.strategy.unwrap().disable_adapter():
            logps, _ = self.logps(batch)
        return logps.detach().float().cpu()

    @torch.no_grad()
    def precompute_reference(self, examples: list[DPOExample]) -> torch.Tensor:
        """(P, 2) reference log-probs of every pair, each rank scoring a strided share.

        Every rank runs the same number of forwards (ZeRO-3 gathers weights collectively), padding its
        share with a repeat of pair 0, then the shares are all-gathered. Adapters are disabled; full
        fine-tuning runs this before the first update, when the policy *is* the reference.
        """
        world, rank = self.strategy.world_size, self.strategy.rank
        mb = self.cfg.reference.micro_batch_size
        mine = list(range(rank, len(examples), world))
        n_batches = math.ceil(math.ceil(len(examples) / world) / mb)
        was_training = self.model.training
        self.model.eval()
        out = torch.full((len(examples), 2), float("nan"), dtype=torch.float64)
        adapters = self.cfg.peft.method not in ("full", "freeze")
        for b in range(n_batches):
            idx = mine[b * mb:(b + 1) * mb] or [0]
            batch = self.batch([examples[i] for i in idx])
            if adapters:
                logps = self.reference_logps(batch)
            else:
                logps, _ = self.logps(batch)
            chosen, rejected = split_pairs(logps.detach().double().cpu())
            if mine[b * mb:(b + 1) * mb]:
                out[idx, 0], out[idx, 1] = chosen, rejected
        if was_training:
            self.model.train()
        if world > 1:
            import torch.distributed as dist

            # Each pair was scored by exactly one rank; the others hold NaN there.
            have = ~torch.isnan(out)
            vals = torch.where(have, out, torch.zeros_like(out))
            dist.all_reduce(vals)
            count = have.double()
            dist.all_reduce(count)
            out = vals / count
        return out.float()

    # ----------------------------------------------------------------- step
    def step(self, examples: list[DPOExample], indices: list[int], ref: torch.Tensor | None = None) -> dict[str, float]:
        """One optimizer step on the global batch ``indices`` (same list on every rank; each takes its slice).

        The loss of each micro-batch is its pairs' loss sum over the *global* pair count, so gradients
        are the same for any split over ranks and micro-batches.
        """
        cfg, st = self.cfg, self.strategy
        G, mb = len(indices), cfg.train.micro_batch_size
        per_rank = G // st.world_size
        mine = self.by_length(examples, indices[st.rank * per_rank:(st.rank + 1) * per_rank])
        t0 = time.perf_counter()
        sums = torch.zeros(8, dtype=torch.float64)  # loss, rc, rr, margin, acc, logp_c, logp_r, tokens
        for i in range(0, per_rank, mb):
            idx = mine[i:i + mb]
            pairs = [examples[j] for j in idx]
            batch = self.batch(pairs)
            tokens = sum(len(e.chosen_ids) + len(e.rejected_ids) for e in pairs)  # real tokens, whatever the layout
            logps, ntok = self.logps(batch)  # (2b,), (2b,)
            pc, pr = split_pairs(logps)
            tc, tr = (x.to(pc) for x in split_pairs(ntok))
            if ref is not None:
                rc, rr = ref[idx, 0].to(pc), ref[idx, 1].to(pc)
            else:
                rc, rr = (x.to(pc) for x in split_pairs(self.reference_logps(batch)))
            loss, m = dpo_loss(pc, pr, rc, rr, loss_type=cfg.loss.type, beta=cfg.loss.beta,
                               label_smoothing=cfg.loss.label_smoothing, chosen_tokens=tc, rejected_tokens=tr,
                               num_pairs=G)
            st.backward(loss)
            b = len(idx)
            sums += torch.tensor([float(loss.detach()), float(m["rewards/chosen"]) * b, float(m["rewards/rejected"]) * b,
                                  float(m["margin"]) * b, float(m["accuracy"]) * b, float(pc.detach().sum()),
                                  float(pr.detach().sum()), float(tokens)], dtype=torch.float64)
        lr = st.lr()  # the rate this step's update used
        grad_norm = st.step()
        if st.world_size > 1:
            import torch.distributed as dist

            dist.all_reduce(sums)
        dt = time.perf_counter() - t0
        loss_sum, rc, rr, margin, acc, lc, lr_, tokens = sums.tolist()
        return {M.LOSS_DPO: loss_sum, M.DPO_REWARD_CHOSEN: rc / G, M.DPO_REWARD_REJECTED: rr / G, M.DPO_MARGIN: margin / G,
                M.DPO_ACCURACY: acc / G, M.DPO_LOGP_CHOSEN: lc / G, M.DPO_LOGP_REJECTED: lr_ / G, M.LR: lr,
                M.GRAD_NORM: grad_norm, M.TOKENS_PER_S: tokens / dt, M.PAIRS_PER_S: G / dt, M.STEP_TIME: dt,
                M.TRAIN_TOKENS: tokens}

    @torch.no_grad()
    def evaluate(self, examples: list[DPOExample], ref: torch.Tensor | None = None) -> dict[str, float]:
        """Loss, implicit-reward margin and accuracy over held-out pairs (every rank runs every batch: ZeRO-3
        gathers weights collectively)."""
        cfg, mb = self.cfg, self.cfg.reference.micro_batch_size
        was_training = self.model.training
        self.model.eval()
        loss_sum = margin = acc = 0.0
        for i in range(0, len(examples), mb):
            idx = list(range(i, min(i + mb, len(examples))))
            batch = self.batch([examples[j] for j in idx])
            logps, ntok = self.logps(batch)
            pc, pr = split_pairs(logps.float().cpu())
            tc, tr = split_pairs(ntok)
            rc, rr = (ref[idx, 0], ref[idx, 1]) if ref is not None else split_pairs(self.reference_logps(batch))
            loss, m = dpo_loss(pc, pr, rc, rr, loss_type=cfg.loss.type, beta=cfg.loss.beta,
                               label_smoothing=cfg.loss.label_smoothing, chosen_tokens=tc, rejected_tokens=tr,
                               num_pairs=len(examples))
            loss_sum += float(loss)
            margin += float(m["margin"]) * len(idx)
            acc += float(m["accuracy"]) * len(idx)
        if was_training:
            self.model.train()
        n = len(examples)
        return {M.EVAL_DPO_LOSS: loss_sum, M.EVAL_DPO_MARGIN: margin / n, M.EVAL_DPO_ACCURACY: acc / n}

    # ---------------------------------------------------------------- saving
    def save_adapter(self, out: Path) -> None:
        """Adapter (or full weights) in Hugging Face format; a collective under ZeRO-3, written by rank 0."""
        state = self.strategy.full_state_dict()
        if not self.rank0:
            return
        out.mkdir(parents=True, exist_ok=True)
        self.strategy.unwrap().save_pretrained(out, state_dict=state, safe_serialization=True)
        self.tok.save_pretrained(out)

    def save_final(self, run: Path) -> None:
        full = self.cfg.peft.method in ("full", "freeze")
        self.save_adapter(run / "final" if full else run / "final" / "adapter")


def total_steps(cfg: DPOConfig, n_pairs: int) -> int:
    if cfg.train.max_steps > 0:
        return cfg.train.max_steps
    return max(1, math.floor(cfg.train.epochs * n_pairs / cfg.train.global_batch_size))


def load_reference_cache(learner: DPOLearner, run: Path, examples: list[DPOExample],
                         name: str = REFERENCE_CACHE) -> torch.Tensor:
    """Reference log-probs of every pair, from ``run/reference_logps.pt`` when it matches these pairs and this
    reference model, else computed now (before any update) and written there by rank 0."""
    key = {"pairs": fingerprint(examples), "model": learner.model_path, "peft": learner.cfg.peft.method}
    path = run / name
    if path.is_file():
        cached = torch.load(path, weights_only=False)
        if cached.get("key") == key:
            return cached["logps"]
        if learner.cfg.peft.method in ("full", "freeze") and learner.cfg.resume:
            from alignloop.config import ConfigError

            raise ConfigError(f"{path} was computed for other pairs or another model; a resumed full fine-tuning run "
                              "cannot recompute its reference (the policy has moved)")
    t0 = time.perf_counter()
    logps = learner.precompute_reference(examples)
    if learner.rank0:
        torch.save({"key": key, "logps": logps}, path)
        print(f"[alignloop] reference log-probs of {len(examples)} pairs precomputed in "
              f"{time.perf_counter() - t0:.1f}s -> {path}", flush=True)
    learner.strategy.barrier()
    return logps


def train_worker(config: dict, *, step_hook=None) -> None:
    """Offline DPO on each worker; ``config`` is the resolved DPOConfig as a dict plus the run directory.

    ``step_hook(event, step)`` (in-process callers only, e.g. the benchmark's clocks) is called with
    ``"begin"`` and ``"end"`` around every optimizer step.
    """
    cfg = DPOConfig.model_validate(config["cfg"])
    run = Path(config["run_dir"])
    torch.set_num_threads(int(config.get("threads") or torch.get_num_threads()))

    # 1-2. pairs (already checked by the CLI before any model loaded); tokenizer comes with the learner
    prefs = read_pairs(train_source(cfg, run), cfg.data.limit)
    steps_guess = total_steps(cfg, len(prefs))
    # 3-4. model, PEFT, strategy
    learner = DPOLearner(cfg, steps_guess)
    examples = tokenize_pairs(prefs, learner.tok, cfg.data.max_length, cfg.data.max_prompt_length)
    eval_ex = []
    if cfg.data.eval:
        eval_ex = tokenize_pairs(read_pairs(cfg.data.eval, cfg.data.eval_limit), learner.tok, cfg.data.max_length,
                                 cfg.data.max_prompt_length)
    steps, G, rank0 = steps_guess, cfg.train.global_batch_size, learner.rank0

    # 5. reference: precomputed once (cached in the run dir), or the adapter disabled on every batch
    ref = eval_ref = None
    if cfg.precompute_reference:
        ref = load_reference_cache(learner, run, examples)
        if eval_ex:
            eval_ref = load_reference_cache(learner, run, eval_ex, EVAL_REFERENCE_CACHE)

    # 6. resume
    start = 0
    if cfg.resume:
        found = rundir.latest_checkpoint(run)
        if found is not None:
            client = learner.strategy.load_checkpoint(found[1])
            start = int(client["step"])
            if rank0:
                print(f"[alignloop] resumed from {found[1]} (step {start})", flush=True)
    if rank0 and start:
        M.rewind(run, start)  # steps logged after that checkpoint by the killed run are logged again
    logger = M.MetricsLogger(run, enabled=rank0)
    if rank0:
        print(f"[alignloop] dpo: {len(examples)} pairs, {steps} steps, loss={cfg.loss.type} beta={cfg.loss.beta}, "
              f"strategy={learner.strategy_name} x{cfg.ray.num_workers}, peft={cfg.peft.method}, reference="
              f"{'precomputed' if ref is not None else 'adapter disabled'}, trainable {learner.trainable:,} of "
              f"{learner.total:,} params", flush=True)

    # 7. steps
    for step in range(start, steps):
        if step_hook is not None:
            step_hook("begin", step)
        idx = global_batch_indices(len(examples), G, step, cfg.train.seed)
        rec = learner.step(examples, idx, ref)
        if step_hook is not None:
            step_hook("end", step)
        done = step + 1
        if done % cfg.train.log_every == 0 or done == steps:
            rec[M.EPOCH] = done * G / len(examples)
            if eval_ex and cfg.train.eval_every and done % cfg.train.eval_every == 0 and done != steps:
                rec.update(learner.evaluate(eval_ex, eval_ref))
            logger.log(done, rec)
        if (cfg.train.save_every and done % cfg.train.save_every == 0) or done == steps:
            path = rundir.checkpoint_path(run, done)
            learner.strategy.save_checkpoint(path, {"step": done})
            learner.strategy.barrier()
            if rank0:
                rundir.mark_done(path)
                rundir.prune(run, cfg.train.keep_checkpoints)
        if os.environ.get("ALIGNLOOP_CRASH_AFTER_STEP") == str(done):  # fault injection for the resume test
            raise SystemExit(f"[alignloop] simulated crash after step {done}")

    if eval_ex:
        final_eval = learner.evaluate(eval_ex, eval_ref)
        logger.log(steps, final_eval)
        if rank0:
            (run / "eval.json").write_text(json.dumps({**final_eval, "pairs": len(eval_ex)}, indent=1) + "\n")

    # 8. final save: full weights gathered on rank 0; adapters saved as adapters
    learner.save_final(run)
    logger.close()
    learner.strategy.barrier()
