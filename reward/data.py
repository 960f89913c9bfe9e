"""Preference data: reading, checking and tokenizing ranked answers.

Every row becomes a :class:`Preference`: two or more full conversations (chat
messages ending with the assistant answer), best first, plus an optional
margin. Accepted rows (auto-detected per row):

- pair: ``{"prompt": str | messages, "chosen": str | messages, "rejected": ..., "margin"?}``
  (also a feedback-service export row, whose ``messages`` column, when present,
  is the chat history the answers continue);
- HH-RLHF: ``{"chosen": "\\n\\nHuman: ... \\n\\nAssistant: ...", "rejected": ...}``, full
  dialogues split at the last ``"\\n\\nAssistant:"`` (the shared prefix is the prompt);
- implicit-prompt chat form: ``{"chosen": [messages], "rejected": [messages]}``, each
  ending with the assistant answer;
- listwise: ``{"prompt": ..., "ranked": [answer, answer, ...]}`` best first (K >= 2).

Nothing is dropped silently: a row that fits none of these raises
:class:`~alignloop.data.DataError` naming ``file:line``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from alignloop.data import DataError, ROLE_ALIASES, iter_rows

HH_TURN = re.compile(r"\n\n(Human|Assistant):[ ]?")
HH_ROLES = {"Human": "user", "Assistant": "assistant"}


@dataclass
class Preference:
    conversations: list[list[dict]]  # K conversations, best first; each ends with the assistant answer
    margin: float | None  # how much better the first is (pairs only), None if not given
    where: str  # file:line of the row


@dataclass
class TokenizedPreference:
    input_ids: list[list[int]]  # K sequences (T_k,) rendered with the chat template, best first
    margin: float | None
    where: str
    truncated: bool = field(default=False)  # the front of some conversation was cut to fit max_length


def parse_hh_dialogue(text: str, where: str, key: str) -> list[dict]:
    """``"\\n\\nHuman: a\\n\\nAssistant: b"`` -> chat messages; the last turn must be the assistant's."""
    parts = HH_TURN.split(text)
    head, rest = parts[0], parts[1:]
    if not rest:
        raise DataError(f"{where}: field {key!r} has no '\\n\\nHuman:'/'\\n\\nAssistant:' turns")
    msgs = []
    if head.strip():  # text before the first turn: keep it as a system message, never drop it
        msgs.append({"role": "system", "content": head.strip()})
    for role, content in zip(rest[0::2], rest[1::2]):
        msgs.append({"role": HH_ROLES[role], "content": content.strip()})
    if msgs[-1]["role"] != "assistant":
        raise DataError(f"{where}: field {key!r} does not end with an '\\n\\nAssistant:' turn")
    # An empty last turn is kept: in HH-RLHF it is a real answer (4 of the 2,312 harmless-base test
    # rows prefer saying nothing over a harmful continuation).
    return msgs


def _messages(raw: Any, where: str, key: str) -> list[dict]:
    if not isinstance(raw, list) or not raw:
        raise DataError(f"{where}: field {key!r} must be a string or a non-empty list of messages")
    out = []
    for i, m in enumerate(raw):
        if not isinstance(m, dict) or m.get("role") not in ROLE_ALIASES or not isinstance(m.get("content"), str):
            raise DataError(f"{where}: {key}[{i}] must be {{'role': user|assistant|system, 'content': str}}, got {m!r:.80}")
        out.append({"role": ROLE_ALIASES[m["role"]], "content": m["content"]})
    return out


def _prompt(row: dict, where: str) -> list[dict]:
    if isinstance(row.get("messages"), list) and row["messages"]:  # feedback export of a chat-history item
        msgs = _messages(row["messages"], where, "messages")
        if msgs[-1]["role"] == "assistant":
            raise DataError(f"{where}: field 'messages' (the chat history) must end with a user turn")
        return msgs
    p = row.get("prompt")
    if isinstance(p, str):
        if not p.strip():
            raise DataError(f"{where}: field 'prompt' is empty")
        return [{"role": "user", "content": p}]
    if isinstance(p, list):
        return _messages(p, where, "prompt")
    raise DataError(f"{where}: field 'prompt' must be a string or a list of messages, got {type(p).__name__}")


def _answer(prompt: list[dict], raw: Any, where: str, key: str) -> list[dict]:
    if isinstance(raw, str):
        if not raw.strip():
            raise DataError(f"{where}: field {key!r} is empty")
        return prompt + [{"role": "assistant", "content": raw}]
    msgs = _messages(raw, where, key)
    if msgs[-1]["role"] != "assistant" or not msgs[-1]["content"].strip():
        raise DataError(f"{where}: field {key!r} must end with a non-empty assistant message")
    return prompt + msgs


def _margin(row: dict, where: str) -> float | None:
    m = row.get("margin")
    if m is None:
        return None
    if isinstance(m, bool) or not isinstance(m, (int, float)) or m != m:
        raise DataError(f"{where}: field 'margin' must be a number, got {m!r}")
    return float(m)


def to_preference(row: dict, where: str) -> Preference:
    """Normalise one row (any accepted shape) to a :class:`Preference`."""
    if "ranked" in row:
        ranked = row["ranked"]
        if not isinstance(ranked, list) or len(ranked) < 2:
            raise DataError(f"{where}: field 'ranked' must list at least 2 answers, best first")
        prompt = _prompt(row, where)
        convs = [_answer(prompt, a, where, f"ranked[{i}]") for i, a in enumerate(ranked)]
        return Preference(convs, None, where)
    for key in ("chosen", "rejected"):
        if key not in row or row[key] is None:
            raise DataError(f"{where}: missing field {key!r} (expected prompt/chosen/rejected, HH-RLHF chosen/rejected "
                            f"dialogues, or prompt/ranked; got keys {sorted(row)})")
    chosen, rejected = row["chosen"], row["rejected"]
    has_prompt = row.get("prompt") is not None or (isinstance(row.get("messages"), list) and row["messages"])
    if has_prompt:
        prompt = _prompt(row, where)
        convs = [_answer(prompt, chosen, where, "chosen"), _answer(prompt, rejected, where, "rejected")]
    elif isinstance(chosen, str) and isinstance(rejected, str):  # HH-RLHF full dialogues
        # Each dialogue is split at its own last "\n\nAssistant:"; the two prefixes are normally
        # equal (a few HH rows differ there: each answer then keeps its own history).
        convs = [parse_hh_dialogue(chosen, where, "chosen"), parse_hh_dialogue(rejected, where, "rejected")]
    elif isinstance(chosen, list) and isinstance(rejected, list):  # implicit-prompt chat form
        convs = [_answer([], chosen, where, "chosen"), _answer([], rejected, where, "rejected")]
    else:
        raise DataError(f"{where}: 'chosen' and 'rejected' must both be strings or both message lists without a "
                        f"'prompt' (got {type(chosen).__name__} and {type(rejected).__name__})")
    if convs[0] == convs[1]:
        raise DataError(f"{where}: 'chosen' and 'rejected' are identical")
    return Preference(convs, _margin(row, where), where)


def read_preferences(path: str | Path, limit: int | None = None) -> list[Preference]:
    """Every row checked and normalised; the first bad one raises DataError with its file:line."""
    out = []
    for row, where in iter_rows(path):
        out.append(to_preference(row, where))
        if limit is not None and len(out) >= limit:
            break
    if not out:
        raise DataError(f"{path}: no preference rows")
    return out


def check_preference_file(path: str | Path) -> int:
    """Validate every row without a tokenizer (the CLI runs this before any model loads); returns the count."""
    return len(read_preferences(path))


def render(tok, conversation: list[dict], max_length: int) -> tuple[list[int], bool]:
    """Chat-template token ids of a whole conversation, cut from the *front* to ``max_length``.

    The score is read at the last token, so the answer's end is what must survive; a
    too-long history loses its oldest tokens (reported, never silent: see ``truncated``).
    """
    ids = render_ids(tok, conversation)
    if len(ids) > max_length:
        return ids[-max_length:], True
    return ids, False


def render_ids(tok, conversation: list[dict]) -> list[int]:
    text = tok.apply_chat_template(conversation, tokenize=False)
    return tok(text, add_special_tokens=False)["input_ids"]


def common_prefix_len(seqs: list[list[int]]) -> int:
    """Tokens at the start that every sequence has in common (their shared history)."""
    n = 0
    for column in zip(*seqs):
        if any(t != column[0] for t in column[1:]):
            break
        n += 1
    return n


def truncate_group(seqs: list[list[int]], max_length: int) -> tuple[list[list[int]], bool]:
    """Cut the answers of one row to ``max_length`` from the front, *together*.

    The shared history is cut by the same number of tokens in every conversation (as many
    as the longest one needs, at most the whole shared part), so chosen and rejected are
    still judged in one and the same context; whatever is still too long (an answer longer
    than the rest of the budget) then loses its own oldest tokens.
    """
    over = max(len(s) for s in seqs) - max_length
    if over <= 0:
        return seqs, False
    cut = min(over, common_prefix_len(seqs))
    return [s[cut:][-max_length:] for s in seqs], True


def tokenize_preferences(prefs: list[Preference], tok, max_length: int,
                         truncation: str = "pair") -> list[TokenizedPreference]:
    """Token ids of every answer's conversation. ``truncation``: ``pair`` cuts the answers of a row
    together (:func:`truncate_group`), ``each`` cuts every conversation on its own (:func:`render`)."""
    if truncation not in ("pair", "each"):
        raise ValueError(f"truncation must be 'pair' or 'each', got {truncation!r}")
    out = []
    for p in prefs:
        if truncation == "pair":
            seqs, cut = truncate_group([render_ids(tok, conv) for conv in p.conversations], max_length)
        else:
            seqs, cut = [], False
            for conv in p.conversations:
                ids, t = render(tok, conv, max_length)
                seqs.append(ids)
                cut = cut or t
        out.append(TokenizedPreference(seqs, p.margin, p.where, cut))
    return out


def as_pairs(prefs: list[Preference]) -> list[Preference]:
    """Ranked lists expanded into all (better, worse) pairs, for the pairwise loss and pairwise metrics."""
    out = []
    for p in prefs:
        if len(p.conversations) == 2:
            out.append(p)
            continue
        k = len(p.conversations)
        for i in range(k):
            for j in range(i + 1, k):
                out.append(Preference([p.conversations[i], p.conversations[j]], None, p.where))
    return out
