"""Rollout engines: one generation interface, two implementations (vLLM and transformers).

The SFT ``synth`` command generates through it now; the PPO stage will reuse it
for rollouts, which is why the interface speaks token ids, returns the log-prob
of every sampled token, and takes weight updates and LoRA adapters.

Conventions shared by both engines, so their outputs are interchangeable:

- Prompts are tokenized here with the model's Hugging Face tokenizer, never by
  the engine: a plain string with the tokenizer's default special tokens
  (``add_special_tokens=True``), a chat conversation rendered by the chat
  template (which carries its own special tokens, so none are added). Both
  engines therefore see the same prompt ids.
- ``Completion.token_ids`` are the generated ids, cut after the first stop token
  (EOS, inclusive) or after the token that completes a stop string. ``text`` is
  decoded here from those ids without special tokens and ends before the stop
  string. ``finish_reason`` is ``"stop"`` (EOS or stop string) or ``"length"``.
- ``Completion.logprobs[t] = log softmax(z_t)[a_t]`` where ``z_t`` are the *raw*
  logits of the model at step t: before temperature, top-k and top-p (vLLM's
  ``logprobs_mode="raw_logprobs"``). That is log π_θ(a_t|s_t) of the model at
  temperature 1, independent of the sampling settings, which is what PPO's
  importance ratio and KL terms compare against a training forward pass (a
  trainer that samples at temperature T divides its own logits by T and
  recomputes; the engines' numbers stay comparable across settings).
- Seeds make one engine reproducible with itself, not the two engines equal to
  each other when sampling (their random streams differ); greedy decoding
  (``temperature == 0``) is deterministic and agrees across engines.

Everything runs in the calling process (no Ray here): PPO wraps an engine in a
thin Ray actor.
"""

from __future__ import annotations

import abc
import contextlib
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Sequence

if TYPE_CHECKING:
    import torch

EngineKind = Literal["vllm", "hf", "auto"]


@dataclass(frozen=True)
class SamplingSettings:
    """How to sample; ``temperature == 0`` means greedy (top_p/top_k ignored)."""

    max_new_tokens: int = 64  # A upper bound on generated tokens per sample
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0  # nucleus mass kept (1.0 = off)
    top_k: int = 0  # keep the k most likely tokens (0 = off)
    n: int = 1  # samples per prompt
    seed: int | None = None  # reproducible sampling within one engine
    stop: tuple[str, ...] = ()  # stop strings (cut before them in text, after them in token_ids)

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if self.n < 1:
            raise ValueError(f"n must be >= 1, got {self.n}")
        if isinstance(self.stop, str):  # a single string is a common slip
            object.__setattr__(self, "stop", (self.stop,))
        else:
            object.__setattr__(self, "stop", tuple(self.stop))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass
class Completion:
    """One sample for one prompt."""

    prompt_token_ids: list[int]  # (P,) the prompt as the engine saw it
    token_ids: list[int]  # (A,) generated ids, cut after EOS / the stop-string token (inclusive)
    text: str  # decoded token_ids without special tokens, cut before a stop string
    logprobs: list[float]  # (A,) log π(a_t|s_t) from the raw logits (temperature 1, no top-k/top-p)
    finish_reason: Literal["stop", "length"]

    @property
    def cumulative_logprob(self) -> float:
        return float(sum(self.logprobs))


def _stop_token_ids(tokenizer, generation_config=None) -> list[int]:
    """EOS ids: the tokenizer's plus the model's generation config (SmolLM2 lists several)."""
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    eos = getattr(generation_config, "eos_token_id", None) if generation_config is not None else None
    if isinstance(eos, int):
        ids.add(eos)
    elif isinstance(eos, (list, tuple)):
        ids.update(int(x) for x in eos)
    return sorted(ids)


def _generation_config(path: str):
    from transformers import GenerationConfig

    try:
        return GenerationConfig.from_pretrained(path)
    except OSError:  # no generation_config.json: the tokenizer's EOS alone
        return None


def finish(tokenizer, prompt_ids: list[int], ids: Sequence[int], logprobs: Sequence[float], eos_ids: Sequence[int],
           stop: Sequence[str]) -> Completion:
    """Apply the shared cut rules (EOS inclusive, then stop strings) to raw engine output."""
    ids, logprobs = list(ids), list(logprobs)
    reason: Literal["stop", "length"] = "length"
    eos = set(eos_ids)
    for t, tid in enumerate(ids):
        if tid in eos:
            ids, logprobs, reason = ids[: t + 1], logprobs[: t + 1], "stop"
            break
    text = tokenizer.decode(ids, skip_special_tokens=True)
    if stop:
        hits = [(text.find(s), s) for s in stop if s and s in text]
        if hits:
            pos, s = min(hits)
            # Smallest k whose decoded prefix already contains the stop string (decoded length grows with k).
            lo, hi = 1, len(ids)
            while lo < hi:
                mid = (lo + hi) // 2
                if len(tokenizer.decode(ids[:mid], skip_special_tokens=True)) >= pos + len(s):
                    hi = mid
                else:
                    lo = mid + 1
            ids, logprobs, text, reason = ids[:lo], logprobs[:lo], text[:pos], "stop"
    return Completion(list(prompt_ids), ids, text, logprobs, reason)


class RolloutEngine(abc.ABC):
    """Generation for synth and PPO. Subclasses set ``self.tokenizer`` and implement the abstract methods."""

    tokenizer = None
    kind: str = "?"

    # ------------------------------------------------------------------ prompts
    def encode(self, prompts: Sequence[str] | Sequence[Sequence[int]]) -> list[list[int]]:
        """Prompt strings (tokenizer's default special tokens) or id lists -> id lists."""
        out: list[list[int]] = []
        for p in prompts:
            if isinstance(p, str):
                out.append(list(self.tokenizer(p)["input_ids"]))
            else:
                ids = [int(x) for x in p]
                if not ids:
                    raise ValueError("empty prompt (no token ids)")
                out.append(ids)
        return out

    def apply_chat_template(self, messages: list[dict]) -> list[int]:
        """A conversation ending with a user turn -> prompt ids with the assistant generation prompt."""
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def generate_chat(self, messages_list: Sequence[list[dict]], settings: SamplingSettings) -> list[list[Completion]]:
        return self.generate([self.apply_chat_template(m) for m in messages_list], settings)

    # ---------------------------------------------------------------- interface
    @abc.abstractmethod
    def generate(self, prompts: Sequence[str] | Sequence[Sequence[int]], settings: SamplingSettings) -> list[list[Completion]]:
        """Outer list: prompts in order; inner list: ``settings.n`` samples."""

    @abc.abstractmethod
    def update_weights(self, state_dict: "dict[str, torch.Tensor]") -> None:
        """Replace base-model weights, names as in the Hugging Face checkpoint (all of them, or a subset: the
        others keep their values)."""

    @abc.abstractmethod
    def load_lora(self, adapter_dir: str | Path | None) -> None:
        """Use this peft LoRA adapter for the following generations (None: back to the base model)."""

    def close(self) -> None:
        """Release the model (idempotent)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# ---------------------------------------------------------------------- vLLM
_NARROWING = "Attempted to load weight %s with dtype %s into parameter with dtype %s"


def _drop_narrowing(record) -> bool:
    """Keep every record but vLLM's per-weight notice that a wider checkpoint tensor goes into a narrower parameter
    (float32 -> bfloat16). An engine gets a narrower dtype only when asked to (``rollout.dtype``), so the notice,
    one line per weight at load and formerly on every sync, says nothing the user did not ask for."""
    return not (record.msg == _NARROWING and len(record.args or ()) == 3
                and getattr(record.args[1], "itemsize", 0) > getattr(record.args[2], "itemsize", 0))


_NOT_LOADED = "%s: Failed to load weights"


def _drop_rotary_not_loaded(record) -> bool:
    """Keep every record but the reload's notice that a rotary-embedding module got no weights. It has none to get:
    its cos/sin cache is computed, in no checkpoint, and the reload puts the existing one back. The notice came once
    per weight sync, i.e. every PPO step; the same notice for any other module still shows."""
    return not (record.msg == _NOT_LOADED and len(record.args or ()) == 1
                and str(record.args[0]).endswith("RotaryEmbedding"))


def _drop_subset_not_loaded(record) -> bool:
    """Installed only while ``update_weights`` reloads a subset (a LoRA merge sends only the adapted layers, the engine
    keeps the rest): vLLM's in-place reload would list every other weight as "not loaded from checkpoint" on each
    sync. A full reload that misses a weight still says so."""
    return "were not loaded from checkpoint" not in str(record.msg)


def _drop_not_loaded(record) -> bool:
    """Installed only while ``update_weights`` reloads a subset of the checkpoint's tensors (a LoRA merge sends the
    adapted layers; the norms, embedding and head keep theirs): every module it sends nothing drew one "Failed to load
    weights" notice per sync, 63 lines per PPO step for SmolLM2. A module whose tensors were sent and did not load
    would not log this (its load fails instead), so nothing real is hidden; a full reload keeps the notice."""
    return record.msg != _NOT_LOADED


_THREAD_BINDING = "CPU backend doesn't allow to use `torch.set_num_threads` after the thread binding, skip it."


def _drop_thread_binding(record) -> bool:
    return record.msg != _THREAD_BINDING


def _checkpoint_names(model_path: str) -> frozenset[str] | None:
    """The tensor names of a local safetensors checkpoint (None when it is not one: reloads then count as full)."""
    import json

    root = Path(model_path)
    index = root / "model.safetensors.index.json"
    try:
        if index.is_file():
            return frozenset(json.loads(index.read_text())["weight_map"])
        files = sorted(root.glob("*.safetensors"))
        if not files:
            return None
        from safetensors import safe_open

        names = set()
        for f in files:
            with safe_open(str(f), framework="pt") as h:
                names.update(h.keys())
        return frozenset(names)
    except (OSError, ValueError, KeyError):
        return None


def _quiet_expected_notices() -> None:
    for name, keep in (("vllm.model_executor.models.utils", _drop_narrowing),
                       ("vllm.model_executor.model_loader.reload.layerwise", _drop_rotary_not_loaded)):
        log = logging.getLogger(name)
        if keep not in log.filters:
            log.addFilter(keep)


@contextlib.contextmanager
def _dropping(*filters):
    """``(logger name, filter)`` pairs installed for the duration of the block only (vLLM notices about what a call
    of ours does on purpose; the same notice at any other time still shows)."""
    logs = [(logging.getLogger(name), keep) for name, keep in filters]
    for log, keep in logs:
        log.addFilter(keep)
    try:
        yield
    finally:
        for log, keep in logs:
            log.removeFilter(keep)


class VLLMEngine(RolloutEngine):
    """vLLM's offline ``LLM`` in this process (CPU build here; the official wheel on GPU machines)."""

    kind = "vllm"

    def __init__(self, model_path: str | Path, dtype: str = "float32", seed: int = 0, max_model_len: int = 2048,
                 enable_lora: bool = False, max_lora_rank: int = 16, chat_template: str | None = None,
                 gpu_memory_utilization: float = 0.5, **llm_kwargs):
        # Must be set before vLLM starts its engine: one process (about 2 s start instead of 15-25 s) and
        # a KV cache in GiB sized for these machines. A caller's own setting wins.
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        _quiet_expected_notices()
        from vllm import LLM

        from alignloop.models import load_tokenizer

        self.model_path = str(model_path)
        self.tokenizer = load_tokenizer(self.model_path, chat_template)
        kwargs = dict(model=self.model_path, dtype=dtype, seed=seed, max_model_len=max_model_len,
                      enforce_eager=True,  # no CUDA graphs / torch.compile: starts fast (rollout.compile turns them on)
                      logprobs_mode="raw_logprobs",  # see the module docstring
                      enable_lora=enable_lora, gpu_memory_utilization=gpu_memory_utilization)
        if enable_lora:
            kwargs.update(max_lora_rank=max_lora_rank, max_loras=1)
        from vllm.platforms import current_platform

        if enable_lora and dtype == "float32" and current_platform.is_cuda():
            from alignloop.config import ConfigError

            # vLLM's CUDA LoRA kernels (lora/ops/triton_ops/lora_shrink_op.py) assert float16/bfloat16 inputs: fail
            # here with the fix rather than at the first generate. (The CPU build runs LoRA in float32.)
            raise ConfigError("vLLM's CUDA LoRA kernels take float16/bfloat16 only: set rollout.dtype=bfloat16 (the "
                              "engine alone) or model.dtype=bfloat16 for LoRA rollouts on a GPU (or peft.method=full, "
                              "or rollout.lora_sync=merged)")
        if current_platform.is_cpu():
            # vLLM 0.32 CPU: when a step's prompts exceed the token budget, chunked prefill splits one and rewinds
            # that request's seeded generator (Generator.set_offset), which CPU generators refuse ("CPU Generator
            # does not use offset"). Whole-prompt prefill never rewinds; the budget must then hold one prompt.
            kwargs.update(enable_chunked_prefill=False, max_num_batched_tokens=max(max_model_len, 4096))
        kwargs.update(llm_kwargs)
        # While it starts, vLLM's CPU worker replaces torch.set_num_threads with a no-op that warns, and vLLM's own
        # start-up then calls it four times: four warnings about vLLM's calls, none about the user's. Only those go;
        # a later call (the user's, whose thread count is then not applied) still warns.
        with _dropping(("vllm.v1.worker.cpu_worker", _drop_thread_binding)):
            self.llm = LLM(**kwargs)
        # the dtype vLLM resolved for its weights (a float32 trainer may feed a bfloat16 engine)
        self.weight_dtype = getattr(getattr(self.llm.llm_engine, "model_config", None), "dtype", None)
        self.enable_lora = enable_lora
        self._cpu = current_platform.is_cpu()
        self.eos_ids = _stop_token_ids(self.tokenizer, _generation_config(self.model_path))
        self._lora = None
        self._lora_id = 0
        self._checkpoint = _checkpoint_names(self.model_path)  # to tell a subset reload from a full one

    def _params(self, s: SamplingSettings):
        from vllm import SamplingParams

        common = dict(n=s.n, max_tokens=s.max_new_tokens, logprobs=0, stop=list(s.stop) or None,
                      stop_token_ids=self.eos_ids, detokenize=bool(s.stop), skip_special_tokens=True)
        if s.greedy:
            return lambda seed: SamplingParams(temperature=0.0, **common)
        return lambda seed: SamplingParams(temperature=s.temperature, top_p=s.top_p, top_k=s.top_k, seed=seed, **common)

    def generate(self, prompts, settings: SamplingSettings) -> list[list[Completion]]:
        ids = self.encode(prompts)
        make = self._params(settings)
        # vLLM seeds the j-th of n samples with (request seed + j), so request i gets seed + i*n: every sample in
        # the call has its own random stream (with seed + i, sample j of prompt i and sample j-1 of prompt i+1
        # would share one and come out near-identical on a flat distribution).
        n = settings.n
        params = [make(None if settings.seed is None else settings.seed + i * n) for i in range(len(ids))]
        outs = self.llm.generate([{"prompt_token_ids": p} for p in ids], params, lora_request=self._lora, use_tqdm=False)
        result = []
        for p, out in zip(ids, outs):
            samples = []
            for o in sorted(out.outputs, key=lambda o: o.index):
                lps = [d[t].logprob for t, d in zip(o.token_ids, o.logprobs)]
                samples.append(finish(self.tokenizer, p, o.token_ids, lps, self.eos_ids, settings.stop))
            result.append(samples)
        return result

    def update_weights(self, state_dict) -> None:
        # vLLM's CPU build repacks linear weights for its kernels after loading, so model.load_weights on the
        # live model fails; reload_weights re-runs the loader's per-layer processing (checkpoint names, fused
        # qkv/gate_up handled by the model's own load_weights) and resets the LoRA cache.
        # Cast once, here, to the engine's dtype: given float32 tensors, a bfloat16 engine casts each itself and logs
        # a warning per weight on every sync.
        dt = self.weight_dtype

        def engine_form(v):
            v = v.detach()
            return v.to("cpu", dtype=dt) if dt is not None and v.is_floating_point() else v.to("cpu")

        weights = [(k, engine_form(v)) for k, v in state_dict.items()]
        import torch

        # On a CPU the reload is ~900 small copies and a oneDNN handle per linear layer, which more OpenMP threads
        # only slow down: 0.24 s at one thread against 0.34 at two (SmolLM2, bfloat16 engine, 2 cores). The casts
        # above are large and keep the caller's threads. (torch._C's setter: vLLM's CPU backend no-ops torch's.)
        threads = torch.get_num_threads()
        if self._cpu:
            torch._C.set_num_threads(1)
        subset = self._checkpoint is not None and not self._checkpoint.issubset(state_dict)
        quiet = (("vllm.model_executor.model_loader.reload.layerwise", _drop_not_loaded),
                 ("vllm.model_executor.model_loader.reload.inplace", _drop_subset_not_loaded)) if subset else ()
        try:
            with _dropping(*quiet):
                self.llm.collective_rpc("reload_weights",
                                        kwargs={"weights_iterator": iter(weights), "is_checkpoint_format": True})
        finally:
            torch._C.set_num_threads(threads)

    def load_lora(self, adapter_dir) -> None:
        if adapter_dir is None:
            self._lora = None
            return
        if not self.enable_lora:
            raise ValueError("VLLMEngine was started without enable_lora=True; cannot load a LoRA adapter")
        from vllm.lora.request import LoRARequest

        path = Path(adapter_dir)
        if not (path / "adapter_config.json").is_file():
            raise FileNotFoundError(f"{path}: no adapter_config.json (not a peft adapter directory)")
        # A fresh id per load: vLLM caches adapters by id, and the same directory may hold new weights.
        self._lora_id += 1
        self._lora = LoRARequest(f"adapter-{self._lora_id}", self._lora_id, str(path.resolve()))

    def close(self) -> None:
        llm = getattr(self, "llm", None)
        if llm is None:
            return
        try:
            llm.llm_engine.engine_core.shutdown()
        except Exception:  # noqa: BLE001 - best effort; the in-process core has little to release
            pass
        self.llm = None
        import gc

        gc.collect()


# -------------------------------------------------------------- transformers
class HFEngine(RolloutEngine):
    """transformers ``generate``: the fallback and the reference the vLLM engine is tested against."""

    kind = "hf"

    def __init__(self, model_or_path, tokenizer=None, dtype: str = "float32", seed: int = 0, batch_size: int = 16,
                 chat_template: str | None = None):
        import torch
        from transformers import AutoModelForCausalLM

        from alignloop.models import disable_dropout, load_tokenizer, torch_dtype

        if isinstance(model_or_path, (str, Path)):
            self.model_path = str(model_or_path)
            from alignloop.strategy import train_device

            self.model = AutoModelForCausalLM.from_pretrained(self.model_path, dtype=torch_dtype(dtype))
            self.model.to(train_device())  # the GPU when there is one; a given model stays where it is
        else:
            self.model = model_or_path
            self.model_path = getattr(self.model.config, "_name_or_path", None)
        if tokenizer is None:
            if not self.model_path:
                raise ValueError("HFEngine with a model object needs tokenizer=")
            tokenizer = load_tokenizer(self.model_path, chat_template)
        self.tokenizer = tokenizer
        self.model.eval()
        disable_dropout(self.model)
        self.batch_size = batch_size
        self.seed = seed
        self.eos_ids = _stop_token_ids(tokenizer, getattr(self.model, "generation_config", None))
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_ids[0]
        self._adapter: str | None = None
        self._torch = torch

    @property
    def device(self):
        return next(self.model.parameters()).device

    def _gen_config(self, s: SamplingSettings):
        from transformers import GenerationConfig

        # A complete config, so the model's own generation_config.json (temperature, top_p...) never leaks in.
        kw = dict(max_new_tokens=s.max_new_tokens, num_return_sequences=s.n, eos_token_id=self.eos_ids,
                  pad_token_id=self.pad_id, return_dict_in_generate=True, output_logits=True, use_cache=True)
        if s.greedy:
            return GenerationConfig(do_sample=False, num_beams=1, **kw)
        return GenerationConfig(do_sample=True, temperature=s.temperature, top_p=s.top_p, top_k=s.top_k, **kw)

    def generate(self, prompts, settings: SamplingSettings) -> list[list[Completion]]:
        torch = self._torch
        ids = self.encode(prompts)
        gcfg = self._gen_config(settings)
        stop_kw = {"stop_strings": list(settings.stop), "tokenizer": self.tokenizer} if settings.stop else {}
        result: list[list[Completion]] = []
        for start in range(0, len(ids), self.batch_size):
            chunk = ids[start:start + self.batch_size]
            width = max(len(p) for p in chunk)
            # Left padding: every prompt ends at the same column, so new tokens append in lockstep.
            input_ids = torch.tensor([[self.pad_id] * (width - len(p)) + p for p in chunk], device=self.device)  # (B, P)
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk], device=self.device)  # (B, P)
            # A private RNG stream: seeding must not disturb the caller's (e.g. a trainer's) global RNG.
            with torch.no_grad(), torch.random.fork_rng(devices=[]):
                if settings.seed is not None:
                    torch.manual_seed(settings.seed + start)
                out = self.model.generate(input_ids=input_ids, attention_mask=mask, generation_config=gcfg, **stop_kw)
            new = out.sequences[:, width:]  # (B*n, A)
            # output_logits are the raw logits before temperature/top-k/top-p: see the module docstring.
            logits = torch.stack(out.logits, dim=1).float()  # (B*n, A, V)
            lps = torch.log_softmax(logits, dim=-1).gather(-1, new[..., None]).squeeze(-1)  # (B*n, A)
            for i, p in enumerate(chunk):
                samples = []
                for j in range(settings.n):
                    row = i * settings.n + j
                    samples.append(finish(self.tokenizer, p, new[row].tolist(), lps[row].tolist(), self.eos_ids,
                                          settings.stop))
                result.append(samples)
        return result

    def score(self, prompt_token_ids: Sequence[int], token_ids: Sequence[int]) -> list[float]:
        """log π(a_t|s_t) of given completion tokens under the current model (one forward pass, raw logits)."""
        torch = self._torch
        full = torch.tensor([list(prompt_token_ids) + list(token_ids)], device=self.device)  # (1, T)
        with torch.no_grad():
            logits = self.model(input_ids=full).logits.float()  # (1, T, V)
        p = len(prompt_token_ids)
        lp = torch.log_softmax(logits[0, p - 1:-1], dim=-1)  # (A, V): position t predicts token t+1
        return lp.gather(-1, full[0, p:, None]).squeeze(-1).tolist()

    def _base(self):
        return self.model.get_base_model() if self._adapter is not None else self.model

    def update_weights(self, state_dict) -> None:
        torch = self._torch
        adapter = self._adapter
        if adapter is not None:
            self.load_lora(None)
        params = dict(self.model.named_buffers())
        params.update(self.model.state_dict(keep_vars=True))  # every name, also a tied one (lm_head = embeddings)
        unknown = [k for k in state_dict if k not in params]
        if unknown:
            raise KeyError(f"update_weights: unknown parameter names {unknown[:5]}{'...' if len(unknown) > 5 else ''}")
        with torch.no_grad():
            for k, v in state_dict.items():
                params[k].copy_(v.to(params[k].dtype))
        if adapter is not None:
            self.load_lora(adapter)

    def load_lora(self, adapter_dir) -> None:
        if self._adapter is not None:
            # Remove the LoRA layers without merging: the base weights come back untouched.
            self.model = self.model.unload()
            self._adapter = None
        if adapter_dir is None:
            return
        from peft import PeftModel

        path = Path(adapter_dir)
        if not (path / "adapter_config.json").is_file():
            raise FileNotFoundError(f"{path}: no adapter_config.json (not a peft adapter directory)")
        self.model = PeftModel.from_pretrained(self.model, str(path))
        self.model.eval()
        self._adapter = str(path)

    def close(self) -> None:
        self.model = None


# ------------------------------------------------------------------- factory
def vllm_available() -> bool:
    try:
        import vllm  # noqa: F401
    except Exception:  # noqa: BLE001 - a broken install counts as unavailable
        return False
    return True


def make_engine(kind: EngineKind, model_path: str | Path, *, dtype: str = "float32", seed: int = 0,
                max_model_len: int = 2048, enable_lora: bool = False, max_lora_rank: int = 16,
                chat_template: str | None = None, batch_size: int = 16, compile: bool = False) -> RolloutEngine:
    """``vllm``, ``hf``, or ``auto`` (vLLM when it imports, else transformers with a one-line notice).
    ``compile``: vLLM compiles its model (``enforce_eager=False``); transformers generate ignores it."""
    if kind == "auto":
        if vllm_available():
            kind = "vllm"
        else:
            print("[alignloop] vLLM is not importable; generating with transformers (engine=hf)", file=sys.stderr)
            kind = "hf"
    if kind == "vllm":
        return VLLMEngine(model_path, dtype=dtype, seed=seed, max_model_len=max_model_len, enable_lora=enable_lora,
                          max_lora_rank=max_lora_rank, chat_template=chat_template, enforce_eager=not compile)
    if kind == "hf":
        return HFEngine(model_path, dtype=dtype, seed=seed, batch_size=batch_size, chat_template=chat_template)
    raise ValueError(f"engine: unknown kind {kind!r} (vllm | hf | auto)")
