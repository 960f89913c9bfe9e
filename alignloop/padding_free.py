"""Padding-free forward passes over ragged batches: the matrix products see only real tokens.

A micro-batch of rollouts is ragged: prompts of different lengths, answers of different lengths. Padded to
(B, T), every linear layer, norm and MLP also runs on the padding (on SmolLM2 PPO mini-batches 10-15% of the
columns). Here the real tokens of all rows go through the model as one row of L tokens, and only the attention
puts them back into their (B, T) rows: :func:`enable` registers a Hugging Face attention function (the model's
own eager or SDPA attention, wrapped) which scatters the packed queries, keys and values into the padded layout,
attends there with the usual causal + key-padding mask, and gathers the real rows back. The attention's cost is
that of the padded batch (B·T², small beside the linear layers at these lengths); everything else costs L instead
of B·T.

The result is the padded batch's (the same mask over the same layout), computed with differently shaped matrix
products: equal to float rounding. On a GPU, flash-attention's varlen kernels do the same without the scatter.

Called with a 2-D attention mask (no ``padfree_index``), a model with the wrapped attention behaves exactly as
before: the wrapper hands everything to the model's own attention.
"""

from __future__ import annotations

import sys

import torch
from torch import nn

PREFIX = "alignloop_padfree_"
BASES = ("eager", "sdpa")


def _base_attention(module: nn.Module, base: str):
    if base == "sdpa":
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward
    fn = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)  # the model's own
    if fn is None:
        raise ValueError(f"padding-free attention: {type(module).__module__} has no eager_attention_forward")
    return fn


def _wrapped(base: str):
    def attention(module, query, key, value, attention_mask, *args, padfree_index=None, **kwargs):
        fn = _base_attention(module, base)
        if padfree_index is None:
            return fn(module, query, key, value, attention_mask, *args, **kwargs)
        B, T = attention_mask.shape[0], attention_mask.shape[-1]

        def rows(x):  # (1, h, L, d) packed -> (B, h, T, d) in the padded layout, zeros on padding
            h, d = x.shape[1], x.shape[3]
            flat = x.new_zeros(B * T, h, d).index_copy(0, padfree_index, x[0].transpose(0, 1))
            return flat.view(B, T, h, d).transpose(1, 2)

        out, _ = fn(module, rows(query), rows(key), rows(value), attention_mask, *args, **kwargs)  # (B, T, h, d)
        return out.reshape(B * T, *out.shape[2:]).index_select(0, padfree_index).unsqueeze(0), None  # (1, L, h, d)

    return attention


def enable(model: nn.Module) -> None:
    """Switch ``model`` (a transformers ``PreTrainedModel``; PEFT-wrapped is fine) to the padding-free wrapper of its
    eager or SDPA attention. Idempotent."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    current = inner.config._attn_implementation
    if current.startswith(PREFIX):
        return
    if current not in BASES:
        raise ValueError(f"train.padding_free needs model.attn_implementation eager or sdpa, got {current!r}")
    name = PREFIX + current
    if name not in AttentionInterface._global_mapping:
        AttentionInterface.register(name, _wrapped(current))
        # the base's mask function, so a 2-D mask (plain padded calls) becomes the mask the base expects
        ALL_MASK_ATTENTION_FUNCTIONS.register(name, ALL_MASK_ATTENTION_FUNCTIONS[current])
    inner.set_attn_implementation(name)


def float_mask(attn_implementation: str) -> bool:
    """Eager attention adds its mask to the scores (a float mask); SDPA takes a boolean one."""
    return attn_implementation.removeprefix(PREFIX) == "eager"


def inputs(input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor, additive: bool,
           dtype: torch.dtype = torch.float32) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Padded (B, T) model inputs -> the padding-free ones, and ``where`` (B, T): each padded column's index in the
    packed row (a padding column gets the index of the real token before it, or 0).

    Returns ``input_ids``/``position_ids`` (1, L) of the L real tokens in row-major order, ``padfree_index`` (L,)
    their flat (B·T) positions, and a 4-D ``attention_mask`` (B, 1, T, T) over the padded layout: a real query sees
    the real keys at or before it; a padding query sees those and itself (its output is dropped; no row of the
    softmax is empty, so no NaN reaches the backward). ``additive``: 0 / dtype's min as eager attention adds it,
    else boolean."""
    keep = attention_mask.bool()
    B, T = keep.shape
    flat = keep.flatten()
    index = flat.nonzero().squeeze(1)
    allowed = torch.ones(T, T, dtype=torch.bool, device=keep.device).tril() & keep[:, None, :]
    allowed |= torch.eye(T, dtype=torch.bool, device=keep.device)
    mask = allowed.unsqueeze(1)  # (B, 1, T, T)
    if additive:
        mask = torch.zeros(mask.shape, dtype=dtype, device=keep.device).masked_fill(~mask, torch.finfo(dtype).min)
    where = (flat.long().cumsum(0) - 1).clamp(min=0).view(B, T)
    packed = {"input_ids": input_ids.flatten()[index].unsqueeze(0),
              "position_ids": position_ids.flatten()[index].unsqueeze(0),
              "attention_mask": mask, "padfree_index": index}
    return packed, where
