"""The expert store: hot (compute device, compute dtype) and warm (CPU RAM) levels within byte
budgets over the cold level (the checkpoint's shards), serving the model's expert-source
interface (:class:`lite_llm.model.expert_source.ExpertSource`).

A fetch of a step's experts looks each up in hot, then warm, then reads it cold; what it
brings in is kept in warm (as stored) and hot (as computed with) when their budgets allow,
evicting unpinned entries by the policy, which is told how many rows the step routed to each
expert (a prefill's counts are the prompt's routes, known before decoding starts).  Every fetched expert stays pinned in hot until the
computation that asked for it is done, so the budget must hold the experts of one call:
:meth:`max_experts_at_once` tells the model how many that is, and it takes a layer's experts
in chunks of that many (the outputs do not change, see ``model/expert_source.py``).

On a CPU run whose compute dtype is the stored one, hot and warm hold the same tensors (no
copy is made); both budgets count them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
import threading
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from ..errors import ConfigError
from .cache import CacheLevel, LevelStats, Weights
from .cold import ColdExperts
from .policies import EvictionPolicy, Key
from .sizes import format_bytes


@dataclass
class StoreStats:
    hot: LevelStats
    warm: LevelStats
    cold_reads: int
    cold_bytes: int
    fetches: int

    def to_dict(self) -> dict[str, object]:
        return {"hot": self.hot.to_dict(), "warm": self.warm.to_dict(), "cold_reads": self.cold_reads, "cold_bytes": self.cold_bytes,
                "fetches": self.fetches}


class ExpertStore:
    """Experts of a checkpoint served within ``hot_budget`` and ``warm_budget`` bytes."""

    def __init__(
        self,
        cold: ColdExperts,
        *,
        hot_budget: int,
        warm_budget: int,
        hot_policy: EvictionPolicy,
        warm_policy: EvictionPolicy,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.cold = cold
        self.device = torch.device(device)
        self.dtype = dtype
        self.hot = CacheLevel("hot", hot_budget, hot_policy)
        self.warm = CacheLevel("warm", warm_budget, warm_policy)
        self.cold_reads = 0
        self.fetches = 0
        self.allowed_tiers: list[str] | None = None  # the current request's TierSet, resolved
        # Called with (layer, keys) once a layer's fetches are over (a prefetcher scores its guess).
        self.on_fetch: Callable[[int, list[Key]], None] | None = None
        self._layer: int | None = None
        self._layer_keys: list[Key] = []
        self._warm_lock = threading.Lock()  # the warm level is shared with the prefetch thread

    # ------------------------------------------------------------------------------ sizes
    def hot_bytes(self, layer: int, tier: str) -> int:
        """Bytes one expert of ``tier`` in ``layer`` takes in hot (compute dtype)."""
        return self.cold.expert_elements(layer, tier) * self.dtype.itemsize

    def max_experts_at_once(self, layer: int, tier: str) -> int:
        return max(self.hot.budget // self.hot_bytes(layer, tier), 1)

    def check_budgets(self, keys: Sequence[tuple[int, str]]) -> None:
        """Refuse a hot budget that cannot hold one expert of every (layer, tier) in ``keys``
        (those the TierSet may use), and a warm budget that is not 0 (no warm level) but cannot
        hold one either: every expert read would be dropped on the spot, and a prefetcher
        would read each of its guesses for nothing."""
        need = max((self.hot_bytes(layer, tier) for layer, tier in keys), default=0)
        if self.hot.budget < need:
            raise ConfigError(
                f"a hot budget of {format_bytes(self.hot.budget)} cannot hold one expert; the least that works is {need} bytes "
                f"({format_bytes(need)}): give --hot-budget {need} or more"
            )
        warm_need = max((self.cold.expert_bytes(layer, tier) for layer, tier in keys), default=0)
        if 0 < self.warm.budget < warm_need:
            raise ConfigError(
                f"a warm budget of {format_bytes(self.warm.budget)} cannot hold one expert; the least that works is {warm_need} bytes "
                f"({format_bytes(warm_need)}): give --warm-budget {warm_need} or more, or leave it out for no warm level"
            )

    def set_allowed_tiers(self, tiers: Sequence[str] | None) -> None:
        """Tell the policies (and a prefetcher) which tiers the current request can touch."""
        self.allowed_tiers = None if tiers is None else list(tiers)
        self.hot.policy.set_allowed_tiers(tiers)
        self.warm.policy.set_allowed_tiers(tiers)

    # ------------------------------------------------------------------------------ fetch
    @contextmanager
    def fetch(
        self, layer: int, tier: str, experts: Sequence[int], uses: Sequence[int] | None = None
    ) -> Iterator[list[tuple[torch.Tensor, torch.Tensor]]]:
        keys: list[Key] = [(layer, tier, int(e)) for e in experts]
        counts = [1] * len(keys) if uses is None else [max(int(n), 1) for n in uses]
        if len(counts) != len(keys):
            raise ValueError(f"{len(keys)} experts but {len(counts)} use counts")  # before anything is fetched or pinned
        if len(keys) > self.max_experts_at_once(layer, tier):
            raise ConfigError(f"{len(keys)} experts of tier {tier} do not fit the hot budget at once; ask for at most {self.max_experts_at_once(layer, tier)}")
        self.fetches += 1
        if layer != self._layer:
            self._end_layer()
            self._layer = layer
        self._layer_keys.extend(keys)
        held: list[Key] = []
        out: list[Weights] = []
        try:
            for key, n in zip(keys, counts):
                weights = self._hot(key, n)
                self.hot.pin(key)
                held.append(key)
                out.append(weights)
            yield out
        finally:
            for key in held:
                self.hot.unpin(key)

    @contextmanager
    def room(self, nbytes: int) -> Iterator[None]:
        """Room for ``nbytes`` more on the compute device beside the pinned experts (unpinned
        ones evicted), held until the context exits: the stacked copy a grouped matmul makes of
        the experts it fetched, so that the hot level and that copy together stay within
        ``--hot-budget``."""
        self.hot.reserve(nbytes)
        try:
            yield
        finally:
            self.hot.release(nbytes)

    def _hot(self, key: Key, uses: int) -> Weights:
        weights = self.hot.get(key, uses)
        if weights is not None:
            return weights
        stored = self._warm(key, uses)  # as on disk (a quantized tier: quantized), dequantized on the way to hot
        weights = tuple(t.to(device=self.device, dtype=self.dtype) for t in self.cold.weights(key, stored))  # type: ignore[assignment]
        if not self.hot.put(key, weights, self.hot_bytes(key[0], key[1])):
            raise RuntimeError(f"the hot level has no room for expert {key} beside the pinned ones")  # max_experts_at_once prevents this
        return weights

    def _end_layer(self) -> None:
        if self._layer is not None and self.on_fetch is not None:
            self.on_fetch(self._layer, self._layer_keys)
        self._layer_keys = []

    def _warm(self, key: Key, uses: int) -> tuple[torch.Tensor, ...]:
        with self._warm_lock:
            weights = self.warm.get(key, uses)
        if weights is not None:
            return weights
        return self._read_into_warm(key)

    def _read_into_warm(self, key: Key) -> tuple[torch.Tensor, ...]:
        weights = self.cold.read(key)
        nbytes = self.cold.expert_bytes(key[0], key[1])
        if self.device.type == "cuda":
            weights = tuple(t.pin_memory() for t in weights)  # type: ignore[assignment]
        with self._warm_lock:
            self.cold_reads += 1
            if self.warm.fits(nbytes):
                self.warm.put(key, weights, nbytes)
        return weights

    def warm_up(self, keys: Sequence[Key], on_read: Callable[[Key], None] | None = None) -> None:
        """Read ``keys`` that neither level holds into warm (a prefetch; any thread);
        ``on_read`` hears each key it did read."""
        for key in keys:
            with self._warm_lock:
                known = key in self.warm.entries or key in self.hot.entries
            if not known and self.warm.budget > 0:
                self._read_into_warm(key)
                if on_read is not None:
                    on_read(key)

    # ------------------------------------------------------------------------------ report
    def stats(self) -> StoreStats:
        return StoreStats(self.hot.stats, self.warm.stats, self.cold_reads, self.cold.bytes_read, self.fetches)
