"""Byte budgets as people write them: ``512MB``, ``2GiB``, ``1.5G``, ``800k``, ``4096``."""

from __future__ import annotations

import re

from ..errors import ConfigError

_UNITS = {
    "": 1, "b": 1,
    "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9, "t": 10**12, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}


def parse_bytes(value: int | str, what: str = "budget") -> int:
    """``value`` in bytes; decimal units (kB, MB, GB) are powers of 1000, binary ones (KiB,
    MiB, GiB) of 1024, as safetensors and `ls -h --si` count them."""
    if isinstance(value, bool):
        raise ConfigError(f"cannot read {value!r} as a {what}; write e.g. 512MB, 2GiB or 1000000")
    if isinstance(value, int):
        if value < 0:
            raise ConfigError(f"{what} must be >= 0 bytes, got {value}")
        return value
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(value))
    unit = match.group(2).lower() if match else None
    if not match or unit not in _UNITS:
        raise ConfigError(f"cannot read {value!r} as a {what}; write e.g. 512MB, 2GiB or 1000000")
    return int(float(match.group(1)) * _UNITS[unit])


def format_bytes(n: int) -> str:
    """``1536000`` -> ``1.54 MB``."""
    for unit, scale in (("TB", 10**12), ("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n} B"
