"""One level of the store: experts held within a byte budget, evicted by a policy, pinned
while a computation uses them, with statistics."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

import torch

from .policies import EvictionPolicy, Key

Weights = tuple[torch.Tensor, torch.Tensor]  # (gate_up (2H, d), down (d, H))


@dataclass
class LevelStats:
    """What one level did: ``hits`` and ``misses`` of lookups, ``bytes_in`` (loaded into this
    level), ``evictions``, and the largest ``peak_bytes`` it held."""

    hits: int = 0
    misses: int = 0
    bytes_in: int = 0
    evictions: int = 0
    peak_bytes: int = 0

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0

    def to_dict(self) -> dict[str, float]:
        return {"hits": self.hits, "misses": self.misses, "hit_rate": round(self.hit_rate, 4), "bytes_in": self.bytes_in,
                "evictions": self.evictions, "peak_bytes": self.peak_bytes}


@dataclass
class CacheLevel:
    """Experts of one level (hot or warm), at most ``budget`` bytes of them."""

    name: str
    budget: int
    policy: EvictionPolicy
    entries: dict[Key, tuple[Weights, int]] = field(default_factory=dict)
    pins: Counter = field(default_factory=Counter)
    used: int = 0
    reserved: int = 0  # bytes held outside the entries for a while (the stacked copy of a grouped matmul's experts)
    stats: LevelStats = field(default_factory=LevelStats)

    def get(self, key: Key, uses: int = 1) -> Weights | None:
        """The cached weights of ``key`` (a hit), or None (a miss); either way an access, by
        ``uses`` tokens at once (what the policy learns; the statistics count one lookup)."""
        entry = self.entries.get(key)
        if entry is None:
            self.stats.misses += 1
        else:
            self.stats.hits += 1
        self.policy.touch(key, uses)
        return None if entry is None else entry[0]

    def fits(self, nbytes: int) -> bool:
        return nbytes <= self.budget

    def put(self, key: Key, weights: Weights, nbytes: int, on_evict: Callable[[Key, Weights], None] | None = None) -> bool:
        """Hold ``weights`` (``nbytes``) for ``key``, evicting unpinned entries as needed.
        Returns False, holding nothing, when the pinned entries leave no room."""
        if key in self.entries:
            return True
        if not self._make_room(nbytes, on_evict):
            return False
        self.entries[key] = (weights, nbytes)
        self.used += nbytes
        self.stats.bytes_in += nbytes
        self.stats.peak_bytes = max(self.stats.peak_bytes, self.used + self.reserved)
        return True

    def reserve(self, nbytes: int) -> None:
        """Count ``nbytes`` held beside the entries against the budget until :meth:`release`,
        evicting unpinned entries to make room (as far as the pinned ones allow)."""
        self._make_room(nbytes)
        self.reserved += nbytes
        self.stats.peak_bytes = max(self.stats.peak_bytes, self.used + self.reserved)

    def release(self, nbytes: int) -> None:
        self.reserved -= nbytes

    def _make_room(self, nbytes: int, on_evict: Callable[[Key, Weights], None] | None = None) -> bool:
        """Evict unpinned entries until ``nbytes`` more fit; False when the pinned ones leave no room."""
        while self.used + self.reserved + nbytes > self.budget:
            candidates = [k for k in self.entries if not self.pins[k]]
            if not candidates:
                return False
            victim = self.policy.victim(candidates)
            evicted, size = self.entries.pop(victim)
            self.used -= size
            self.stats.evictions += 1
            self.policy.forget(victim)
            if on_evict is not None:
                on_evict(victim, evicted)
        return True

    def pin(self, key: Key) -> None:
        self.pins[key] += 1

    def unpin(self, key: Key) -> None:
        self.pins[key] -= 1
        if self.pins[key] <= 0:
            del self.pins[key]

    def drop(self, key: Key) -> None:
        if key in self.entries and not self.pins[key]:
            self.used -= self.entries.pop(key)[1]
            self.policy.forget(key)
