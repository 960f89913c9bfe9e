"""Reward stage config (``alignloop reward --config configs/reward.yaml key=value ...``)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, SecretStr, model_validator

from alignloop.config import Section
from alignloop.sections import (DeepSpeedConfig, ModelConfig, OptimConfig, PeftConfig, RayConfig, TrainConfig,
                                check_parallel_layout)

REWARD_PEFT = ("full", "lora", "freeze")


class FeedbackSource(Section):
    url: str = Field(..., description="base URL of a running feedback service, e.g. http://127.0.0.1:8000")
    token: SecretStr | None = Field(None, description="admin API token (never written to the run directory); default: $token_env")
    token_env: str = Field("ALIGNLOOP_FEEDBACK_TOKEN", description="environment variable holding the token when token is unset")
    campaign: str = Field(..., description="campaign name or numeric id")
    since_watermark: int | None = Field(None, ge=0, description="only feedback newer than this ranking watermark")
    since_last: bool = Field(False, description="only feedback newer than the campaign's previous export")
    export_id: int | None = Field(None, gt=0, description="reuse this existing export version instead of creating one")
    strategy: Literal["all_pairs", "best_vs_rest"] = Field("all_pairs", description="pairs from a ranking")
    aggregation: Literal["none", "majority", "mean_rank"] = Field("majority", description="how several labelers' rankings combine")
    min_rankings: int | None = Field(None, gt=0, description="rankings an item needs before it is exported")


class RewardDataConfig(Section):
    train: str | None = Field(None, description="preference rows: .jsonl/.jsonl.gz/.json/.parquet or a datasets directory")
    feedback: FeedbackSource | None = Field(None, description="train on a live feedback service's export instead of data.train")
    eval: str | None = Field(None, description="held-out rows (same formats); default: split eval_fraction off train")
    eval_fraction: float = Field(0.1, ge=0, lt=1, description="fraction of train held out for eval when data.eval is unset")
    max_length: int = Field(512, gt=1, description="tokens per conversation after the chat template (longer ones lose their oldest tokens)")
    packing: bool | Literal["auto"] = Field("auto", description="true: a micro-batch's sequences in one row (no pad tokens, a "
                                            "block-diagonal mask); false: right-padded rows; auto: packed only with "
                                            "attn_implementation=flash_attention_2 (varlen kernels), else padded")
    shared_prefix: bool = Field(True, description="compute the history a row's answers share once per row (each answer "
                                "attends to it through the attention mask); a micro-batch uses it only when that computes "
                                "fewer token positions; not with flash_attention_2")
    group_by_length: bool = Field(True, description="form each optimizer step's micro-batches (and eval batches) from "
                                  "examples of similar length, so less padding is computed; the step's pairs and "
                                  "gradient stay the same")
    truncation: Literal["pair", "each"] = Field("pair", description="pair: a too-long row's answers lose the same oldest "
                                                "history tokens (they keep one context); each: every conversation is cut on its own")
    limit: int | None = Field(None, gt=0, description="use only the first N training rows (after the eval split)")
    eval_limit: int | None = Field(None, gt=0, description="evaluate on at most N held-out rows")

    @model_validator(mode="after")
    def _source(self):
        if (self.train is None) == (self.feedback is None):
            raise ValueError("set exactly one of data.train (a file) and data.feedback (a feedback service)")
        return self


def resolve_packing(packing: bool | str, attn_implementation: str) -> bool:
    """``data.packing``: auto packs only where attention has variable-length kernels (flash-attention):
    with sdpa/eager a packed row needs a block-diagonal (T x T) mask over the whole micro-batch, which
    costs more attention work than right padding saves for answers of similar length."""
    if packing == "auto":
        return attn_implementation.startswith("flash_attention")
    return bool(packing)


def shared_prefix_supported(attn_implementation: str) -> bool:
    """The shared-prefix layout needs a custom 4D attention mask (sdpa, eager); flash-attention takes none."""
    return attn_implementation in ("sdpa", "eager")


class LossConfig(Section):
    type: Literal["bradley_terry", "plackett_luce"] = Field("bradley_terry", description="pairwise Bradley-Terry, or listwise Plackett-Luce over whole rankings")
    use_margin: bool = Field(False, description="Bradley-Terry: subtract margin_scale x the row's margin (rows without one: 0)")
    margin_scale: float = Field(1.0, ge=0, description="weight of the margin")
    center_coef: float = Field(0.0, ge=0, description="adds coef x mean(r^2) to keep rewards centred near 0 (Eisenstein et al. 2023)")


class EvalConfig(Section):
    calibration_bins: int = Field(10, gt=1, description="bins of the calibration plot and ECE")
    stats_max_examples: int = Field(256, gt=0, description="without an eval set: training examples scored for the saved reward mean/std")


class RewardConfig(Section):
    output_dir: str = Field("runs", description="parent directory of run directories")
    run_name: str = Field("reward", description="run directory name under output_dir")
    resume: bool = Field(False, description="continue from the newest checkpoint in the run directory")
    model: ModelConfig = ModelConfig()
    peft: PeftConfig = PeftConfig()
    data: RewardDataConfig
    loss: LossConfig = LossConfig()
    eval: EvalConfig = EvalConfig()
    optim: OptimConfig = OptimConfig()
    train: TrainConfig = TrainConfig()
    deepspeed: DeepSpeedConfig = DeepSpeedConfig()
    ray: RayConfig = RayConfig()

    @model_validator(mode="after")
    def _checks(self):
        check_parallel_layout(self.train, self.ray)
        if self.peft.method not in REWARD_PEFT:
            raise ValueError(f"peft.method={self.peft.method} is not supported for reward models (use one of {REWARD_PEFT})")
        if self.loss.use_margin and self.loss.type != "bradley_terry":
            raise ValueError("loss.use_margin applies to loss.type=bradley_terry only")
        return self

    @property
    def grad_accum(self) -> int:
        return self.train.global_batch_size // (self.ray.num_workers * self.train.micro_batch_size)
