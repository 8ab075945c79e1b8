"""Stable hashes for splits and sampling.

Python's ``hash()`` of a string is salted per process, so anything derived from it (which
documents are held out, which windows a step trains on) would change between runs and break
resumption.  BLAKE2b of a canonical encoding is the same on every machine and every run.
"""

from __future__ import annotations

import hashlib


def stable_u64(*parts: object) -> int:
    """A 64-bit hash of ``parts`` (ints and strings), identical across processes and machines."""
    encoded = "\x1f".join(f"{type(p).__name__}:{p}" for p in parts).encode("utf-8")
    return int.from_bytes(hashlib.blake2b(encoded, digest_size=8).digest(), "little")


def stable_unit(*parts: object) -> float:
    """A number in [0, 1) drawn deterministically from ``parts``."""
    return (stable_u64(*parts) >> 11) / 2.0**53  # 53 bits: exact in a float, never rounds to 1.0
