"""The policy (actor) trainer and the critic trainer: plain classes, one per worker process.

Both run unchanged in the driver process (``train.strategy=single``) and inside
the thin Ray actors of ``ppo.ray_actors`` (one per DeepSpeed rank). They see
only their shard of a rollout batch; the driver computes advantages over the
whole batch and passes ``global_tokens`` (answer tokens in the whole
mini-batch) so each rank's loss is its share of the global token mean
(``ppo.losses`` normalizer): any split over ranks and micro-batches gives the
same gradient. Metrics come back as token-weighted *sums* that the driver adds
up and divides once.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from torch import nn

from alignloop import padding_free
from alignloop.models import apply_peft, count_parameters, disable_dropout, load_causal_lm, torch_dtype
from alignloop.strategy import make_strategy, seed_all
from ppo import losses as L
from ppo.config import PPOConfig
from ppo.experience import Experience, pad_answers, repeats_a_prompt, shared_prefix_inputs


def micro_batches(exp: Experience, size: int):
    """Consecutive rows, each micro-batch only as wide as its own longest prompt and answer (Experience.trimmed)."""
    for i in range(0, len(exp), size):
        yield exp.select(slice(i, i + size)).trimmed()


def packed_inputs(exp: Experience, device: torch.device, attn_implementation: str):
    """:func:`ppo.experience.shared_prefix_inputs` on ``device``; eager attention gets an additive float mask."""
    inputs, index = shared_prefix_inputs(exp)  # (1, W) row, (B, A) columns
    inputs = {k: v.to(device) for k, v in inputs.items()}
    if attn_implementation == "eager":  # eager adds the mask to the scores
        allowed = inputs["attention_mask"]
        inputs["attention_mask"] = torch.zeros(allowed.shape, device=device).masked_fill(
            ~allowed, torch.finfo(torch.float32).min)
    return inputs, index.to(device)


def padding_free_applies(cfg: PPOConfig, exp: Experience) -> bool:
    """``train.padding_free`` for this micro-batch: it has padding to leave out and at least one answer token."""
    return cfg.pads_free and bool((exp.prompt_mask == 0).any() or (exp.mask == 0).any()) and bool(exp.mask.any())


def padding_free_inputs(cfg: PPOConfig, exp: Experience) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """:func:`alignloop.padding_free.inputs` of ``exp`` (on its device): the packed row and each (b, T) column's
    index in it."""
    return padding_free.inputs(**exp.model_inputs(), additive=padding_free.float_mask(cfg.model.attn_implementation),
                               dtype=torch_dtype(cfg.model.dtype))


def autocast(cfg: PPOConfig, device: torch.device):
    """``train.autocast``: the forward (and so the backward) in bfloat16 where autocast allows it; the weights, the
    optimizer and the heads (:func:`float32_head`) stay float32.

    Without autocast's weight cache. That cache is one process-wide map behind one mutex: with
    ``train.overlap_critic`` the actor and the critic each run autocast in their own thread, and a thread leaving
    autocast empties the map while holding the mutex, which frees cached bf16 copies of LoRA weights and so may need
    the GIL, while the other thread, tracing a layer for ``train.compile`` with the GIL held, waits for the mutex in
    its next cast: a deadlock (seen twice in a dozen SmolLM2 runs; py-spy showed exactly those two stacks). The
    cache only saves a cast when one trainable float32 leaf is used twice in one forward, which no model here does."""
    if cfg.train.autocast != "bfloat16":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=False)


def frozen_linears_to_bfloat16(model: nn.Module, bf16_head: bool = False) -> None:
    """``train.bfloat16_frozen``: store the weights (and biases) of ``model``'s frozen ``nn.Linear`` layers in bfloat16,
    in place. Under bf16 autocast a linear layer's forward casts its float32 weight to exactly
    these values every time, so forwards and backwards compute the same numbers without the per-forward casts. Anything
    that trains is left alone, and so are the input embeddings, whose float32 output starts the float32 residual
    stream. A frozen LM head (often tied to them) gets its own bfloat16 copy where it computes in bf16 (``bf16_head``:
    ``train.float32_lm_head=false``; SmolLM2's head is a fifth of its weights); else it too is left alone."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if bf16_head and isinstance(head, nn.Linear) and not head.weight.requires_grad and head.bias is None \
            and head.weight.dtype == torch.float32:
        head.weight = nn.Parameter(head.weight.detach().to(torch.bfloat16), requires_grad=False)  # untied from the input
    for name, module in model.named_modules():
        # peft's modules_to_save keeps a frozen original beside the trained copy of a head: a head, left alone
        if not isinstance(module, nn.Linear) or module is head or "original_module" in name.split("."):
            continue
        params = [p for p in (module.weight, module.bias) if p is not None]
        if any(p.requires_grad for p in params) or any(p.dtype != torch.float32 for p in params):
            continue
        for p in params:
            p.data = p.data.to(torch.bfloat16)


def float32_head(head: nn.Module) -> None:
    """Run ``head`` (the LM head, the value head) in float32 even under autocast: a log-prob needs more than
    bfloat16's 8 significant bits (logits of 10-30 would carry errors of ~0.1, half a PPO clip range)."""
    if getattr(head, "_alignloop_float32", False):
        return
    forward = head.forward

    def float_forward(x, *args, **kwargs):
        with torch.autocast(x.device.type, enabled=False):
            return forward(x.float(), *args, **kwargs)

    head.forward = float_forward
    head._alignloop_float32 = True


def contiguous_input(head: nn.Module) -> None:
    """Hand ``head`` (the LM head) a contiguous input. ``logits_to_keep`` gives it a strided slice of the hidden
    states, which ``F.linear`` runs as a batched matmul, about 25% slower on the CPU than one matrix product over the
    copied rows (a (b·A, d) x (d, V) product is the largest single matmul of a policy forward)."""
    if not getattr(head, "_alignloop_contiguous", False):
        head.register_forward_pre_hook(lambda _m, args: (args[0].contiguous(), *args[1:]))
        head._alignloop_contiguous = True


def compile_layers(model: nn.Module) -> None:
    """``train.compile``: ``torch.compile`` each decoder layer, with dynamic shapes (every micro-batch has its own
    width). All layers run the same code with their weights as inputs, so they share one compiled graph per mode
    (training, no-grad, LoRA adapter off; actor and critic), and a model compiles in the time of one layer. The
    matrix products stay the library's; what compiling gains is the fused element-wise work between them."""
    import torch._dynamo.config as dynamo_config

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    backbone = getattr(inner, getattr(inner, "base_model_prefix", ""), inner)
    layers = getattr(backbone, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(f"train.compile: {type(inner).__name__} has no list of decoder layers at "
                         f"{getattr(inner, 'base_model_prefix', '?')}.layers; set train.compile=false")
    # one graph per mode and a few shape specialisations: more than torch's default of 8 entries per code object
    dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, 32)
    for layer in layers:
        layer.compile(dynamic=True)


def _strategy(cfg: PPOConfig, optim, workers: int):
    return make_strategy(cfg.resolved_strategy(), optim=optim, ds=cfg.deepspeed, total_steps=cfg.optimizer_steps,
                         micro_batch_size=cfg.train.micro_batch_size, grad_accum=cfg.grad_accum(workers),
                         dtype=cfg.model.dtype, use_gpu=cfg.ray.use_ray and cfg.ray.gpus_per_worker > 0)


class PolicyTrainer:
    """π_θ (full or LoRA) with its optimizer, and the reference π_ref (LoRA: the same model, adapter disabled)."""

    def __init__(self, cfg: PPOConfig, model_path: str, workers: int = 1):
        self.cfg, self.model_path = cfg, model_path
        self.strategy = _strategy(cfg, cfg.optim, workers)
        seed_all(cfg.train.seed)
        self.lora = cfg.peft.method == "lora"
        self.ref = None
        if cfg.uses_reference and not self.lora:
            # A frozen full copy, loaded *before* the ZeRO-3 init context so it stays an ordinary module
            # (replicated per rank; a sharded reference would be a second DeepSpeed engine).
            self.ref = load_causal_lm(cfg.model, None, path=model_path).eval().requires_grad_(False)
            self.ref.to(self.strategy.device)
        with self.strategy.model_init_context():
            model = load_causal_lm(cfg.model, cfg.peft, path=model_path)  # dropout off (alignloop.models)
            if self.lora:
                model = apply_peft(model, cfg.peft, model_path)
        self.trainable, self.total = count_parameters(model)
        self.model = self.strategy.prepare(model)
        self.model.train()
        self.on_phase = lambda: None  # called before each training forward and backward (LocalRoles: the thread share)
        for m in (self.strategy.unwrap(), self.ref):
            if m is not None:
                if cfg.stores_frozen_bfloat16:
                    frozen_linears_to_bfloat16(m, bf16_head=not cfg.train.float32_lm_head)
                if cfg.train.autocast and cfg.train.float32_lm_head:
                    float32_head(m.get_output_embeddings())
                contiguous_input(m.get_output_embeddings())
                if cfg.pads_free:
                    padding_free.enable(m)
                if cfg.train.compile:
                    compile_layers(m)

    @property
    def rank(self) -> int:
        return self.strategy.rank

    @property
    def device(self) -> torch.device:
        return self.strategy.device

    # ------------------------------------------------------------------ forward
    def _answer_logits(self, model, exp: Experience) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The logits that predict the answer tokens: (b, A, V) and None, or, padding-free (``train.padding_free``),
        (N, V) for the N real answer tokens in row-major order and the (b, A) mask of the slots they fill.

        Only the last A + 1 positions go through the LM head (columns P-1 .. T-1; the answer_slice is its first
        A): the (P - 1) x V prompt logits nobody reads are never computed; padding-free, not the padded slots either."""
        B, A = exp.response_ids.shape
        with autocast(self.cfg, self.device):
            if self.cfg.packs_rows and B > 1 and repeats_a_prompt(exp):
                inputs, index = packed_inputs(exp, self.device, self.cfg.model.attn_implementation)
                out = model(**inputs, use_cache=False, logits_to_keep=index.flatten())
                return out.logits.view(B, A, -1), None  # (b, A, V)
            if padding_free_applies(self.cfg, exp):
                inputs, where = padding_free_inputs(self.cfg, exp)
                real = exp.mask.bool()
                out = model(**inputs, use_cache=False, logits_to_keep=where[:, exp.answer_slice][real])
                return out.logits[0], real  # (N, V)
            out = model(**exp.model_inputs(), use_cache=False, logits_to_keep=A + 1)
            return out.logits[:, :A], None  # (b, A, V)

    def _answer_logprobs(self, model, exp: Experience, entropy: bool = False):
        """(b, A) log π(a_t|s_t) from :meth:`_answer_logits` (and the entropy, with ``entropy``); 0 on padding
        slots the padding-free forward never computed."""
        logits, real = self._answer_logits(model, exp)
        ids = exp.response_ids if real is None else exp.response_ids[real]
        out = L.logprobs_and_entropy(logits, ids) if entropy else (L.logprobs_from_logits(logits, ids),)
        if real is not None:
            out = tuple(torch.zeros(real.shape, dtype=t.dtype, device=t.device).masked_scatter(real, t) for t in out)
        return out if entropy else out[0]

    def _reference_context(self):
        return self.strategy.unwrap().disable_adapter() if self.lora else contextlib.nullcontext()

    @torch.no_grad()
    def logprobs(self, exp: Experience, reference: bool = False) -> torch.Tensor:
        """(B, A) log π(a_t|s_t) of the current policy, or of the reference; 0 on padding. On the CPU, like every
        tensor a trainer returns (the driver combines them, through Ray or in process)."""
        out, A = [], exp.response_ids.shape[1]
        with self._reference_context() if reference else contextlib.nullcontext():
            model = self.ref if (reference and self.ref is not None) else self.model
            for mb in micro_batches(exp.to(self.device), self.cfg.train.micro_batch_size):
                self.on_phase()  # a core the critic's value pass frees goes to the next micro-batch
                out.append(pad_answers(self._answer_logprobs(model, mb) * mb.mask, A))
        return torch.cat(out).cpu()

    # ------------------------------------------------------------------- update
    def train_mini_batch(self, exp: Experience, global_tokens: float, kl_coef: float, first: bool = False
                         ) -> dict[str, float]:
        """One optimizer step on this rank's share of a mini-batch; returns token-weighted metric sums.

        ``first``: the iteration's first mini-batch, trained before any update since the rollout, so this forward's
        log-probs are π_θold's and the gap to the engine's (``rollout/logprob_diff``) is measured here (the only
        measure of it with ``algo.old_logprobs=rollout``, which runs no separate pass).
        ``exp.old_logprobs is None`` (``algo.reuse_logprobs``: the first mini-batch of the first epoch) also takes
        π_θold from this forward, detached (the same loss and gradient, without a separate no-grad pass), and
        measures its KL to the reference here."""
        a = self.cfg.algo
        exp = exp.to(self.device)
        sums = {"loss/policy": 0.0, "ppo/clipfrac": 0.0, "ppo/approx_kl": 0.0, "ppo/entropy": 0.0, "ppo/kl_loss": 0.0,
                "tokens": 0.0}
        reuse = exp.old_logprobs is None
        measure = first or reuse
        if measure:
            sums.update({"rollout/logprob_diff_sum": 0.0, "rollout/logprob_diff_max": 0.0, "rollout/logprob_diff_tokens": 0.0})
        if reuse:
            sums["ppo/kl_old_sum"] = 0.0
        for mb in micro_batches(exp, self.cfg.train.micro_batch_size):
            self.on_phase()
            lp, entropy = self._answer_logprobs(self.model, mb, entropy=True)  # (b, A) each; the entropy is detached
            old = lp.detach() * mb.mask if reuse else mb.old_logprobs
            if measure:
                gap = (mb.rollout_logprobs - lp.detach()).abs() * mb.mask
                sums["rollout/logprob_diff_sum"] += float(gap.sum())
                sums["rollout/logprob_diff_max"] = max(sums["rollout/logprob_diff_max"], float(gap.max()))
                sums["rollout/logprob_diff_tokens"] += float(mb.mask.sum())
            if reuse and mb.ref_logprobs is not None:  # the KL(π_θold || π_ref) the driver reports and adapts β to
                sums["ppo/kl_old_sum"] += float(L.masked_sum(L.kl_penalty(old, mb.ref_logprobs, a.kl.estimator),
                                                             mb.mask))
            w = L.truncated_is_weights(old, mb.rollout_logprobs, a.is_cap) if a.is_correction else None
            loss, m = L.policy_loss(lp, old, mb.advantages, mb.mask, clip_eps=a.clip_eps,
                                    clip_eps_high=a.clip_eps_high, dual_clip=a.dual_clip, normalizer=global_tokens,
                                    is_weights=w)
            n = float(mb.mask.sum())
            sums["loss/policy"] += float(loss.detach()) * global_tokens
            if not a.kl.in_reward and kl_coef > 0:
                # KL in the loss (GRPO): β·mean_t KL(π_θ || π_ref), gradient through π_θ's log-probs.
                kl = L.masked_sum(L.kl_penalty(lp, mb.ref_logprobs, a.kl.estimator), mb.mask) / global_tokens
                loss = loss + kl_coef * kl
                sums["ppo/kl_loss"] += float(kl.detach()) * global_tokens
            self.on_phase()
            self.strategy.backward(loss)
            sums["ppo/clipfrac"] += m["clipfrac"] * n
            sums["ppo/approx_kl"] += m["approx_kl"] * n
            sums["ppo/entropy"] += float(L.masked_sum(entropy, mb.mask))
            sums["tokens"] += n
        sums["optim/grad_norm"] = self.strategy.step()
        sums["optim/lr"] = self.strategy.lr()
        return sums

    # --------------------------------------------------------------------- sync
    def save_adapter(self, out: str | Path) -> str | None:
        """LoRA: write the adapter (only) to ``out`` on rank 0; a collective under ZeRO-3."""
        model = self.strategy.unwrap()
        params = [p for p in model.parameters() if p.requires_grad]
        ctx = contextlib.nullcontext()
        if getattr(self.strategy, "ds_cfg", None) is not None and self.strategy.ds_cfg.zero_stage == 3:
            import deepspeed

            ctx = deepspeed.zero.GatheredParameters(params, modifier_rank=None)
        with ctx:
            if self.rank == 0:
                model.save_pretrained(str(out))
        return str(out) if self.rank == 0 else None

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Full weights with Hugging Face names on rank 0 (empty elsewhere); a collective under ZeRO-3."""
        return self.strategy.full_state_dict()

    def engine_weights(self) -> dict[str, torch.Tensor]:
        """What a full-weight sync sends the engine (rank 0; a collective under ZeRO-3): the weights, or with LoRA
        (``rollout.lora_sync=merged``) base + scaling·B@A of the adapted layers, under the base model's names,
        computed out of place. Only those: the engine starts from the same base model and nothing else trains, so
        the embeddings, norms and unadapted layers it holds are already right (SmolLM2, all-linear LoRA: 106M of
        135M parameters, and vLLM's CPU reload 0.10 s instead of 0.23-0.32)."""
        sd = self.strategy.full_state_dict()
        if not self.lora or not sd:
            return sd
        from alignloop.merge import merged_lora_state_dict

        return merged_lora_state_dict(sd, self.cfg.peft.lora_alpha / self.cfg.peft.lora_r, only_merged=True)

    def parameters_digest(self) -> dict[str, torch.Tensor]:
        """Trainable parameters, gathered (tests compare ranks/processes with it)."""
        model = self.strategy.unwrap()
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        ctx = contextlib.nullcontext()
        if getattr(self.strategy, "ds_cfg", None) is not None and self.strategy.ds_cfg.zero_stage == 3:
            import deepspeed

            ctx = deepspeed.zero.GatheredParameters([p for _, p in named], modifier_rank=None)
        with ctx:
            return {n: p.detach().clone().cpu() for n, p in named}

    # --------------------------------------------------------------- checkpoint
    def save_checkpoint(self, path: Path, client_state: dict) -> None:
        self.strategy.save_checkpoint(path, client_state)

    def load_checkpoint(self, path: Path) -> dict:
        return self.strategy.load_checkpoint(path)


class ValueModel(nn.Module):
    """V(s_t) for every position: the backbone of a ``*ForSequenceClassification`` model and its scalar ``score`` head."""

    def __init__(self, seq: nn.Module):
        super().__init__()
        self.seq = seq

    def forward(self, input_ids, attention_mask, position_ids, **kwargs) -> torch.Tensor:
        inner = self.seq.get_base_model() if hasattr(self.seq, "get_base_model") else self.seq
        backbone = getattr(inner, inner.base_model_prefix)
        hidden = backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                          use_cache=False, **kwargs).last_hidden_state  # (b, T, d)
        return inner.score(hidden).squeeze(-1).float()  # (b, T)


def load_value_model(cfg: PPOConfig, path: str) -> nn.Module:
    """Backbone + head from a reward model directory (head kept) or from the policy (head freshly initialised)."""
    from transformers import AutoModelForSequenceClassification

    seq = AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=1, dtype=torch_dtype(cfg.model.dtype), attn_implementation=cfg.model.attn_implementation)
    disable_dropout(seq)
    if cfg.peft.method == "lora":
        import peft

        p = cfg.peft
        # SEQ_CLS: LoRA on the backbone, the value head trained fully (modules_to_save).
        seq = peft.get_peft_model(seq, peft.LoraConfig(task_type="SEQ_CLS", r=p.lora_r, lora_alpha=p.lora_alpha,
                                                       lora_dropout=p.lora_dropout, target_modules=p.target_modules))
    return ValueModel(seq)


class CriticTrainer:
    """The value function V_φ: initialised from the reward model when given, else from the policy backbone."""

    def __init__(self, cfg: PPOConfig, model_path: str, workers: int = 1):
        self.cfg = cfg
        self.strategy = _strategy(cfg, cfg.critic.optim, workers)
        seed_all(cfg.train.seed + 1)  # the fresh head's init, independent of the actor's RNG use
        self._path = model_path
        with self.strategy.model_init_context():
            model = load_value_model(cfg, cfg.critic.init_from or model_path)
        if cfg.train.autocast:
            inner = model.seq.get_base_model() if hasattr(model.seq, "get_base_model") else model.seq
            float32_head(inner.score)
        if cfg.stores_frozen_bfloat16:
            frozen_linears_to_bfloat16(model.seq)
        if cfg.pads_free:
            padding_free.enable(model.seq)
        if cfg.train.compile:
            compile_layers(model.seq)
        self.model = self.strategy.prepare(model)
        self.model.train()
        self._kept = None  # values(keep=True)'s output, with its graph, for the next train_mini_batch(reuse=True)

    @property
    def rank(self) -> int:
        return self.strategy.rank

    @property
    def device(self) -> torch.device:
        return self.strategy.device

    def _values(self, exp: Experience) -> torch.Tensor:
        with autocast(self.cfg, self.device):
            if self.cfg.packs_rows and len(exp) > 1 and repeats_a_prompt(exp):  # one packed row (see PolicyTrainer)
                inputs, index = packed_inputs(exp, self.device, self.cfg.model.attn_implementation)
                return self.model(**inputs)[0, index]  # (b, A)
            if padding_free_applies(self.cfg, exp):  # padding slots read a real column's value; masked by the caller
                inputs, where = padding_free_inputs(self.cfg, exp)
                return self.model(**inputs)[0, where[:, exp.answer_slice]]  # (b, A)
            return self.model(**exp.model_inputs())[:, exp.answer_slice]  # (b, A): V(s_t) before answer token t

    def values(self, exp: Experience, keep: bool = False) -> torch.Tensor:
        """(B, A) V_φ(s_t), 0 on padding; on the CPU.

        ``keep`` (``algo.reuse_values``; ``exp`` is this rank's share of the first mini-batch, one micro-batch): the
        forward runs with its graph, which the next ``train_mini_batch(..., reuse=True)`` trains on instead of
        running the same forward again (no update happens in between, and dropout is off)."""
        A = exp.response_ids.shape[1]
        if keep:
            mbs = list(micro_batches(exp.to(self.device), self.cfg.train.micro_batch_size))
            if len(mbs) != 1:
                raise ValueError(f"values(keep=True) takes one micro-batch, got {len(exp)} rows "
                                 f"(train.micro_batch_size {self.cfg.train.micro_batch_size})")
            v = self._values(mbs[0])
            self._kept = v
            return pad_answers(v.detach() * mbs[0].mask, A).cpu()
        with torch.no_grad():
            mbs = micro_batches(exp.to(self.device), self.cfg.train.micro_batch_size)
            return torch.cat([pad_answers(self._values(mb) * mb.mask, A) for mb in mbs]).cpu()

    def train_mini_batch(self, exp: Experience, global_tokens: float, reuse: bool = False) -> dict[str, float]:
        """One optimizer step on this rank's share of a mini-batch; ``reuse``: its forward is the one the last
        ``values(keep=True)`` kept (the same rows)."""
        exp = exp.to(self.device)
        sums = {"loss/value": 0.0, "ppo/value_clipfrac": 0.0, "tokens": 0.0}
        kept, self._kept = self._kept, None
        if reuse and kept is None:
            raise RuntimeError("train_mini_batch(reuse=True) without a kept value pass (values(keep=True))")
        for mb in micro_batches(exp, self.cfg.train.micro_batch_size):
            v = kept if reuse else self._values(mb)
            if reuse and v.shape != mb.mask.shape:
                raise RuntimeError(f"kept value pass {tuple(v.shape)} does not match the mini-batch {tuple(mb.mask.shape)}")
            loss, m = L.value_loss(v, mb.values, mb.returns, mb.mask, clip_eps=self.cfg.algo.value_clip,
                                   normalizer=global_tokens)
            self.strategy.backward(loss)
            n = float(mb.mask.sum())
            sums["loss/value"] += float(loss.detach()) * global_tokens
            sums["ppo/value_clipfrac"] += m["value_clipfrac"] * n
            sums["tokens"] += n
        sums["critic/grad_norm"] = self.strategy.step()
        return sums

    def parameters_digest(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().clone().cpu() for n, p in self.strategy.unwrap().named_parameters() if p.requires_grad}

    def save_final(self, out: Path, tokenizer_dir: str | None = None) -> None:
        """The trained value model as a plain HF ``*ForSequenceClassification`` (LoRA merged) in ``out``: loadable with
        ``AutoModelForSequenceClassification`` and usable as ``critic.init_from`` of the next run.

        Every rank must call it: the full weights are gathered collectively (ZeRO-3). Rank 0 then builds a fresh,
        unsharded CPU copy of the same structure with ZeRO-3 integration switched off (else transformers would
        partition it, a collective rank 0 cannot run alone), loads the weights, merges LoRA and saves."""
        sd = self.strategy.full_state_dict()
        if self.rank != 0:
            return
        sd = {k[len("seq."):]: v for k, v in sd.items() if k.startswith("seq.")}
        with self.strategy.unsharded_init_context():
            fresh = load_value_model(self.cfg, self.cfg.critic.init_from or self._path).seq  # same structure
            missing, unexpected = fresh.load_state_dict(sd, strict=False)
            if unexpected or [k for k in missing if "lora" in k or "score" in k]:
                raise RuntimeError(f"critic export: state dict mismatch (missing {missing[:5]}, unexpected {unexpected[:5]})")
            if hasattr(fresh, "merge_and_unload"):
                fresh = fresh.merge_and_unload()
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        fresh.save_pretrained(out, safe_serialization=True)
        if tokenizer_dir:
            from transformers import AutoTokenizer

            AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(out)

    def save_checkpoint(self, path: Path, client_state: dict) -> None:
        self.strategy.save_checkpoint(path, client_state)

    def load_checkpoint(self, path: Path) -> dict:
        return self.strategy.load_checkpoint(path)
