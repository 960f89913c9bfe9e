"""Thin Ray actors around the plain PPO classes, and ``RayRoles`` that the PPO loop drives.

- ``PolicyWorker`` x ``ray.actor_workers``: one DeepSpeed rank each (ZeRO-3 over gloo on CPU, NCCL on GPU),
  wrapping :class:`ppo.actor.PolicyTrainer`; the group forms its own process group.
- ``CriticWorker`` x ``ray.critic_workers``: the same around :class:`ppo.actor.CriticTrainer`, a separate group.
- ``EngineWorker``: a rollout engine (vLLM, or transformers) in its own process.

The driver (``ppo.trainer.PPOLoop``) holds the whole rollout batch, so advantages and
whitening are global by construction; each rank gets an equal, contiguous shard plus
the mini-batch's global token count. Weight sync: rank 0 writes the LoRA adapter to
the run directory (``sync/adapter``) and the engine loads it, or rank 0 returns the
gathered full state dict and the engine reloads it (see docs/ppo.md for the GPU path).
Tensors cross Ray on the CPU: a worker moves its shard to its model's device (``Experience.to``) and
returns CPU tensors. ``ray.gpus_per_worker`` / ``ray.gpus_per_engine`` reserve GPUs for the actors.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import ray

from ppo.config import PPOConfig
from ppo.experience import Experience

VLLM_ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1", "TOKENIZERS_PARALLELISM": "false",
            "HF_HUB_OFFLINE": "1"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _join_group(rank: int, world: int, port: int, threads: int) -> None:
    import torch

    os.environ.update({"RANK": str(rank), "LOCAL_RANK": "0", "WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(port)})
    torch.set_num_threads(threads)


@ray.remote
class PolicyWorker:
    def __init__(self, cfg: dict, model_path: str, rank: int, world: int, port: int, threads: int):
        _join_group(rank, world, port, threads)
        from ppo.actor import PolicyTrainer

        self.t = PolicyTrainer(PPOConfig.model_validate(cfg), model_path, workers=world)

    def ready(self) -> int:
        return self.t.rank

    def logprobs(self, exp: Experience, reference: bool):
        return self.t.logprobs(exp, reference)

    def train_mini_batch(self, exp: Experience, global_tokens: float, kl_coef: float, first: bool = False) -> dict:
        return self.t.train_mini_batch(exp, global_tokens, kl_coef, first)

    def save_adapter(self, out: str):
        return self.t.save_adapter(out)

    def engine_weights(self):
        return self.t.engine_weights()

    def save_final(self, out: str, lora: bool) -> None:
        if lora:
            self.t.save_adapter(Path(out) / "adapter")
            return
        sd = self.t.full_state_dict()
        if self.t.rank == 0:
            self.t.strategy.unwrap().save_pretrained(out, state_dict=sd, safe_serialization=True)

    def parameters_digest(self):
        return self.t.parameters_digest()

    def save_checkpoint(self, path: str, client: dict) -> None:
        self.t.save_checkpoint(Path(path), client)

    def load_checkpoint(self, path: str) -> dict:
        return self.t.load_checkpoint(Path(path))


@ray.remote
class CriticWorker:
    def __init__(self, cfg: dict, model_path: str, rank: int, world: int, port: int, threads: int):
        _join_group(rank, world, port, threads)
        from ppo.actor import CriticTrainer

        self.t = CriticTrainer(PPOConfig.model_validate(cfg), model_path, workers=world)

    def ready(self) -> int:
        return self.t.rank

    def values(self, exp: Experience, keep: bool = False):
        return self.t.values(exp, keep)

    def train_mini_batch(self, exp: Experience, global_tokens: float, reuse: bool = False) -> dict:
        return self.t.train_mini_batch(exp, global_tokens, reuse)

    def save_final(self, out: str, tokenizer_dir: str) -> None:
        self.t.save_final(Path(out), tokenizer_dir)

    def save_checkpoint(self, path: str, client: dict) -> None:
        self.t.save_checkpoint(Path(path), client)

    def load_checkpoint(self, path: str) -> dict:
        return self.t.load_checkpoint(Path(path))


@ray.remote
class EngineWorker:
    def __init__(self, cfg: dict, model_path: str, threads: int):
        import torch

        torch.set_num_threads(threads)
        from ppo.trainer import make_rollout_engine

        self.engine = make_rollout_engine(PPOConfig.model_validate(cfg), model_path)

    def ready(self) -> str:
        return self.engine.kind

    def generate(self, prompt_ids, settings):
        return self.engine.generate(prompt_ids, settings)

    def load_lora(self, adapter_dir):
        self.engine.load_lora(adapter_dir)

    def update_weights(self, state_dict):
        self.engine.update_weights(state_dict)

    def close(self):
        self.engine.close()


class _Group:
    """N workers of one role; calls fan out with equal contiguous shards and gather in rank order."""

    def __init__(self, cls, cfg: PPOConfig, model_path: str, n: int):
        port = _free_port()
        opts = dict(num_cpus=cfg.ray.cpus_per_worker, num_gpus=cfg.ray.gpus_per_worker,
                    runtime_env={"env_vars": VLLM_ENV})
        self.workers = [cls.options(**opts).remote(cfg.model_dump(mode="json"), model_path, r, n, port,
                                                    cfg.ray.threads_per_worker) for r in range(n)]
        ray.get([w.ready.remote() for w in self.workers])

    def shards(self, exp: Experience) -> list[Experience]:
        k = len(exp) // len(self.workers)
        return [exp.select(slice(r * k, (r + 1) * k)) for r in range(len(self.workers))]

    def submit(self, method: str, exp: Experience, *args) -> list:
        """The calls, not waited for (each worker runs a caller's calls in the order they were made)."""
        return [getattr(w, method).remote(s, *args) for w, s in zip(self.workers, self.shards(exp))]

    def map(self, method: str, exp: Experience, *args) -> list:
        return ray.get(self.submit(method, exp, *args))

    def all(self, method: str, *args) -> list:
        return ray.get([getattr(w, method).remote(*args) for w in self.workers])


class _Pending:
    """Ray calls of one group, gathered (and combined) on ``result()``."""

    def __init__(self, refs: list, combine):
        self.refs, self.combine = refs, combine

    def result(self):
        return self.combine(ray.get(self.refs))


class RayRoles:
    """The ``LocalRoles`` interface over Ray actor groups."""

    def __init__(self, cfg: PPOConfig, model_path: str, run: Path):
        import torch

        from alignloop.ray_utils import init_ray

        init_ray(cfg.ray.address)
        self.model_path = model_path
        self.cfg, self.run = cfg, Path(run).resolve()
        self.actor = _Group(PolicyWorker, cfg, model_path, cfg.ray.actor_workers)
        self.critic = _Group(CriticWorker, cfg, model_path, cfg.ray.critic_workers) if cfg.uses_critic else None
        self.engines = [EngineWorker.options(num_cpus=cfg.ray.cpus_per_worker, num_gpus=cfg.ray.gpus_per_engine,
                                             runtime_env={"env_vars": VLLM_ENV}).remote(
            cfg.model_dump(mode="json"), model_path, cfg.ray.threads_per_worker) for _ in range(cfg.ray.num_engines)]
        self.engine = self.engines[0]
        ray.get([e.ready.remote() for e in self.engines])
        self._torch = torch

    def generate(self, prompt_ids, settings):
        """Contiguous shards of the prompts over the engines (each its own sampling seed), gathered in order."""
        import dataclasses

        n = len(self.engines)
        if n == 1 or len(prompt_ids) < 2:
            return ray.get(self.engine.generate.remote(prompt_ids, settings))
        bounds = [len(prompt_ids) * i // n for i in range(n + 1)]
        futures = []
        for i, eng in enumerate(self.engines):
            shard = prompt_ids[bounds[i]:bounds[i + 1]]
            if shard:
                s = settings if settings.seed is None else dataclasses.replace(settings, seed=settings.seed + 7919 * i)
                futures.append(eng.generate.remote(shard, s))
        return [c for part in ray.get(futures) for c in part]

    def logprobs(self, exp, reference=False):
        return self._torch.cat(self.actor.map("logprobs", exp, reference))

    def values_async(self, exp, keep=False):
        return _Pending(self.critic.submit("values", exp, keep), self._torch.cat)

    @staticmethod
    def _merge(parts: list[dict]) -> dict:
        # Sums add over ranks; grad norm and lr are already global (identical on every rank).
        out = {k: (max if k.endswith("_max") else sum)(p[k] for p in parts) for k in parts[0]}
        for k in ("optim/grad_norm", "optim/lr", "critic/grad_norm"):
            if k in parts[0]:
                out[k] = parts[0][k]
        return out

    def train_actor(self, exp, global_tokens, kl_coef, first=False):
        return self._merge(self.actor.map("train_mini_batch", exp, global_tokens, kl_coef, first))

    def train_critic_async(self, exp, global_tokens, reuse=False):
        """The critic group works while the driver goes on to the actor's mini-batches."""
        return _Pending(self.critic.submit("train_mini_batch", exp, global_tokens, reuse), self._merge)

    def sync(self) -> None:
        if self.cfg.syncs_adapter:
            paths = self.actor.all("save_adapter", str(self.run / "sync" / "adapter"))
            ray.get([e.load_lora.remote(paths[0]) for e in self.engines])
        else:
            sd = ray.put(self.actor.all("engine_weights")[0])  # rank 0 holds the gathered weights; one copy in the store
            ray.get([e.update_weights.remote(sd) for e in self.engines])

    def save(self, path: Path, client: dict) -> None:
        self.actor.all("save_checkpoint", str(Path(path).resolve() / "actor"), client)
        if self.critic is not None:
            self.critic.all("save_checkpoint", str(Path(path).resolve() / "critic"), {})

    def load(self, path: Path) -> dict:
        client = self.actor.all("load_checkpoint", str(Path(path).resolve() / "actor"))[0]
        if self.critic is not None:
            self.critic.all("load_checkpoint", str(Path(path).resolve() / "critic"))
        return client

    def save_final(self, out: Path) -> None:
        self.actor.all("save_final", str(Path(out).resolve()), self.cfg.peft.method == "lora")
        if self.critic is not None:
            self.critic.all("save_final", str(Path(out).resolve() / "critic"), self.model_path)

    def actor_digest(self) -> dict:
        return self.actor.all("parameters_digest")[0]

    def close(self) -> None:
        try:
            ray.get([e.close.remote() for e in self.engines])
        except Exception:  # noqa: BLE001 - best effort at shutdown
            pass
        for w in (self.engines + self.actor.workers + (self.critic.workers if self.critic else [])):
            ray.kill(w)
