"""API tokens: random, shown once, stored only as a SHA-256 hash, revocable.

A token carries 256 random bits, so a fast hash is enough (no password stretching needed) and
lets the lookup be an indexed equality on the hash.
"""

from __future__ import annotations

import hashlib
import secrets

TOKEN_PREFIX = "alf_"


def new_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


def display_prefix(token: str) -> str:
    return token[: len(TOKEN_PREFIX) + 6]
