"""Config sections shared by the training stages (SFT, reward, PPO, DPO)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from alignloop.config import Section

PeftMethod = Literal["full", "lora", "qlora", "prompt_tuning", "prefix_tuning", "ia3", "freeze"]


class ModelConfig(Section):
    path: str = Field("smollm2", description="local Hugging Face model directory, a .gguf file, or 'smollm2' (the packaged SmolLM2-135M-Instruct)")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="parameter dtype for training (float32 is exact on CPU; bfloat16 halves memory)")
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = Field("sdpa", description="attention kernel")
    gradient_checkpointing: bool = Field(False, description="recompute activations in backward to save memory")
    chat_template: str | None = Field(None, description="Jinja chat template overriding the tokenizer's (a model without one gets alignloop's documented default)")


class PeftConfig(Section):
    method: PeftMethod = Field("lora", description="full | lora | qlora | prompt_tuning | prefix_tuning | ia3 | freeze")
    lora_r: int = Field(16, gt=0, description="LoRA rank")
    lora_alpha: float = Field(32, gt=0, description="LoRA alpha (scale = alpha / r)")
    lora_dropout: float = Field(0.0, ge=0, lt=1, description="LoRA dropout")
    target_modules: list[str] | Literal["all-linear"] = Field("all-linear", description="modules LoRA/IA3 wrap, or 'all-linear'")
    num_virtual_tokens: int = Field(16, gt=0, description="prompt/prefix tuning: number of virtual tokens")
    prompt_init_text: str | None = Field(None, description="prompt tuning: initialise the soft prompt from this text")
    freeze_embeddings: bool = Field(True, description="freeze: keep the token embeddings (and a tied LM head) frozen")
    freeze_first_k_layers: int = Field(0, ge=0, description="freeze: keep the first K transformer blocks frozen, train the rest")
    qlora_quant_type: Literal["nf4", "fp4"] = Field("nf4", description="QLoRA 4-bit data type")
    qlora_double_quant: bool = Field(True, description="QLoRA: quantize the quantization constants too")


class OptimConfig(Section):
    lr: float = Field(2e-4, gt=0, description="peak learning rate")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay")
    betas: tuple[float, float] = Field((0.9, 0.95), description="AdamW betas")
    eps: float = Field(1e-8, gt=0, description="AdamW epsilon")
    max_grad_norm: float = Field(1.0, ge=0, description="gradient clipping (0 = off)")
    scheduler: Literal["constant", "linear", "cosine"] = Field("cosine", description="LR schedule after warm-up")
    warmup_steps: int = Field(0, ge=0, description="linear warm-up steps")


class DeepSpeedConfig(Section):
    zero_stage: Literal[0, 1, 2, 3] = Field(3, description="ZeRO stage when strategy=deepspeed")
    offload_optimizer: bool = Field(False, description="ZeRO: optimizer states in CPU memory")
    offload_params: bool = Field(False, description="ZeRO-3: parameters in CPU memory")
    overlap_comm: bool = Field(False, description="overlap reduction with backward")


class RayConfig(Section):
    num_workers: int = Field(1, ge=1, description="training workers (Ray Train); 1 runs in this process unless use_ray=true")
    use_ray: bool | None = Field(None, description="force Ray Train on/off (default: on when num_workers > 1)")
    address: str | None = Field(None, description="Ray cluster address (default: the job's cluster, else a local one)")
    use_gpu: bool = Field(False, description="one GPU per worker (NCCL); CPU workers use gloo")
    cpus_per_worker: int = Field(1, ge=1, description="CPUs reserved per training worker")

    @property
    def enabled(self) -> bool:
        return self.num_workers > 1 if self.use_ray is None else self.use_ray


class TrainConfig(Section):
    strategy: Literal["auto", "single", "deepspeed", "fsdp"] = Field("auto", description="auto: single process for 1 worker, DeepSpeed ZeRO for several")
    micro_batch_size: int = Field(4, gt=0, description="sequences per forward/backward per worker")
    global_batch_size: int = Field(8, gt=0, description="sequences per optimizer step over all workers")
    max_steps: int = Field(-1, description="optimizer steps (-1: derived from epochs)")
    epochs: float = Field(1.0, gt=0, description="passes over the training data when max_steps=-1")
    seed: int = Field(42, description="seed for data order, init and dropout")
    log_every: int = Field(1, gt=0, description="log metrics every N steps")
    eval_every: int = Field(0, ge=0, description="evaluate every N steps (0: only at the end)")
    save_every: int = Field(0, ge=0, description="checkpoint every N steps (0: only at the end)")
    keep_checkpoints: int = Field(2, gt=0, description="newest checkpoints kept")

    @model_validator(mode="after")
    def _batch(self):
        if self.global_batch_size % self.micro_batch_size:
            raise ValueError(f"global_batch_size {self.global_batch_size} must be a multiple of micro_batch_size {self.micro_batch_size}")
        return self

    def resolved_strategy(self, num_workers: int) -> str:
        if self.strategy != "auto":
            return self.strategy
        return "single" if num_workers == 1 else "deepspeed"


def check_parallel_layout(train: TrainConfig, ray: RayConfig, peft: PeftConfig | None = None,
                          deepspeed: DeepSpeedConfig | None = None, unit: str = "") -> None:
    """The checks every data-parallel stage config shares (SFT, reward, DPO), raised as ValueError for pydantic.

    The global batch must split into micro-batches x accumulation x workers; strategy=single is one process;
    QLoRA's 4-bit weights cannot be partitioned by ZeRO-3 on this stack.
    """
    world = ray.num_workers
    G, mb = train.global_batch_size, train.micro_batch_size
    if G % world or (G // world) % mb:
        raise ValueError(f"train.global_batch_size {G}{unit} must equal micro_batch_size {mb} x accumulation x "
                         f"ray.num_workers {world}")
    if train.strategy == "single" and world > 1:
        raise ValueError("train.strategy=single runs one process; set ray.num_workers=1 or strategy=deepspeed/fsdp")
    if (peft is not None and deepspeed is not None and peft.method == "qlora"
            and train.resolved_strategy(world) == "deepspeed" and deepspeed.zero_stage == 3):
        raise ValueError("peft.method=qlora cannot be sharded with ZeRO-3 here (bitsandbytes 4-bit weights are not "
                         "partitionable on this stack); use deepspeed.zero_stage=2 or train.strategy=single")
