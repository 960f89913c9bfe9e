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


def to_device(batch: dict, device: torch.device | str) -> dict:
    """The batch's tensors on ``device`` (the strategy's, where the model lives); other values unchanged."""
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def shared_prefix_rows(groups: list[list[list[int]]], shared: list[int], pad_id: int, packing: bool
                       ) -> tuple[dict[str, torch.Tensor], list[tuple[int, int]]]:
    """Rows in which the first ``shared[b]`` tokens of group b (common to all its sequences) appear once,
    followed by each sequence's own tokens (a *branch*).

    Per token: the group it belongs to (``seg``) and its branch (0 = shared part, k+1 = sequence k).
    Token i may attend to token j iff j <= i in the row, same group, and j is in the shared part or
    in i's own branch: exactly the causal context each sequence has alone; position ids continue the
    shared part in every branch. Rows: one per group (right-padded), or every group in one row with
    ``packing``. Returns the model inputs -- ``input_ids``, ``position_ids`` (R, W) and
    ``attention_mask`` (R, 1, W, W), True = may attend -- and, per sequence in group order,
    ``(row, column)`` of its first own token: its token t >= shared[b] sits at column + t - shared[b].
    """
    pieces = []  # per group: (ids, positions, branches, offsets of the branches within the piece)
    for seqs, L in zip(groups, shared):
        ids, pos, br, starts = list(seqs[0][:L]), list(range(L)), [0] * L, []
        for k, s in enumerate(seqs):
            starts.append(len(ids))
            ids += s[L:]
            pos += range(L, len(s))
            br += [k + 1] * (len(s) - L)
        pieces.append((ids, pos, br, starts))
    rows_of = [list(range(len(pieces)))] if packing else [[b] for b in range(len(pieces))]
    width = max(sum(len(pieces[b][0]) for b in g) for g in rows_of)
    R = len(rows_of)
    ids = torch.full((R, width), pad_id, dtype=torch.long)  # (R, W)
    pos = torch.zeros((R, width), dtype=torch.long)  # (R, W)
    seg = torch.full((R, width), -1, dtype=torch.long)  # (R, W) group id, -1 on pads
    br = torch.zeros((R, width), dtype=torch.long)  # (R, W) branch id
    where = []
    for r, g in enumerate(rows_of):
        off = 0
        for b in g:
            p_ids, p_pos, p_br, p_starts = pieces[b]
            n = len(p_ids)
            ids[r, off:off + n] = torch.tensor(p_ids)
            pos[r, off:off + n] = torch.tensor(p_pos)
            br[r, off:off + n] = torch.tensor(p_br)
            seg[r, off:off + n] = b
            where += [(r, off + x) for x in p_starts]
            off += n
    causal = torch.ones((width, width), dtype=torch.bool).tril()  # (W, W) j <= i
    same = seg[:, :, None] == seg[:, None, :]  # (R, W, W); pads only see pads, never content
    branch = (br[:, None, :] == 0) | (br[:, :, None] == br[:, None, :])  # (R, W, W) shared part or own branch
    mask = (causal & same & branch)[:, None]  # (R, 1, W, W); every position sees itself: no empty row
    return {"input_ids": ids, "position_ids": pos, "attention_mask": mask}, where


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
