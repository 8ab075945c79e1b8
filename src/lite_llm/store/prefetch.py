"""Pre-gating prefetch: while layer ``l`` finishes, guess layer ``l+1``'s experts by applying
``l+1``'s router to the residual stream leaving ``l`` and read the guesses into warm in the
background.

Attached from outside the model, as forward hooks on the blocks (the model knows nothing of
it).  A guess only fills a cache: the experts a step computes with are always those its own
routing chose, so a wrong guess costs bytes and never changes an output.  Each guess is
scored when the next layer's real fetch arrives: recall (used experts that were guessed),
precision (guesses that were used) and the bytes of wrong guesses.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from torch import nn

from .policies import Key
from .store import ExpertStore


@dataclass
class PrefetchStats:
    guessed: int = 0  # experts guessed (per layer fetch, counted once)
    used: int = 0  # experts the next layer fetched
    hits: int = 0  # guessed and used
    wasted_bytes: int = 0  # bytes read from disk for guesses not used (a guess already held costs nothing)

    @property
    def recall(self) -> float:
        return self.hits / self.used if self.used else 0.0

    @property
    def precision(self) -> float:
        return self.hits / self.guessed if self.guessed else 0.0

    def to_dict(self) -> dict[str, float]:
        return {"guessed": self.guessed, "used": self.used, "hits": self.hits, "recall": round(self.recall, 4),
                "precision": round(self.precision, 4), "wasted_bytes": self.wasted_bytes}


class Prefetcher:
    """Guesses each MoE layer's experts one layer early and reads them into ``store``'s warm level."""

    def __init__(self, model: nn.Module, store: ExpertStore, *, extra: int = 2, max_guesses: int | None = None) -> None:
        from ..model import TieredMoE

        self.model, self.store, self.extra = model, store, extra
        self.max_guesses = max_guesses
        self.stats = PrefetchStats()
        self._pending: dict[int, set[Key]] = {}  # layer -> guessed keys not yet scored
        self._read: set[Key] = set()  # guesses this prefetcher read from disk, not yet scored
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lite-llm-prefetch")
        self._futures: list[Future] = []
        self._hooks = []
        blocks = list(model.layers)  # type: ignore[attr-defined]
        for prev, nxt in zip(blocks[:-1], blocks[1:]):
            if isinstance(nxt.ffn, TieredMoE):
                self._hooks.append(prev.register_forward_hook(self._hook_for(nxt)))
        store.on_fetch = self._score

    def _hook_for(self, nxt: nn.Module) -> Any:
        def hook(_module: nn.Module, _inputs: Any, output: Any) -> None:
            x = output[0]
            flat = nxt.ffn_norm(x).reshape(-1, x.shape[-1])
            allowed = self.model.allowed_tiers(self.store.allowed_tiers)  # type: ignore[attr-defined]
            probs = nxt.ffn.router.expert_probabilities(flat, allowed)
            slots = min(_slots(nxt) + self.extra, probs.shape[-1])
            ids = probs.topk(slots, dim=-1).indices.flatten().unique().tolist()
            keys = [_key(nxt.ffn, nxt.layer, flat_id) for flat_id in ids]
            if self.max_guesses is not None:
                keys = keys[: self.max_guesses]
            self._pending[nxt.layer] = set(keys)
            self._futures = [f for f in self._futures if not f.done()]
            self._futures.append(self._pool.submit(self.store.warm_up, keys, self._read.add))

        return hook

    def _score(self, layer: int, keys: Sequence[Key]) -> None:
        """Called by the store with the keys a layer's fetch asked for (all chunks)."""
        guessed = self._pending.pop(layer, None)
        if guessed is None:
            return
        used = set(keys)
        self.stats.guessed += len(guessed)
        self.stats.used += len(used)
        self.stats.hits += len(guessed & used)
        wasted = {k for k in guessed - used if k in self._read}  # set.add from the worker, membership here: both atomic under the GIL
        self.stats.wasted_bytes += sum(self.store.cold.expert_bytes(k[0], k[1]) for k in wasted)
        self._read -= guessed

    def wait(self) -> None:
        for f in self._futures:
            f.result()
        self._futures = []

    def close(self) -> None:
        self.wait()
        for h in self._hooks:
            h.remove()
        self.store.on_fetch = None
        self._pool.shutdown(wait=True)


def _slots(block: nn.Module) -> int:
    """Experts a token uses in this MoE block at most."""
    router = block.ffn.router
    return int(router.k_tier * router.max_k_group * router.max_k_expert)


def _key(moe: nn.Module, layer: int, flat: int) -> Key:
    offsets, names = moe.tier_offsets, moe.tier_names
    tier = max(i for i in range(len(names)) if offsets[i] <= flat)
    return layer, names[tier], flat - offsets[tier]
