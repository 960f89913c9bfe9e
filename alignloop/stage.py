"""What every stage CLI shares: argument parsing, early validation, run directory, Ray or in-process launch."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Callable

from alignloop.config import ConfigError, describe, dump_config, load_config


def parse_stage_args(stage: str, cls, argv: list[str]):
    ap = argparse.ArgumentParser(prog=f"alignloop {stage}", description=f"alignloop {stage} stage")
    ap.add_argument("--config", help="YAML config file")
    ap.add_argument("--help-config", action="store_true", help="list every config key with its type, default and meaning")
    ap.add_argument("overrides", nargs="*", help="dotted.key=value overrides, e.g. train.max_steps=10 peft.method=lora")
    args = ap.parse_args(argv)
    if args.help_config:
        print("\n".join(describe(cls)))
        raise SystemExit(0)
    return load_config(cls, args.config, args.overrides)


def prepare_run_dir(cfg, run: Path) -> None:
    """Create the run directory and write the resolved config; refuse to clobber a finished run silently."""
    if run.exists() and (run / "config.yaml").exists() and not cfg.resume:
        if (run / "metrics.jsonl").exists():
            raise ConfigError(f"run directory {run} already holds a run; set resume=true to continue it or choose "
                              "another run_name")
    run.mkdir(parents=True, exist_ok=True)
    dump_config(cfg, run / "config.yaml")
    warn_slow_dtypes(cfg)


def warn_slow_dtypes(cfg) -> None:
    """Say before any model loads when a 16-bit dtype in the config runs far slower than float32 on this CPU."""
    from alignloop.perf import slow_dtype_warning

    msg = slow_dtype_warning(cfg)
    if msg:
        print(f"[alignloop] warning: {msg}", file=sys.stderr, flush=True)


def launch(worker: Callable[[dict], None], cfg, run: Path, name: str) -> None:
    """Run ``worker`` on Ray Train workers (ray.num_workers, or forced by ray.use_ray) or in this process."""
    payload = {"cfg": cfg.model_dump(mode="json"), "run_dir": str(run.resolve())}
    if cfg.ray.enabled:
        from alignloop.ray_utils import run_on_workers

        payload["threads"] = cfg.ray.cpus_per_worker
        run_on_workers(worker, payload, num_workers=cfg.ray.num_workers, use_gpu=cfg.ray.use_gpu,
                       cpus_per_worker=cfg.ray.cpus_per_worker, storage=run / "ray", name=name,
                       address=cfg.ray.address)
    else:
        worker(payload)


def run_stage(stage: str, body: Callable[[list[str]], int], argv: list[str]) -> int:
    """Turn config/data errors into one clear line and exit code 2 (no traceback)."""
    from alignloop.data import DataError

    try:
        return body(argv)
    except (ConfigError, DataError) as e:
        print(f"alignloop {stage}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"alignloop {stage}: interrupted; continue with resume=true", file=sys.stderr)
        return 130


def quiet_env() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
