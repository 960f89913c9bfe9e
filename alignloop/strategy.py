"""How a model is trained across processes: one process, DeepSpeed ZeRO, or FSDP.

Every strategy takes a loss that is already this rank's share of the *global*
token mean (sum of token losses / tokens in the whole global batch), so the
gradient is the same however the batch is split over ranks and micro-batches
(2 ranks give the result of 1). Backends that average gradients over ranks get
the loss multiplied by the world size to undo that average.
"""

from __future__ import annotations

import contextlib
import os
import random
from pathlib import Path
from typing import Any  # noqa: F401

import numpy as np
import torch
import torch.distributed as dist

from alignloop.config import ConfigError
from alignloop.deepspeed_config import build_deepspeed_config
from alignloop.sections import DeepSpeedConfig, OptimConfig


def init_distributed(backend: str = "gloo") -> None:
    """Join the process group that Ray Train / torchrun set up, or form a 1-rank group."""
    if dist.is_available() and dist.is_initialized():
        return
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    dist.init_process_group(backend=backend, rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]))


def train_device(use_gpu: bool = False) -> torch.device:
    """Where this process trains: ``cuda:LOCAL_RANK`` when it sees CUDA (made the current device, the one NCCL,
    DeepSpeed's ``zero.Init`` and FSDP's default mesh use), else the CPU.

    DeepSpeed moves its engine to CUDA by itself whenever torch sees a GPU, so every strategy follows that one
    rule. ``use_gpu`` (``ray.use_gpu``) turns a missing GPU into an error instead of a silent CPU run.
    """
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count())
        torch.cuda.set_device(device)
        return device
    if use_gpu:
        raise ConfigError("ray.use_gpu=true, but this process sees no CUDA device (torch.cuda.is_available() is False)")
    return torch.device("cpu")


def comm_backend(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def make_scheduler(optimizer, optim: OptimConfig, total_steps: int):
    """Linear warm-up then constant / linear / cosine decay to 0."""
    import math

    warm = optim.warmup_steps

    def factor(step: int) -> float:
        if warm and step < warm:
            return (step + 1) / warm
        if optim.scheduler == "constant" or total_steps <= warm:
            return 1.0
        frac = min(1.0, (step - warm) / max(1, total_steps - warm))
        return 1.0 - frac if optim.scheduler == "linear" else 0.5 * (1.0 + math.cos(math.pi * frac))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _adamw(params, optim: OptimConfig, fused: bool = False):
    """torch AdamW. ``fused``: one kernel over all parameters (CPU and CUDA, floating point) instead of torch's
    default on the CPU, a loop of small ops per parameter: 36 → 6 ms a step for SmolLM2's 420 LoRA tensors on one
    core; the same update to float rounding."""
    return torch.optim.AdamW(params, lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps,
                             weight_decay=optim.weight_decay, fused=fused or None)


def _fusable(params) -> bool:
    return all(type(p.data) is torch.Tensor and p.device.type in ("cpu", "cuda") and p.dtype.is_floating_point
               for p in params)


class Strategy:
    """Interface: prepare -> (backward per micro-batch, step per global batch) -> save."""

    name = "base"
    world_size = 1
    rank = 0
    device = torch.device("cpu")  # where the model lives: batches go there before forward, results come back to CPU

    @property
    def is_rank0(self) -> bool:
        return self.rank == 0

    def model_init_context(self):
        return contextlib.nullcontext()

    def unsharded_init_context(self):
        """Build an ordinary (unpartitioned, CPU) model in one process, e.g. on rank 0 to export weights."""
        return contextlib.nullcontext()

    def all_reduce_sum(self, value: float | torch.Tensor) -> float:
        t = torch.as_tensor(value, dtype=torch.float64).clone()
        if self.world_size > 1:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return float(t)

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()


class SingleStrategy(Strategy):
    """One process, plain torch AdamW: the fastest path on one CPU or GPU."""

    name = "single"

    def __init__(self, optim: OptimConfig, total_steps: int, grad_accum: int, device: torch.device | None = None):
        self.optim_cfg, self.total_steps, self.grad_accum = optim, total_steps, grad_accum
        self.device = device if device is not None else train_device()

    def prepare(self, model):
        if any(p.device != self.device for p in model.parameters()):
            model = model.to(self.device)
        self.model = model
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise ConfigError("no trainable parameters (check peft.method and freeze settings)")
        self.optimizer = _adamw(params, self.optim_cfg, fused=_fusable(params))
        self.scheduler = make_scheduler(self.optimizer, self.optim_cfg, self.total_steps)
        return model

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> float:
        params = [p for p in self.model.parameters() if p.requires_grad]
        if self.optim_cfg.max_grad_norm > 0:
            norm = float(torch.nn.utils.clip_grad_norm_(params, self.optim_cfg.max_grad_norm))
        else:
            norm = float(torch.norm(torch.stack([p.grad.norm() for p in params if p.grad is not None])))
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def save_checkpoint(self, path: Path, client_state: dict) -> None:
        path.mkdir(parents=True, exist_ok=True)
        trainable = {n: p.detach().clone() for n, p in self.model.named_parameters() if p.requires_grad}
        torch.save({"model": trainable, "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                    "client": client_state, "rng": rng_state()}, path / "state.pt")

    def load_checkpoint(self, path: Path) -> dict:
        st = torch.load(path / "state.pt", weights_only=False, map_location="cpu")  # copied onto the model's device
        missing = set(st["model"]) - {n for n, _ in self.model.named_parameters()}
        if missing:
            raise ConfigError(f"checkpoint {path} does not match the model (unknown parameters, e.g. {sorted(missing)[:3]})")
        with torch.no_grad():
            for n, p in self.model.named_parameters():
                if n in st["model"]:
                    p.copy_(st["model"][n])
        self.optimizer.load_state_dict(st["optimizer"])
        self.scheduler.load_state_dict(st["scheduler"])
        set_rng_state(st["rng"])
        return st["client"]

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu() for k, v in self.model.state_dict().items()}

    def unwrap(self):
        return self.model


class DeepSpeedStrategy(Strategy):
    """DeepSpeed ZeRO (stage 0-3, optional CPU offload) over gloo (CPU) or NCCL (GPU)."""

    name = "deepspeed"

    def __init__(self, ds: DeepSpeedConfig, optim: OptimConfig, total_steps: int, micro_batch_size: int, grad_accum: int,
                 dtype: str = "float32", device: torch.device | None = None):
        import deepspeed

        self.device = device if device is not None else train_device()
        backend = comm_backend(self.device)
        init_distributed(backend)
        deepspeed.init_distributed(dist_backend=backend)
        self.world_size, self.rank = dist.get_world_size(), dist.get_rank()
        self.ds_cfg, self.optim_cfg, self.total_steps = ds, optim, total_steps
        self.config = build_deepspeed_config(ds, optim, micro_batch_size=micro_batch_size, grad_accum=grad_accum,
                                             world_size=self.world_size, dtype=dtype)
        self._hf_ds = None

    def model_init_context(self):
        """Under ZeRO-3, from_pretrained partitions weights as it loads them (HfDeepSpeedConfig must stay alive)."""
        if self.ds_cfg.zero_stage == 3:
            from transformers.integrations import HfDeepSpeedConfig

            self._hf_ds = HfDeepSpeedConfig(self.config)
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def unsharded_init_context(self):
        """ZeRO-3 integration off while the block runs: transformers partitions every model it builds while an
        ``HfDeepSpeedConfig`` is registered (``is_deepspeed_zero3_enabled()``), a collective that one rank alone
        hangs in. ``unset_hf_deepspeed_config``/``set_hf_deepspeed_config`` are transformers' own switches."""
        from transformers.integrations import set_hf_deepspeed_config, unset_hf_deepspeed_config

        unset_hf_deepspeed_config()
        try:
            yield
        finally:
            if self._hf_ds is not None:
                set_hf_deepspeed_config(self._hf_ds)

    def prepare(self, model):
        import deepspeed

        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise ConfigError("no trainable parameters (check peft.method and freeze settings)")
        optimizer = None if "optimizer" in self.config else _adamw(params, self.optim_cfg)
        sched = (lambda opt: make_scheduler(opt, self.optim_cfg, self.total_steps))
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, model_parameters=params, optimizer=optimizer, lr_scheduler=sched, config=self.config)
        self.device = self.engine.device  # DeepSpeed placed the module (cuda:LOCAL_RANK, or the CPU)
        return self.engine

    def backward(self, loss: torch.Tensor) -> None:
        # DeepSpeed averages gradients over ranks; we scale by world size so the
        # result is the global token mean. GAS scaling is ours too (scale_wrt_gas=False).
        self.engine.backward(loss * self.world_size, scale_wrt_gas=False)
        self.engine.step()  # only applies the update at the accumulation boundary

    def step(self) -> float:
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    def lr(self) -> float:
        return self.engine.get_lr()[0]

    def save_checkpoint(self, path: Path, client_state: dict) -> None:
        client = dict(client_state)
        client["rng"] = rng_state()
        self.engine.save_checkpoint(str(path.parent), tag=path.name, client_state=client)

    def load_checkpoint(self, path: Path) -> dict:
        _, client = self.engine.load_checkpoint(str(path.parent), tag=path.name)
        if client is None:
            raise ConfigError(f"cannot load DeepSpeed checkpoint {path}")
        set_rng_state(client.pop("rng"))
        return client

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Gathered weights on rank 0 (empty dict elsewhere); every rank must call it."""
        if self.ds_cfg.zero_stage == 3:
            sd = self.engine._zero3_consolidated_16bit_state_dict()
            return {k: v.cpu() for k, v in (sd or {}).items()} if self.is_rank0 else {}
        return {k: v.detach().cpu() for k, v in self.engine.module.state_dict().items()} if self.is_rank0 else {}

    def unwrap(self):
        return self.engine.module


def make_strategy(name: str, *, optim: OptimConfig, ds: DeepSpeedConfig, total_steps: int, micro_batch_size: int,
                  grad_accum: int, dtype: str, use_gpu: bool = False) -> Strategy:
    """``use_gpu``: a GPU is required (see :func:`train_device`); NCCL on CUDA, gloo on the CPU."""
    if name not in ("single", "deepspeed", "fsdp"):
        raise ConfigError(f"train.strategy: unknown {name!r}")
    device = train_device(use_gpu)
    if name == "single":
        return SingleStrategy(optim, total_steps, grad_accum, device)
    if name == "deepspeed":
        return DeepSpeedStrategy(ds, optim, total_steps, micro_batch_size, grad_accum, dtype, device)
    from alignloop.fsdp import FSDPStrategy

    return FSDPStrategy(optim, total_steps, grad_accum, device)


