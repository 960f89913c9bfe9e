"""``alignloop ppo --config configs/ppo.yaml [dotted.key=value ...]`` (also GRPO/RLOO/REINFORCE++ via algo.advantage)."""

from __future__ import annotations

import json
import time

from alignloop import rundir
from alignloop.stage import parse_stage_args, prepare_run_dir, quiet_env, run_stage
from ppo.config import PPOConfig


def _body(argv: list[str]) -> int:
    quiet_env()
    cfg = parse_stage_args("ppo", PPOConfig, argv)
    # Fail fast, before any model is loaded: prompts file, reward rules and files, model paths.
    from alignloop.models import resolve_model_path
    from ppo.rewards import build_reward
    from ppo.trainer import read_prompts

    n = len(read_prompts(cfg.data.prompts, cfg.data.limit))
    if cfg.reward.model is None:
        build_reward(cfg.reward)  # imports every rule; a learned model is loaded once, in run_ppo
    resolve_model_path(cfg.model.path)
    if cfg.critic.init_from is not None:
        resolve_model_path(cfg.critic.init_from)
    run = rundir.run_dir(cfg.output_dir, cfg.run_name)
    prepare_run_dir(cfg, run)
    print(f"[alignloop] ppo run directory: {run} ({n} prompts)", flush=True)
    t0 = time.time()
    from ppo.trainer import run_ppo

    history = run_ppo(cfg, run)
    summary = {"run_dir": str(run), "final": str(run / "final"), "seconds": round(time.time() - t0, 1),
               "steps": len(history)}
    print(json.dumps(summary), flush=True)
    return 0


def main(argv: list[str]) -> int:
    return run_stage("ppo", _body, argv)
