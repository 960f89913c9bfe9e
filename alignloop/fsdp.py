"""PyTorch FSDP2 (``fully_shard``): parameters, gradients and optimizer states sharded per transformer block."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed as dist

from alignloop.config import ConfigError
from alignloop.models import transformer_blocks
from alignloop.sections import OptimConfig
from alignloop.strategy import (Strategy, _adamw, comm_backend, init_distributed, make_scheduler, rng_state,
                                set_rng_state, train_device)


class FSDPStrategy(Strategy):
    name = "fsdp"

    def __init__(self, optim: OptimConfig, total_steps: int, grad_accum: int, device: torch.device | None = None):
        # fully_shard places the shards on its default mesh's device: the current CUDA device, else the CPU
        self.device = device if device is not None else train_device()
        init_distributed(comm_backend(self.device))
        self.world_size, self.rank = dist.get_world_size(), dist.get_rank()
        self.optim_cfg, self.total_steps = optim, total_steps

    def prepare(self, model):
        from torch.distributed.fsdp import fully_shard

        for block in transformer_blocks(model):
            fully_shard(block)
        fully_shard(model)
        self.model = model
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise ConfigError("no trainable parameters (check peft.method and freeze settings)")
        self.optimizer = _adamw(params, self.optim_cfg)
        self.scheduler = make_scheduler(self.optimizer, self.optim_cfg, self.total_steps)
        return model

    def backward(self, loss: torch.Tensor) -> None:
        # FSDP averages gradients over ranks in its reduce-scatter; undo it (global token mean).
        (loss * self.world_size).backward()

    def step(self) -> float:
        params = [p for p in self.model.parameters() if p.requires_grad]
        max_norm = self.optim_cfg.max_grad_norm if self.optim_cfg.max_grad_norm > 0 else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(norm)

    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def save_checkpoint(self, path: Path, client_state: dict) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        msd, osd = get_state_dict(self.model, self.optimizer)
        dcp.save({"model": msd, "optim": osd}, checkpoint_id=str(path / "sharded"))
        torch.save({"rng": rng_state(), "scheduler": self.scheduler.state_dict()}, path / f"rank{self.rank}.pt")
        if self.is_rank0:
            (path / "client.json").write_text(json.dumps(client_state))

    def load_checkpoint(self, path: Path) -> dict:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        msd, osd = get_state_dict(self.model, self.optimizer)
        state = {"model": msd, "optim": osd}
        dcp.load(state, checkpoint_id=str(path / "sharded"))
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        local = torch.load(path / f"rank{self.rank}.pt", weights_only=False)
        set_rng_state(local["rng"])
        self.scheduler.load_state_dict(local["scheduler"])
        return json.loads((path / "client.json").read_text())

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        sd = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return sd if self.is_rank0 else {}

    def unwrap(self):
        return self.model
