"""Reward-model training throughput: alignloop's trainer against plain TRL ``RewardTrainer``, in one run.

    .venv/bin/python bench/bench_reward.py                              # SmolLM2-135M, full fine-tuning
    .venv/bin/python bench/bench_reward.py --steps 4 --max-length 64 --systems alignloop,trl

Same model (the packaged SmolLM2-135M-Instruct with the same freshly initialised
head: both trainers start from identical weights), same token ids (the pairs are
rendered once with the chat template and handed to TRL as ``chosen_ids`` /
``rejected_ids``), same pairs in every optimizer step (TRL reads them in
alignloop's order with a sequential sampler), same global/micro batch, optimizer,
schedule and dtype. Data: the first pairs of HH-RLHF harmless-base from
``../shared/data`` when present (read in place), else synthetic marker pairs.

Rows:
- ``alignloop``: ``reward.trainer.train_worker`` in this process, padding-free batches (default).
- ``alignloop-padded``: the same with right-padded batches (``data.packing=false``).
- ``trl``: ``RewardTrainer`` as shipped (right-padded chosen+rejected batches).

pairs/s = global batch / mean wall time of the measured steps (the first
``--warmup`` steps are dropped). The step-1 loss of each row is printed: equal
starts and data give equal losses, a check that the rows do the same work.
Writes ``bench/results/reward.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT)]
HH = ROOT.parent / "shared" / "data" / "hh-rlhf-harmless-base-test.jsonl.gz"
SYSTEMS = ("alignloop", "alignloop-padded", "trl")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2", help="model path (default: the packaged SmolLM2-135M-Instruct)")
    ap.add_argument("--systems", default=",".join(SYSTEMS), help=f"comma list of {', '.join(SYSTEMS)}")
    ap.add_argument("--steps", type=int, default=6, help="optimizer steps per run (default 6)")
    ap.add_argument("--warmup", type=int, default=1, help="first steps left out of the measurement (default 1)")
    ap.add_argument("--global-batch", type=int, default=8, help="pairs per optimizer step (default 8)")
    ap.add_argument("--micro-batch", type=int, default=4, help="pairs per forward/backward (default 4)")
    ap.add_argument("--max-length", type=int, default=128, help="tokens per conversation (default 128)")
    ap.add_argument("--data", default=str(HH) if HH.is_file() else "synthetic", help="preference file or 'synthetic'")
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--work-dir", default="/tmp/alignloop-bench-reward")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "reward.json"))
    return ap.parse_args(argv)


def prepare(args, work: Path):
    """Rows file for alignloop, token ids per pair in step order for TRL, and the tokenizer."""
    from alignloop.batching import global_batch_indices
    from alignloop.models import load_tokenizer, resolve_model_path
    from reward.data import read_preferences, tokenize_preferences
    from reward.synthetic import marker_rows, write_rows

    n = args.steps * args.global_batch
    rows_file = work / "pairs.jsonl"
    if args.data == "synthetic":
        write_rows(marker_rows(n, seed=args.seed), rows_file)
    else:
        import gzip

        opener = gzip.open if args.data.endswith(".gz") else open
        with opener(args.data, "rt") as fh:
            rows_file.write_text("".join(next(fh) for _ in range(n)))
    path = resolve_model_path(args.model)
    tok = load_tokenizer(path)
    ex = tokenize_preferences(read_preferences(rows_file), tok, args.max_length)
    order = [i for s in range(args.steps) for i in global_batch_indices(len(ex), args.global_batch, s, args.seed)]
    trl_rows = [{"chosen_ids": ex[i].input_ids[0], "rejected_ids": ex[i].input_ids[1]} for i in order]
    tokens = sum(len(ids) for e in ex for ids in e.input_ids)
    return rows_file, trl_rows, tok, path, tokens / len(ex)


def fresh_model(args, path: str, pad_id: int):
    import torch

    from alignloop.sections import ModelConfig, PeftConfig
    from reward.model import load_reward_model

    torch.manual_seed(args.seed)
    return load_reward_model(ModelConfig(path=path), PeftConfig(method="full"), path, pad_id)


def run_alignloop(args, rows_file: Path, work: Path, packing: bool) -> dict:
    from reward.config import RewardConfig
    from reward.trainer import train_worker

    name = "alignloop" if packing else "alignloop-padded"
    run = work / name
    shutil.rmtree(run, ignore_errors=True)
    cfg = RewardConfig.model_validate({
        "output_dir": str(work), "run_name": name, "model": {"path": args.model}, "peft": {"method": "full"},
        "data": {"train": str(rows_file), "eval_fraction": 0.0, "max_length": args.max_length, "packing": packing},
        "eval": {"stats_max_examples": 1},
        "optim": {"lr": args.lr, "warmup_steps": 0, "scheduler": "cosine", "betas": [0.9, 0.95]},
        "train": {"strategy": "single", "max_steps": args.steps, "global_batch_size": args.global_batch,
                  "micro_batch_size": args.micro_batch, "seed": args.seed, "save_every": 10**6}})
    run.mkdir(parents=True)
    train_worker({"cfg": cfg.model_dump(mode="json"), "run_dir": str(run), "threads": args.threads})
    m = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [x for x in m if x.get("time/step_s") is not None]
    return {"step_s": [x["time/step_s"] for x in steps], "loss": [x["loss/reward"] for x in steps]}


def run_trl(args, trl_rows, tok, path: str, work: Path) -> dict:
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import RewardConfig as TrlRewardConfig
    from trl import RewardTrainer

    class StepClock(TrainerCallback):
        def __init__(self):
            self.begin, self.end = [], []

        def on_step_begin(self, a, state, control, **kw):
            self.begin.append(time.perf_counter())

        def on_step_end(self, a, state, control, **kw):
            self.end.append(time.perf_counter())

    if args.threads:
        torch.set_num_threads(args.threads)
    clock = StepClock()
    model = fresh_model(args, path, tok.pad_token_id).seq  # the same weights and head init alignloop starts from
    targs = TrlRewardConfig(
        output_dir=str(work / "trl"), max_steps=args.steps, seed=args.seed,
        per_device_train_batch_size=args.micro_batch, gradient_accumulation_steps=args.global_batch // args.micro_batch,
        learning_rate=args.lr, lr_scheduler_type="cosine", warmup_steps=0, weight_decay=0.0,
        adam_beta1=0.9, adam_beta2=0.95, adam_epsilon=1e-8, max_grad_norm=1.0, optim="adamw_torch",
        max_length=args.max_length, use_cpu=True, bf16=False, gradient_checkpointing=False,
        train_sampling_strategy="sequential", dataloader_num_workers=0,
        logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True)
    trainer = RewardTrainer(model=model, args=targs, train_dataset=Dataset.from_list(trl_rows), processing_class=tok,
                            callbacks=[clock])
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    shutil.rmtree(work / "trl", ignore_errors=True)
    return {"step_s": [e - b for b, e in zip(clock.begin, clock.end)], "loss": [h["loss"] for h in logs]}


def main(argv=None) -> int:
    args = parse_args(argv)
    systems = [s for s in args.systems.split(",") if s]
    unknown = set(systems) - set(SYSTEMS)
    if unknown:
        raise SystemExit(f"unknown systems {sorted(unknown)}")
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    rows_file, trl_rows, tok, path, tokens_per_pair = prepare(args, work)
    results = {}
    load = {"start": os.getloadavg()}
    for name in systems:
        t0 = time.perf_counter()
        if name == "trl":
            r = run_trl(args, trl_rows, tok, path, work)
        else:
            r = run_alignloop(args, rows_file, work, packing=name == "alignloop")
        measured = r["step_s"][args.warmup:]
        r["pairs_per_s"] = args.global_batch / statistics.mean(measured)
        r["wall_s"] = round(time.perf_counter() - t0, 1)
        results[name] = r
        print(f"[bench] {name}: {r['pairs_per_s']:.3f} pairs/s (steps {', '.join(f'{x:.2f}' for x in measured)} s), "
              f"loss step 1 {r['loss'][0]:.4f}", flush=True)
    load["end"] = os.getloadavg()
    ratio = None
    if "alignloop" in results and "trl" in results:
        ratio = results["alignloop"]["pairs_per_s"] / results["trl"]["pairs_per_s"]
        print(f"[bench] alignloop / trl = {ratio:.2f}x", flush=True)
    out = {"model": args.model, "data": args.data, "steps": args.steps, "warmup": args.warmup,
           "global_batch": args.global_batch, "micro_batch": args.micro_batch, "max_length": args.max_length,
           "tokens_per_pair": round(tokens_per_pair, 1), "threads": args.threads, "load_average": load,
           "machine": f"{platform.machine()} {os.cpu_count()} CPUs", "ratio_alignloop_over_trl": ratio,
           "results": {k: {kk: v for kk, v in r.items()} for k, r in results.items()}}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps({"ratio_alignloop_over_trl": ratio, **{k: round(r["pairs_per_s"], 3) for k, r in results.items()}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
