"""Offline DPO training throughput: ``alignloop dpo`` against TRL's ``DPOTrainer``, in one run.

    .venv/bin/python bench/bench_dpo.py                                  # SmolLM2-135M + LoRA, 8 steps, 2 rounds
    .venv/bin/python bench/bench_dpo.py --data ../shared/data/hh-rlhf-harmless-base-test.jsonl.gz   # longer prompts

Both sides train the same thing: the packaged SmolLM2-135M-Instruct in float32,
LoRA r=16 / alpha=32 / dropout 0 on every linear layer of the blocks, sigmoid DPO
(β=0.1), AdamW (lr 5e-5, betas 0.9/0.95, no weight decay, clip 1.0, cosine, no
warm-up), the same global and micro batch, the same torch threads, gradient
checkpointing off. The reference is the base model with the LoRA adapter
disabled, one no-grad forward per micro-batch on both sides (alignloop: its
default for adapters, ``reference.precompute`` unset; TRL: ``ref_model=None`` with
``peft_config``, ``precompute_ref_log_probs=False``).

Same token ids: the pairs are read and rendered with the chat template once by
alignloop's reader (``ppo.dpo_data``); TRL is handed them as ``prompt_ids`` /
``chosen_ids`` / ``rejected_ids`` (its ``_prepare_dataset`` tokenizer is bypassed,
nothing else of the trainer is touched). Only pairs that fit ``--max-length``
untruncated are used, so neither side cuts anything and the prompt of the chosen
and the rejected answer is the same token list. Same pairs in every optimizer
step: TRL reads them in alignloop's step order with a sequential sampler. Data:
``reward.synthetic.marker_rows`` (the default, ``--data synthetic``: short prompts and
answers that differ in one word), or the first fitting pairs of a preference file,
e.g. HH-RLHF harmless-base from ``../shared/data`` (read in place, no download).

Rows:
- ``alignloop``: ``ppo.dpo_trainer.train_worker``, the function ``alignloop dpo`` runs in-process,
  with the trainer's defaults;
- ``trl``: ``trl.DPOTrainer`` as shipped (chosen and rejected right-padded into 2B rows, its fused
  LM head computing log-probs at completion positions only).

Per optimizer step the wall time and the process CPU time (``time.process_time``, all threads) are
taken; the first ``--warmup`` steps of each run are dropped. Training tokens/s = real tokens of the
step's sequences (prompt+chosen and prompt+rejected of every pair, no pads: the same count on both
sides) / step time. ``--rounds N`` runs the systems N times, order reversed every other round, and
the ratio TRL time / alignloop time is given per round (neighbours in time) and over all steps.
Step 1 of both sides starts at the reference (LoRA B = 0), so its mean chosen/rejected log-probs
must agree: a check that both compute the same thing on the same tokens.
Writes ``bench/results/dpo.json`` (``--out``).
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path

from bench_reward import Clock, pair_bench_args, trl_args, trl_step_clock  # also sets the offline env defaults

SYSTEMS = ("alignloop", "trl")


def parse_args(argv=None):
    # --max-length: pairs longer than this are skipped (nothing is cut); --threads 1: the machine is shared
    ap = pair_bench_args(__doc__, SYSTEMS, steps=8, warmup=2, rounds=2, max_length=256, lr=5e-5, threads=1, name="dpo")
    ap.set_defaults(data="synthetic")
    ap.add_argument("--lora-r", type=int, default=16)
    ap.add_argument("--lora-alpha", type=float, default=32)
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--profile", default=None, help="cProfile the alignloop row into this file (.prof)")
    return ap.parse_args(argv)


# ---------------------------------------------------------------------- data

def prepare(args, work: Path):
    """The pairs file alignloop trains on, TRL's rows in step order, and real tokens per step."""
    import gzip

    from alignloop.batching import global_batch_indices
    from alignloop.data import DataError
    from alignloop.models import load_tokenizer, resolve_model_path
    from ppo.dpo_data import read_pairs, tokenize_pairs
    from reward.synthetic import marker_rows, write_rows

    n = args.steps * args.global_batch
    tok = load_tokenizer(resolve_model_path(args.model))
    rows_file = work / "pairs.jsonl"
    if args.data == "synthetic":
        source = marker_rows(4 * n, seed=args.seed)
    else:
        opener = gzip.open if args.data.endswith(".gz") else open
        with opener(args.data, "rt") as fh:
            source = [json.loads(line) for line in fh]
    kept = []
    for row in source:  # pairs that fit untruncated (checked and tokenized by alignloop's reader, row by row)
        write_rows([row], rows_file)
        try:
            (ex,) = tokenize_pairs(read_pairs(rows_file), tok, 10**9, 10**9)
        except (DataError, ValueError):
            continue  # e.g. identical answers, or a ranked row (not one pair)
        if max(len(ex.chosen_ids), len(ex.rejected_ids)) <= args.max_length:
            kept.append(row)
            if len(kept) == n:
                break
    if len(kept) < n:
        raise SystemExit(f"only {len(kept)} pairs of {args.data} fit --max-length={args.max_length}; need {n}")
    write_rows(kept, rows_file)
    ex = tokenize_pairs(read_pairs(rows_file), tok, args.max_length, args.max_length)
    order = [global_batch_indices(len(ex), args.global_batch, s, args.seed) for s in range(args.steps)]
    trl_rows = []
    for i in (i for step in order for i in step):
        e = ex[i]
        p = e.chosen_labels.count(-100)  # prompt tokens: the same list in both sequences (nothing was cut)
        assert e.chosen_ids[:p] == e.rejected_ids[:p] and e.rejected_labels.count(-100) == p
        trl_rows.append({"prompt_ids": e.chosen_ids[:p], "chosen_ids": e.chosen_ids[p:], "rejected_ids": e.rejected_ids[p:]})
    step_tokens = [sum(len(ex[i].chosen_ids) + len(ex[i].rejected_ids) for i in step) for step in order]
    prompt = statistics.mean(e.chosen_labels.count(-100) for e in ex)
    answers = statistics.mean(len(e.chosen_ids) + len(e.rejected_ids) for e in ex) - 2 * prompt
    return rows_file, trl_rows, tok, step_tokens, {"prompt_tokens": round(prompt, 1), "answer_tokens": round(answers / 2, 1)}


# ------------------------------------------------------------------- systems

def run_alignloop(args, rows_file: Path, work: Path) -> dict:
    from ppo.dpo_config import DPOConfig
    from ppo.dpo_trainer import train_worker

    run = work / "alignloop"
    shutil.rmtree(run, ignore_errors=True)
    cfg = DPOConfig.model_validate({
        "output_dir": str(work), "run_name": "alignloop", "model": {"path": args.model, "dtype": "float32"},
        "peft": {"method": "lora", "lora_r": args.lora_r, "lora_alpha": args.lora_alpha, "lora_dropout": 0.0,
                 "target_modules": "all-linear"},
        "data": {"train": str(rows_file), "max_length": args.max_length, "max_prompt_length": args.max_length},
        "loss": {"type": "sigmoid", "beta": args.beta},
        "optim": {"lr": args.lr, "warmup_steps": 0, "scheduler": "cosine", "betas": [0.9, 0.95], "weight_decay": 0.0,
                  "max_grad_norm": 1.0},
        "train": {"strategy": "single", "max_steps": args.steps, "global_batch_size": args.global_batch,
                  "micro_batch_size": args.micro_batch, "seed": args.seed, "save_every": 0},
        "merge": False})
    run.mkdir(parents=True)
    clock = Clock()
    payload = {"cfg": cfg.model_dump(mode="json"), "run_dir": str(run), "threads": args.threads}
    hook = lambda event, step: clock.begin() if event == "begin" else clock.end()  # noqa: E731
    if args.profile:
        import cProfile

        cProfile.runctx("train_worker(payload, step_hook=hook)", globals(), locals(), args.profile)
    else:
        train_worker(payload, step_hook=hook)
    m = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [x for x in m if x.get("loss/dpo") is not None]
    shutil.rmtree(run, ignore_errors=True)
    return {"steps_wall_s": clock.wall, "steps_cpu_s": clock.cpu, "loss": [x["loss/dpo"] for x in steps],
            "logp_chosen_step1": steps[0]["dpo/logp_chosen"], "logp_rejected_step1": steps[0]["dpo/logp_rejected"]}


def run_trl(args, trl_rows: list[dict], tok, work: Path) -> dict:
    import torch
    import trl
    from datasets import Dataset
    from peft import LoraConfig

    from alignloop.models import load_causal_lm, resolve_model_path
    from alignloop.sections import ModelConfig, PeftConfig

    class PreTokenized(trl.DPOTrainer):
        """DPOTrainer whose dataset already holds alignloop's token ids (no second tokenization)."""

        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            assert {"prompt_ids", "chosen_ids", "rejected_ids"} <= set(dataset.column_names)
            return dataset

    torch.set_num_threads(args.threads)
    clock = trl_step_clock()
    path = resolve_model_path(args.model)
    # alignloop's loader: the same float32 weights, sdpa attention and dropout off that alignloop trains
    model = load_causal_lm(ModelConfig(path=path, dtype="float32"), PeftConfig(method="lora"), path)
    peft = LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=0.0, target_modules="all-linear",
                      task_type="CAUSAL_LM")
    targs = trl_args(trl.DPOConfig, args, work / "trl", loss_type=["sigmoid"], beta=args.beta,
                     precompute_ref_log_probs=False)
    trainer = PreTokenized(model=model, args=targs, train_dataset=Dataset.from_list(trl_rows), processing_class=tok,
                           peft_config=peft, callbacks=[clock])
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    shutil.rmtree(work / "trl", ignore_errors=True)
    return {"steps_wall_s": clock.clock.wall, "steps_cpu_s": clock.clock.cpu, "loss": [h["loss"] for h in logs],
            "logp_chosen_step1": logs[0].get("logps/chosen"), "logp_rejected_step1": logs[0].get("logps/rejected"),
            "trl_version": trl.__version__}


# ---------------------------------------------------------------------- main

def rates(args, r: dict, step_tokens: list[int]) -> dict:
    """Seconds per optimizer step and training tokens/s (wall and CPU) over the measured steps."""
    w, c = r["steps_wall_s"][args.warmup:], r["steps_cpu_s"][args.warmup:]
    t = step_tokens[args.warmup:len(r["steps_wall_s"])]
    return {"step_s": statistics.mean(w), "step_cpu_s": statistics.mean(c), "tokens_per_s": sum(t) / sum(w),
            "tokens_per_cpu_s": sum(t) / sum(c)}


def main(argv=None) -> int:
    args = parse_args(argv)
    systems = [s for s in args.systems.split(",") if s]
    if set(systems) - set(SYSTEMS):
        raise SystemExit(f"unknown systems {sorted(set(systems) - set(SYSTEMS))}")
    if args.steps <= args.warmup or args.global_batch % args.micro_batch:
        raise SystemExit("--steps must exceed --warmup, and --micro-batch divide --global-batch")
    import torch

    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    rows_file, trl_rows, tok, step_tokens, lengths = prepare(args, work)
    runs, load = [], {"start": os.getloadavg()}
    for rnd in range(args.rounds):
        for name in systems if rnd % 2 == 0 else systems[::-1]:
            t0, la0 = time.perf_counter(), os.getloadavg()
            r = run_trl(args, trl_rows, tok, work) if name == "trl" else run_alignloop(args, rows_file, work)
            r.update({"system": name, "round": rnd, **rates(args, r, step_tokens),
                      "wall_s": round(time.perf_counter() - t0, 1), "load_average": [la0, os.getloadavg()]})
            runs.append(r)
            print(f"[bench] round {rnd} {name}: {r['step_s']:.2f} s/step wall ({r['step_cpu_s']:.2f} CPU), "
                  f"{r['tokens_per_s']:.1f} tokens/s, step-1 logp chosen/rejected {r['logp_chosen_step1']:.4f}/"
                  f"{r['logp_rejected_step1']:.4f}, losses {', '.join(f'{x:.4f}' for x in r['loss'])}, "
                  f"load {la0[0]:.2f} -> {os.getloadavg()[0]:.2f}", flush=True)
    load["end"] = os.getloadavg()
    summary = {}
    for name in systems:
        mine = [r for r in runs if r["system"] == name]
        w = [x for r in mine for x in r["steps_wall_s"][args.warmup:]]
        c = [x for r in mine for x in r["steps_cpu_s"][args.warmup:]]
        tokens = sum(step_tokens[args.warmup:]) * len(mine)
        summary[name] = {"step_s": statistics.mean(w), "step_cpu_s": statistics.mean(c), "tokens_per_s": tokens / sum(w),
                         "tokens_per_cpu_s": tokens / sum(c), "step_s_median": statistics.median(w)}
    ratio = {}
    if set(systems) == set(SYSTEMS):
        per_round = []
        for rnd in range(args.rounds):
            a = next(r for r in runs if r["system"] == "alignloop" and r["round"] == rnd)
            t = next(r for r in runs if r["system"] == "trl" and r["round"] == rnd)
            per_round.append({"wall": t["step_s"] / a["step_s"], "cpu": t["step_cpu_s"] / a["step_cpu_s"]})
        ratio = {"wall": summary["trl"]["step_s"] / summary["alignloop"]["step_s"],
                 "cpu": summary["trl"]["step_cpu_s"] / summary["alignloop"]["step_cpu_s"], "per_round": per_round}
        print(f"[bench] TRL time / alignloop time: {ratio['wall']:.2f}x wall, {ratio['cpu']:.2f}x CPU (per round: "
              + "; ".join(f"{x['wall']:.2f}x / {x['cpu']:.2f}x" for x in per_round) + ")", flush=True)
    out = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "model": args.model, "data": args.data,
           "pairs": args.steps * args.global_batch, **lengths, "steps": args.steps, "warmup": args.warmup,
           "rounds": args.rounds, "global_batch": args.global_batch, "micro_batch": args.micro_batch,
           "max_length": args.max_length, "lora": {"r": args.lora_r, "alpha": args.lora_alpha, "targets": "all-linear"},
           "beta": args.beta, "lr": args.lr, "dtype": "float32", "threads": args.threads,
           "reference": {"alignloop": "base with the LoRA adapter disabled, one no-grad forward per micro-batch",
                         "trl": "ref_model=None + peft_config: adapter disabled (use_adapter), one no-grad forward per "
                                "micro-batch, precompute_ref_log_probs=False"},
           "step_tokens": step_tokens, "torch": torch.__version__, "load_average": load,
           "machine": f"{platform.machine()} {os.cpu_count()} CPUs", "summary": summary,
           "trl_time_over_alignloop": ratio, "runs": runs}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps({k: round(v, 3) for k, v in ratio.items() if k != "per_round"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
