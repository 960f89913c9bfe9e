"""Tiny models and data made on the fly, for tests and smoke runs (no downloads)."""

from __future__ import annotations

import json
from pathlib import Path

from alignloop.models import DEFAULT_CHAT_TEMPLATE

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Write a short poem about the sea. The sea is blue and wide.",
    "Translate to French: hello -> bonjour. Summarize: cats sleep a lot.",
    "Answer: yes. Answer: no. The answer is 2 because 1+1=2.",
    "user assistant system instruction input output",
    "0 1 2 3 4 5 6 7 8 9 + - * / = ? ! , . : ; ' \" ( ) [ ] { }",
]


def build_tokenizer(out: Path, vocab_size: int = 400):
    """A byte-level BPE tokenizer (any text encodes) with ChatML special tokens and a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(CORPUS * 5, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                  pad_token="<|endoftext|>", unk_token="<|endoftext|>")
    tok.chat_template = DEFAULT_CHAT_TEMPLATE
    tok.save_pretrained(out)
    return tok


def build_tiny_llama(out: str | Path, seed: int = 0, layers: int = 2, hidden: int = 128, heads: int = 2,
                     vocab_size: int = 400, tie_word_embeddings: bool = False) -> Path:
    """A random Llama with head_dim 64 (vLLM's CPU attention needs 32/64/80/...), saved with its tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(out, vocab_size)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=heads, head_dim=hidden // heads,
                      max_position_embeddings=512, tie_word_embeddings=tie_word_embeddings, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, torch_dtype="float32")
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(out, safe_serialization=True)
    return out


def write_instruction_data(path: str | Path, n: int = 32, marker: str = "Done.") -> Path:
    """Instruction records whose answers all end with ``marker`` (a pattern a tiny model learns fast)."""
    rows = []
    for i in range(n):
        a, b = i % 7, (i * 3) % 5
        rows.append({"instruction": f"Add {a} and {b}.", "input": "" if i % 2 else f"{a} + {b}",
                     "output": f"The answer is {a + b}. {marker}"})
    path = Path(path)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
