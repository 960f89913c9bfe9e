"""The reward model: a causal-LM backbone with a scalar head, read at the last real token.

The weights live in a standard Hugging Face ``*ForSequenceClassification`` model
with ``num_labels=1`` (backbone + ``score`` linear layer, no LM head), so
``final/`` loads with ``AutoModelForSequenceClassification``. The forward pass is
ours, not the HF one: HF finds the last token by comparing ids with the pad id,
which breaks when pad == eos and eos appears inside a conversation, and it
assumes right padding. We use the attention mask (or packed segment ends) and
position ids counted from each sequence's first real token, so left, right and
no padding give the same score.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from alignloop.models import apply_peft, disable_dropout, torch_dtype


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) 0/1 mask -> (B,) index of the last 1 in each row, for left or right padding."""
    T = attention_mask.shape[1]
    return T - 1 - attention_mask.flip(-1).long().argmax(-1)  # (B,)


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids that start at 0 on each row's first real token (left padding shifts nothing)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)  # (B, T)


def head_init_std(hidden_size: int) -> float:
    """std = 1/sqrt(d+1) for the scalar head (Stiennon et al. 2020; lm-human-preferences `reward_model.py`):
    the initial rewards then have about unit variance over hidden states of unit scale."""
    return 1.0 / math.sqrt(hidden_size + 1)


class RewardModel(nn.Module):
    """``seq``: an HF sequence-classification model (possibly PEFT-wrapped); ``forward`` returns (N,) rewards.

    Three batch layouts (built by ``reward.trainer.collate``):

    - padded: ``input_ids``/``attention_mask`` (N, T), one sequence per row;
    - packed: ``input_ids``/``position_ids`` (1, ΣT) with ``ends`` (N,) holding the index of each
      sequence's last token (padding-free: no pad token is computed);
    - shared prefix: ``input_ids``/``position_ids`` (R, W), a 4D boolean ``attention_mask``
      (R, 1, W, W) (True = may attend) and ``rows``/``ends`` (N,) locating each sequence's last
      token. A row holds an example's shared history once and each answer after it; an answer's
      tokens see the history and themselves, never a sibling answer, and their position ids
      continue from the history, so every answer gets exactly the hidden states it would get alone.
    """

    def __init__(self, seq: nn.Module):
        super().__init__()
        self.seq = seq

    @property
    def inner(self) -> nn.Module:
        return self.seq.get_base_model() if hasattr(self.seq, "get_base_model") else self.seq

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, ends: torch.Tensor | None = None,
                rows: torch.Tensor | None = None) -> torch.Tensor:
        inner = self.inner
        if ends is None:  # padded (N, T)
            position_ids = positions_from_mask(attention_mask)
            hidden = inner.base_model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                      use_cache=False).last_hidden_state  # (N, T, d)
            idx = last_token_index(attention_mask)  # (N,)
            last = hidden[torch.arange(hidden.shape[0], device=hidden.device), idx]  # (N, d)
        elif attention_mask is not None:  # shared prefix (R, W) with a custom (R, 1, W, W) mask
            mask = attention_mask
            if inner.config._attn_implementation == "eager":  # eager adds the mask to the scores
                dtype = inner.score.weight.dtype
                mask = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)
            hidden = inner.base_model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids,
                                      use_cache=False).last_hidden_state  # (R, W, d)
            last = hidden[rows, ends]  # (N, d)
        else:  # packed (1, ΣT): the block-diagonal mask comes from position ids restarting at 0
            hidden = inner.base_model(input_ids=input_ids, position_ids=position_ids,
                                      use_cache=False).last_hidden_state  # (1, ΣT, d)
            last = hidden[0, ends]  # (N, d)
        return inner.score(last).squeeze(-1).float()  # (N,)


def load_reward_model(model_cfg, peft_cfg, path: str, pad_token_id: int | None, *, trainable: bool = True) -> RewardModel:
    """Backbone from a causal-LM (or an earlier reward model) directory plus a freshly initialised head.

    The head is created by ``from_pretrained`` as a missing weight, initialised by HF's
    ``_init_weights`` with ``config.initializer_range``; setting that to 1/sqrt(d+1) gives
    the recommended init and also works under ZeRO-3, where weights are partitioned as they load.
    """
    from transformers import AutoConfig, AutoModelForSequenceClassification

    cfg = AutoConfig.from_pretrained(path)
    d = getattr(cfg, "hidden_size", None) or getattr(cfg, "d_model")
    seq = AutoModelForSequenceClassification.from_pretrained(
        path, num_labels=1, dtype=torch_dtype(model_cfg.dtype), attn_implementation=model_cfg.attn_implementation,
        initializer_range=head_init_std(d), pad_token_id=pad_token_id)
    disable_dropout(seq)
    if model_cfg.gradient_checkpointing:
        seq.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    seq.config.use_cache = False
    if trainable and peft_cfg is not None:
        seq = apply_peft(seq, peft_cfg, path, task_type="SEQ_CLS")
    return RewardModel(seq)
