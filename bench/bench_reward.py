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
- ``alignloop``: ``reward.trainer.train_worker`` in this process with its defaults: shared-prefix
  batches (each pair's common history computed once), ``data.packing=auto`` (right padding on CPU)
  and ``data.group_by_length`` (a step's micro-batches from pairs of similar length);
- ``alignloop-padded``: right-padded batches, no shared prefix, no grouping: the same micro-batches
  and the same work as TRL (a control for the loop's own overhead);
- ``alignloop-packed``: one padding-free row per micro-batch, no shared prefix, no grouping;
- ``trl``: ``RewardTrainer`` as shipped (right-padded chosen+rejected batches).

Per optimizer step both the wall time and the process CPU time (user+sys of this process, all
threads: ``time.process_time``) are taken; pairs/s = global batch / mean of the measured steps
(the first ``--warmup`` steps of each run are dropped). CPU-time pairs/s are less sensitive to
other jobs on a shared machine (a step that waits for a core costs wall time, not CPU time).
``--rounds N`` runs the systems N times, reversing the order every other round, and reports the
ratio per round (neighbours in time) and the median. The step-1 loss of each row is printed:
equal starts and data give equal losses, a check that the rows do the same work.
Writes ``bench/results/reward.json`` (``--out``).
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
SYSTEMS = ("alignloop", "alignloop-padded", "alignloop-packed", "trl")
LAYOUTS = {"alignloop": ("auto", True, True),  # data.packing, data.shared_prefix, data.group_by_length
           "alignloop-padded": (False, False, False), "alignloop-packed": (True, False, False)}


def pair_bench_args(doc: str, systems, *, steps: int, warmup: int, rounds: int, max_length: int, lr: float,
                    threads: int | None, name: str) -> argparse.ArgumentParser:
    """The options every preference-pair benchmark (reward, DPO) takes, with its own defaults."""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2", help="model path (default: the packaged SmolLM2-135M-Instruct)")
    ap.add_argument("--systems", default=",".join(systems), help=f"comma list of {', '.join(systems)}")
    ap.add_argument("--steps", type=int, default=steps, help=f"optimizer steps per run (default {steps})")
    ap.add_argument("--rounds", type=int, default=rounds, help="run the systems this many times, order reversed every other round")
    ap.add_argument("--warmup", type=int, default=warmup, help=f"first steps left out of the measurement (default {warmup})")
    ap.add_argument("--global-batch", type=int, default=8, help="pairs per optimizer step (default 8)")
    ap.add_argument("--micro-batch", type=int, default=4, help="pairs per forward/backward (default 4)")
    ap.add_argument("--max-length", type=int, default=max_length, help=f"tokens per conversation (default {max_length})")
    ap.add_argument("--data", default=str(HH) if HH.is_file() else "synthetic", help="preference file or 'synthetic'")
    ap.add_argument("--lr", type=float, default=lr)
    ap.add_argument("--threads", type=int, default=threads,
                    help="torch threads (default: torch's)" if threads is None else f"torch threads (default {threads})")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--work-dir", default=f"/tmp/alignloop-bench-{name}")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / f"{name}.json"))
    return ap


def parse_args(argv=None):
    ap = pair_bench_args(__doc__, SYSTEMS, steps=6, warmup=1, rounds=1, max_length=128, lr=1e-5, threads=None,
                         name="reward")
    ap.add_argument("--truncation", default="pair", choices=("pair", "each"), help="data.truncation (default pair)")
    return ap.parse_args(argv)


def trl_step_clock():
    """A TRL/transformers callback holding a :class:`Clock` around every optimizer step (``.clock``)."""
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        def __init__(self):
            self.clock = Clock()

        def on_step_begin(self, a, state, control, **kw):
            self.clock.begin()

        def on_step_end(self, a, state, control, **kw):
            self.clock.end()

    return StepClock()


def trl_args(config_cls, args, out_dir: Path, **extra):
    """TRL training arguments matching alignloop's defaults in these benchmarks: AdamW (0.9, 0.95), cosine without
    warm-up, no weight decay, clip 1.0, float32 on CPU, no gradient checkpointing, rows in the given order."""
    return config_cls(
        output_dir=str(out_dir), max_steps=args.steps, seed=args.seed,
        per_device_train_batch_size=args.micro_batch, gradient_accumulation_steps=args.global_batch // args.micro_batch,
        learning_rate=args.lr, lr_scheduler_type="cosine", warmup_steps=0, weight_decay=0.0,
        adam_beta1=0.9, adam_beta2=0.95, adam_epsilon=1e-8, max_grad_norm=1.0, optim="adamw_torch",
        max_length=args.max_length, use_cpu=True, bf16=False, gradient_checkpointing=False,
        train_sampling_strategy="sequential", dataloader_num_workers=0,
        logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True, **extra)


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
    ex = tokenize_preferences(read_preferences(rows_file), tok, args.max_length, args.truncation)
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


class Clock:
    """Wall and process CPU time of each optimizer step."""

    def __init__(self):
        self.wall, self.cpu, self._t = [], [], None

    def begin(self):
        self._t = (time.perf_counter(), time.process_time())

    def end(self):
        w, c = self._t
        self.wall.append(time.perf_counter() - w)
        self.cpu.append(time.process_time() - c)


def run_alignloop(args, rows_file: Path, work: Path, name: str) -> dict:
    from reward.config import RewardConfig
    from reward.trainer import train_worker

    packing, shared, grouped = LAYOUTS[name]
    run = work / name
    shutil.rmtree(run, ignore_errors=True)
    cfg = RewardConfig.model_validate({
        "output_dir": str(work), "run_name": name, "model": {"path": args.model}, "peft": {"method": "full"},
        "data": {"train": str(rows_file), "eval_fraction": 0.0, "max_length": args.max_length, "packing": packing,
                 "shared_prefix": shared, "group_by_length": grouped, "truncation": args.truncation},
        "eval": {"stats_max_examples": 1},
        "optim": {"lr": args.lr, "warmup_steps": 0, "scheduler": "cosine", "betas": [0.9, 0.95]},
        "train": {"strategy": "single", "max_steps": args.steps, "global_batch_size": args.global_batch,
                  "micro_batch_size": args.micro_batch, "seed": args.seed, "save_every": 10**6}})
    run.mkdir(parents=True)
    clock = Clock()
    train_worker({"cfg": cfg.model_dump(mode="json"), "run_dir": str(run), "threads": args.threads},
                 step_hook=lambda event, step: clock.begin() if event == "begin" else clock.end())
    m = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [x for x in m if x.get("time/step_s") is not None]
    shutil.rmtree(run, ignore_errors=True)
    return {"step_s": clock.wall, "step_cpu_s": clock.cpu, "loss": [x["loss/reward"] for x in steps]}


def run_trl(args, trl_rows, tok, path: str, work: Path) -> dict:
    import torch
    from datasets import Dataset
    from trl import RewardConfig as TrlRewardConfig
    from trl import RewardTrainer

    if args.threads:
        torch.set_num_threads(args.threads)
    clock = trl_step_clock()
    model = fresh_model(args, path, tok.pad_token_id).seq  # the same weights and head init alignloop starts from
    targs = trl_args(TrlRewardConfig, args, work / "trl")
    trainer = RewardTrainer(model=model, args=targs, train_dataset=Dataset.from_list(trl_rows), processing_class=tok,
                            callbacks=[clock])
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    shutil.rmtree(work / "trl", ignore_errors=True)
    return {"step_s": clock.clock.wall, "step_cpu_s": clock.clock.cpu, "loss": [h["loss"] for h in logs]}


def rate(args, step_s: list[float]) -> float:
    measured = step_s[args.warmup:]
    return args.global_batch / statistics.mean(measured)


def main(argv=None) -> int:
    args = parse_args(argv)
    systems = [s for s in args.systems.split(",") if s]
    unknown = set(systems) - set(SYSTEMS)
    if unknown:
        raise SystemExit(f"unknown systems {sorted(unknown)}")
    if args.steps <= args.warmup:
        raise SystemExit("--steps must exceed --warmup")
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    rows_file, trl_rows, tok, path, tokens_per_pair = prepare(args, work)
    runs = []
    load = {"start": os.getloadavg()}
    for rnd in range(args.rounds):
        for name in systems if rnd % 2 == 0 else systems[::-1]:
            t0 = time.perf_counter()
            la0 = os.getloadavg()
            if name == "trl":
                r = run_trl(args, trl_rows, tok, path, work)
            else:
                r = run_alignloop(args, rows_file, work, name)
            r.update({"system": name, "round": rnd, "pairs_per_s": rate(args, r["step_s"]),
                      "pairs_per_cpu_s": rate(args, r["step_cpu_s"]), "wall_s": round(time.perf_counter() - t0, 1),
                      "load_average": [la0, os.getloadavg()]})
            runs.append(r)
            print(f"[bench] round {rnd} {name}: {r['pairs_per_s']:.3f} pairs/s wall, {r['pairs_per_cpu_s']:.3f} pairs/CPU-s "
                  f"(steps {', '.join(f'{w:.1f}/{c:.1f}' for w, c in zip(r['step_s'], r['step_cpu_s']))} s wall/CPU), "
                  f"loss step 1 {r['loss'][0]:.6f}, load {la0[0]:.1f} -> {os.getloadavg()[0]:.1f}", flush=True)
    load["end"] = os.getloadavg()
    summary = {}
    for name in systems:
        mine = [r for r in runs if r["system"] == name]
        wall = [x for r in mine for x in r["step_s"][args.warmup:]]
        cpu = [x for r in mine for x in r["step_cpu_s"][args.warmup:]]
        summary[name] = {"pairs_per_s": args.global_batch / statistics.mean(wall),
                         "pairs_per_cpu_s": args.global_batch / statistics.mean(cpu),
                         "step_s_median": statistics.median(wall), "step_cpu_s_median": statistics.median(cpu)}
    ratios = {}
    if "trl" in systems:
        for name in systems:
            if name == "trl":
                continue
            per_round = []
            for rnd in range(args.rounds):
                a = next(r for r in runs if r["system"] == name and r["round"] == rnd)
                t = next(r for r in runs if r["system"] == "trl" and r["round"] == rnd)
                per_round.append({"wall": a["pairs_per_s"] / t["pairs_per_s"], "cpu": a["pairs_per_cpu_s"] / t["pairs_per_cpu_s"]})
            ratios[name] = {
                "wall": summary[name]["pairs_per_s"] / summary["trl"]["pairs_per_s"],
                "cpu": summary[name]["pairs_per_cpu_s"] / summary["trl"]["pairs_per_cpu_s"],
                "wall_median_of_rounds": statistics.median(x["wall"] for x in per_round),
                "cpu_median_of_rounds": statistics.median(x["cpu"] for x in per_round),
                "per_round": per_round}
            walls = ", ".join(f"{x['wall']:.2f}" for x in per_round)
            cpus = ", ".join(f"{x['cpu']:.2f}" for x in per_round)
            print(f"[bench] {name} / trl: {ratios[name]['wall']:.2f}x wall, {ratios[name]['cpu']:.2f}x CPU time "
                  f"(per round: wall {walls}; CPU {cpus})", flush=True)
    out = {"model": args.model, "data": args.data, "steps": args.steps, "warmup": args.warmup, "rounds": args.rounds,
           "global_batch": args.global_batch, "micro_batch": args.micro_batch, "max_length": args.max_length,
           "truncation": args.truncation, "tokens_per_pair": round(tokens_per_pair, 1), "threads": args.threads,
           "torch_threads": __import__("torch").get_num_threads(), "load_average": load,
           "machine": f"{platform.machine()} {os.cpu_count()} CPUs", "summary": summary, "ratios_over_trl": ratios,
           "runs": runs}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps({k: {"wall": round(v["wall"], 3), "cpu": round(v["cpu"], 3)} for k, v in ratios.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
