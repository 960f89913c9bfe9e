"""The reward-model training loop, run by every worker (one process, or each Ray Train worker).

Numbered stages: 1 distributed setup -> 2 tokenizer and data -> 3 model (scalar head,
PEFT) -> 4 strategy (single / DeepSpeed ZeRO / FSDP) -> 5 resume -> 6 steps ->
7 held-out evaluation (accuracy, calibration, reward statistics) -> 8 final save.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import torch

warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")

from alignloop import metrics as M  # noqa: E402
from alignloop import rundir  # noqa: E402
from alignloop.batching import global_batch_indices, shared_prefix_rows, to_device  # noqa: E402
from alignloop.models import count_parameters, load_tokenizer, resolve_model_path  # noqa: E402
from alignloop.strategy import make_strategy, seed_all  # noqa: E402
from reward import evaluate as E  # noqa: E402
from reward.config import RewardConfig, resolve_packing, shared_prefix_supported  # noqa: E402
from reward.data import TokenizedPreference, as_pairs, common_prefix_len, read_preferences, tokenize_preferences  # noqa: E402
from reward.losses import LOSSES  # noqa: E402
from reward.model import load_reward_model  # noqa: E402

FEEDBACK_EXPORT = "feedback_export.jsonl"  # in the run directory: the export version this run trained on


def train_source(cfg: RewardConfig, run: Path) -> str:
    """The training file: data.train, or the feedback export the CLI fetched into the run directory."""
    return str(run / FEEDBACK_EXPORT) if cfg.data.feedback is not None else str(cfg.data.train)


def split_preferences(cfg: RewardConfig, run: Path):
    """(train, eval) preferences: data.eval, or a seeded held-out fraction of the training rows."""
    d = cfg.data
    rows = read_preferences(train_source(cfg, run))
    if d.eval:
        train, held = rows, read_preferences(d.eval)
    elif d.eval_fraction > 0 and len(rows) > 1:
        n_eval = max(1, int(len(rows) * d.eval_fraction))
        order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(cfg.train.seed)).tolist()
        held_idx = set(order[:n_eval])
        train = [r for i, r in enumerate(rows) if i not in held_idx]
        held = [rows[i] for i in sorted(held_idx)]
    else:
        train, held = rows, []
    if d.limit is not None:
        train = train[: d.limit]
    if d.eval_limit is not None:
        held = held[: d.eval_limit]
    if cfg.loss.type == "bradley_terry":
        train = as_pairs(train)  # a ranked list of K answers gives K(K-1)/2 pairs
    return train, held


def total_steps(cfg: RewardConfig, n_train: int) -> int:
    if cfg.train.max_steps > 0:
        return cfg.train.max_steps
    return max(1, math.floor(cfg.train.epochs * n_train / cfg.train.global_batch_size))


@dataclass
class Batch:
    model_inputs: dict[str, torch.Tensor]  # padded (N, T), packed (1, ΣT) with ends (N,), or shared-prefix rows
    index: torch.Tensor  # (B, K) position of example b's k-th answer among the N sequences
    mask: torch.Tensor  # (B, K) real answers (lists shorter than K are padded)
    margin: torch.Tensor  # (B,) the row's margin, 0 where none was given
    tokens: int  # real tokens in the batch (of the full conversations)
    layout: str = "padded"  # padded | packed | shared | shared-packed
    positions: int = 0  # token positions the forward pass computes (pads and the shared history once included)

    def to(self, device: torch.device | str) -> "Batch":
        """Every tensor on ``device`` (the strategy's, where the model lives)."""
        return replace(self, model_inputs=to_device(self.model_inputs, device), index=self.index.to(device),
                       mask=self.mask.to(device), margin=self.margin.to(device))


def shared_prefix_len(seqs: list[list[int]]) -> int:
    """Leading tokens every answer's conversation shares, leaving each at least its last token of its own."""
    return min(common_prefix_len(seqs), min(len(s) for s in seqs) - 1)


def _shared_rows(examples: list[TokenizedPreference], pad_id: int, packing: bool) -> tuple[dict[str, torch.Tensor], int]:
    """The shared-prefix layout (:func:`alignloop.batching.shared_prefix_rows`): each example's shared history
    once, then each answer's own tokens; ``rows``/``ends`` locate each answer's last token. Rows: one per example
    (right-padded), or the whole micro-batch in one row with ``packing``."""
    shared = [shared_prefix_len(e.input_ids) for e in examples]
    inputs, where = shared_prefix_rows([e.input_ids for e in examples], shared, pad_id, packing)
    lengths = [len(s) - L for e, L in zip(examples, shared) for s in e.input_ids]  # own tokens of each answer
    inputs["rows"] = torch.tensor([r for r, _ in where])
    inputs["ends"] = torch.tensor([c + n - 1 for (_, c), n in zip(where, lengths)])
    return inputs, inputs["input_ids"].numel()


def row_width(e: TokenizedPreference, shared_prefix: bool) -> int:
    """Token positions an example takes in its row: the history once with ``shared_prefix``, else its longest answer
    (what a right-padded micro-batch pays for each of its sequences)."""
    if shared_prefix:
        return sum(len(s) for s in e.input_ids) - (len(e.input_ids) - 1) * shared_prefix_len(e.input_ids)
    return max(len(s) for s in e.input_ids)


def by_length(examples: list[TokenizedPreference], shared_prefix: bool) -> list[int]:
    """Order (indices) that puts examples of similar row width next to each other (stable)."""
    return sorted(range(len(examples)), key=lambda i: row_width(examples[i], shared_prefix))


def collate(examples: list[TokenizedPreference], pad_id: int, packing: bool, shared_prefix: bool = False) -> Batch:
    """One micro-batch. ``shared_prefix``: use the shared-history layout when it computes fewer token
    positions than the plain one (packed or right-padded) would; the rewards are the same either way."""
    seqs = [ids for e in examples for ids in e.input_ids]
    B, K = len(examples), max(len(e.input_ids) for e in examples)
    index = torch.zeros((B, K), dtype=torch.long)
    mask = torch.zeros((B, K), dtype=torch.bool)
    n = 0
    for b, e in enumerate(examples):
        for k in range(len(e.input_ids)):
            index[b, k], mask[b, k] = n, True
            n += 1
    margin = torch.tensor([e.margin or 0.0 for e in examples], dtype=torch.float32)  # (B,)
    tokens = sum(len(s) for s in seqs)
    plain = tokens if packing else len(seqs) * max(len(s) for s in seqs)
    if shared_prefix:
        widths = [sum(len(s) for s in e.input_ids) - (len(e.input_ids) - 1) * shared_prefix_len(e.input_ids)
                  for e in examples]
        if (sum(widths) if packing else B * max(widths)) < plain:
            inputs, positions = _shared_rows(examples, pad_id, packing)
            return Batch(inputs, index, mask, margin, tokens, "shared-packed" if packing else "shared", positions)
    if packing:
        flat, pos, ends = [], [], []
        for s in seqs:
            flat += s
            pos += range(len(s))
            ends.append(len(flat) - 1)
        inputs = {"input_ids": torch.tensor([flat]), "position_ids": torch.tensor([pos]), "ends": torch.tensor(ends)}
    else:
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)  # (N, T) right-padded
        am = torch.zeros((len(seqs), width), dtype=torch.long)  # (N, T)
        for i, s in enumerate(seqs):
            ids[i, : len(s)] = torch.tensor(s)
            am[i, : len(s)] = 1
        inputs = {"input_ids": ids, "attention_mask": am}
    return Batch(inputs, index, mask, margin, tokens, "packed" if packing else "padded", plain)


def pair_counts(r: torch.Tensor, mask: torch.Tensor) -> tuple[int, int, float]:
    """(correctly ordered pairs, pairs, Σ(r_better - r_worse)) over every i<j inside each example."""
    K = r.shape[1]
    upper = torch.triu(torch.ones(K, K, dtype=torch.bool, device=mask.device), diagonal=1)  # (K, K) i<j
    valid = upper & mask[:, :, None] & mask[:, None, :]  # (B, K, K)
    diff = r[:, :, None] - r[:, None, :]  # (B, K, K) r_i - r_j
    return int((diff > 0)[valid].sum()), int(valid.sum()), float(diff[valid].sum())


def batch_loss(cfg: RewardConfig, rewards: torch.Tensor, batch: Batch) -> torch.Tensor:
    """Summed loss of the batch's examples (the caller divides by the global example count)."""
    r = rewards[batch.index]  # (B, K)
    if cfg.loss.type == "bradley_terry":
        margin = batch.margin.to(r.dtype) if cfg.loss.use_margin else None
        loss, _ = LOSSES["bradley_terry"](r[:, 0], r[:, 1], margin, margin_scale=cfg.loss.margin_scale, reduction="sum")
    else:
        loss, _ = LOSSES["plackett_luce"](r, batch.mask, reduction="sum")
    if cfg.loss.center_coef:
        m = batch.mask.to(r.dtype)
        loss = loss + cfg.loss.center_coef * ((r**2 * m).sum(-1) / m.sum(-1)).sum()
    return loss


@torch.no_grad()
def score_examples(model, examples: list[TokenizedPreference], pad_id: int, mb: int, packing: bool,
                   shared_prefix: bool = False, group_by_length: bool = False,
                   device: torch.device | str = "cpu") -> list[list[float]]:
    """Rewards of every answer of every example, best first, in the examples' order (every rank runs every
    batch: ZeRO-3 gathers). ``group_by_length``: batches of similar length, results put back in order."""
    was_training = model.training
    model.eval()
    order = by_length(examples, shared_prefix) if group_by_length else list(range(len(examples)))
    out: list[list[float] | None] = [None] * len(examples)
    for i in range(0, len(order), mb):
        chunk = order[i: i + mb]
        b = collate([examples[j] for j in chunk], pad_id, packing, shared_prefix)
        rewards = model(**to_device(b.model_inputs, device)).float().cpu()  # (N,)
        for j, row, m in zip(chunk, b.index, b.mask):
            out[j] = rewards[row[m]].tolist()
    if was_training:
        model.train()
    return out


def train_worker(config: dict, *, step_hook=None) -> None:
    """Entry point on each worker; ``config`` is the resolved RewardConfig as a dict plus the run directory.

    ``step_hook(event, step)`` (in-process callers only, e.g. the benchmark's clocks) is called with
    ``"begin"`` and ``"end"`` around every optimizer step.
    """
    cfg = RewardConfig.model_validate(config["cfg"])
    run = Path(config["run_dir"])
    torch.set_num_threads(int(config.get("threads") or torch.get_num_threads()))
    attn = cfg.model.attn_implementation
    packing = resolve_packing(cfg.data.packing, attn)
    shared = cfg.data.shared_prefix and shared_prefix_supported(attn)

    # 1. distributed setup
    world = cfg.ray.num_workers
    strategy_name = cfg.train.resolved_strategy(world)
    model_path = resolve_model_path(cfg.model.path)

    # 2. tokenizer and data (rows were checked by the CLI before any model loaded)
    tok = load_tokenizer(model_path, cfg.model.chat_template)
    train_p, eval_p = split_preferences(cfg, run)
    train_ex = tokenize_preferences(train_p, tok, cfg.data.max_length, cfg.data.truncation)
    eval_ex = tokenize_preferences(eval_p, tok, cfg.data.max_length, cfg.data.truncation)
    steps = total_steps(cfg, len(train_ex))
    strategy = make_strategy(strategy_name, optim=cfg.optim, ds=cfg.deepspeed, total_steps=steps,
                             micro_batch_size=cfg.train.micro_batch_size, grad_accum=cfg.grad_accum,
                             dtype=cfg.model.dtype, use_gpu=cfg.ray.use_gpu)
    if strategy.world_size != world:
        raise RuntimeError(f"expected {world} ranks, the process group has {strategy.world_size}")
    rank0 = strategy.is_rank0
    seed_all(cfg.train.seed)

    # 3. model: backbone + scalar head (std 1/sqrt(d+1)), dropout off, PEFT
    with strategy.model_init_context():
        model = load_reward_model(cfg.model, cfg.peft, model_path, tok.pad_token_id)
    trainable, total = count_parameters(model)

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
        cut = sum(e.truncated for e in train_ex + eval_ex)
        print(f"[alignloop] reward: {len(train_ex)} train / {len(eval_ex)} eval examples, {steps} steps, "
              f"loss={cfg.loss.type}, strategy={strategy_name} x{world}, peft={cfg.peft.method}, trainable "
              f"{trainable:,} of {total:,} params, batches {'packed' if packing else 'padded'}"
              f"{' with shared prefixes' if shared else ''}" + (f"; {cut} rows cut to data.max_length={cfg.data.max_length} "
                                                      "(oldest tokens dropped)" if cut else ""), flush=True)
    bar = None
    if rank0 and sys.stderr.isatty() and not os.environ.get("RAY_JOB_ID"):
        from tqdm import tqdm

        bar = tqdm(total=steps, initial=start, desc="reward", unit="step")

    # 6. steps
    G, mb = cfg.train.global_batch_size, cfg.train.micro_batch_size
    per_rank = G // world
    pad_id = tok.pad_token_id
    layouts: dict[str, int] = {}

    def score(examples):
        return score_examples(model, examples, pad_id, mb, packing, shared, cfg.data.group_by_length, strategy.device)

    positions = real_positions = 0
    for step in range(start, steps):
        if step_hook is not None:
            step_hook("begin", step)
        t0 = time.perf_counter()
        idx = global_batch_indices(len(train_ex), G, step, cfg.train.seed)
        mine = [train_ex[i] for i in idx[strategy.rank * per_rank:(strategy.rank + 1) * per_rank]]
        if cfg.data.group_by_length and per_rank > mb:  # same pairs, same summed gradient, less padding
            mine = [mine[j] for j in by_length(mine, shared)]
        loss_sum, correct, pairs, gap, tokens = 0.0, 0, 0, 0.0, 0
        for i in range(0, per_rank, mb):
            b = collate(mine[i: i + mb], pad_id, packing, shared).to(strategy.device)
            layouts[b.layout] = layouts.get(b.layout, 0) + 1
            positions, real_positions = positions + b.positions, real_positions + b.tokens
            rewards = model(**b.model_inputs)  # (N,)
            loss = batch_loss(cfg, rewards, b)
            strategy.backward(loss / G)  # this rank's share of the global mean over examples
            loss_sum += float(loss.detach())
            c, n, g = pair_counts(rewards.detach()[b.index], b.mask)
            correct, pairs, gap, tokens = correct + c, pairs + n, gap + g, tokens + b.tokens
        lr = strategy.lr()
        grad_norm = strategy.step()
        loss = strategy.all_reduce_sum(loss_sum) / G
        correct, pairs = strategy.all_reduce_sum(correct), strategy.all_reduce_sum(pairs)
        gap, tokens = strategy.all_reduce_sum(gap), strategy.all_reduce_sum(tokens)
        dt = time.perf_counter() - t0
        if step_hook is not None:
            step_hook("end", step)
        done = step + 1
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}")
        if done % cfg.train.log_every == 0 or done == steps:
            rec = {M.LOSS_REWARD: loss, M.REWARD_ACCURACY: correct / max(pairs, 1), M.REWARD_MARGIN: gap / max(pairs, 1),
                   M.LR: lr, M.GRAD_NORM: grad_norm, M.PAIRS_PER_S: G / dt, M.TOKENS_PER_S: tokens / dt,
                   M.STEP_TIME: dt, M.EPOCH: done * G / len(train_ex), M.TRAIN_TOKENS: tokens}
            if eval_ex and cfg.train.eval_every and done % cfg.train.eval_every == 0 and done != steps:
                s = E.summarize(score(eval_ex), cfg.eval.calibration_bins)
                rec.update({M.EVAL_ACCURACY: s[M.EVAL_ACCURACY], M.LOSS_EVAL: s[M.LOSS_EVAL]})
            logger.log(done, rec)
        if (cfg.train.save_every and done % cfg.train.save_every == 0) or done == steps:
            path = rundir.checkpoint_path(run, done)
            strategy.save_checkpoint(path, {"step": done})
            strategy.barrier()
            if rank0:
                rundir.mark_done(path)
                rundir.prune(run, cfg.train.keep_checkpoints)
        if os.environ.get("ALIGNLOOP_CRASH_AFTER_STEP") == str(done):  # fault injection for resume tests
            raise SystemExit(f"[alignloop] simulated crash after step {done}")
    if bar is not None:
        bar.close()
    if rank0 and layouts:
        print(f"[alignloop] micro-batches by layout {layouts}: computed {positions:,} token positions for "
              f"{real_positions:,} conversation tokens ({positions / max(real_positions, 1):.2f}x)", flush=True)

    # 7. held-out evaluation; reward mean/std for PPO normalisation (eval rewards, else a train sample)
    t_eval = time.perf_counter()
    stats_ex, source = (eval_ex, "eval") if eval_ex else (train_ex[: cfg.eval.stats_max_examples], "train")
    summary = E.summarize(score(stats_ex), cfg.eval.calibration_bins)
    if rank0:
        if eval_ex:
            logger.log(steps, {k: summary[k] for k in (M.EVAL_ACCURACY, M.LOSS_EVAL, M.EVAL_REWARD_CHOSEN_MEAN,
                                                       M.EVAL_REWARD_CHOSEN_STD, M.EVAL_REWARD_REJECTED_MEAN,
                                                       M.EVAL_REWARD_REJECTED_STD, M.EVAL_ECE)})
            E.plot_calibration(summary, run / "calibration.png")
        summary.update({"source": source, "examples": len(stats_ex), "eval_seconds": round(time.perf_counter() - t_eval, 1)})
        (run / "eval.json").write_text(json.dumps(summary, indent=1) + "\n")

    # 8. final save: gathered weights on rank 0; LoRA as an adapter (the CLI merges it)
    save_final(strategy, cfg, run, tok, summary, source)
    logger.close()
    strategy.barrier()


def save_final(strategy, cfg: RewardConfig, run: Path, tok, summary: dict, source: str) -> None:
    state = strategy.full_state_dict()  # collective under ZeRO-3
    if not strategy.is_rank0:
        return
    seq = strategy.unwrap().seq
    sd = {k[len("seq."):]: v for k, v in state.items() if k.startswith("seq.")}
    final = run / "final"
    final.mkdir(parents=True, exist_ok=True)
    target = final if cfg.peft.method in ("full", "freeze") else final / "adapter"
    seq.save_pretrained(target, state_dict=sd, safe_serialization=True)
    tok.save_pretrained(target)
    E.write_stats(final, summary, source, cfg.data.max_length)
