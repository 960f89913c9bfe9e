"""DPO stage config (``alignloop dpo --config configs/dpo.yaml key=value ...``), offline and online."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from alignloop.config import Section
from alignloop.sections import (DeepSpeedConfig, ModelConfig, OptimConfig, PeftConfig, RayConfig, TrainConfig,
                                check_parallel_layout)
from reward.config import FeedbackSource

ADAPTER_METHODS = ("lora", "qlora", "ia3", "prompt_tuning", "prefix_tuning")


class DPODataConfig(Section):
    train: str | None = Field(None, description="preference rows ({prompt, chosen, rejected} strings or messages, "
                                                "HH-RLHF dialogues): .jsonl/.jsonl.gz/.json/.parquet or a datasets directory")
    feedback: FeedbackSource | None = Field(None, description="train on a live feedback service's export instead of data.train")
    eval: str | None = Field(None, description="held-out pairs (same formats): loss, implicit-reward margin and accuracy at "
                                                "train.eval_every and at the end")
    eval_limit: int | None = Field(None, gt=0, description="evaluate on at most N held-out pairs")
    max_length: int = Field(512, gt=2, description="tokens per prompt+answer (longer prompts lose their oldest tokens, then answers their tail)")
    max_prompt_length: int = Field(256, gt=0, description="prompt tokens kept when a pair must be cut to max_length")
    limit: int | None = Field(None, gt=0, description="use only the first N pairs (smoke runs)")
    packing: bool | Literal["auto"] = Field("auto", description="true: a micro-batch's sequences in one row (no pad tokens, a "
                                            "block-diagonal mask); false: right-padded rows; auto: packed only with "
                                            "attn_implementation=flash_attention_2 (varlen kernels), else padded")
    shared_prefix: bool = Field(True, description="compute each pair's prompt once: the chosen and the rejected answer "
                                "are two branches of one row that see the prompt through the attention mask; a micro-batch "
                                "uses it only when that computes fewer token positions; not with flash_attention_2 or "
                                "prompt/prefix tuning")
    group_by_length: bool = Field(True, description="form each optimizer step's micro-batches from pairs of similar "
                                  "length, so less padding is computed; the step's pairs and gradient stay the same")

    @model_validator(mode="after")
    def _source(self):
        if self.train is not None and self.feedback is not None:
            raise ValueError("set at most one of data.train (a file) and data.feedback (a feedback service)")
        return self


class DPOLossConfig(Section):
    type: Literal["sigmoid", "robust", "ipo", "hinge"] = Field(
        "sigmoid", description="sigmoid (DPO; with label_smoothing: conservative DPO) | robust | ipo | hinge (SLiC)")
    beta: float = Field(0.1, gt=0, description="KL strength β (IPO: τ)")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="assumed label-flip rate ε (sigmoid: cDPO, robust: rDPO)")


class ReferenceConfig(Section):
    precompute: bool | None = Field(None, description="score every pair with the reference once before training and "
                                                       "cache it in the run dir (default: on for full/freeze, off for adapters, "
                                                       "whose reference is the base with the adapter disabled)")
    micro_batch_size: int = Field(8, gt=0, description="pairs per forward in the precompute pass")


class RuleScorer(Section):
    kind: Literal["rule", "reward_model", "feedback"] = Field(
        "rule", description="rule: a Python callable; reward_model: a trained reward model's score; feedback: push the "
                            "answers to a feedback service campaign for labelers (the human path) and stop")
    function: str | None = Field(None, description="rule: 'module:function' taking (prompt, answer: str) -> float; prompt is the user's text (a list of messages for multi-turn prompts)")
    reward_model: str | None = Field(None, description="reward_model: the reward stage's final/ directory (or its run directory)")
    feedback: FeedbackSource | None = Field(None, description="feedback: the campaign that receives the answers")


class OnlineConfig(Section):
    enabled: bool = Field(False, description="online (iterative) DPO: sample, score, pair, train, repeat (instead of data.train)")
    prompts: str | None = Field(None, description="prompts to sample from: rows with 'prompt' (string or messages), same file formats")
    rounds: int = Field(2, gt=0, description="sample -> score -> train rounds")
    prompts_per_round: int = Field(16, gt=0, description="prompts sampled each round (cycling through the file)")
    k: int = Field(4, ge=2, description="answers sampled per prompt; the best and the worst by score form the pair")
    steps_per_round: int = Field(4, gt=0, description="optimizer steps on each round's pairs")
    max_new_tokens: int = Field(64, gt=0, description="answer length bound when sampling")
    temperature: float = Field(1.0, gt=0, description="sampling temperature")
    top_p: float = Field(1.0, gt=0, le=1, description="nucleus sampling mass")
    engine: Literal["vllm", "hf", "auto"] = Field("vllm", description="rollout engine (vLLM, or transformers generate)")
    scorer: RuleScorer = Field(RuleScorer(), description="what orders the k answers")
    @model_validator(mode="before")
    @classmethod
    def _section_means_on(cls, data):
        # "alignloop dpo with an online section": writing any online key (without an explicit enabled) turns it on.
        if isinstance(data, dict) and data and "enabled" not in data:
            return {**data, "enabled": True}
        return data

    min_score_gap: float = Field(0.0, ge=0, description="skip a prompt whose best and worst scores differ by no more than this (ties teach nothing)")


class DPOConfig(Section):
    output_dir: str = Field("runs", description="parent directory of run directories")
    run_name: str = Field("dpo", description="run directory name under output_dir")
    resume: bool = Field(False, description="continue from the newest checkpoint in the run directory")
    model: ModelConfig = ModelConfig()
    peft: PeftConfig = PeftConfig()
    data: DPODataConfig = DPODataConfig()
    loss: DPOLossConfig = DPOLossConfig()
    reference: ReferenceConfig = ReferenceConfig()
    online: OnlineConfig = OnlineConfig()
    optim: OptimConfig = OptimConfig(lr=5e-5)  # LoRA-scale default; full fine-tuning usually wants 5e-7..5e-6
    train: TrainConfig = TrainConfig()
    deepspeed: DeepSpeedConfig = DeepSpeedConfig()
    ray: RayConfig = RayConfig()
    merge: bool = Field(True, description="also write the adapter merged into the base model (HF format) in final/")

    @model_validator(mode="after")
    def _checks(self):
        world = self.ray.num_workers
        check_parallel_layout(self.train, self.ray, self.peft, self.deepspeed, unit=" (pairs)")
        if not self.online.enabled and self.data.train is None and self.data.feedback is None:
            raise ValueError("offline DPO needs data.train (a file) or data.feedback (a feedback service); "
                             "or set online.enabled=true")
        if self.reference.precompute is False and self.peft.method not in ADAPTER_METHODS:
            raise ValueError(f"peft.method={self.peft.method} has no adapter to disable, so the reference needs its log-probs "
                             "precomputed before training: set reference.precompute=true (or leave it unset)")
        if self.online.enabled:
            if self.online.prompts is None:
                raise ValueError("online.enabled=true needs online.prompts (a file of prompts)")
            sc = self.online.scorer
            need = {"rule": "function", "reward_model": "reward_model", "feedback": "feedback"}[sc.kind]
            if getattr(sc, need) is None:
                raise ValueError(f"online.scorer.kind={sc.kind} needs online.scorer.{need}")
            if self.peft.method not in ("lora", "qlora"):
                raise ValueError("online DPO needs peft.method=lora or qlora: the reference is the base with the adapter "
                                 "disabled, and the adapter is what the rollout engine loads each round")
            if world > 1 or self.ray.enabled:
                raise ValueError("online DPO runs in one process (trainer and rollout engine side by side); set ray.num_workers=1")
        return self

    @property
    def grad_accum(self) -> int:
        return self.train.global_batch_size // (self.ray.num_workers * self.train.micro_batch_size)

    @property
    def precompute_reference(self) -> bool:
        if self.reference.precompute is not None:
            return self.reference.precompute
        return self.peft.method not in ADAPTER_METHODS
