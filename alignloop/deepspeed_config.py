"""The one place a DeepSpeed config is built (every stage calls this)."""

from __future__ import annotations

from alignloop.sections import DeepSpeedConfig, OptimConfig


def build_deepspeed_config(ds: DeepSpeedConfig, optim: OptimConfig, *, micro_batch_size: int, grad_accum: int,
                           world_size: int, dtype: str = "float32") -> dict:
    """A DeepSpeed JSON config for ZeRO stage ``ds.zero_stage``.

    Batch sizes are stated so DeepSpeed's own check (train = micro x accum x world)
    holds. With optimizer offload DeepSpeed must own the optimizer (its CPU Adam),
    so it is declared here; otherwise alignloop passes a torch AdamW.
    """
    cfg: dict = {
        "train_batch_size": micro_batch_size * grad_accum * world_size,
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": grad_accum,
        "gradient_clipping": optim.max_grad_norm if optim.max_grad_norm > 0 else 0.0,
        "zero_optimization": {
            "stage": ds.zero_stage,
            "overlap_comm": ds.overlap_comm,
            "contiguous_gradients": True,
            "reduce_bucket_size": 5e7,
        },
        "bf16": {"enabled": dtype == "bfloat16"},
        "fp16": {"enabled": dtype == "float16"},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        "zero_allow_untested_optimizer": True,
    }
    z = cfg["zero_optimization"]
    if ds.zero_stage == 3:
        z.update({
            "stage3_param_persistence_threshold": 1e4,
            "stage3_max_live_parameters": 1e9,
            "stage3_prefetch_bucket_size": 5e7,
            "stage3_gather_16bit_weights_on_model_save": True,
        })
    if ds.offload_optimizer:
        z["offload_optimizer"] = {"device": "cpu", "pin_memory": False}
        cfg["optimizer"] = {
            "type": "AdamW",
            "params": {"lr": optim.lr, "betas": list(optim.betas), "eps": optim.eps, "weight_decay": optim.weight_decay},
        }
    if ds.offload_params:
        if ds.zero_stage != 3:
            from alignloop.config import ConfigError

            raise ConfigError("deepspeed.offload_params needs deepspeed.zero_stage=3")
        z["offload_param"] = {"device": "cpu", "pin_memory": False}
    return cfg
