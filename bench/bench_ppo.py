"""One PPO / GRPO iteration: alignloop with vLLM rollouts vs alignloop with transformers ``generate`` vs TRL.

    .venv/bin/python bench/bench_ppo.py                       # all systems, 4 iterations each (1 warm-up)
    .venv/bin/python bench/bench_ppo.py --systems ppo-vllm,ppo-hf --steps 3
    .venv/bin/python bench/bench_ppo.py --systems ppo-vllm,ppo-hf,trl-ppo --steps 3 --out bench/results/ppo_trl112.json

Same base model (the packaged SmolLM2-135M-Instruct, float32, LoRA r=16 on all
linear layers), same prompts (``ppo/data/prompts.jsonl``, chat template), same
batch, same answer cap (``--max-new-tokens``), same reward (``ppo.rewards:brevity``),
temperature 1, ``--threads`` torch threads everywhere (default 1: the machine is shared; 2 gives each system
the whole 2-core machine in turn; ``--overlap-critic`` then runs alignloop's actor and critic side by side with one
thread each, ``train.overlap_critic``, after rollouts on both). Rows:

- ``ppo-vllm`` / ``ppo-hf``: ``configs/ppo.yaml`` (critic + GAE, 2 epochs x 2 mini-batches),
  ``--prompts`` prompts x 1 sample, rollouts by vLLM or by transformers generate.
- ``grpo-vllm`` / ``grpo-hf``: ``configs/grpo.yaml`` (``--grpo-prompts`` prompts x ``--group`` samples).
- ``trl-grpo``: TRL 1.16 ``GRPOTrainer`` (its transformers generation), same group size and batch,
  β = 0.04, one iteration per generation, LoRA via ``peft_config``.

- ``trl-ppo``: TRL 1.12 ``trl.experimental.ppo.PPOTrainer`` (the last TRL with PPO; TRL 1.16 has none), run by
  the python of a separate environment (``--trl112-python``, default ``/tmp/venv-trl112/bin/python``; pins in
  ``bench/trl112-requirements.txt``). Same prompts in the same order per step as ``ppo-vllm``/``ppo-hf``, same
  batch (``--prompts`` x 1), ``response_length`` = ``--max-new-tokens``, 2 PPO epochs x 2 mini-batches of 4,
  k1 KL in the reward (0.05), GAE (1.0, 0.95), clip 0.2 / value clip 0.2, LoRA r=16 all-linear on the policy
  (reference = adapter disabled) and on the value model's backbone (head trained fully), like alignloop's
  critic, gradient checkpointing off (TRL's default is on; ours is off). The reward is the same rule:
  ``ppo.rewards:brevity`` (words=20) with alignloop's no-EOS rule (score -1), plugged into TRL's reward-model
  slot as a module that decodes the answer (TRL only reads ``score(backbone(...).hidden_states[-1])`` at
  the last answer token). TRL's own generation (transformers ``generate``) is timed for rollout tokens/s.

``--trl-dtype bfloat16`` loads TRL's models in bf16 (its fastest form on a CPU with bf16 instructions: the
fourth pass compared alignloop's ``train.autocast=bfloat16`` with it), ``--trl-attn eager`` gives TRL eager attention.

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

SYSTEMS = ("ppo-vllm", "ppo-hf", "grpo-vllm", "grpo-hf", "trl-grpo", "trl-ppo")
TRL112_PYTHON = os.environ.get("ALIGNLOOP_TRL112_PYTHON", "/tmp/venv-trl112/bin/python")


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--systems", default=",".join(SYSTEMS))
    ap.add_argument("--steps", type=int, default=4, help="iterations per system (default 4)")
    ap.add_argument("--warmup", type=int, default=1, help="first iterations left out (default 1)")
    ap.add_argument("--prompts", type=int, default=8, help="PPO: prompts per iteration (1 sample each)")
    ap.add_argument("--grpo-prompts", type=int, default=2, help="GRPO: prompts per iteration")
    ap.add_argument("--group", type=int, default=4, help="GRPO: samples per prompt")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads of every system (default 1: one core each; 2 gives each system this whole machine)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="extra config override for the alignloop rows (repeatable), e.g. train.shared_prefix=false")
    ap.add_argument("--bf16", action="store_true",
                    help="mixed precision on both sides: alignloop train.autocast=bfloat16, TRL bf16=True (autocast)")
    ap.add_argument("--overlap-critic", action="store_true",
                    help="ppo-*: train.overlap_critic=true (rollouts on --threads threads, then actor and critic side by side "
                         "on half each)")
    ap.add_argument("--work-dir", default="/tmp/alignloop-bench-ppo")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "ppo.json"))
    ap.add_argument("--trl112-python", default=TRL112_PYTHON,
                    help="python of the TRL 1.12 environment for trl-ppo (pip install -r bench/trl112-requirements.txt)")
    ap.add_argument("--trl-critic", choices=("lora", "full"), default="lora",
                    help="trl-ppo value model: LoRA backbone + full head like alignloop's critic (default), or TRL's full model")
    ap.add_argument("--trl-dtype", choices=("float32", "bfloat16"), default="float32",
                    help="dtype TRL's models are loaded in (bfloat16: pure bf16 weights and compute, TRL's fastest on a CPU "
                         "with bf16 instructions; --bf16 then adds autocast on top)")
    ap.add_argument("--trl-attn", choices=("sdpa", "eager"), default="sdpa",
                    help="attn_implementation of TRL's models (default sdpa, transformers' default)")
    ap.add_argument("--model-dir", help=argparse.SUPPRESS)  # internal: the converted HF directory, for trl-ppo
    ap.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one system, print its JSON
    return ap.parse_args(argv)


def run_ours(system: str, a) -> dict:
    import torch

    from alignloop.config import load_config
    from alignloop.models import load_tokenizer, resolve_model_path
    from alignloop.stage import warn_slow_dtypes
    from ppo.config import PPOConfig
    from ppo.rewards import build_reward
    from ppo.trainer import LocalRoles, PPOLoop, read_prompts

    algo, engine = system.split("-")
    # with the overlap, rollouts take all --threads, then the actor and the critic half each
    extra = (["train.overlap_critic=true"] if a.overlap_critic and algo == "ppo" else []) + \
        (["train.autocast=bfloat16"] if a.bf16 else [])
    cfg_file = ROOT / "configs" / ("ppo.yaml" if algo == "ppo" else "grpo.yaml")
    batch = [f"rollout.prompts_per_step={a.prompts}", "rollout.n_samples=1"] if algo == "ppo" else \
        [f"rollout.prompts_per_step={a.grpo_prompts}", f"rollout.n_samples={a.group}"]
    run = Path(a.work_dir) / system
    cfg = load_config(PPOConfig, cfg_file, [f"output_dir={a.work_dir}", f"run_name={system}", f"rollout.engine={engine}",
                                            f"rollout.max_new_tokens={a.max_new_tokens}", f"train.max_steps={a.steps}",
                                            f"train.threads={a.threads}", "critic.warmup_steps=0", "train.save_every=0",
                                            f"data.prompts={ROOT / 'ppo/data/prompts.jsonl'}", *batch, *extra, *a.set])
    warn_slow_dtypes(cfg)  # bf16 on an AVX2 CPU: 40-50x slower products; say so before minutes of it
    torch.set_num_threads(a.threads)
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
                      "prepare_s": rec["time/prepare_s"], "sync_s": rec["time/sync_s"], "tokens": tokens, "reward": rec["reward/mean"], "logprob_diff": rec.get("rollout/logprob_diff")})
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

    torch.set_num_threads(a.threads)
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
    args = GRPOConfig(output_dir=str(Path(a.work_dir) / "trl"), use_cpu=True, bf16=a.bf16, per_device_train_batch_size=B,
                      num_generations=a.group, max_completion_length=a.max_new_tokens, max_steps=a.steps,
                      learning_rate=5e-5, lr_scheduler_type="constant", beta=0.04, num_iterations=1, logging_steps=1, report_to="none",
                      save_strategy="no", disable_dropout=True, temperature=1.0, seed=42, dataloader_num_workers=0)
    stamps: list[float] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            stamps.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kw):
            stamps.append(time.perf_counter())

    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, a.trl_dtype), attn_implementation=a.trl_attn)
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


def run_trl_ppo(a) -> dict:
    """TRL 1.12 PPOTrainer, one process; runs under --trl112-python (imports only alignloop's torch-free helpers)."""
    import torch
    import torch.nn as nn
    from datasets import Dataset
    from peft import LoraConfig, inject_adapter_in_model
    from torch.utils.data import DataLoader
    from transformers import (AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer,
                              DataCollatorWithPadding, TrainerCallback)
    from transformers.utils import ModelOutput
    import trl
    import trl.experimental.ppo.ppo_trainer as ppo_mod
    from trl.experimental.ppo import PPOConfig as TRLPPOConfig, PPOTrainer

    from alignloop.batching import global_batch_indices
    from ppo.rewards import brevity
    from ppo.trainer import read_prompts, tokenize_prompts

    torch.set_num_threads(a.threads)
    path = a.model_dir
    tok = AutoTokenizer.from_pretrained(path)
    # TRL PPO derives attention masks from ``ids != pad_token_id``; SmolLM2's pad is its EOS (<|im_end|>, which
    # also closes every chat turn inside the prompt), so give TRL a pad token that never occurs in prompts or
    # answers: an existing special token (no new embedding row).
    tok.pad_token = "<empty_output>"
    tok.padding_side = "left"
    eos_id, pad_id = tok.convert_tokens_to_ids("<|im_end|>"), tok.pad_token_id
    assert eos_id != pad_id

    rows = read_prompts(str(ROOT / "ppo/data/prompts.jsonl"))
    ids = tokenize_prompts(rows, tok, True, 128)  # configs/ppo.yaml: chat template, max_prompt_tokens 128
    seed = 42  # configs/ppo.yaml train.seed: the same prompts, in the same order, as ppo-vllm / ppo-hf
    order = [i for step in range(a.steps) for i in global_batch_indices(len(ids), a.prompts, step, seed)]
    ds = Dataset.from_list([{"input_ids": ids[i]} for i in order])

    state = {"context": 0}

    class RuleBackbone(nn.Module):
        """Stands in for a reward model's backbone: "hidden state" = the rule score of the row's answer."""

        def forward(self, input_ids, attention_mask, **kw):
            ctx = state["context"]
            out = torch.zeros(input_ids.shape[0], input_ids.shape[1], 1)
            for b in range(input_ids.shape[0]):
                ans = input_ids[b, ctx:][attention_mask[b, ctx:]].tolist()
                has_eos = eos_id in ans
                if has_eos:
                    ans = ans[: ans.index(eos_id)]
                # alignloop: ppo.rewards:brevity(words=20) on the decoded answer; reward.no_eos_penalty=-1 replaces it
                out[b] = brevity("", tok.decode(ans, skip_special_tokens=True), words=20) if has_eos else -1.0
            return ModelOutput(hidden_states=(out,))

    class RuleReward(nn.Module):
        base_model_prefix = "backbone"

        def __init__(self):
            super().__init__()
            self.backbone = RuleBackbone()

        def score(self, hidden):  # (B, T, 1): TRL reads it at the last answer token
            return hidden

    gen_s: list[float] = []
    tokens: list[int] = []
    orig_batch_generation = ppo_mod.batch_generation

    def timed_batch_generation(model, queries, *args, **kw):
        state["context"] = queries.shape[1]
        t0 = time.perf_counter()
        qr, logits = orig_batch_generation(model, queries, *args, **kw)
        gen_s.append(time.perf_counter() - t0)
        resp = qr[:, queries.shape[1]:]
        n = 0
        for row in resp.tolist():  # answer tokens up to and including EOS, as alignloop counts them
            n += row.index(eos_id) + 1 if eos_id in row else sum(t != pad_id for t in row)
        tokens.append(n)
        return qr, logits

    ppo_mod.batch_generation = timed_batch_generation  # train() looks the name up in its module at call time

    policy = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, a.trl_dtype), attn_implementation=a.trl_attn)
    policy.generation_config.pad_token_id = pad_id
    value = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, dtype=getattr(torch, a.trl_dtype),
                                                               attn_implementation=a.trl_attn)
    value.config.pad_token_id = pad_id
    if a.trl_critic == "lora":  # alignloop's critic: LoRA on the backbone, the value head trained fully
        inject_adapter_in_model(LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"), value.model)
        for n, p in value.named_parameters():
            p.requires_grad = "lora_" in n or n.startswith("score.")

    B = a.prompts
    args = TRLPPOConfig(output_dir=str(Path(a.work_dir) / "trl-ppo"), use_cpu=True, bf16=a.bf16, fp16=False,
                        gradient_checkpointing=False, per_device_train_batch_size=B, gradient_accumulation_steps=1,
                        num_mini_batches=2, num_ppo_epochs=2, total_episodes=a.steps * B,
                        local_rollout_forward_batch_size=B, response_length=a.max_new_tokens, stop_token="eos",
                        temperature=1.0, missing_eos_penalty=None, kl_coef=0.05, kl_estimator="k1", cliprange=0.2,
                        cliprange_value=0.2, gamma=1.0, lam=0.95, whiten_rewards=False, learning_rate=5e-5,
                        lr_scheduler_type="constant", num_sample_generations=0, logging_steps=1, report_to="none",
                        save_strategy="no", seed=42, dataloader_num_workers=0, disable_tqdm=True)
    stamps: list[float] = []

    class Clock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            stamps.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kw):
            stamps.append(time.perf_counter())

    trainer = PPOTrainer(args=args, processing_class=tok, model=policy, ref_model=None, reward_model=RuleReward(),
                         train_dataset=ds, value_model=value, callbacks=[Clock()],
                         peft_config=LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM"))
    # PPOTrainer's own loader shuffles; replace it by one that walks ``order`` (same prompts per step as ours).
    trainer.dataloader = trainer.accelerator.prepare(DataLoader(ds, batch_size=B, shuffle=False, drop_last=True,
                                                                collate_fn=DataCollatorWithPadding(tok)))
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    trainer.train()
    # train() fires on_step_end once per PPO iteration (generate, score, forward passes, update); the interval between
    # two stamps is one whole iteration (the first starts at on_train_begin).
    rewards = [h["objective/scores"] for h in trainer.state.log_history if "objective/scores" in h]
    iters = []
    for i in range(a.steps):
        iters.append({"wall_s": stamps[i + 1] - stamps[i], "gen_s": gen_s[i], "tokens": tokens[i],
                      "reward": rewards[i] if i < len(rewards) else float("nan")})
    return {"system": "trl-ppo", "iterations": iters,
            "env": {"trl": trl.__version__, "torch": torch.__version__, "trainable_params": trainable,
                    "transformers": __import__("transformers").__version__, "peft": __import__("peft").__version__}}


def summarise(res: dict, warmup: int) -> dict:
    it = res["iterations"][warmup:] or res["iterations"]
    wall = statistics.mean(x["wall_s"] for x in it)
    tokens = statistics.mean(x["tokens"] for x in it)
    out = {"system": res["system"], "wall_s_per_iter": round(wall, 2), "answer_tokens_per_iter": round(tokens, 1),
           "tokens_per_s_per_iter": round(tokens / wall, 1)}
    if "gen_s" in it[0]:
        out["rollout_tokens_per_s"] = round(tokens / statistics.mean(x["gen_s"] for x in it), 1)
        out["gen_s"] = round(statistics.mean(x["gen_s"] for x in it), 2)
    for phase in ("prepare_s", "train_s", "sync_s"):  # alignloop's phases (forward passes + advantages, update, sync)
        if phase in it[0]:
            out[phase] = round(statistics.mean(x[phase] for x in it), 2)
    diffs = [x["logprob_diff"] for x in it if x.get("logprob_diff") is not None]
    if diffs:
        out["logprob_diff"] = max(diffs)
    out["wall_s_all"] = [round(x["wall_s"], 2) for x in res["iterations"]]
    out["reward_mean"] = [round(x["reward"], 3) for x in res["iterations"] if "reward" in x]
    if "env" in res:
        out["env"] = res["env"]
    return out


def main(argv=None) -> int:
    a = parse_args(argv)
    if a.one:
        run = {"trl-grpo": run_trl, "trl-ppo": run_trl_ppo}.get(a.one)
        res = run(a) if run else run_ours(a.one, a)
        print("RESULT " + json.dumps(res), flush=True)
        return 0
    rows = []
    uptime = Path("/proc/loadavg").read_text().split()[:3] if Path("/proc/loadavg").exists() else None
    load = {"before": uptime}
    for system in a.systems.split(","):
        python, extra = sys.executable, []
        if system == "trl-ppo":
            if not Path(a.trl112_python).exists():
                msg = (f"{a.trl112_python} not found: python3 -m venv /tmp/venv-trl112 && /tmp/venv-trl112/bin/pip install "
                       "-r bench/trl112-requirements.txt (or pass --trl112-python)")
                print(f"{system}: {msg}", file=sys.stderr)
                rows.append({"system": system, "error": msg})
                continue
            from alignloop.models import resolve_model_path

            python, extra = a.trl112_python, ["--model-dir", resolve_model_path("smollm2"), "--trl-critic", a.trl_critic]
        cmd = [python, __file__, "--one", system, "--steps", str(a.steps), "--warmup", str(a.warmup),
               "--prompts", str(a.prompts), "--grpo-prompts", str(a.grpo_prompts), "--group", str(a.group),
               "--max-new-tokens", str(a.max_new_tokens), "--work-dir", a.work_dir, "--threads", str(a.threads), "--trl-dtype", a.trl_dtype,
               "--trl-attn", a.trl_attn,
               *(["--overlap-critic"] if a.overlap_critic else []), *(["--bf16"] if a.bf16 else []), *[f"--set={x}" for x in a.set], *extra]
        env = dict(os.environ, OMP_NUM_THREADS=str(a.threads), TRL_EXPERIMENTAL_SILENCE="1")
        t0 = time.time()
        r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
        line = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")]
        if r.returncode != 0 or not line:
            print(f"{system}: failed ({r.returncode})\n{r.stderr[-3000:]}", file=sys.stderr)
            rows.append({"system": system, "error": r.stderr[-500:]})
            continue
        row = summarise(json.loads(line[-1][7:]), a.warmup)
        row["process_s"] = round(time.time() - t0, 1)
        row["loadavg_after"] = Path("/proc/loadavg").read_text().split()[:3] if Path("/proc/loadavg").exists() else None
        rows.append(row)
        print(json.dumps(row), flush=True)
    load["after"] = Path("/proc/loadavg").read_text().split()[:3] if Path("/proc/loadavg").exists() else None
    by = {r["system"]: r for r in rows if "error" not in r}
    ratios = {}
    for slow, fast in (("ppo-hf", "ppo-vllm"), ("grpo-hf", "grpo-vllm"), ("trl-grpo", "grpo-vllm"), ("trl-grpo", "grpo-hf"),
                       ("trl-ppo", "ppo-vllm"), ("trl-ppo", "ppo-hf")):
        if slow in by and fast in by:
            s, f = by[slow], by[fast]
            ratios[f"{slow} / {fast} (wall per iteration)"] = round(s["wall_s_per_iter"] / f["wall_s_per_iter"], 2)
            if slow.startswith("trl-"):  # answers are capped alike but not forced equal: also per answer token
                ratios[f"{slow} / {fast} (wall per answer token)"] = round(
                    (s["wall_s_per_iter"] / s["answer_tokens_per_iter"]) / (f["wall_s_per_iter"] / f["answer_tokens_per_iter"]), 2)
            if "rollout_tokens_per_s" in s and "rollout_tokens_per_s" in f:
                ratios[f"{fast} / {slow} (rollout tokens/s)"] = round(f["rollout_tokens_per_s"] / s["rollout_tokens_per_s"], 2)
    out = {"settings": {k: v for k, v in vars(a).items() if k not in ("one", "out", "model_dir")}, "loadavg": load,
           "rows": rows, "ratios": ratios}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=2))
    print_table(rows)
    print(json.dumps(ratios, indent=2))
    return 0


def print_table(rows: list[dict]) -> None:
    cols = ("wall_s_per_iter", "answer_tokens_per_iter", "gen_s", "rollout_tokens_per_s", "train_s")
    print(f"{'system':10s} " + " ".join(f"{c:>22s}" for c in cols))
    for r in rows:
        print(f"{r['system']:10s} " + (" ".join(f"{r.get(c, '-')!s:>22s}" for c in cols) if "error" not in r else "failed"))


if __name__ == "__main__":
    sys.exit(main())
