"""The SFT training loop, run by every worker (one process, or each Ray Train worker).

Numbered stages: 1 distributed setup -> 2 tokenizer and data -> 3 model and PEFT
-> 4 strategy (ZeRO / FSDP / single) -> 5 resume -> 6 steps -> 7 final save.
"""

from __future__ import annotations

import math
import os
import sys
import time
from pathlib import Path

import torch
import warnings

warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")

from alignloop import metrics as M
from alignloop import rundir
from alignloop.batching import global_batch_indices, packed_batch, padded_batch, to_device, token_nll_sum
from alignloop.data import load_sft_examples
from alignloop.models import apply_peft, count_parameters, load_causal_lm, load_tokenizer, resolve_model_path, torch_dtype
from alignloop.perf import FlopCounter, matmul_peak_flops
from alignloop.strategy import make_strategy, seed_all
from sft.config import SFTConfig

PACKING_INCOMPATIBLE = ("prompt_tuning", "prefix_tuning")


def split_examples(cfg: SFTConfig, tok):
    d = cfg.data
    train = load_sft_examples(d.train, tok, d.format, d.max_length, d.loss_on, d.limit)
    if d.eval:
        return train, load_sft_examples(d.eval, tok, d.format, d.max_length, d.loss_on)
    if d.eval_fraction > 0:
        n_eval = max(1, int(len(train) * d.eval_fraction))
        # Deterministic held-out tail of a seeded permutation.
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(cfg.train.seed)).tolist()
        held = set(order[:n_eval])
        return [e for i, e in enumerate(train) if i not in held], [train[i] for i in sorted(held)]
    return train, []


def total_steps(cfg: SFTConfig, n_train: int) -> int:
    if cfg.train.max_steps > 0:
        return cfg.train.max_steps
    return max(1, math.floor(cfg.train.epochs * n_train / cfg.train.global_batch_size))


def make_batch(cfg: SFTConfig, examples, pad_id: int) -> dict[str, torch.Tensor]:
    seqs = [(e.input_ids, e.labels) for e in examples]
    if cfg.data.packing and cfg.peft.method not in PACKING_INCOMPATIBLE:
        return packed_batch(seqs)
    return padded_batch(seqs, pad_id)


def _only_labelled(cfg: SFTConfig) -> bool:
    """Soft prompts prepend virtual positions, so the LM head cannot be restricted by position index."""
    return cfg.peft.method not in PACKING_INCOMPATIBLE


@torch.no_grad()
def evaluate(model, cfg: SFTConfig, examples, pad_id: int, device: torch.device | str = "cpu") -> float:
    """Mean answer-token NLL over the eval set (every rank runs every batch: ZeRO-3 gathers need all ranks)."""
    was_training = model.training
    model.eval()
    nll, n = 0.0, 0
    mb = cfg.train.micro_batch_size
    for i in range(0, len(examples), mb):
        s, k = token_nll_sum(model, to_device(make_batch(cfg, examples[i: i + mb], pad_id), device), _only_labelled(cfg))
        nll += float(s)
        n += k
    if was_training:
        model.train()
    return nll / max(n, 1)


def train_worker(config: dict) -> None:
    """Entry point on each worker; ``config`` is the resolved SFTConfig as a dict plus the run directory."""
    cfg = SFTConfig.model_validate(config["cfg"])
    run = Path(config["run_dir"])
    torch.set_num_threads(int(config.get("threads") or torch.get_num_threads()))

    # 1. distributed setup (DeepSpeed/FSDP join the Ray Train or 1-rank process group)
    world = cfg.ray.num_workers
    strategy_name = cfg.train.resolved_strategy(world)
    model_path = resolve_model_path(cfg.model.path)
    tok = load_tokenizer(model_path, cfg.model.chat_template)
    train_ex, eval_ex = split_examples(cfg, tok)
    steps = total_steps(cfg, len(train_ex))
    strategy = make_strategy(strategy_name, optim=cfg.optim, ds=cfg.deepspeed, total_steps=steps,
                             micro_batch_size=cfg.train.micro_batch_size, grad_accum=cfg.grad_accum,
                             dtype=cfg.model.dtype, use_gpu=cfg.ray.use_gpu)
    if strategy.world_size != world:
        raise RuntimeError(f"expected {world} ranks, the process group has {strategy.world_size}")
    rank0 = strategy.is_rank0
    seed_all(cfg.train.seed)

    # 3. model and PEFT (under ZeRO-3 the weights are partitioned while loading)
    with strategy.model_init_context():
        model = load_causal_lm(cfg.model, cfg.peft, path=model_path)
        model = apply_peft(model, cfg.peft, model_path)
    trainable, total = count_parameters(model)
    flops = FlopCounter(total_params=total, trainable_params=trainable)
    peak = matmul_peak_flops(dtype=torch_dtype(cfg.model.dtype)) if rank0 else float("nan")

    # 4. strategy
    model = strategy.prepare(model)
    model.train()

    # 5. resume
    start = 0
    if cfg.resume:
        found = rundir.latest_checkpoint(run)
        if found is not None:
            client = strategy.load_checkpoint(found[1])
            start = int(client["step"])
            if rank0:
                print(f"[alignloop] resumed from {found[1]} (step {start})", flush=True)
    logger = M.MetricsLogger(run, enabled=rank0)
    if rank0:
        print(f"[alignloop] sft: {len(train_ex)} train / {len(eval_ex)} eval examples, {steps} steps, "
              f"strategy={strategy_name} x{world} on {strategy.device}, peft={cfg.peft.method}, trainable {trainable:,} "
              f"of {total:,} params",
              flush=True)
    bar = None
    if rank0 and sys.stderr.isatty() and not os.environ.get("RAY_JOB_ID"):
        from tqdm import tqdm

        bar = tqdm(total=steps, initial=start, desc="sft", unit="step")

    # 6. steps
    G, mb = cfg.train.global_batch_size, cfg.train.micro_batch_size
    per_rank = G // world
    pad_id = tok.pad_token_id
    for step in range(start, steps):
        t0 = time.perf_counter()
        idx = global_batch_indices(len(train_ex), G, step, cfg.train.seed)
        mine = [train_ex[i] for i in idx[strategy.rank * per_rank:(strategy.rank + 1) * per_rank]]
        micro = [to_device(make_batch(cfg, mine[i: i + mb], pad_id), strategy.device) for i in range(0, per_rank, mb)]
        local_tokens = sum(int((b["targets"] != -100).sum()) for b in micro)
        global_tokens = strategy.all_reduce_sum(local_tokens)
        loss_sum, seen = 0.0, 0
        for b in micro:
            nll, _ = token_nll_sum(model, b, _only_labelled(cfg))
            strategy.backward(nll / global_tokens)
            loss_sum += float(nll.detach())
            seen += int(b["attention_mask"].sum()) if "attention_mask" in b else b["input_ids"].numel()  # no pads
        lr = strategy.lr()  # the rate this step's update used
        grad_norm = strategy.step()
        loss = strategy.all_reduce_sum(loss_sum) / global_tokens
        tokens = strategy.all_reduce_sum(seen)
        dt = time.perf_counter() - t0
        done = step + 1
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}")
        if done % cfg.train.log_every == 0 or done == steps:
            rec = {M.LOSS_SFT: loss, M.LR: lr, M.GRAD_NORM: grad_norm, M.TOKENS_PER_S: tokens / dt,
                   M.MFU: flops.mfu(tokens, dt, peak * world), M.STEP_TIME: dt, M.EPOCH: done * G / len(train_ex),
                   M.TRAIN_TOKENS: tokens}
            if eval_ex and cfg.train.eval_every and done % cfg.train.eval_every == 0 and done != steps:
                rec[M.LOSS_EVAL] = evaluate(model, cfg, eval_ex, pad_id, strategy.device)
            logger.log(done, rec)
        if (cfg.train.save_every and done % cfg.train.save_every == 0) or done == steps:
            path = rundir.checkpoint_path(run, done)
            strategy.save_checkpoint(path, {"step": done})
            strategy.barrier()
            if rank0:
                rundir.mark_done(path)
                rundir.prune(run, cfg.train.keep_checkpoints)
        if os.environ.get("ALIGNLOOP_CRASH_AFTER_STEP") == str(done):  # fault injection for the resume test
            raise SystemExit(f"[alignloop] simulated crash after step {done}")
    if bar is not None:
        bar.close()
    if eval_ex:
        logger.log(steps, {M.LOSS_EVAL: evaluate(model, cfg, eval_ex, pad_id, strategy.device)})

    # 7. final save: full weights gathered on rank 0; adapters saved as adapters
    save_final(strategy, cfg, run, tok)
    logger.close()
    strategy.barrier()


def save_final(strategy, cfg: SFTConfig, run: Path, tok) -> None:
    state = strategy.full_state_dict()  # collective under ZeRO-3
    if not strategy.is_rank0:
        return
    model = strategy.unwrap()
    final = run / "final"
    final.mkdir(parents=True, exist_ok=True)
    if cfg.peft.method in ("full", "freeze"):
        model.save_pretrained(final, state_dict=state, safe_serialization=True)
    else:
        model.save_pretrained(final / "adapter", state_dict=state, safe_serialization=True)
    tok.save_pretrained(final if cfg.peft.method in ("full", "freeze") else final / "adapter")
