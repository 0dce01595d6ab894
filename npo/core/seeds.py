"""Randomness as a function of (run seed, purpose, step): rollback, resume and paired runs are exact for free."""

from __future__ import annotations

import hashlib


def derive_seed(seed: int, purpose: str, step: int | str) -> int:
    """A 63-bit seed that depends only on (run seed, purpose, step)."""
    digest = hashlib.sha256(f"{seed}/{purpose}/{step}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)
