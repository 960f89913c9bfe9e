"""SFT throughput: alignloop's trainer against plain TRL ``SFTTrainer``, in one run.

    .venv/bin/python bench/bench_sft.py                     # LoRA and full, 8 steps each
    .venv/bin/python bench/bench_sft.py --modes lora --steps 4 --dtype bfloat16

Same base model (the packaged SmolLM2-135M-Instruct), same data, same examples in
every optimizer step (TRL reads the rows in alignloop's order with a sequential
sampler), same global/micro batch, max length, optimizer settings and dtype.
Rows:

- ``alignloop``: ``sft.trainer.train_worker`` in this process, default padding-free
  batches; tokens/s and MFU read from the run's ``metrics.jsonl``.
- ``trl``: ``SFTTrainer`` as shipped (right-padded batches, TRL's default).
- ``trl-padding-free``: ``SFTTrainer`` with ``padding_free=True`` (no packing, so
  the batches hold the same rows), fed TRL's own tokenized and truncated rows.

Throughput counts non-pad input tokens of the measured steps (the first
``--warmup`` steps are dropped) over their wall time, from the end of the last
warm-up step to the end of the last step. MFU = FlopCounter FLOPs per token x
tokens/s / the matmul FLOP/s measured once in this process, for every row.
Writes ``bench/results/sft.json`` and ``bench/results/sft.png``.
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
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

SYSTEMS = ("alignloop", "alignloop-padded", "trl", "trl-padding-free")
DEFAULT_SYSTEMS = ("alignloop", "trl", "trl-padding-free")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--modes", default="lora,full", help="comma list of lora, full (default: lora,full)")
    ap.add_argument("--systems", default=",".join(DEFAULT_SYSTEMS),
                    help=f"comma list of {', '.join(SYSTEMS)} (default: {','.join(DEFAULT_SYSTEMS)})")
    ap.add_argument("--steps", type=int, default=8, help="optimizer steps per run (default 8)")
    ap.add_argument("--warmup", type=int, default=1, help="first steps left out of the measurement (default 1)")
    ap.add_argument("--global-batch", type=int, default=8, help="sequences per optimizer step (default 8)")
    ap.add_argument("--micro-batch", type=int, default=4, help="sequences per forward/backward (default 4)")
    ap.add_argument("--max-length", type=int, default=256, help="tokens per example (default 256)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="parameter dtype")
    ap.add_argument("--lr", type=float, default=2e-4, help="peak learning rate (cosine, no warm-up)")
    ap.add_argument("--data", default="auto",
                    help="auto (the shipped sft/data/*.jsonl if present, else generated), generated, or a JSONL path")
    ap.add_argument("--records", type=int, default=200, help="number of generated records")
    ap.add_argument("--model", default="smollm2", help="model.path (default: the packaged SmolLM2-135M-Instruct)")
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's, one per core)")
    ap.add_argument("--work-dir", default=None, help="scratch directory for run dirs (default: a temp dir, removed)")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"), help="where sft.json and sft.png go")
    args = ap.parse_args(argv)
    args.modes = [m for m in args.modes.split(",") if m]
    args.systems = [s for s in args.systems.split(",") if s]
    for m in args.modes:
        if m not in ("lora", "full"):
            ap.error(f"--modes: unknown mode {m!r}")
    for s in args.systems:
        if s not in SYSTEMS:
            ap.error(f"--systems: unknown system {s!r}")
    if args.global_batch % args.micro_batch:
        ap.error("--global-batch must be a multiple of --micro-batch")
    if not 0 <= args.warmup < args.steps - 1:
        ap.error("--warmup must leave at least two measured steps")
    return args


# ---------------------------------------------------------------- 1. data


def build_data(args, work: Path) -> tuple[Path, str]:
    """The project's shipped instruction data if present, else the generated set (bench/sft_data.py)."""
    if args.data not in ("auto", "generated"):
        return Path(args.data), args.data
    shipped = sorted((ROOT / "sft" / "data").glob("*.jsonl")) if args.data == "auto" else []
    if shipped:
        rows = []
        for p in shipped:
            rows += [json.loads(line) for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]
        src = ", ".join(str(p.relative_to(ROOT)) for p in shipped)
    else:
        from sft_data import make_records

        rows, src = make_records(args.records, seed=0), f"generated by bench/sft_data.py ({args.records} records)"
    from sft_data import write_jsonl

    return write_jsonl(rows, work / "train.jsonl"), src


# ---------------------------------------------------------------- 2. alignloop


def run_alignloop(args, mode: str, data: Path, work: Path, packing: bool = True) -> dict:
    from alignloop.metrics import read_metrics
    from sft.config import SFTConfig
    from sft.trainer import train_worker

    run = work / f"alignloop-{mode}{'' if packing else '-padded'}"
    if run.exists():
        shutil.rmtree(run)
    cfg = SFTConfig.model_validate({
        "output_dir": str(work), "run_name": run.name,
        "model": {"path": args.model, "dtype": args.dtype},
        "peft": {"method": mode, "lora_r": 16, "lora_alpha": 32, "lora_dropout": 0.0, "target_modules": "all-linear"},
        "data": {"train": str(data), "max_length": args.max_length, "packing": packing},
        "optim": {"lr": args.lr},
        "train": {"global_batch_size": args.global_batch, "micro_batch_size": args.micro_batch,
                  "max_steps": args.steps, "seed": args.seed},
        "merge": False,
    })
    run.mkdir(parents=True)
    train_worker({"cfg": cfg.model_dump(mode="json"), "run_dir": str(run)})  # what sft/cli.py's launch passes
    recs = [r for r in read_metrics(run / "metrics.jsonl") if "perf/tokens_per_s" in r]
    shutil.rmtree(run / "final", ignore_errors=True)  # checkpoints/final weights are not needed here
    shutil.rmtree(run / "checkpoints", ignore_errors=True)
    meas = recs[args.warmup:]
    tokens = sum(r["train/tokens"] for r in meas)
    busy = sum(r["time/step_s"] for r in meas)
    return {
        "step_tokens": [int(r["train/tokens"]) for r in recs],
        "step_s": [r["time/step_s"] for r in recs],
        # metrics.jsonl: the trainer's own per-step figures (batch build .. optimizer step)
        "tokens_per_s_reported": tokens / busy,
        "mfu_reported": statistics.fmean(r["perf/mfu"] for r in meas if r.get("perf/mfu") is not None),
        # wall clock between the log lines of the last warm-up step and the last step (ms resolution)
        "wall_s": recs[-1]["time"] - recs[args.warmup - 1]["time"] if args.warmup else None,
        "step_wall_s": [b["time"] - a["time"] for a, b in zip(recs, recs[1:])],  # steps 2..S
        "loss": [r["loss/sft"] for r in recs],
    }


# ---------------------------------------------------------------- 3. TRL


def trl_rows(data: Path, order: list[int]) -> list[dict]:
    """Conversational prompt/completion rows (TRL's completion-only loss), in alignloop's step order."""
    from alignloop.data import iter_rows, to_messages

    msgs = [to_messages(row, where) for row, where in iter_rows(data)]
    return [{"prompt": msgs[i][:-1], "completion": msgs[i][-1:]} for i in order]


def run_trl(args, mode: str, rows_or_ds, work: Path, padding_free: bool, model_path: str, tok,
            train: bool = True) -> tuple[dict, object]:
    """One SFTTrainer run timed by a callback; also returns TRL's prepared (tokenized, truncated) train rows."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import SFTConfig as TrlSFTConfig
    from trl import SFTTrainer

    from alignloop.models import disable_dropout

    class StepClock(TrainerCallback):
        def __init__(self):
            self.begin, self.end = [], []

        def on_step_begin(self, a, state, control, **kw):
            self.begin.append(time.perf_counter())

        def on_step_end(self, a, state, control, **kw):
            self.end.append(time.perf_counter())

    name = f"trl{'-pf' if padding_free else ''}-{mode}"
    clock = StepClock()
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=getattr(torch, args.dtype), attn_implementation="sdpa")
    disable_dropout(model)  # alignloop trains without dropout (SmolLM2 has none anyway)
    peft_cfg = None
    if mode == "lora":
        peft_cfg = LoraConfig(task_type="CAUSAL_LM", r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear")
    ds = rows_or_ds if isinstance(rows_or_ds, Dataset) else Dataset.from_list(rows_or_ds)
    targs = TrlSFTConfig(
        output_dir=str(work / name), max_steps=args.steps, seed=args.seed,
        per_device_train_batch_size=args.micro_batch, gradient_accumulation_steps=args.global_batch // args.micro_batch,
        learning_rate=args.lr, lr_scheduler_type="cosine", warmup_steps=0, weight_decay=0.0,
        adam_beta1=0.9, adam_beta2=0.95, adam_epsilon=1e-8, max_grad_norm=1.0, optim="adamw_torch",
        # padding-free without packing does not truncate: it gets rows TRL already truncated (see main)
        max_length=None if padding_free else args.max_length,
        completion_only_loss=True, packing=False, padding_free=padding_free,
        use_cpu=True, bf16=args.dtype == "bfloat16", gradient_checkpointing=False,  # TRL defaults to True
        train_sampling_strategy="sequential", shuffle_dataset=False, dataloader_num_workers=0,
        logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True,
    )
    trainer = SFTTrainer(model=model, args=targs, train_dataset=ds, processing_class=tok, peft_config=peft_cfg,
                         callbacks=[clock])
    if train:
        trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    out = {"begin": clock.begin, "end": clock.end, "loss": [h["loss"] for h in logs],
           "num_tokens": [h.get("num_tokens") for h in logs], "model": trainer.model}
    prepared = trainer.train_dataset
    shutil.rmtree(work / name, ignore_errors=True)
    return out, prepared


def diffs(xs: list[float]) -> list[float]:
    return [b - a for a, b in zip(xs, xs[1:])]


def alignloop_flops(args, mode: str, model_path: str):
    """FlopCounter from the parameter counts of the model alignloop builds (when no TRL run gave them)."""
    from alignloop.models import apply_peft, count_parameters, load_causal_lm
    from alignloop.perf import FlopCounter
    from alignloop.sections import ModelConfig, PeftConfig

    m = apply_peft(load_causal_lm(ModelConfig(path=args.model, dtype=args.dtype), path=model_path),
                   PeftConfig(method=mode), model_path)
    trainable, total = count_parameters(m)
    return FlopCounter(total_params=total, trainable_params=trainable)


# ---------------------------------------------------------------- 4. table, json, chart


def summarise(args, name: str, step_tokens: list[int], wall_s: float, step_wall_s: list[float], flops, peak: float,
              extra: dict) -> dict:
    """Aggregate tokens/s over the measured steps, plus the median of per-step rates (robust to a busy machine).

    ``step_wall_s`` holds the wall time of steps 2..S (end of the previous step to the end of this one).
    """
    tokens = sum(step_tokens[args.warmup:])
    tps = tokens / wall_s
    per_step = [tok / dt for tok, dt in zip(step_tokens[1:], step_wall_s)][max(args.warmup - 1, 0):]
    return {"system": name, "tokens": tokens, "seconds": round(wall_s, 3), "tokens_per_s": tps,
            "mfu": flops.mfu(tokens, wall_s, peak), "step_tokens_per_s": per_step,
            "median_step_tokens_per_s": statistics.median(per_step), **extra}


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = list(results["modes"])
    systems = [s for s in SYSTEMS if any(s in results["modes"][m] for m in modes)]
    fig, ax = plt.subplots(figsize=(6, 3.2), dpi=100)
    w = 0.8 / len(systems)
    for j, s in enumerate(systems):
        ys = [results["modes"][m].get(s, {}).get("tokens_per_s", 0) for m in modes]
        bars = ax.bar([i + (j - (len(systems) - 1) / 2) * w for i in range(len(modes))], ys, w, label=s)
        ax.bar_label(bars, fmt="%.1f" if max(ys) < 100 else "%.0f", fontsize=7)
    ax.set_xticks(range(len(modes)), [f"{m}" for m in modes])
    ax.set_ylabel("tokens/s (non-pad)")
    ax.set_title(f"SFT throughput, SmolLM2-135M, {results['settings']['dtype']}, CPU"
                 f"{'' if results.get('complete') else ' (partial run)'}", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)


def write_report(results: dict, out_dir: Path, final: bool = False) -> None:
    """Table on stdout, sft.json and sft.png; called after each mode so a cut-short run keeps what it measured."""
    lines = [f"{'mode':<5} {'system':<17} {'tokens/s':>9} {'MFU':>7} {'vs trl':>7} {'vs trl-pf':>9} {'median step tok/s':>18}"]
    for mode, res in results["modes"].items():
        base, base_pf = res.get("trl", {}).get("tokens_per_s"), res.get("trl-padding-free", {}).get("tokens_per_s")
        for s in SYSTEMS:
            if s not in res:
                continue
            r = res[s]
            r["ratio_vs_trl"] = r["tokens_per_s"] / base if base else None
            r["ratio_vs_trl_padding_free"] = r["tokens_per_s"] / base_pf if base_pf else None
            fmt = lambda x: f"{x:.2f}x" if x else "-"  # noqa: E731
            lines.append(f"{mode:<5} {s:<17} {r['tokens_per_s']:>9.1f} {r['mfu']:>7.2%} "
                         f"{fmt(r['ratio_vs_trl']):>7} {fmt(r['ratio_vs_trl_padding_free']):>9} "
                         f"{r['median_step_tokens_per_s']:>18.1f}")
        if "alignloop" in res:
            a = res["alignloop"]
            lines.append(f"{'':<5} (alignloop's metrics.jsonl: {a['tokens_per_s_reported']:.1f} tokens/s, "
                         f"MFU {a['mfu_reported']:.2%} against the peak it measured itself)")
    results["table"] = "\n".join(lines)
    results["complete"] = final
    print(results["table"], flush=True)
    (out_dir / "sft.json").write_text(json.dumps(results, indent=1))
    plot(results, out_dir / "sft.png")
    print(f"[bench] wrote {out_dir / 'sft.json'} and {out_dir / 'sft.png'}", flush=True)


def main(argv=None) -> int:
    args = parse_args(argv)
    import tempfile

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from alignloop.batching import global_batch_indices
    from alignloop.data import load_sft_examples
    from alignloop.models import load_tokenizer, resolve_model_path
    from alignloop.perf import FlopCounter, matmul_peak_flops

    work = Path(args.work_dir or tempfile.mkdtemp(prefix="alignloop-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    load0 = os.getloadavg()

    # 1. data and the shared step order (every system sees the same rows in every step)
    data, data_src = build_data(args, work)
    model_path = resolve_model_path(args.model)
    tok = load_tokenizer(model_path)
    examples = load_sft_examples(str(data), tok, "auto", args.max_length, "answer")
    order = [i for s in range(args.steps) for i in global_batch_indices(len(examples), args.global_batch, s, args.seed)]
    G, mb = args.global_batch, args.micro_batch
    step_tokens = [sum(len(examples[i].input_ids) for i in order[s * G:(s + 1) * G]) for s in range(args.steps)]
    padded_tokens = [sum(mb * max(len(examples[i].input_ids) for i in order[k:k + mb])
                         for k in range(s * G, (s + 1) * G, mb)) for s in range(args.steps)]
    pad_share = 1 - sum(step_tokens) / sum(padded_tokens)
    lengths = [len(e.input_ids) for e in examples]
    print(f"[bench] data: {data_src}; {len(examples)} rows, tokens/row min {min(lengths)} mean "
          f"{sum(lengths) / len(lengths):.0f} max {max(lengths)} (max_length {args.max_length}); "
          f"right padding would add {pad_share:.1%} pad positions", flush=True)

    # 2. the MFU denominator, measured once (median of 5) and used for every row
    peak = statistics.median(matmul_peak_flops() for _ in range(5))
    print(f"[bench] matmul peak {peak / 1e9:.1f} GFLOP/s (float32, {torch.get_num_threads()} threads)", flush=True)

    results = {"settings": {k: v for k, v in vars(args).items() if k not in ("work_dir", "out")},
               "data": {"source": data_src, "rows": len(examples), "mean_tokens": sum(lengths) / len(lengths),
                        "max_tokens": max(lengths), "pad_share_if_padded": pad_share},
               "env": {"python": platform.python_version(), "torch": torch.__version__, "threads": torch.get_num_threads(),
                       "cpu": platform.processor() or platform.machine(), "loadavg_start": load0},
               "matmul_peak_flops": peak, "modes": {}}
    import transformers
    import trl

    results["env"].update(transformers=transformers.__version__, trl=trl.__version__)

    trl_order_rows = trl_rows(data, order)
    for mode in args.modes:
        res: dict = {}
        flops = None
        prepared = None

        # 3. TRL as shipped (right-padded); its prepared rows feed the padding-free run
        if "trl" in args.systems or "trl-padding-free" in args.systems:
            print(f"[bench] {mode}: trl SFTTrainer (padded)", flush=True)
            t, prepared = run_trl(args, mode, trl_order_rows, work, False, model_path, tok, train="trl" in args.systems)
            if len(prepared) != len(order):
                raise RuntimeError(f"TRL kept {len(prepared)} of {len(order)} rows; the step batches would differ")
            from alignloop.models import count_parameters

            trainable, total = count_parameters(t.pop("model"))
            flops = FlopCounter(total_params=total, trainable_params=trainable)
            trl_lens = [len(x) for x in prepared["input_ids"]]
            trl_step_tokens = [sum(trl_lens[s * G:(s + 1) * G]) for s in range(args.steps)]
            if "trl" in args.systems:
                res["trl"] = summarise(args, "trl", trl_step_tokens, t["end"][-1] - t["end"][args.warmup - 1]
                                       if args.warmup else t["end"][-1] - t["begin"][0], diffs(t["end"]), flops, peak,
                                       {"loss": t["loss"], "step_tokens": trl_step_tokens,
                                        "trl_num_tokens": t["num_tokens"]})
            if "trl-padding-free" in args.systems:
                print(f"[bench] {mode}: trl SFTTrainer (padding_free=True)", flush=True)
                t2, _ = run_trl(args, mode, prepared.select_columns(["input_ids", "labels"]), work, True,
                                model_path, tok)
                t2.pop("model")
                res["trl-padding-free"] = summarise(
                    args, "trl-padding-free", trl_step_tokens,
                    t2["end"][-1] - t2["end"][args.warmup - 1] if args.warmup else t2["end"][-1] - t2["begin"][0],
                    diffs(t2["end"]), flops, peak, {"loss": t2["loss"], "step_tokens": trl_step_tokens})

        # 4. alignloop's trainer, in this process (padding-free by default; padded for comparison)
        for system in ("alignloop", "alignloop-padded"):
            if system not in args.systems:
                continue
            packing = system == "alignloop"
            print(f"[bench] {mode}: {system} sft (train_worker, data.packing={packing})", flush=True)
            a = run_alignloop(args, mode, data, work, packing)
            if flops is None:
                flops = alignloop_flops(args, mode, model_path)
            wall = a["wall_s"] if a["wall_s"] else sum(a["step_s"])
            if packing and a["step_tokens"] != step_tokens:
                print(f"[bench] warning: alignloop counted {a['step_tokens']} tokens per step, expected {step_tokens}",
                      flush=True)
            # padded: the trainer's train/tokens counts pad positions too, so count non-pad tokens here
            res[system] = summarise(args, system, step_tokens, wall, a["step_wall_s"], flops, peak, {
                "tokens_per_s_reported": a["tokens_per_s_reported"], "mfu_reported": a["mfu_reported"],
                "mfu_at_reported_tokens_per_s": flops.mfu(a["tokens_per_s_reported"], 1.0, peak),
                "loss": a["loss"], "step_tokens_reported": a["step_tokens"]})
        if flops is not None:
            res["params"] = {"total": flops.total_params, "trainable": flops.trainable_params,
                             "flops_per_token": flops.per_token}
        results["modes"][mode] = res
        results["seconds_total"] = round(time.time() - t_start, 1)
        results["env"]["loadavg_end"] = os.getloadavg()
        write_report(results, out_dir)  # partial results survive an interrupted run

    results["env"]["loadavg_end"] = os.getloadavg()
    results["seconds_total"] = round(time.time() - t_start, 1)

    write_report(results, out_dir, final=True)
    if not args.work_dir:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
