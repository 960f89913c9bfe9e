"""Shared helpers for the feedback service tests (a module name no other test folder uses)."""

from __future__ import annotations

import socket

ADMIN_TOKEN = "alf_test-admin-token-0123456789abcdef"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def item(prompt: str, n: int = 3, gold_best: int | None = None, model: str = "sft-tiny") -> dict:
    """An item with n answers, each with provenance."""
    out = {
        "prompt": prompt,
        "answers": [{"text": f"{prompt} / answer {k}", "model_id": model, "model_version": "v1", "sampling": {"temperature": 0.7, "seed": k}} for k in range(n)],
    }
    if gold_best is not None:
        out["gold_best"] = gold_best
    return out
