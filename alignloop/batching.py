"""Batches for causal-LM training: padding-free (packed) or right-padded.

Labels are shifted per sequence *before* packing, so a packed row never
predicts the first token of the next sequence from the end of the previous one.
"""

from __future__ import annotations

import numpy as np
import torch


def shift_labels(labels: list[int]) -> list[int]:
    """labels[t+1] as the target of position t; -100 after the last token."""
    return list(labels[1:]) + [-100]


def packed_batch(seqs: list[tuple[list[int], list[int]]]) -> dict[str, torch.Tensor]:
    """One row of concatenated sequences with per-sequence position ids.

    transformers builds the block-diagonal causal mask from position ids that
    restart at 0 (no attention across sequences), so no pad token is computed.
    """
    ids, pos, tgt = [], [], []
    for input_ids, labels in seqs:
        ids += input_ids
        pos += range(len(input_ids))
        tgt += shift_labels(labels)
    return {
        "input_ids": torch.tensor([ids]),  # (1, sum T)
        "position_ids": torch.tensor([pos]),  # (1, sum T)
        "targets": torch.tensor([tgt]),  # (1, sum T) next-token ids or -100
    }


def padded_batch(seqs: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded rows with an attention mask."""
    width = max(len(s[0]) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)  # (B, T)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)  # (B, T)
    tgt = torch.full((len(seqs), width), -100, dtype=torch.long)  # (B, T)
    for i, (input_ids, labels) in enumerate(seqs):
        n = len(input_ids)
        ids[i, :n] = torch.tensor(input_ids)
        mask[i, :n] = 1
        tgt[i, :n] = torch.tensor(shift_labels(labels))
    return {"input_ids": ids, "attention_mask": mask, "targets": tgt}


def token_nll_sum(model, batch: dict[str, torch.Tensor], only_labelled: bool = True) -> tuple[torch.Tensor, int]:
    """Sum of next-token NLL over labelled positions, and their count.

    ``only_labelled``: the LM head runs only at positions some row has a target
    for (``logits_to_keep`` with an index tensor), so prompt positions cost no
    (T x vocab) projection and no logits memory; the result is the same.
    Soft-prompt models (prompt/prefix tuning) prepend virtual positions, so they
    use the full path: logits sliced to the last T positions.
    """
    kwargs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "position_ids")}
    targets = batch["targets"]  # (B, T)
    if only_labelled:
        keep = (targets != -100).any(dim=0).nonzero().squeeze(-1)  # (K,) positions with a target in some row
        logits = model(**kwargs, use_cache=False, logits_to_keep=keep).logits  # (B, K, vocab)
        targets = targets[:, keep]  # (B, K)
    else:
        logits = model(**kwargs, use_cache=False).logits  # (B, V+T, vocab) or (B, T, vocab)
        logits = logits[:, -targets.shape[1]:, :]  # (B, T, vocab)
    n = int((targets != -100).sum())
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1),
                                            ignore_index=-100, reduction="sum")
    return nll, n


def epoch_order(n: int, seed: int, epoch: int) -> np.ndarray:
    """The data order of one epoch: a permutation fixed by (seed, epoch), so resume lands on the same rows."""
    return np.random.default_rng([seed, epoch]).permutation(n)


def global_batch_indices(n: int, global_batch: int, step: int, seed: int) -> list[int]:
    """Example indices of optimizer step ``step`` (0-based) on an endless stream of epoch permutations."""
    start = step * global_batch
    out: list[int] = []
    while len(out) < global_batch:
        epoch, offset = divmod(start + len(out), n)
        order = epoch_order(n, seed, epoch)
        take = min(global_batch - len(out), n - offset)
        out += order[offset: offset + take].tolist()
    return out
