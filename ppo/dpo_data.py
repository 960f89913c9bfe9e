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

from alignloop.batching import shift_labels
from alignloop.data import DataError
from reward.data import Preference, as_pairs, read_preferences


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

def pair_batch(examples: list[DPOExample], pad_id: int, packing: bool = True) -> dict[str, torch.Tensor]:
    """Sequences in the order [w_0, l_0, w_1, l_1, ...] (N = 2B), packed into one row or right-padded.

    Packed: one row with per-sequence position ids (no cross-sequence attention, no pad tokens) and
    ``seq_index`` (1, ΣT) naming the sequence each position belongs to. Labels are shifted per sequence
    before packing, so a sequence never predicts the next one's first token.
    """
    seqs = []
    for e in examples:
        seqs += [(e.chosen_ids, e.chosen_labels), (e.rejected_ids, e.rejected_labels)]
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


def sequence_logps(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ_t log π(a_t|s_t) over answer tokens, answer token count), each (N,), for the N sequences of ``batch``.

    Token log-probs come from cross-entropy (logsumexp over the vocabulary, never a full log-softmax
    tensor) in float32; logits are sliced to the last T positions because prompt tuning prepends
    virtual tokens whose outputs are not ours.
    """
    kwargs = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "position_ids")}
    logits = model(**kwargs, use_cache=False).logits  # (R, V+T, vocab) or (R, T, vocab)
    targets = batch["targets"]  # (R, T)
    logits = logits[:, -targets.shape[1]:, :]
    tok_logp = -torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1),
                                                  ignore_index=-100, reduction="none").view(targets.shape)  # (R, T)
    mask = (targets != -100)
    tok_logp = tok_logp * mask
    if "seq_index" in batch:  # packed: R = 1, scatter positions into their sequences
        idx = batch["seq_index"].reshape(-1)
        n = int(idx.max()) + 1
        sums = torch.zeros(n, dtype=tok_logp.dtype, device=tok_logp.device).index_add(0, idx.to(tok_logp.device),
                                                                                        tok_logp.reshape(-1))
        counts = torch.zeros(n, dtype=torch.float32).index_add(0, idx, mask.reshape(-1).float().cpu())
        return sums, counts  # (N,), (N,)
    return tok_logp.sum(1), mask.sum(1).float().cpu()  # (N,), (N,)


def split_pairs(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N,) in [w_0, l_0, w_1, l_1, ...] order -> chosen (B,), rejected (B,)."""
    v = values.view(-1, 2)  # (B, 2)
    return v[:, 0], v[:, 1]
