"""Which cached expert to evict.

A policy sees every access (``touch``) and, when a level is over its budget, orders the
unpinned candidates (``victim``).  Keys are ``(layer, tier, expert)``; time is counted in
accesses, so the policies behave the same whatever the speed of the machine.

* :class:`LRU` — the least recently used goes first (mixtral-offloading's per-layer cache,
  llama.cpp's expert cache).
* :class:`LayerCycle` — ours.  A decoder visits its layers in a cycle, so the next time an
  expert of layer ``l`` *can* be used is known: when the model next reaches ``l``.  Whether it
  *will* be used is estimated by how often it was (an exponentially decayed count per expert,
  half-life ``half_life`` visits of its layer: 128 measured best of 8, 32, 128 and 512 on a
  trained model's routes, by a few percent; BENCHMARKS.md).  The victim is the expert with the least
  expected use per access until its next chance — ``p(use) / distance`` — which is what
  Belady's rule (evict the one needed furthest in the future) becomes when the future is
  known only in distribution.  Experts of tiers outside the request's TierSet cannot be used
  at all and go first.  A prompt's routes are known before decoding starts: a prefill touches
  each expert once with ``uses`` = the prompt tokens routed to it, so decoding begins with the
  prompt's own frequencies rather than a flat "seen once" for every expert it touched.
* :func:`belady_hits` — the offline optimum for a known sequence of accesses (benchmarks only).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Hashable, Iterable, Sequence
from typing import Protocol

Key = tuple[int, str, int]  # (layer, tier, expert)


class EvictionPolicy(Protocol):
    name: str

    def touch(self, key: Key, uses: int = 1) -> None:
        """``key`` was accessed (a hit or a miss) by ``uses`` tokens at once."""
        ...

    def forget(self, key: Key) -> None:
        """``key`` left the cache."""
        ...

    def victim(self, candidates: Iterable[Key]) -> Key:
        """Which of ``candidates`` (unpinned, cached) to evict next."""
        ...

    def set_allowed_tiers(self, tiers: Iterable[str] | None) -> None:
        """The tiers the current request may use (None: all)."""
        ...


class LRU:
    name = "lru"

    def __init__(self) -> None:
        self._order: OrderedDict[Key, None] = OrderedDict()

    def touch(self, key: Key, uses: int = 1) -> None:
        self._order[key] = None
        self._order.move_to_end(key)

    def forget(self, key: Key) -> None:
        self._order.pop(key, None)

    def victim(self, candidates: Iterable[Key]) -> Key:
        allowed = set(candidates)
        for key in self._order:
            if key in allowed:
                return key
        return next(iter(allowed))

    def set_allowed_tiers(self, tiers: Iterable[str] | None) -> None:
        pass


class LayerCycle:
    name = "layer-cycle"

    def __init__(self, n_layers: int, half_life: float = 128.0) -> None:
        self.n_layers = max(int(n_layers), 1)
        self.decay = 0.5 ** (1.0 / half_life)
        self._score: dict[Key, float] = {}  # decayed use count, as of _seen[key]
        self._seen: dict[Key, int] = {}  # visits of the key's layer when the score was updated
        self._visits = [0] * self.n_layers  # visits of each layer so far
        self._layer = 0  # the layer accessed last
        self._allowed: set[str] | None = None

    def touch(self, key: Key, uses: int = 1) -> None:
        layer = key[0] % self.n_layers
        # A new visit of this layer (the experts of one visit share it) when another layer came
        # between, or when an expert of this visit is accessed again (a visit accesses each
        # expert once): with a single MoE layer the layer never changes, and only that shows
        # the next token's visit.
        if layer != self._layer or self._visits[layer] == 0 or self._seen.get(key) == self._visits[layer]:
            self._visits[layer] += 1
        self._layer = layer
        now = self._visits[layer]
        self._score[key] = self._score_at(key, now) + float(uses)
        self._seen[key] = now

    def forget(self, key: Key) -> None:
        pass  # the frequency estimate outlives a stay in the cache

    def _score_at(self, key: Key, now: int) -> float:
        if key not in self._score:
            return 0.0
        return self._score[key] * self.decay ** (now - self._seen[key])

    def decayed_uses(self, key: Key) -> float:
        """Uses of ``key`` so far, each weighted by 1/2 per ``half_life`` visits of its layer since."""
        return self._score_at(key, self._visits[key[0] % self.n_layers])

    def value(self, key: Key) -> float:
        """Expected uses per access until ``key``'s layer comes round again."""
        if self._allowed is not None and key[1] not in self._allowed:
            return -1.0
        layer = key[0] % self.n_layers
        distance = (layer - self._layer - 1) % self.n_layers + 1  # 1 = the next layer, n = this one again
        rate = self.decayed_uses(key) * (1.0 - self.decay)  # ~ p(use) per visit
        return rate / distance

    def victim(self, candidates: Iterable[Key]) -> Key:
        return min(candidates, key=lambda k: (self.value(k), k))

    def set_allowed_tiers(self, tiers: Iterable[str] | None) -> None:
        self._allowed = None if tiers is None else set(tiers)


POLICIES = ("layer-cycle", "lru")  # the names make_policy takes


def make_policy(name: str, n_layers: int) -> EvictionPolicy:
    """A policy by its command-line name."""
    from ..errors import ConfigError

    if name == "lru":
        return LRU()
    if name == "layer-cycle":
        return LayerCycle(n_layers)
    raise ConfigError(f"unknown cache policy {name!r}; choose {' or '.join(POLICIES)}")


def belady_hits(accesses: Sequence[Hashable], capacity: int) -> int:
    """Hits of Belady's optimal cache (evict the entry used furthest in the future) holding
    ``capacity`` entries, over ``accesses``: the upper bound any policy is measured against."""
    import heapq

    if capacity <= 0:
        return 0
    n = len(accesses)
    next_use = [math.inf] * n
    last: dict[Hashable, int] = {}
    for i in range(n - 1, -1, -1):
        next_use[i] = last.get(accesses[i], math.inf)
        last[accesses[i]] = i
    cached: dict[Hashable, float] = {}  # key -> its next use
    heap: list[tuple[float, int, Hashable]] = []  # (-next use, tiebreak, key), lazily cleaned
    hits = 0
    for i, key in enumerate(accesses):
        if key in cached:
            hits += 1
        elif len(cached) >= capacity:
            while True:
                neg, _, old = heapq.heappop(heap)
                if old in cached and cached[old] == -neg:
                    del cached[old]
                    break
        cached[key] = next_use[i]
        heapq.heappush(heap, (-next_use[i], i, key))
    return hits
