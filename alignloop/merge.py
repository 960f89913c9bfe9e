"""Merging a trained adapter into its base model (Hugging Face format that transformers and vLLM load)."""

from __future__ import annotations

from pathlib import Path

MERGEABLE = ("lora", "qlora", "ia3")


def merge_adapter(base_path: str, adapter_dir: Path, out_dir: Path, dtype: str = "float32") -> Path:
    """Load the base in full precision (also for QLoRA: merging into 4-bit weights would re-quantize), merge, save."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from alignloop.models import torch_dtype

    base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch_dtype(dtype))
    merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    merged.save_pretrained(out_dir, safe_serialization=True)
    AutoTokenizer.from_pretrained(str(adapter_dir)).save_pretrained(out_dir)
    return out_dir


def merged_lora_state_dict(state_dict: dict, scaling: float, adapter: str = "default", only_merged: bool = False) -> dict:
    """A peft LoRA model's state dict -> the merged model's, with the base model's (Hugging Face checkpoint) names.

    ``W + scaling · B @ A`` for every ``<m>.base_layer.weight`` with ``<m>.lora_A/B.<adapter>.weight`` beside it
    (``scaling = lora_alpha / r``); other weights pass through (``only_merged``: are left out, as nothing but the
    adapter trains: a rollout engine that holds the base model needs only the merged layers); the peft prefix and
    ``.base_layer`` are dropped.
    Out of place: the trainer's weights are untouched (an in-place merge/unmerge would drift the base, and with it
    the adapter-disabled reference). Works on any gathered state dict (single process or ZeRO-3 rank 0).
    """
    import torch

    prefix = "base_model.model."
    out = {}
    for key, value in state_dict.items():
        if ".lora_" in key:
            continue
        name = key[len(prefix):] if key.startswith(prefix) else key
        if name.endswith(".base_layer.weight"):
            stem = key[: -len(".base_layer.weight")]
            a, b = state_dict.get(f"{stem}.lora_A.{adapter}.weight"), state_dict.get(f"{stem}.lora_B.{adapter}.weight")
            if a is None or b is None:
                raise KeyError(f"{key}: no LoRA A/B weights for adapter {adapter!r} beside it")
            # one fused pass, no (out, in) temporaries: W + scaling·B@A in float32, rounded once to W's dtype
            value = torch.addmm(value.float(), b.float(), a.float(), alpha=scaling).to(value.dtype)
            name = name[: -len(".base_layer.weight")] + ".weight"
        elif only_merged:
            continue
        elif name.endswith(".base_layer.bias"):
            name = name[: -len(".base_layer.bias")] + ".bias"
        out[name] = value
    return out
