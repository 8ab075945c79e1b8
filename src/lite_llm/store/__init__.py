"""Where expert weights live: hot (the compute device), warm (CPU RAM), cold (the checkpoint's
shards on disk, one expert's bytes at a time), within byte budgets, evicted by a policy,
pinned while in use.  Implements the model's expert-source interface from checkpoint files;
the model never reads a file."""

from .cache import CacheLevel, LevelStats
from .cold import ColdExperts, ExpertFileChanged
from .load import InferenceModel, StoredModel, load_for_inference, load_with_store
from .prefetch import Prefetcher, PrefetchStats
from .policies import LRU, POLICIES, LayerCycle, belady_hits, make_policy
from .sizes import format_bytes, parse_bytes
from .store import ExpertStore, StoreStats

__all__ = [
    "CacheLevel", "LevelStats", "ColdExperts", "ExpertFileChanged", "InferenceModel", "StoredModel", "load_for_inference", "load_with_store", "LRU", "POLICIES",
    "LayerCycle", "belady_hits", "make_policy", "format_bytes", "parse_bytes", "ExpertStore", "StoreStats", "Prefetcher", "PrefetchStats",
]
