"""One PPO / GRPO iteration: alignloop with vLLM rollouts vs alignloop with transformers ``generate`` vs TRL.

    .venv/bin/python bench/bench_ppo.py                       # all systems, 4 iterations each (1 warm-up)
    .venv/bin/python bench/bench_ppo.py --systems ppo-vllm,ppo-hf --steps 3

Same base model (the packaged SmolLM2-135M-Instruct, float32, LoRA r=16 on all
linear layers), same prompts (``ppo/data/prompts.jsonl``, chat template), same
batch, same answer cap (``--max-new-tokens``), same reward (``ppo.rewards:brevity``),
temperature 1, one torch thread everywhere (the machine is shared). Rows:

- ``ppo-vllm`` / ``ppo-hf``: ``configs/ppo.yaml`` (critic + GAE, 2 epochs x 2 mini-batches),
  ``--prompts`` prompts x 1 sample, rollouts by vLLM or by transformers generate.
- ``grpo-vllm`` / ``grpo-hf``: ``configs/grpo.yaml`` (``--grpo-prompts`` prompts x ``--group`` samples).
- ``trl-grpo``: TRL 1.16 ``GRPOTrainer`` (its transformers generation), same group size and batch,
  β = 0.04, one iteration per generation, LoRA via ``peft_config``.

TRL 1.12's ``PPOTrainer`` (the last TRL with PPO) needs its own environment and is not run here.
Each system runs in its own subprocess; the first ``--warmup`` iterations are dropped. Wall time per
iteration is measured around the whole iteration (generate + score + forward passes + update + sync).
Writes ``bench/results/ppo.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SYSTEMS = ("ppo-vllm", "ppo-hf", "grpo-vllm", "grpo-hf", "trl-grpo")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--systems", default=",".join(SYSTEMS))
    ap.add_argument("--steps", type=int, default=4, help="iterations per system (default 4)")
    ap.add_argument("--warmup", type=int, default=1, help="first iterations left out (default 1)")
    ap.add_argument("--prompts", type=int, default=8, help="PPO: prompts per iteration (1 sample each)")
    ap.add_argument("--grpo-prompts", type=int, default=2, help="GRPO: prompts per iteration")
    ap.add_argument("--group", type=int, default=4, help="GRPO: samples per prompt")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--work-dir", default="/tmp/alignloop-bench-ppo")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "ppo.json"))
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one system, print its JSON
    return ap.parse_args(argv)


def run_ours(system: str, a) -> dict:
    import torch

    from alignloop.config import load_config
    from alignloop.models import load_tokenizer, resolve_model_path
    from ppo.config import PPOConfig
    from ppo.rewards import build_reward
    from ppo.trainer import LocalRoles, PPOLoop, read_prompts

    algo, engine = system.split("-")
    cfg_file = ROOT / "configs" / ("ppo.yaml" if algo == "ppo" else "grpo.yaml")
    batch = [f"rollout.prompts_per_step={a.prompts}", "rollout.n_samples=1"] if algo == "ppo" else \
        [f"rollout.prompts_per_step={a.grpo_prompts}", f"rollout.n_samples={a.group}"]
    run = Path(a.work_dir) / system
    cfg = load_config(PPOConfig, cfg_file, [f"output_dir={a.work_dir}", f"run_name={system}", f"rollout.engine={engine}",
                                            f"rollout.max_new_tokens={a.max_new_tokens}", f"train.max_steps={a.steps}",
                                            "train.threads=1", "critic.warmup_steps=0", "train.save_every=0",
                                            f"data.prompts={ROOT / 'ppo/data/prompts.jsonl'}", *batch])
    torch.set_num_threads(1)
    run.mkdir(parents=True, exist_ok=True)
    path = resolve_model_path(cfg.model.path)
    roles = LocalRoles(cfg, path, run)
    loop = PPOLoop(cfg, roles, load_tokenizer(path), run, build_reward(cfg.reward), read_prompts(cfg.data.prompts), path)
    iters = []
    for step in range(a.steps):
        t0 = time.perf_counter()
        rec = loop.iteration(step)
        wall = time.perf_counter() - t0
        tokens = rec["rollout/answer_length"] * cfg.rollout_batch
        iters.append({"wall_s": wall, "gen_s": rec["time/rollout_s"], "train_s": rec["time/train_s"],
                      "tokens": tokens, "reward": rec["reward/mean"], "logprob_diff": rec["rollout/logprob_diff"]})
    roles.close()
    return {"system": system, "iterations": iters}


def run_trl(a) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from alignloop.models import load_tokenizer, resolve_model_path
    from ppo.rewards import brevity
    from ppo.trainer import read_prompts

    torch.set_num_threads(1)
    path = resolve_model_path("smollm2")
    tok = load_tokenizer(path)
    rows = read_prompts(str(ROOT / "ppo/data/prompts.jsonl"))
    ds = Dataset.from_list([{"prompt": r["messages"]} for r in rows])
    lengths: list[float] = []

    def reward(prompts, completions, **kw):
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        lengths.append(sum(len(tok(t)["input_ids"]) for t in texts))
        return [brevity("", t, words=20) for t in texts]

    B = a.grpo_prompts * a.group
    args = GRPOConfig(output_dir=str(Path(a.work_dir) / "trl"), use_cpu=True, bf16=False, per_device_train_batch_size=B,
                      num_generations=a.group, max_completion_length=a.max_new_tokens, max_steps=a.steps,
                      learning_rate=5e-5, lr_scheduler_type="constant", beta=0.04, num_iterations=1, logging_steps=1, report_to="none",
                      save_strategy="no", disable_dropout=True, temperature=1.0, seed=42, dataloader_num_workers=0)
    stamps: list[float] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            stamps.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kw):
            stamps.append(time.perf_counter())

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=args, train_dataset=ds, processing_class=tok,
                          peft_config=LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM"),
                          callbacks=[Clock()])
    trainer.train()
    # GRPOTrainer generates inside the step (its _prepare_inputs), so begin -> end covers a whole iteration.
    iters = []
    for i in range(a.steps):
        wall = stamps[2 * i + 1] - stamps[2 * i]
        iters.append({"wall_s": wall, "tokens": lengths[i] if i < len(lengths) else float("nan")})
    return {"system": "trl-grpo", "iterations": iters}


def summarise(res: dict, warmup: int) -> dict:
    it = res["iterations"][warmup:] or res["iterations"]
    wall = statistics.mean(x["wall_s"] for x in it)
    tokens = statistics.mean(x["tokens"] for x in it)
    out = {"system": res["system"], "wall_s_per_iter": round(wall, 2), "answer_tokens_per_iter": round(tokens, 1),
           "tokens_per_s_per_iter": round(tokens / wall, 1)}
    if "gen_s" in it[0]:
        out["rollout_tokens_per_s"] = round(tokens / statistics.mean(x["gen_s"] for x in it), 1)
        out["gen_s"] = round(statistics.mean(x["gen_s"] for x in it), 2)
        out["train_s"] = round(statistics.mean(x["train_s"] for x in it), 2)
        out["logprob_diff"] = max(x["logprob_diff"] for x in it)
    return out


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.one:
        res = run_trl(a) if a.one == "trl-grpo" else run_ours(a.one, a)
        print("RESULT " + json.dumps(res), flush=True)
        return 0
    rows = []
    for system in a.systems.split(","):
        cmd = [sys.executable, __file__, "--one", system, "--steps", str(a.steps), "--warmup", str(a.warmup),
               "--prompts", str(a.prompts), "--grpo-prompts", str(a.grpo_prompts), "--group", str(a.group),
               "--max-new-tokens", str(a.max_new_tokens), "--work-dir", a.work_dir]
        env = dict(os.environ, OMP_NUM_THREADS="1")
        t0 = time.time()
        r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
        line = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")]
        if r.returncode != 0 or not line:
            print(f"{system}: failed ({r.returncode})\n{r.stderr[-3000:]}", file=sys.stderr)
            rows.append({"system": system, "error": r.stderr[-500:]})
            continue
        row = summarise(json.loads(line[-1][7:]), a.warmup)
        row["process_s"] = round(time.time() - t0, 1)
        rows.append(row)
        print(json.dumps(row), flush=True)
    by = {r["system"]: r for r in rows if "error" not in r}
    ratios = {}
    for slow, fast in (("ppo-hf", "ppo-vllm"), ("grpo-hf", "grpo-vllm"), ("trl-grpo", "grpo-vllm"), ("trl-grpo", "grpo-hf")):
        if slow in by and fast in by:
            ratios[f"{slow} / {fast} (wall per iteration)"] = round(by[slow]["wall_s_per_iter"] / by[fast]["wall_s_per_iter"], 2)
    out = {"settings": {k: v for k, v in vars(a).items() if k not in ("one", "out")}, "rows": rows, "ratios": ratios}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=2))
    print(json.dumps(ratios, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
