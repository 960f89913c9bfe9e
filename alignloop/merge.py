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
