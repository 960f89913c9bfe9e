"""``alignloop demo-sft``: instruction tuning of the packaged base model alone, before and after (the full loop is ``alignloop demo``).

1. convert the packaged SmolLM2-135M-Instruct (once) and measure the base model:
   eval loss and greedy answers to held-out instructions;
2. LoRA SFT on the shipped instruction set (``sft/data/demo_train.jsonl``), whose
   answers all follow one house style (a direct answer, "- " detail lines, and
   the sign-off "Hope this helps!");
3. the same measurements on the tuned model, a before/after table, and a loss plot.

Any SFT config key can be overridden: ``alignloop demo-sft train.max_steps=10``.
"""

from __future__ import annotations

import json
import tempfile
import textwrap
import time
from pathlib import Path

import yaml

DATA = Path(__file__).resolve().parents[1] / "sft" / "data"
SIGN_OFF = "Hope this helps!"

DEMO_CONFIG = {
    "output_dir": "runs",
    "run_name": "demo-sft",
    "model": {"path": "smollm2", "dtype": "float32"},
    "peft": {"method": "lora", "lora_r": 16, "lora_alpha": 32, "target_modules": "all-linear"},
    "data": {"train": str(DATA / "demo_train.jsonl"), "eval": str(DATA / "demo_eval.jsonl"), "max_length": 256},
    "optim": {"lr": 1e-3, "warmup_steps": 3, "scheduler": "cosine"},
    "train": {"max_steps": 40, "global_batch_size": 8, "micro_batch_size": 4, "log_every": 1, "eval_every": 20},
}


def follows_style(text: str) -> bool:
    """The house style: ends with the sign-off and has at least one '- ' detail line."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return bool(lines) and lines[-1] == SIGN_OFF and any(line.startswith("- ") for line in lines[:-1])


def eval_loss(model_path: str, eval_path: str, max_length: int) -> float:
    """Mean answer-token NLL of a saved model on the eval records (same loss as training)."""
    import torch
    from transformers import AutoModelForCausalLM

    from alignloop.batching import packed_batch, token_nll_sum
    from alignloop.data import load_sft_examples
    from alignloop.models import load_tokenizer

    tok = load_tokenizer(model_path)
    examples = load_sft_examples(eval_path, tok, "auto", max_length, "answer")
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    total, n = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(examples), 4):
            s, k = token_nll_sum(model, packed_batch([(e.input_ids, e.labels) for e in examples[i: i + 4]]))
            total, n = total + float(s), n + k
    return total / n


def answers(model_path: str, prompts: list[list[dict]], engine: str, max_new_tokens: int) -> list[str]:
    from alignloop.rollout import SamplingSettings, make_engine

    from transformers import AutoConfig

    limit = getattr(AutoConfig.from_pretrained(model_path), "max_position_embeddings", 1024) or 1024
    with make_engine(engine, model_path, dtype="float32", seed=0, max_model_len=min(1024, limit)) as eng:
        out = eng.generate_chat(prompts, SamplingSettings(max_new_tokens=max_new_tokens, temperature=0.0))
    return [c[0].text.strip() for c in out]


def measure(label: str, model_path: str, eval_path: str, engine: str, max_length: int, max_new_tokens: int) -> dict:
    """Run in a child process: vLLM's CPU backend binds this process's OpenMP threads and disables
    ``torch.set_num_threads`` for good, which would slow the training that follows in the same process."""
    import multiprocessing as mp

    with mp.get_context("spawn").Pool(1) as pool:
        return pool.apply(_measure, (label, model_path, eval_path, engine, max_length, max_new_tokens))


def _measure(label: str, model_path: str, eval_path: str, engine: str, max_length: int, max_new_tokens: int) -> dict:
    from alignloop.data import iter_rows, to_messages

    t0 = time.time()
    prompts = [to_messages(row, where)[:-1] for row, where in iter_rows(eval_path)]
    texts = answers(model_path, prompts, engine, max_new_tokens)
    loss = eval_loss(model_path, eval_path, max_length)
    style = sum(follows_style(t) for t in texts) / len(texts)
    print(f"[demo] {label}: eval loss {loss:.3f}, house style in {style:.0%} of {len(texts)} answers "
          f"({time.time() - t0:.0f}s)", flush=True)
    return {"eval_loss": loss, "style_rate": style, "answers": texts,
            "prompts": [p[-1]["content"] for p in prompts]}


def plot_loss(run: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:  # plots are a bonus, never a failure
        return None
    from alignloop.metrics import LOSS_EVAL, LOSS_SFT, read_metrics

    rows = read_metrics(run / "metrics.jsonl")
    tr = [(r["step"], r[LOSS_SFT]) for r in rows if r.get(LOSS_SFT) is not None]
    ev = [(r["step"], r[LOSS_EVAL]) for r in rows if r.get(LOSS_EVAL) is not None]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    if tr:
        ax.plot(*zip(*tr), label="train loss (answer tokens)")
    if ev:
        ax.plot(*zip(*ev), "o-", label="eval loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title("alignloop demo: LoRA SFT of SmolLM2-135M-Instruct")
    ax.legend()
    fig.tight_layout()
    out = run / "loss.png"
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def _clip(text: str, width: int = 58, lines: int = 4) -> list[str]:
    flat = text.replace("\n", " | ")
    return textwrap.wrap(flat, width)[:lines] or [""]


def print_table(before: dict, after: dict, show: int = 4) -> None:
    print("\n" + "=" * 124)
    print(f"{'':<20}{'before (base model)':<52}{'after (LoRA SFT)':<52}")
    print(f"{'eval loss':<20}{before['eval_loss']:<52.3f}{after['eval_loss']:<52.3f}")
    print(f"{'house style rate':<20}{before['style_rate']:<52.0%}{after['style_rate']:<52.0%}")
    print("=" * 124)
    for i in range(min(show, len(before["prompts"]))):
        print(f"instruction: {before['prompts'][i][:110]}")
        b, a = _clip(before["answers"][i]), _clip(after["answers"][i])
        for j in range(max(len(b), len(a))):
            print(f"  {(b[j] if j < len(b) else ''):<60}  {(a[j] if j < len(a) else ''):<60}")
        print("-" * 124)


def _body(argv: list[str]) -> int:
    import argparse

    from alignloop.config import load_config
    from alignloop.models import resolve_model_path
    from alignloop.stage import quiet_env
    from sft import cli as sft_cli
    from sft.config import SFTConfig

    quiet_env()
    ap = argparse.ArgumentParser(prog="alignloop demo-sft", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--engine", default="auto", choices=["auto", "vllm", "hf"], help="generation engine")
    ap.add_argument("--max-new-tokens", type=int, default=80)
    ap.add_argument("overrides", nargs="*", help="SFT config overrides, e.g. train.max_steps=10")
    args = ap.parse_args(argv)
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        base_yaml = Path(tmp) / "demo.yaml"
        base_yaml.write_text(yaml.safe_dump(DEMO_CONFIG))
        cfg = load_config(SFTConfig, base_yaml, args.overrides)
    run = Path(cfg.output_dir) / cfg.run_name
    if run.exists() and not cfg.resume:
        import shutil

        print(f"[demo] replacing the previous demo run in {run}", flush=True)
        shutil.rmtree(run)
    print("[demo] step 1/3: the base model", flush=True)
    base = resolve_model_path(cfg.model.path)
    before = measure("before", base, cfg.data.eval, args.engine, cfg.data.max_length, args.max_new_tokens)

    print(f"[demo] step 2/3: LoRA SFT ({cfg.train.max_steps} steps); same as: alignloop sft --config <this config>",
          flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        resolved = Path(tmp) / "sft.yaml"
        resolved.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
        rc = sft_cli.main(["--config", str(resolved)])
    if rc:
        return rc

    print("[demo] step 3/3: the tuned model", flush=True)
    after = measure("after", str(run / "final"), cfg.data.eval, args.engine, cfg.data.max_length, args.max_new_tokens)
    print_table(before, after)
    (run / "before_after.json").write_text(json.dumps({"before": before, "after": after}, indent=1))
    plot = plot_loss(run)
    print(f"\n[demo] done in {time.time() - t0:.0f}s. Run directory: {run} (metrics.jsonl, tensorboard/, "
          f"checkpoints/, final/{', loss.png' if plot else ''}, before_after.json)", flush=True)
    return 0


def main(argv: list[str]) -> int:
    from alignloop.stage import run_stage

    return run_stage("demo-sft", _body, argv)
