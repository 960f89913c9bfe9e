"""Reading and checking training records.

Readers yield ``(record, where)`` pairs, where ``where`` is ``file:line`` (JSONL),
``file[index]`` (JSON array, Parquet, ``datasets`` directory), so every error
names the exact row. Records are checked and normalised to chat messages before
any model is loaded.

Accepted SFT shapes (auto-detected per row, or forced with ``data.format``):
- instruction: ``{"instruction", "input"?, "output"}`` (the brief's record schema)
- messages: ``{"messages": [{"role", "content"}, ...]}`` (OpenAI/TRL chat form)
- conversations: ``{"conversations": [{"from", "value"}, ...]}`` (ShareGPT form)
- prompt_completion: ``{"prompt", "completion"}`` as strings or message lists
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from alignloop.config import ConfigError


class DataError(ValueError):
    """A malformed data row or file; the message starts with ``file:line`` or ``file[index]``."""


def iter_rows(path: str | Path) -> Iterator[tuple[dict, str]]:
    """Yield (row, where) from a JSONL, JSON, Parquet file or a saved ``datasets`` directory."""
    p = Path(path)
    if not p.exists():
        raise DataError(f"{p}: data file not found")
    if p.is_dir():
        if not (p / "dataset_info.json").is_file() and not (p / "state.json").is_file() and not (p / "dataset_dict.json").is_file():
            raise DataError(f"{p}: a directory but not a `datasets` directory saved with save_to_disk")
        from datasets import load_from_disk

        ds = load_from_disk(str(p))
        if hasattr(ds, "keys"):  # DatasetDict: take 'train'
            if "train" not in ds:
                raise DataError(f"{p}: DatasetDict without a 'train' split (has {list(ds.keys())})")
            ds = ds["train"]
        for i, row in enumerate(ds):
            yield row, f"{p}[{i}]"
        return
    suffix = "".join(p.suffixes[-2:]) if p.suffix == ".gz" else p.suffix
    if suffix in (".jsonl", ".ndjson", ".jsonl.gz"):
        import gzip

        opener = gzip.open if suffix.endswith(".gz") else open
        with opener(p, "rt", encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(f"{p}:{lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
                if not isinstance(row, dict):
                    raise DataError(f"{p}:{lineno}: expected a JSON object, got {type(row).__name__}")
                yield row, f"{p}:{lineno}"
    elif suffix == ".json":
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise DataError(f"{p}:{e.lineno}: not valid JSON ({e.msg})") from None
        if isinstance(data, dict) and isinstance(data.get("data"), list):
            data = data["data"]
        if not isinstance(data, list):
            raise DataError(f"{p}: expected a JSON array of records (or {{'data': [...]}})")
        for i, row in enumerate(data):
            if not isinstance(row, dict):
                raise DataError(f"{p}[{i}]: expected a JSON object, got {type(row).__name__}")
            yield row, f"{p}[{i}]"
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(p)
        for i, row in enumerate(table.to_pylist()):
            yield row, f"{p}[{i}]"
    else:
        raise DataError(f"{p}: unknown data format {suffix!r} (use .jsonl, .json, .parquet or a datasets directory)")


# ---------------------------------------------------------------- SFT records

ROLE_ALIASES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "bot": "assistant",
                "model": "assistant", "system": "system", "chatgpt": "assistant"}


def _need_str(row: dict, key: str, where: str, allow_empty: bool = False) -> str:
    if key not in row or row[key] is None:
        raise DataError(f"{where}: missing field {key!r}")
    v = row[key]
    if not isinstance(v, str):
        raise DataError(f"{where}: field {key!r} must be a string, got {type(v).__name__}")
    if not allow_empty and not v.strip():
        raise DataError(f"{where}: field {key!r} is empty")
    return v


def _messages(raw: Any, where: str, field: str, role_key: str = "role", content_key: str = "content") -> list[dict]:
    if not isinstance(raw, list) or not raw:
        raise DataError(f"{where}: field {field!r} must be a non-empty list of messages")
    out = []
    for i, m in enumerate(raw):
        if not isinstance(m, dict):
            raise DataError(f"{where}: {field}[{i}] must be an object with {role_key!r} and {content_key!r}")
        role = m.get(role_key)
        content = m.get(content_key)
        if role not in ROLE_ALIASES:
            raise DataError(f"{where}: {field}[{i}].{role_key} is {role!r}; expected one of {sorted(set(ROLE_ALIASES))}")
        if not isinstance(content, str):
            raise DataError(f"{where}: {field}[{i}].{content_key} must be a string, got {type(content).__name__}")
        out.append({"role": ROLE_ALIASES[role], "content": content})
    return out


def detect_format(row: dict) -> str | None:
    if "messages" in row:
        return "messages"
    if "conversations" in row:
        return "conversations"
    if "instruction" in row or "output" in row:
        return "instruction"
    if "prompt" in row and "completion" in row:
        return "prompt_completion"
    return None


def to_messages(row: dict, where: str, fmt: str = "auto") -> list[dict]:
    """Normalise one SFT row to chat messages ending with an assistant turn."""
    kind = detect_format(row) if fmt == "auto" else fmt
    if kind is None:
        raise DataError(f"{where}: cannot tell the record format from keys {sorted(row)}; expected instruction/input/output, "
                        "messages, conversations, or prompt/completion")
    if kind == "instruction":
        instruction = _need_str(row, "instruction", where)
        extra = row.get("input")
        if extra is not None and not isinstance(extra, str):
            raise DataError(f"{where}: field 'input' must be a string, got {type(extra).__name__}")
        output = _need_str(row, "output", where)
        user = instruction if not extra or not extra.strip() else f"{instruction}\n\n{extra}"
        msgs = [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
        if isinstance(row.get("system"), str) and row["system"].strip():
            msgs.insert(0, {"role": "system", "content": row["system"]})
    elif kind == "messages":
        msgs = _messages(row.get("messages"), where, "messages")
    elif kind == "conversations":
        msgs = _messages(row.get("conversations"), where, "conversations", "from", "value")
    elif kind == "prompt_completion":
        prompt, completion = row.get("prompt"), row.get("completion")
        if isinstance(prompt, str) and isinstance(completion, str):
            if not completion.strip():
                raise DataError(f"{where}: field 'completion' is empty")
            msgs = [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]
        elif isinstance(prompt, list) and isinstance(completion, list):
            msgs = _messages(prompt, where, "prompt") + _messages(completion, where, "completion")
        else:
            raise DataError(f"{where}: 'prompt' and 'completion' must both be strings or both message lists")
    else:
        raise ConfigError(f"data.format: unknown format {fmt!r}")
    if msgs[-1]["role"] != "assistant" or not msgs[-1]["content"].strip():
        raise DataError(f"{where}: the last message must be a non-empty assistant answer (got role {msgs[-1]['role']!r})")
    return msgs


@dataclass
class TokenizedExample:
    input_ids: list[int]  # (T,) prompt + answer tokens
    labels: list[int]  # (T,) input_ids on trained tokens, -100 elsewhere
    where: str


def tokenize_messages(tok, messages: list[dict], where: str, max_length: int, loss_on: str = "answer") -> TokenizedExample:
    """Render with the chat template and label the assistant turns (or every token with loss_on='all').

    The assistant spans are found on the rendered string: the render of the
    turns before an answer (with the generation prompt) must be a prefix of the
    render that includes it; token offsets map those character spans to tokens,
    so the end-of-turn token after each answer is trained too (the model learns
    to stop).
    """
    full = tok.apply_chat_template(messages, tokenize=False)
    spans: list[tuple[int, int]] = []
    if loss_on == "answer":
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            before = tok.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True) if i else ""
            upto = tok.apply_chat_template(messages[: i + 1], tokenize=False)
            if not full.startswith(before) or not full.startswith(upto):
                raise DataError(f"{where}: the chat template does not render turns as prefixes; cannot locate the answer "
                                "(set data.loss_on=all or model.chat_template)")
            spans.append((len(before), len(upto)))
    enc = tok(full, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    if loss_on == "all":
        labels = list(ids)
    else:
        labels = [-100] * len(ids)
        for j, (s, e) in enumerate(offsets):
            if any(a <= s < b for a, b in spans) and e > s:
                labels[j] = ids[j]
    ids, labels = ids[:max_length], labels[:max_length]
    if all(x == -100 for x in labels[1:]):
        raise DataError(f"{where}: no answer tokens left within data.max_length={max_length} "
                        f"(prompt is {len(enc['input_ids'])} tokens); raise data.max_length or shorten the row")
    return TokenizedExample(ids, labels, where)


def load_sft_examples(path: str, tok, fmt: str, max_length: int, loss_on: str, limit: int | None = None) -> list[TokenizedExample]:
    """Check every row first (cheap), then tokenize; any problem raises DataError naming the row."""
    rows = []
    for row, where in iter_rows(path):
        rows.append((to_messages(row, where, fmt), where))
        if limit is not None and len(rows) >= limit:
            break
    if not rows:
        raise DataError(f"{path}: no records")
    return [tokenize_messages(tok, m, w, max_length, loss_on) for m, w in rows]


def check_sft_file(path: str, fmt: str = "auto") -> int:
    """Validate every row without a tokenizer; returns the row count."""
    n = 0
    for row, where in iter_rows(path):
        to_messages(row, where, fmt)
        n += 1
    if n == 0:
        raise DataError(f"{path}: no records")
    return n
