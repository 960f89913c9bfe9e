"""Rollout batches as tensors: prompts left-padded to P, answers right-padded to A.

Layout of one row of the model input (T = P + A)::

    [pad pad p0 p1 p2 | a0 a1 a2 EOS pad pad]
     <- prompt, P ->    <- answer, A ->

so every answer starts at column P and the logits that predict answer token t
sit at column P - 1 + t for every row: one slice ``[:, P-1 : P-1+A]`` gives all
(B, A) log-probs and values, with no per-row gather. Position ids count real
tokens from each row's first one, so left padding changes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch


@dataclass
class Experience:
    """One rollout batch; every tensor's first dim is B (answers, n consecutive per prompt)."""

    prompt_ids: torch.Tensor  # (B, P) left-padded prompt ids
    prompt_mask: torch.Tensor  # (B, P) 1 on real prompt tokens
    response_ids: torch.Tensor  # (B, A) answer ids a_t, right-padded
    mask: torch.Tensor  # (B, A) 1 on real answer tokens (up to and including EOS)
    rollout_logprobs: torch.Tensor  # (B, A) log π_engine(a_t|s_t) from the rollout engine (raw logits)
    has_eos: torch.Tensor  # (B,) bool: the answer ended with EOS (not cut at max_new_tokens)
    old_logprobs: torch.Tensor | None = None  # (B, A) log π_θold(a_t|s_t), trainer forward before the update
    ref_logprobs: torch.Tensor | None = None  # (B, A) log π_ref(a_t|s_t)
    values: torch.Tensor | None = None  # (B, A) V_old(s_t) from the critic
    scores: torch.Tensor | None = None  # (B,) shaped sequence score (after EOS penalty, normalisation, clip)
    advantages: torch.Tensor | None = None  # (B, A) A_t
    returns: torch.Tensor | None = None  # (B, A) R_t (critic target)

    def __len__(self) -> int:
        return self.response_ids.shape[0]

    def _map(self, fn) -> "Experience":
        return replace(self, **{f.name: (fn(getattr(self, f.name)) if getattr(self, f.name) is not None else None)
                                for f in fields(self)})

    def select(self, idx: slice | torch.Tensor | list[int]) -> "Experience":
        """Rows ``idx`` of every tensor (micro-batches, rank shards)."""
        return self._map(lambda t: t[idx])

    def to(self, device: torch.device | str) -> "Experience":
        """Every tensor on ``device`` (None fields stay None): a trainer moves its shard to the model's device
        before the forward pass; the driver keeps the whole batch on the CPU."""
        return self._map(lambda t: t.to(device))

    def trimmed(self) -> "Experience":
        """The same rows without the columns that are padding in every row: the leading prompt columns and the
        trailing answer columns (at least one answer column stays). A micro-batch drawn from a batch is as wide as
        the batch's longest prompt plus its longest answer; trimmed, it is only as wide as its own. Padding is masked
        out of every result, so only the work changes; (b, A) outputs are padded back with :func:`pad_answers`."""
        lead = int((self.prompt_mask.sum(0) == 0).long().cumprod(0).sum())  # prompt columns empty in every row
        A = max(1, int(self.mask.sum(-1).max())) if len(self) else 1
        if lead == 0 and A == self.response_ids.shape[1]:
            return self
        cut = {}
        for f in fields(self):
            t = getattr(self, f.name)
            if t is not None and t.dim() == 2:  # (B,) fields stay
                cut[f.name] = t[:, lead:] if f.name in _PROMPT_FIELDS else t[:, :A]
        return replace(self, **cut)

    def model_inputs(self) -> dict[str, torch.Tensor]:
        input_ids = torch.cat([self.prompt_ids, self.response_ids], dim=1)  # (B, T)
        attn = torch.cat([self.prompt_mask, self.mask], dim=1).long()  # (B, T)
        pos = (attn.cumsum(-1) - 1).clamp(min=0)  # (B, T) positions from each row's first real token
        return {"input_ids": input_ids, "attention_mask": attn, "position_ids": pos}

    @property
    def answer_slice(self) -> slice:
        P, A = self.prompt_ids.shape[1], self.response_ids.shape[1]
        return slice(P - 1, P - 1 + A)  # columns whose outputs predict / evaluate answer tokens

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


_PROMPT_FIELDS = ("prompt_ids", "prompt_mask")  # (B, P); every other 2-D field is (B, A)


def pad_answers(t: torch.Tensor, A: int) -> torch.Tensor:
    """(b, A') -> (b, A): zeros after column A' (the inverse of :meth:`Experience.trimmed` on an answer tensor)."""
    return t if t.shape[1] == A else torch.nn.functional.pad(t, (0, A - t.shape[1]))


def cut_after_eos(ids: list[int], eos_ids: set[int]) -> tuple[list[int], bool]:
    """Drop everything after the first EOS (kept); an engine that ran on past EOS must not be trained on it."""
    for t, tok in enumerate(ids):
        if tok in eos_ids:
            return ids[: t + 1], True
    return ids, False


def build_experience(prompt_ids: list[list[int]], responses: list[list[int]], logprobs: list[list[float]],
                     eos_ids: set[int], pad_id: int) -> Experience:
    """Pad B prompts and answers into an :class:`Experience` (answers cut after EOS; empty answers keep one pad)."""
    B = len(prompt_ids)
    cut = [cut_after_eos(list(r), eos_ids) for r in responses]
    P = max(len(p) for p in prompt_ids)
    A = max(1, max(len(r) for r, _ in cut))
    prompt = torch.full((B, P), pad_id, dtype=torch.long)
    pmask = torch.zeros(B, P, dtype=torch.long)
    resp = torch.full((B, A), pad_id, dtype=torch.long)
    mask = torch.zeros(B, A, dtype=torch.float32)
    lps = torch.zeros(B, A, dtype=torch.float32)
    for i, (p, (r, _)) in enumerate(zip(prompt_ids, cut)):
        prompt[i, P - len(p):] = torch.tensor(p)
        pmask[i, P - len(p):] = 1
        if r:
            resp[i, : len(r)] = torch.tensor(r)
            mask[i, : len(r)] = 1
            lps[i, : len(r)] = torch.tensor(logprobs[i][: len(r)], dtype=torch.float32)
    has_eos = torch.tensor([e for _, e in cut], dtype=torch.bool)
    return Experience(prompt, pmask, resp, mask, lps, has_eos)


def concat(parts: list[torch.Tensor]) -> torch.Tensor:
    return torch.cat(parts, dim=0)


def _prompts(exp: Experience) -> list[tuple[int, ...]]:
    """Each row's prompt token ids without padding."""
    return [tuple(exp.prompt_ids[b][exp.prompt_mask[b].bool()].tolist()) for b in range(len(exp))]


def repeats_a_prompt(exp: Experience) -> bool:
    """Some prompt fills two rows. Only then does one packed row (:func:`shared_prefix_inputs`) save work: with
    distinct prompts it saves only the padding and pays attention over the whole row (W² instead of B·T²)."""
    return len(set(_prompts(exp))) < len(exp)


def shared_prefix_inputs(exp: Experience) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """One packed row for the whole batch: each distinct prompt once, its answers as branches after it.

    Returns the model inputs (``input_ids``/``position_ids`` (1, W), a boolean 4D ``attention_mask``
    (1, 1, W, W): an answer token sees its prompt and its own answer, causally, nothing else) and
    ``index`` (B, A): the column whose output predicts answer token t of row b (the prompt's last
    token for t = 0, the answer's token t-1 after that; padding points at a valid column and stays
    masked). ``logits[0, index]`` is then exactly ``logits[:, answer_slice]`` of the padded layout.
    """
    from alignloop.batching import shared_prefix_rows

    B, A = exp.response_ids.shape
    prompts = _prompts(exp)
    lengths = exp.mask.sum(-1).long().tolist()
    order: dict[tuple, list[int]] = {}
    for b, p in enumerate(prompts):
        order.setdefault(p, []).append(b)
    groups, shared = [], []
    for p, members in order.items():
        groups.append([list(p) + exp.response_ids[b, :lengths[b]].tolist() for b in members])
        shared.append(len(p))
    inputs, where = shared_prefix_rows(groups, shared, pad_id=0, packing=True)  # pads are seen by nothing
    index = torch.zeros((B, A), dtype=torch.long)
    k = 0
    for members in order.values():
        prompt_last = where[k][1] - 1  # the first branch starts right after the prompt
        for b in members:
            col = where[k][1]
            index[b, 0] = prompt_last
            if A > 1:
                t = torch.arange(1, A)
                index[b, 1:] = torch.where(t < max(lengths[b], 1), col + t - 1, prompt_last)
            k += 1
    return inputs, index
