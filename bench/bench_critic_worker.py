"""Where the critic works beside the actor (``train.critic_worker``): a thread of the loop's process or a process
of its own, measured in alternating rounds in one run (so that a machine whose speed drifts affects both alike).

    .venv/bin/python bench/bench_critic_worker.py --rounds 5 --out bench/results/critic-worker.json

Each round: ``--updates`` critic mini-batch updates handed to the worker, and as many actor updates in the main
thread beside them, on one torch thread each (``train.overlap_critic`` on a 2-core machine); the round's time is
until both are done. The packaged SmolLM2 with the PPO benchmark's fast recipe (bf16 autocast, compiled layers,
LoRA r=16), mini-batches of 4 answers of ``--answer`` tokens after prompts of ``--prompt`` tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SETS = ["train.autocast=bfloat16", "model.attn_implementation=eager", "train.float32_lm_head=false",
        "train.compile=true", "critic.warmup_steps=0", "train.overlap_critic=true"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--updates", type=int, default=4, help="actor and critic updates per round (default 4)")
    ap.add_argument("--prompt", type=int, default=90)
    ap.add_argument("--answer", type=int, default=64)
    ap.add_argument("--work-dir", default="/tmp/alignloop-bench-critic-worker")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "critic-worker.json"))
    a = ap.parse_args()

    import torch

    from alignloop.config import load_config
    from alignloop.models import resolve_model_path
    from ppo.actor import CriticTrainer, PolicyTrainer
    from ppo.config import PPOConfig
    from ppo.critic_process import CriticProcess
    from ppo.experience import build_experience
    from ppo.trainer import _CriticThread

    cfg = load_config(PPOConfig, ROOT / "configs" / "ppo.yaml", [*SETS, f"output_dir={a.work_dir}"])
    path = resolve_model_path(cfg.model.path)
    torch._C.set_num_threads(1)
    actor = PolicyTrainer(cfg, path)
    workers = {"thread": _CriticThread(CriticTrainer(cfg, path), 1), "process": CriticProcess(cfg, path, 1)}
    workers["process"].wait_ready()
    g = torch.Generator().manual_seed(0)
    B = 4
    exp = build_experience([torch.randint(100, 40000, (a.prompt,), generator=g).tolist() for _ in range(B)],
                           [torch.randint(100, 40000, (a.answer,), generator=g).tolist() for _ in range(B)],
                           [[-2.0] * a.answer for _ in range(B)], set(), 0)
    exp.old_logprobs = exp.ref_logprobs = exp.rollout_logprobs.clone()
    exp.values, exp.scores = torch.zeros(B, a.answer), torch.zeros(B)
    exp.advantages, exp.returns = torch.randn(B, a.answer, generator=g), torch.randn(B, a.answer, generator=g)
    tokens = float(exp.mask.sum())

    def round_(worker) -> float:
        t = time.perf_counter()
        futures = [worker.submit("train_mini_batch", exp, tokens, False) for _ in range(a.updates)]
        for _ in range(a.updates):
            actor.train_mini_batch(exp, tokens, 0.05, False)
        for f in futures:
            f.result()
        return time.perf_counter() - t

    for w in workers.values():  # compile and warm both
        round_(w), round_(w)
    times: dict[str, list[float]] = {k: [] for k in workers}
    for i in range(a.rounds):
        for name, w in workers.items():
            times[name].append(round(round_(w), 3))
            print(f"round {i + 1}: {name} {times[name][-1]:.2f} s", flush=True)
    for w in workers.values():
        w.shutdown()
    mean = {k: round(sum(v) / len(v), 3) for k, v in times.items()}
    out = {"settings": vars(a), "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
           "seconds_per_round": times, "mean_s": mean, "thread / process": round(mean["thread"] / mean["process"], 2)}
    print(json.dumps(out, indent=1))
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
