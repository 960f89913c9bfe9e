"""SFT stage config (``alignloop sft --config configs/sft.yaml key=value ...``)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from alignloop.config import Section
from alignloop.sections import (DeepSpeedConfig, ModelConfig, OptimConfig, PeftConfig, RayConfig, TrainConfig,
                                check_parallel_layout)


class SFTDataConfig(Section):
    train: str = Field(..., description="training records: .jsonl/.json/.parquet file or a datasets directory")
    eval: str | None = Field(None, description="held-out records (same formats); default: split eval_fraction off train")
    eval_fraction: float = Field(0.0, ge=0, lt=1, description="fraction of train held out for eval when data.eval is unset")
    format: Literal["auto", "instruction", "messages", "conversations", "prompt_completion"] = Field("auto", description="record format (auto: detected per row)")
    max_length: int = Field(512, gt=1, description="tokens per example after the chat template (longer rows are truncated)")
    loss_on: Literal["answer", "all"] = Field("answer", description="train on assistant answers only, or on every token")
    packing: bool = Field(True, description="padding-free batches: concatenate a micro-batch into one row with per-sequence positions")
    limit: int | None = Field(None, gt=0, description="use only the first N training rows (smoke runs)")


class SFTConfig(Section):
    output_dir: str = Field("runs", description="parent directory of run directories")
    run_name: str = Field("sft", description="run directory name under output_dir")
    resume: bool = Field(False, description="continue from the newest checkpoint in the run directory")
    model: ModelConfig = ModelConfig()
    peft: PeftConfig = PeftConfig()
    data: SFTDataConfig
    optim: OptimConfig = OptimConfig()
    train: TrainConfig = TrainConfig()
    deepspeed: DeepSpeedConfig = DeepSpeedConfig()
    ray: RayConfig = RayConfig()
    merge: bool = Field(True, description="also write the adapter merged into the base model (HF format) in final/")

    @model_validator(mode="after")
    def _checks(self):
        check_parallel_layout(self.train, self.ray, self.peft, self.deepspeed)
        return self

    @property
    def grad_accum(self) -> int:
        return self.train.global_batch_size // (self.ray.num_workers * self.train.micro_batch_size)
