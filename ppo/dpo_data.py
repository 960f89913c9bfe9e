"""DPO pairs: reading (the reward stage's preference reader and feedback export), tokenizing, batching,
and sequence log-probs of answer tokens only.

Rows are read and checked by :mod:`reward.data` (pairs as strings or chat
messages, HH-RLHF full dialogues, implicit-prompt chat pairs, ranked lists
expanded into all pairs, feedback-export rows), so DPO and the reward model
accept exactly the same files and fail on the same ``file:line``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from alignloop.batching import shared_prefix_rows, shift_labels
from alignloop.data import DataError
from reward.data import Preference, as_pairs, common_prefix_len, read_preferences


@dataclass
class DPOExample:
    chosen_ids: list[int]  # (T_w,) prompt + chosen answer, chat template applied
    chosen_labels: list[int]  # (T_w,) chosen_ids on answer tokens, -100 on the prompt
    rejected_ids: list[int]  # (T_l,)
    rejected_labels: list[int]  # (T_l,)
    where: str  # file:line of the row
    engine_logps: tuple[float, float] | None = None  # (2,) online: the rollout engine's Σ log π of (w, l) as sampled


# ------------------------------------------------------------------ reading

def read_pairs(path: str | Path, limit: int | None = None) -> list[Preference]:
    """Every row checked (DataError names file:line); ranked rows become all their (better, worse) pairs."""
    return as_pairs(read_preferences(path, limit))


# ---------------------------------------------------------------- tokenizing

def tokenize_answer(tok, conversation: list[dict], where: str, max_length: int, max_prompt_length: int
                    ) -> tuple[list[int], list[int]]:
    """(ids, labels) of one conversation whose last message is the answer; only the answer is labelled.

    The prompt is the render of every earlier turn with the generation prompt; it must be a prefix of
    the full render (the same rule as SFT). Too long: the prompt loses its oldest tokens down to
    ``max_prompt_length``, then the answer its tail.
    """
    prompt_text = tok.apply_chat_template(conversation[:-1], tokenize=False, add_generation_prompt=True)
    full_text = tok.apply_chat_template(conversation, tokenize=False)
    if not full_text.startswith(prompt_text):
        raise DataError(f"{where}: the chat template does not render the prompt as a prefix of prompt+answer; "
                        "set model.chat_template")
    prompt_ids = tok(prompt_text, add_special_tokens=False)["input_ids"]
    answer_ids = tok(full_text[len(prompt_text):], add_special_tokens=False)["input_ids"]
    if not answer_ids:
        raise DataError(f"{where}: empty answer after the chat template")
    if len(prompt_ids) + len(answer_ids) > max_length:
        keep_prompt = min(len(prompt_ids), max(max_prompt_length, max_length - len(answer_ids)))
        prompt_ids = prompt_ids[len(prompt_ids) - keep_prompt:]
        answer_ids = answer_ids[: max_length - len(prompt_ids)]
        if not answer_ids:
            raise DataError(f"{where}: no answer tokens left within data.max_length={max_length}")
    return prompt_ids + answer_ids, [-100] * len(prompt_ids) + answer_ids


def tokenize_pairs(prefs: list[Preference], tok, max_length: int, max_prompt_length: int) -> list[DPOExample]:
    out = []
    for p in prefs:
        if len(p.conversations) != 2:  # read_pairs expands rankings; anything else is a caller error
            raise DataError(f"{p.where}: expected a pair, got {len(p.conversations)} answers")
        cw, lw = tokenize_answer(tok, p.conversations[0], p.where, max_length, max_prompt_length)
        cl, ll = tokenize_answer(tok, p.conversations[1], p.where, max_length, max_prompt_length)
        out.append(DPOExample(cw, lw, cl, ll, p.where))
    return out


def fingerprint(examples: list[DPOExample]) -> str:
    """A hash of every token of every pair: the key of cached reference log-probs."""
    h = hashlib.sha256()
    for e in examples:
        for seq in (e.chosen_ids, e.chosen_labels, e.rejected_ids, e.rejected_labels):
            h.update(json.dumps(seq).encode())
    return h.hexdigest()[:16]


# ------------------------------------------------------------------ batching

def prompt_len(labels: list[int]) -> int:
    """Leading unlabelled (-100) tokens: the prompt part of one sequence."""
    n = 0
    while n < len(labels) and labels[n] == -100:
        n += 1
    return n


def pair_shared_len(e: DPOExample) -> int:
    """Leading tokens of a pair computed once in the shared-prefix layout: common to both sequences *and* free of
    targets, so every position keeps one target. Position t predicts token t+1, so the last prompt token (which
    predicts a different first answer token in each sequence) stays in both branches."""
    common = common_prefix_len([e.chosen_ids, e.rejected_ids])
    return max(0, min(common, prompt_len(e.chosen_labels) - 1, prompt_len(e.rejected_labels) - 1))


def pair_width(e: DPOExample, shared_prefix: bool) -> int:
    """Token positions a pair takes in its row: the prompt once with ``shared_prefix``, else its longer sequence
    (what a right-padded micro-batch pays for each of its two sequences)."""
    if shared_prefix:
        return len(e.chosen_ids) + len(e.rejected_ids) - pair_shared_len(e)
    return max(len(e.chosen_ids), len(e.rejected_ids))


def pair_batch(examples: list[DPOExample], pad_id: int, packing: bool = True, shared_prefix: bool = False
               ) -> dict[str, torch.Tensor]:
    """Sequences in the order [w_0, l_0, w_1, l_1, ...] (N = 2B), in one of four layouts.

    - packed: one row with per-sequence position ids (no cross-sequence attention, no pad tokens);
    - padded: N right-padded rows with an attention mask;
    - shared (``shared_prefix``): each pair's prompt once, then the chosen and the rejected answer as two
      branches that see the prompt and themselves (a 4D mask, :func:`alignloop.batching.shared_prefix_rows`);
      one row per pair, or the whole micro-batch in one row with ``packing``. Used when it computes fewer
      token positions than the plain layout.

    ``targets`` holds the next-token id on answer positions (-100 elsewhere); ``seq_index`` names the sequence
    each position belongs to where a row holds several. Labels are shifted per sequence before they are laid
    out, so a sequence never predicts another one's token.
    """
    seqs = []
    for e in examples:
        seqs += [(e.chosen_ids, e.chosen_labels), (e.rejected_ids, e.rejected_labels)]
    tokens = sum(len(s[0]) for s in seqs)
    plain = tokens if packing else len(seqs) * max(len(s[0]) for s in seqs)
    if shared_prefix:
        shared = [pair_shared_len(e) for e in examples]
        widths = [pair_width(e, True) for e in examples]
        if (sum(widths) if packing else len(widths) * max(widths)) < plain:
            inputs, where = shared_prefix_rows([[e.chosen_ids, e.rejected_ids] for e in examples], shared, pad_id,
                                               packing)
            tgt = torch.full_like(inputs["input_ids"], -100)  # (R, W)
            idx = torch.zeros_like(inputs["input_ids"])  # (R, W)
            for i, ((input_ids, labels), (r, c)) in enumerate(zip(seqs, where)):
                L = shared[i // 2]  # the shared positions predict prompt tokens only: no target there
                own = len(input_ids) - L
                tgt[r, c:c + own] = torch.tensor(shift_labels(labels)[L:])
                idx[r, c:c + own] = i
            return {**inputs, "targets": tgt, "seq_index": idx}
    if packing:
        ids, pos, tgt, idx = [], [], [], []
        for i, (input_ids, labels) in enumerate(seqs):
            ids += input_ids
            pos += range(len(input_ids))
            tgt += shift_labels(labels)
            idx += [i] * len(input_ids)
        return {"input_ids": torch.tensor([ids]),  # (1, ΣT)
                "position_ids": torch.tensor([pos]),  # (1, ΣT)
                "targets": torch.tensor([tgt]),  # (1, ΣT) next-token id on answer positions, else -100
                "seq_index": torch.tensor([idx])}  # (1, ΣT) which of the N sequences
    width = max(len(s[0]) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)  # (N, T)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)  # (N, T)
    tgt = torch.full((len(seqs), width), -100, dtype=torch.long)  # (N, T)
    for i, (input_ids, labels) in enumerate(seqs):
        n = len(input_ids)
        ids[i, :n] = torch.tensor(input_ids)
        mask[i, :n] = 1
        tgt[i, :n] = torch.tensor(shift_labels(labels))
    return {"input_ids": ids, "attention_mask": mask, "targets": tgt}


def sequence_logps(model, batch: dict[str, torch.Tensor], only_labelled: bool = True
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ_t log π(a_t|s_t) over answer tokens, answer token count), each (N,), for the N sequences of ``batch``.

    ``only_labelled``: the LM head runs only at positions some row has a target for (``logits_to_keep`` with an
    index tensor), so prompt positions cost no (T x vocab) projection; the result is the same. Soft-prompt
    models (prompt/prefix tuning) prepend virtual positions and pass False: logits sliced to the last T
    positions. Token log-probs come from cross-entropy (logsumexp over the vocabulary, never a full
    log-softmax tensor) in float32.
    """
    kwargs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "position_ids")}
    targets = batch["targets"]  # (R, T)
    seq_index = batch.get("seq_index")  # (R, T) or None: one sequence per row
    n_seqs = int(seq_index.max()) + 1 if seq_index is not None else targets.shape[0]
    if only_labelled:
        keep = (targets != -100).any(dim=0).nonzero().squeeze(-1)  # (K,) positions with a target in some row
        logits = model(**kwargs, use_cache=False, logits_to_keep=keep).logits  # (R, K, vocab)
        targets = targets[:, keep]  # (R, K)
        seq_index = seq_index[:, keep] if seq_index is not None else None
    else:
        logits = model(**kwargs, use_cache=False).logits  # (R, V+T, vocab) or (R, T, vocab)
        logits = logits[:, -targets.shape[1]:, :]
    tok_logp = -torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1),
                                                  ignore_index=-100, reduction="none").view(targets.shape)  # (R, K)
    mask = (targets != -100)
    tok_logp = tok_logp * mask
    if seq_index is not None:  # several sequences per row: scatter positions into their sequences
        idx = seq_index.reshape(-1)
        sums = torch.zeros(n_seqs, dtype=tok_logp.dtype, device=tok_logp.device).index_add(
            0, idx.to(tok_logp.device), tok_logp.reshape(-1))
        counts = torch.zeros(n_seqs, dtype=torch.float32).index_add(0, idx.cpu(), mask.reshape(-1).float().cpu())
        return sums, counts  # (N,), (N,)
    return tok_logp.sum(1), mask.sum(1).float().cpu()  # (N,), (N,)


def split_pairs(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N,) in [w_0, l_0, w_1, l_1, ...] order -> chosen (B,), rejected (B,)."""
    v = values.view(-1, 2)  # (B, 2)
    return v[:, 0], v[:, 1]
