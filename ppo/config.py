"""PPO stage config (``alignloop ppo --config configs/ppo.yaml key=value ...``).

Every implementation detail of PPO-for-LM is one field here with its default
(issue 5); the same config runs PPO (``algo.advantage=gae``, with a critic) and
its critic-free relatives GRPO, RLOO and REINFORCE++.

Batch arithmetic, computed once (``derived``): one iteration samples
``rollout.prompts_per_step x rollout.n_samples`` answers (the rollout batch B);
each of ``algo.ppo_epochs`` passes splits B into ``algo.num_mini_batches``
optimizer steps; a mini-batch is split over ``ray.actor_workers`` ranks and then
into micro-batches of ``train.micro_batch_size``. Every division must be exact.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from alignloop.config import Section
from alignloop.sections import DeepSpeedConfig, ModelConfig, OptimConfig, PeftConfig


class PromptDataConfig(Section):
    prompts: str = Field(..., description="prompts file (.jsonl): one {\"prompt\": str} or {\"messages\": [...]} per line")
    chat_template: bool = Field(True, description="render prompts with the tokenizer's chat template (assistant turn open)")
    max_prompt_tokens: int = Field(256, gt=0, description="longer prompts keep their last N tokens")
    limit: int | None = Field(None, gt=0, description="use only the first N prompts")


class RolloutConfig(Section):
    engine: Literal["vllm", "hf", "auto"] = Field("auto", description="vllm (fast), hf (transformers generate), auto: vllm when importable")
    prompts_per_step: int = Field(8, gt=0, description="prompts sampled per iteration")
    n_samples: int = Field(1, gt=0, description="answers per prompt (the group size of GRPO/RLOO)")
    max_new_tokens: int = Field(64, gt=0, description="A: answer length cap (answers that hit it get no EOS)")
    temperature: float = Field(1.0, gt=0, description="sampling temperature (1.0 keeps the sampler equal to the trained policy)")
    top_p: float = Field(1.0, gt=0, le=1, description="nucleus sampling mass")
    max_model_len: int = Field(1024, gt=0, description="vLLM context length")
    lora_sync: Literal["adapter", "merged"] = Field("adapter", description="peft.method=lora: push only the adapter to "
                                                   "the engine (vLLM LoRA), or merge it on the trainer side and reload "
                                                   "full weights (no LoRA kernels in the engine: on CPU, where vLLM's "
                                                   "LoRA decode is 3-6x slower, the faster choice)")
    dtype: Literal["float32", "bfloat16", "float16"] | None = Field(
        None, description="the engine's weights and compute (None: model.dtype). bfloat16 rollouts beside a float32 "
        "trainer: decoding reads half the bytes (on a CPU with AMX/AVX512-BF16 about 1.7x faster at one thread); "
        "the engine's log-probs then differ from the trainer's by ~1e-2 (rollout/logprob_diff), which "
        "algo.is_correction corrects")
    compile: bool = Field(False, description="vLLM: torch.compile the model (CUDA graphs on GPU) instead of eager "
                          "mode. On CPU the engine takes 1.5-2 min longer to start and decodes about 2x faster at two "
                          "threads (no gain at one): for long runs")
    log_samples: int = Field(0, ge=0, description="print this many (prompt, answer, score) triples per logged step")


class RewardRule(Section):
    fn: str = Field(..., description="'module:function' with fn(prompt: str, answer: str, **kwargs) -> float")
    weight: float = Field(1.0, description="weight of this rule in the summed score")
    kwargs: dict = Field(default_factory=dict, description="extra keyword arguments for the function")


class RewardSectionConfig(Section):
    rules: list[RewardRule] = Field(default_factory=list, description="rule rewards, summed with their weights")
    model: str | None = Field(None, description="learned reward model directory (reward stage final/), added with weight model_weight")
    model_weight: float = Field(1.0, description="weight of the learned reward model's score")
    url: str | None = Field(None, description="remote scorer speaking alignloop reward-serve's protocol (POST /score), added with weight url_weight")
    url_weight: float = Field(1.0, description="weight of the remote scorer's score")
    normalize: Literal["none", "stored", "fixed"] = Field("none", description="score normalisation: none; stored: (s - mean)/std with "
                                                          "the reward model's reward_stats.json; fixed: with mean/std below")
    mean: float = Field(0.0, description="normalize=fixed: score mean")
    std: float = Field(1.0, gt=0, description="normalize=fixed: score std")
    clip: float | None = Field(None, gt=0, description="clip the (normalised) score to [-clip, clip] (None = off)")
    no_eos_penalty: float | None = Field(None, description="answers without EOS (cut at max_new_tokens) get this score instead "
                                         "of theirs (None = keep the score)")

    @model_validator(mode="after")
    def _check(self):
        if not self.rules and self.model is None and self.url is None:
            raise ValueError("reward: give at least one of reward.rules, reward.model, reward.url")
        if self.normalize == "stored" and self.model is None:
            raise ValueError("reward.normalize=stored reads the reward model's statistics; set reward.model")
        return self


class KLConfig(Section):
    coef: float = Field(0.05, ge=0, description="β: initial KL coefficient (0 = no KL and no reference model)")
    estimator: Literal["k1", "k2", "k3"] = Field("k1", description="per-token KL estimator (k1 log-ratio, k2 squared, k3 Schulman's unbiased ≥ 0)")
    in_reward: bool = Field(True, description="true: -β·KL per token in the reward (InstructGPT); false: β·KL term in the policy loss (GRPO)")
    adaptive: bool = Field(False, description="adaptive controller (Ziegler et al. 2019) instead of a fixed β")
    target: float = Field(6.0, gt=0, description="adaptive: target KL per answer")
    horizon: int = Field(10000, gt=0, description="adaptive: horizon in samples")


class AlgoConfig(Section):
    advantage: Literal["gae", "grpo", "rloo", "reinforce_pp"] = Field("gae", description="advantage estimator; only gae trains a critic")
    gamma: float = Field(1.0, ge=0, le=1, description="GAE / REINFORCE++ discount γ")
    lam: float = Field(0.95, ge=0, le=1, description="GAE λ")
    whiten_advantages: bool = Field(True, description="whiten GAE advantages over the global batch (grpo/rloo: not applied; reinforce_pp always whitens)")
    grpo_scale: bool = Field(True, description="grpo: divide by the group std (false = Dr. GRPO)")
    clip_eps: float = Field(0.2, gt=0, description="policy ratio clip ε (low side)")
    clip_eps_high: float | None = Field(None, gt=0, description="ratio clip on the high side (None = clip_eps; DAPO 'clip higher')")
    dual_clip: float | None = Field(None, gt=1, description="dual clip c > 1 for negative advantages (None = off)")
    value_clip: float | None = Field(0.2, gt=0, description="value clipping around the old values (None = off)")
    ppo_epochs: int = Field(1, gt=0, description="passes over each rollout batch")
    num_mini_batches: int = Field(1, gt=0, description="optimizer steps per pass")
    reuse_logprobs: bool = Field(True, description="the first mini-batch of the first epoch takes π_θold from its own training forward (detached) instead of a separate pass: same loss and gradient, one forward pass fewer per sample when ppo_epochs = num_mini_batches = 1")
    reuse_values: bool = Field(True, description="gae: the critic's first mini-batch of the first epoch trains on "
                               "the forward of the value pass, kept with its graph, instead of running a second one: "
                               "the same loss and gradient, one critic forward fewer per iteration (half of the "
                               "critic's forwards when ppo_epochs = num_mini_batches = 1). Applies where a critic "
                               "rank's share of a mini-batch is one micro-batch (only one micro-batch's graph is kept)")
    old_logprobs: Literal["trainer", "rollout"] = Field("trainer", description="π_θold of the ratio and the KL: trainer = a no-grad trainer pass over every answer after the rollout; rollout = the engine's sampled-token log-probs (the behaviour policy, as TRL's PPO uses its generation logits): one actor forward pass fewer per sample, the clip then also bounds any engine/trainer gap (rollout/logprob_diff, then measured on the first mini-batch)")
    is_correction: bool = Field(False, description="truncated importance sampling between rollout engine and trainer log-probs")
    is_cap: float = Field(2.0, gt=0, description="truncation cap of the IS weights")
    kl: KLConfig = KLConfig()


class ActorOptimConfig(OptimConfig):
    lr: float = Field(1e-5, gt=0, description="peak learning rate of the policy")
    scheduler: Literal["constant", "linear", "cosine"] = Field("constant", description="LR schedule after warm-up")


class CriticOptimConfig(OptimConfig):
    lr: float = Field(1e-4, gt=0, description="peak learning rate of the critic")
    scheduler: Literal["constant", "linear", "cosine"] = Field("constant", description="LR schedule after warm-up")


class CriticConfig(Section):
    init_from: str | None = Field(None, description="critic weights: a reward model directory (its backbone and head); default: the policy backbone with a fresh head")
    warmup_steps: int = Field(0, ge=0, description="first iterations in which only the critic trains")
    optim: CriticOptimConfig = CriticOptimConfig()


class PPORayConfig(Section):
    use_ray: bool = Field(False, description="run actor, critic and rollout engine as Ray actors")
    actor_workers: int = Field(1, ge=1, description="actor (policy) DeepSpeed workers")
    critic_workers: int = Field(1, ge=1, description="critic DeepSpeed workers")
    num_engines: int = Field(1, ge=1, description="rollout engine actors (vLLM); each prompt batch is split over them (data-parallel rollouts)")
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs Ray reserves per worker actor (fractions allowed)")
    gpus_per_worker: float = Field(0.0, ge=0, description="GPUs Ray reserves per actor/critic worker; > 0 requires CUDA there (a fraction lets the actor, critic and engine share one GPU; the ranks of one group need a GPU each, NCCL refuses two on one). A worker that sees CUDA trains on it either way")
    gpus_per_engine: float = Field(0.0, ge=0, description="GPUs Ray reserves per rollout engine actor (vLLM holds half of its GPU memory: gpu_memory_utilization=0.5)")
    threads_per_worker: int = Field(1, gt=0, description="torch threads in each worker")
    address: str | None = Field(None, description="Ray cluster address (default: the job's cluster, else a local one)")


class PPOTrainConfig(Section):
    strategy: Literal["auto", "single", "deepspeed"] = Field("auto", description="auto: single process in-process, DeepSpeed ZeRO on Ray")
    micro_batch_size: int = Field(4, gt=0, description="sequences per forward/backward per worker")
    shared_prefix: bool = Field(True, description="policy forward passes compute each prompt once for all its answers "
                                "in a micro-batch (one packed row, a mask that keeps answers apart); the same log-probs "
                                "and gradients as one padded row per answer, with n_samples-1 prompt copies and the "
                                "padding never computed. A micro-batch of distinct prompts keeps padded rows (packing "
                                "would save only padding and cost attention over the whole row)")
    padding_free: bool = Field(True, description="actor, reference and critic forward passes over a ragged micro-batch "
                               "run only its real tokens through the model (one packed row); the attention puts them "
                               "back into their padded rows (alignloop.padding_free), so the results are the padded "
                               "batch's to float rounding. Needs model.attn_implementation eager or sdpa (else off)")
    max_steps: int = Field(20, gt=0, description="PPO iterations (rollout + update)")
    seed: int = Field(42, description="seed for prompt order, sampling and init")
    threads: int | None = Field(None, gt=0, description="torch threads in the driver process (None: torch's default; 1 on a shared, busy CPU)")
    autocast: Literal["bfloat16"] | None = Field(None, description="bfloat16: actor and critic forwards (and backwards) "
                                                 "under torch.autocast; weights, optimizer states and the LM/value heads "
                                                 "stay float32 (log-probs need the precision). On a CPU with AMX or "
                                                 "AVX512-BF16, and on GPUs, the matrix products run several times faster")
    float32_lm_head: bool = Field(True, description="with train.autocast: the LM head's matrix product in float32 (the "
                                  "default). false: in bfloat16 like the body, as a bfloat16 rollout engine computes "
                                  "it: on a 2-core CPU with AVX512-BF16, a PPO iteration's actor and critic updates took 4.47 s "
                                  "instead of 5.18 (SmolLM2, whose head is a fifth of its weights; 4 mini-batches of "
                                  "4 answers of up to 64 tokens), for about twice the log-prob error "
                                  "(mean |Δ| vs float32 0.015 -> 0.027). The log-softmax stays float32 either way")
    bfloat16_frozen: bool = Field(True, description="with train.autocast=bfloat16, in process (train.strategy=single): "
                                  "the frozen linear weights (the LoRA base layers; with full fine-tuning the "
                                  "reference copy) are stored in bfloat16, the values autocast would cast them to in "
                                  "every forward, so the results are the same and each forward skips the casts (half "
                                  "their memory too). A frozen LM head computing in bf16 (train.float32_lm_head=false) "
                                  "gets its own bf16 copy; the input embeddings, norms, adapters and heads keep their "
                                  "dtype. The casts were 7-20% of a pass in profiles on a 2-core Zen 5 CPU (SmolLM2); "
                                  "the PPO benchmark's gain was inside its noise there")
    compile: bool = Field(False, description="in process: torch.compile each decoder layer of the actor, the reference "
                          "and the critic (dynamic shapes; the layers share one compiled graph per mode: training, "
                          "no-grad, adapter off). Fuses the element-wise work around the matrix products: on a CPU "
                          "about 10% less time per update (SmolLM2), for ~60 s of compiling in the first iteration "
                          "(cold cache)")
    overlap_critic: bool = Field(False, description="in process: the critic's value pass and updates run in a second "
                                 "thread beside the actor's (each with train.threads torch threads; set threads to at "
                                 "most half the cores). The same results, in about the time of the actor's work "
                                 "alone. On Ray the critic group always works beside the actor group")
    critic_worker: Literal["process", "thread"] = Field("process", description="train.overlap_critic: where the "
                                                        "critic works. process: a spawned process of its own (the two "
                                                        "roles' Python does not take turns on one GIL; on a 2-core AMX Xeon "
                                                        "four actor and four critic updates side by side took "
                                                        "1.14-1.33x less time than in a thread, "
                                                        "bench/bench_critic_worker.py); thread: a thread of the "
                                                        "loop's process (no second model load and no process start)")
    log_every: int = Field(1, gt=0, description="log metrics every N iterations")
    save_every: int = Field(0, ge=0, description="checkpoint every N iterations (0: only at the end)")
    keep_checkpoints: int = Field(2, gt=0, description="newest checkpoints kept")


class PPOConfig(Section):
    output_dir: str = Field("runs", description="parent directory of run directories")
    run_name: str = Field("ppo", description="run directory name under output_dir")
    resume: bool = Field(False, description="continue from the newest checkpoint in the run directory")
    model: ModelConfig = ModelConfig()
    peft: PeftConfig = PeftConfig()
    data: PromptDataConfig
    rollout: RolloutConfig = RolloutConfig()
    reward: RewardSectionConfig
    algo: AlgoConfig = AlgoConfig()
    critic: CriticConfig = CriticConfig()
    optim: ActorOptimConfig = ActorOptimConfig()
    train: PPOTrainConfig = PPOTrainConfig()
    deepspeed: DeepSpeedConfig = DeepSpeedConfig()
    ray: PPORayConfig = PPORayConfig()

    @model_validator(mode="after")
    def _checks(self):
        a, r = self.algo, self.rollout
        if a.advantage in ("grpo", "rloo") and r.n_samples < 2:
            raise ValueError(f"algo.advantage={a.advantage} normalises within groups: rollout.n_samples must be >= 2")
        if self.peft.method not in ("full", "lora"):
            raise ValueError(f"peft.method={self.peft.method}: PPO supports full and lora (vLLM syncs full weights or a LoRA adapter)")
        B = r.prompts_per_step * r.n_samples
        for workers, who in ((self.ray.actor_workers, "ray.actor_workers"), (self.ray.critic_workers, "ray.critic_workers")):
            if B % a.num_mini_batches or (B // a.num_mini_batches) % (workers * self.train.micro_batch_size):
                raise ValueError(f"rollout batch {B} (prompts_per_step x n_samples) must split into algo.num_mini_batches "
                                 f"{a.num_mini_batches} x {who} {workers} x train.micro_batch_size {self.train.micro_batch_size}")
        if not self.ray.use_ray and (self.ray.actor_workers > 1 or self.ray.critic_workers > 1 or self.ray.num_engines > 1):
            raise ValueError("ray.actor_workers/critic_workers/num_engines > 1 need ray.use_ray=true")
        if self.algo.old_logprobs == "rollout" and self.algo.is_correction:
            raise ValueError("algo.is_correction weighs π_θold/π_engine, which algo.old_logprobs=rollout makes 1: "
                             "set one of them only")
        if self.train.compile and self.resolved_strategy() != "single":
            raise ValueError("train.compile runs in process (train.strategy=single, ray.use_ray=false): DeepSpeed "
                             "ZeRO-3 gathers each layer's weights in hooks that a compiled layer would skip")
        if self.train.strategy == "deepspeed" and not self.ray.use_ray:
            raise ValueError("train.strategy=deepspeed runs on Ray workers: set ray.use_ray=true")
        return self

    # ------------------------------------------------------------ derived sizes
    @property
    def uses_critic(self) -> bool:
        return self.algo.advantage == "gae"

    @property
    def reuses_values(self) -> bool:
        """algo.reuse_values in effect: a critic, and each critic rank's share of a mini-batch is one micro-batch."""
        workers = self.ray.critic_workers if self.ray.use_ray else 1
        return self.uses_critic and self.algo.reuse_values and self.grad_accum(workers) == 1

    @property
    def stores_frozen_bfloat16(self) -> bool:
        """train.bfloat16_frozen in effect: under bf16 autocast, in process (ZeRO shards own their parameters)."""
        return self.train.bfloat16_frozen and self.train.autocast == "bfloat16" and self.resolved_strategy() == "single"

    @property
    def packs_rows(self) -> bool:
        """train.shared_prefix, where the attention takes a custom mask (not flash-attention's varlen kernels)."""
        return self.train.shared_prefix and self._custom_mask_attention

    @property
    def pads_free(self) -> bool:
        """train.padding_free, where the attention is one alignloop.padding_free wraps (eager or SDPA)."""
        return self.train.padding_free and self._custom_mask_attention

    @property
    def _custom_mask_attention(self) -> bool:
        """The attention takes a custom 4D mask (sdpa, eager); flash-attention's varlen kernels take none."""
        return self.model.attn_implementation in ("sdpa", "eager")

    @property
    def syncs_adapter(self) -> bool:
        """The engine runs the LoRA adapter itself (vLLM LoRA); else it gets full (merged) weights."""
        return self.peft.method == "lora" and self.rollout.lora_sync == "adapter"

    @property
    def uses_reference(self) -> bool:
        return self.algo.kl.coef > 0

    @property
    def rollout_batch(self) -> int:
        return self.rollout.prompts_per_step * self.rollout.n_samples

    @property
    def mini_batch(self) -> int:
        return self.rollout_batch // self.algo.num_mini_batches

    def grad_accum(self, workers: int) -> int:
        return self.mini_batch // (workers * self.train.micro_batch_size)

    @property
    def optimizer_steps(self) -> int:
        return self.train.max_steps * self.algo.ppo_epochs * self.algo.num_mini_batches

    def resolved_strategy(self) -> str:
        if self.train.strategy != "auto":
            return self.train.strategy
        return "deepspeed" if self.ray.use_ray else "single"
