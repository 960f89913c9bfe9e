"""Where a PPO iteration's time goes: the actor's and the critic's work, call by call, on one timeline.

    .venv/bin/python bench/bench_ppo_timeline.py --rounds 4 --out bench/results/ppo-timeline.json

Replays the PPO benchmark's iteration (``bench/bench_ppo.py``'s fast recipe: bf16 autocast, compiled layers, LoRA
r=16, ``train.overlap_critic`` with the critic in its own process, 8 prompts x 1 answer, 2 epochs x 2 mini-batches)
with a stand-in rollout engine that returns fixed random answers of 45-64 tokens (no vLLM: generation is measured by
``bench_ppo.py``; the weight sync here is the merge only). Each call is logged with its start, end and the torch
threads it started on (the actor's share can grow mid-call when the critic goes idle; ``thread_s_busy`` counts the
starting share): the actor's (reference pass, updates, sync) as they run, the critic's (value passes, updates) from
when its process can start it (its previous call done) to when its answer is back.

``--critic-start`` compares when the iteration hands the critic its updates, in alternating rounds of one run:
``after-first`` (alignloop's way: after the actor's first update, which runs on every thread) and ``with-first``
(at once, both roles on one thread each from the start).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SETS = ["train.autocast=bfloat16", "rollout.dtype=bfloat16", "model.attn_implementation=eager",
        "train.float32_lm_head=false", "train.compile=true", "train.overlap_critic=true", "critic.warmup_steps=0",
        "train.save_every=0", "rollout.max_new_tokens=64"]


class FixedRollouts:
    """A rollout engine that answers every prompt with random tokens (45-64 of them, EOS-terminated unless 64)."""

    def __init__(self, eos_id: int, seed: int = 0):
        self.eos_id, self.rng = eos_id, random.Random(seed)

    def generate(self, prompt_ids, settings):
        from alignloop.rollout import Completion

        out = []
        for p in prompt_ids:
            n = self.rng.randint(45, settings.max_new_tokens)
            ids = [self.rng.randint(100, 40_000) for _ in range(n)]
            finish = "length" if n == settings.max_new_tokens else "stop"
            if finish == "stop":
                ids[-1] = self.eos_id
            out.append([Completion(list(p), ids, "word " * (n // 3), [-2.0] * n, finish)])
        return out

    def update_weights(self, weights) -> None:
        pass

    def load_lora(self, path) -> None:
        pass

    def close(self) -> None:
        pass


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=4, help="measured iterations per --critic-start (after 2 warm-up ones)")
    ap.add_argument("--critic-start", default="after-first",
                    help="comma-separated: after-first (alignloop), with-first; alternated round by round")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work-dir", default="/tmp/alignloop-bench-ppo-timeline")
    ap.add_argument("--set", action="append", default=[], help="more dotted.key=value config overrides")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "ppo-timeline.json"))
    a = ap.parse_args()
    modes = a.critic_start.split(",")
    for m in modes:
        if m not in ("after-first", "with-first"):
            ap.error(f"--critic-start: {m!r} is not after-first or with-first")

    import torch

    from alignloop.config import load_config
    from alignloop.models import load_tokenizer, resolve_model_path
    from ppo.config import PPOConfig
    from ppo.rewards import build_reward
    from ppo.trainer import LocalRoles, PPOLoop, read_prompts

    cfg = load_config(PPOConfig, ROOT / "configs" / "ppo.yaml",
                      [*SETS, f"train.threads={a.threads}", f"output_dir={a.work_dir}",
                       f"data.prompts={ROOT / 'ppo/data/prompts.jsonl'}", *a.set])
    torch.set_num_threads(a.threads)
    path = resolve_model_path(cfg.model.path)
    tok = load_tokenizer(path)
    run = Path(a.work_dir) / "timeline"
    run.mkdir(parents=True, exist_ok=True)
    roles = LocalRoles(cfg, path, run, engine=FixedRollouts(tok.eos_token_id))
    loop = PPOLoop(cfg, roles, tok, run, build_reward(cfg.reward), read_prompts(cfg.data.prompts), path)

    t0 = [0.0]
    events: list[dict] = []
    lock = threading.Lock()

    def log(who: str, what: str, start: float, end: float, threads: int) -> None:
        with lock:
            events.append({"role": who, "call": what, "start": round(start - t0[0], 3), "end": round(end - t0[0], 3),
                           "threads": threads})

    def timed(obj, name: str, label) -> None:
        inner = getattr(obj, name)

        def call(*args, **kwargs):
            start, threads = time.perf_counter(), torch.get_num_threads()
            try:
                return inner(*args, **kwargs)
            finally:
                log("actor", label(*args, **kwargs), start, time.perf_counter(), threads)
        setattr(obj, name, call)

    timed(roles.actor, "train_mini_batch", lambda *a_, **k: "update")
    timed(roles.actor, "logprobs", lambda exp, reference=False: "reference pass" if reference else "log-prob pass")
    timed(roles, "sync", lambda: "sync (merge)")
    last_done = [0.0]
    submit = roles._critic_call

    def critic_call(name: str, *args):
        future = submit(name, *args)
        handed = time.perf_counter()

        def watch():  # the critic runs its calls in order: one starts when it is handed over and the last is done
            while not future.done():
                time.sleep(0.002)
            end = time.perf_counter()
            with lock:
                start = max(handed, last_done[0])
                last_done[0] = end
            log("critic", {"values": "value pass", "train_mini_batch": "update"}.get(name, name), start, end,
                roles._half)
        threading.Thread(target=watch, daemon=True).start()
        return future
    roles._critic_call = critic_call
    held = roles.train_critic_async

    def at_once(exp, global_tokens, reuse=False):
        return roles._critic_call("train_mini_batch", exp, global_tokens, reuse)

    def iterate(mode: str, step: int) -> dict:
        roles.train_critic_async = held if mode == "after-first" else at_once
        events.clear()
        t0[0] = last_done[0] = time.perf_counter()
        rec = loop.iteration(step)
        wall = time.perf_counter() - t0[0]
        time.sleep(0.01)  # the last watcher's log line
        with lock:
            timeline = sorted(events, key=lambda e: (e["start"], e["role"]))
        busy = sum((e["end"] - e["start"]) * (e["threads"] if e["role"] == "actor" else 1) for e in timeline)
        return {"wall_s": round(wall, 3), "prepare_s": round(rec["time/prepare_s"], 3),
                "train_s": round(rec["time/train_s"], 3), "sync_s": round(rec["time/sync_s"], 3),
                "thread_s_busy": round(busy, 3), "timeline": timeline}

    step = 0
    for mode in modes:  # compiles every variant the modes use
        for _ in range(2):
            print(f"warm-up ({mode}): {iterate(mode, step)['wall_s']:.2f} s", flush=True)
            step += 1
    rounds: dict[str, list[dict]] = {m: [] for m in modes}
    for i in range(a.rounds):
        for mode in modes:
            r = iterate(mode, step)
            step += 1
            rounds[mode].append(r)
            print(f"round {i + 1} {mode}: {r['wall_s']:.2f} s (prepare {r['prepare_s']:.2f}, train {r['train_s']:.2f}, "
                  f"sync {r['sync_s']:.2f}; {r['thread_s_busy']:.1f} thread-s busy of {a.threads * r['wall_s']:.1f})",
                  flush=True)
            for e in r["timeline"]:
                print(f"    {e['role']:6} {e['call']:15} {e['start']:6.2f} -> {e['end']:6.2f}  "
                      f"{e['end'] - e['start']:5.2f} s on {e['threads']} thread(s)")
    roles.close()
    mean = {m: round(sum(r["wall_s"] for r in v) / len(v), 3) for m, v in rounds.items()}
    out = {"settings": vars(a), "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
           "mean_wall_s": mean, "rounds": rounds}
    print(json.dumps({"mean_wall_s": mean}))
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
