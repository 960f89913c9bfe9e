"""Running a training function on Ray Train workers (gloo on CPU, NCCL on GPU)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

# Environment every worker needs on a CPU machine (DESIGN.md pitfalls).
WORKER_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_OFFLINE": "1",
    "OMP_NUM_THREADS": "1",
}


def init_ray(address: str | None = None) -> None:
    """Connect to the job's cluster (RAY_ADDRESS / ``address``) or start a local one."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    env = {k: os.environ.get(k, v) for k, v in WORKER_ENV.items()}
    for k in ("TORCH_EXTENSIONS_DIR", "ALIGNLOOP_CACHE", "PYTHONPATH"):
        if os.environ.get(k):
            env[k] = os.environ[k]
    addr = address or os.environ.get("RAY_ADDRESS")
    ray.init(address=addr, runtime_env={"env_vars": env}, log_to_driver=True,
             include_dashboard=False if addr is None else None, ignore_reinit_error=True)


def run_on_workers(fn: Callable[[dict], Any], config: dict, *, num_workers: int, use_gpu: bool, cpus_per_worker: int,
                   storage: Path, name: str, address: str | None = None) -> None:
    """Run ``fn(config)`` on ``num_workers`` Ray Train workers with a torch process group."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    init_ray(address)
    trainer = TorchTrainer(
        train_loop_per_worker=fn,
        train_loop_config=config,
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(num_workers=num_workers, use_gpu=use_gpu,
                                               resources_per_worker={"CPU": cpus_per_worker}),
        run_config=ray.train.RunConfig(name=name, storage_path=str(storage.resolve())),
    )
    trainer.fit()
