"""Load a checkpoint for inference with its experts left on disk, served by an :class:`ExpertStore`.

Dense weights, router gates and embeddings are read into the model (they are small and every
token needs them); the expert banks are never materialised: the model is built with them on
the meta device and each is replaced by a :class:`~lite_llm.model.expert_source.SourcedExperts`
asking the store.  The dense and router shards are hashed against the manifest like any load;
the expert shards are checked for presence, size and header, and a tier's shard is hashed too
when ``verify_experts`` (one full read of it — what a model larger than memory cannot afford
at every start).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..checkpoint.lazy import open_checkpoint
from ..checkpoint.load import load_tokenizer
from ..checkpoint.manifest import DENSE, MANIFEST, check_file, safe_member
from ..config import ModelConfig, TierSet
from ..errors import CheckpointError, LiteLLMError
from ..model import LiteLLM, load_stored
from ..model.expert_source import attach_expert_source
from .archive import Archive, ArchiveExperts, is_url
from .cold import ColdExperts
from .policies import make_policy
from .prefetch import Prefetcher
from .sizes import parse_bytes
from .store import ExpertStore


@dataclass
class StoredModel:
    """A model whose experts ``store`` serves, with what :func:`load_checkpoint` would give."""

    model: LiteLLM
    config: ModelConfig
    tokenizer: Any
    store: ExpertStore
    path: Path | str  # a local directory, or the archive's URL


def load_with_store(
    path: str | os.PathLike,
    *,
    hot_budget: int | str,
    warm_budget: int | str = 0,
    policy: str = "layer-cycle",
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    verify_experts: bool = False,
    tierset: TierSet | str | None = None,
) -> StoredModel:
    """The checkpoint at ``path`` with its experts in a store of ``hot_budget`` bytes on
    ``device`` and ``warm_budget`` bytes of CPU RAM (sizes like ``512MB`` or ``2GiB``), reading
    only the tiers of ``tierset`` (default: all), whose experts the budgets must hold."""
    hot, warm = parse_bytes(hot_budget, "hot budget"), parse_bytes(warm_budget, "warm budget")
    if is_url(path):  # the archive level: byte ranges from any fsspec URL, every expert hash-checked
        archive = Archive(str(path))
        config, cold, root = archive.config, ArchiveExperts(archive), str(path)
        dense = archive.dense_state()
        tokenizer_of: Any = archive.tokenizer
    else:
        source = open_checkpoint(path, verify=False)
        _check_shards(source.path, source.manifest, verify_experts)
        config, cold, root = source.config, ColdExperts(source), source.path
        dense = {name: source.tensors[name] for name in source.tensors if ".ffn.experts." not in name}
        tokenizer_of = lambda: load_tokenizer(source.tokenizer_dir) if source.tokenizer_dir else None  # noqa: E731
    dtype = dtype or dense["embed.weight"].dtype
    device = torch.device(device)

    model = LiteLLM(config, expert_device="meta")
    store = ExpertStore(
        cold, hot_budget=hot, warm_budget=warm, hot_policy=make_policy(policy, config.n_layers),
        warm_policy=make_policy(policy, config.n_layers), device=device, dtype=dtype,
    )
    replaced = attach_expert_source(model, store)
    missing = [(layer, tier) for layer, tier in replaced if not cold.has(layer, tier)]
    if missing:
        raise CheckpointError(f"checkpoint {root} has no experts for tier {missing[0][1]} in layer {missing[0][0]}; restore its expert shard")
    allowed = TierSet.coerce(tierset).resolve(config) if tierset is not None else None
    if allowed is not None:
        store.set_allowed_tiers(allowed)
    store.check_budgets([(layer, tier) for layer, tier in replaced if allowed is None or tier in allowed])
    load_stored(model, {name: t.to(dtype) if t.is_floating_point() else t for name, t in dense.items()})
    model = model.to(device).eval().requires_grad_(False)
    return StoredModel(model, config, tokenizer_of(), store, root)


def _check_shards(root: Path, manifest: dict, verify_experts: bool) -> None:
    """Every shard present with its listed size; dense and router shards hashed (experts' too
    when ``verify_experts``)."""
    for shard in manifest["shards"]:
        shard_path = safe_member(root, shard["path"], root / MANIFEST)
        hash_it = shard["kind"] != "experts" or verify_experts or shard["tier"] == DENSE
        problem = check_file(shard_path, shard, "shard", verify=hash_it)
        if problem:
            raise CheckpointError(problem)


@dataclass
class InferenceModel:
    """A model ready to decode, with the store serving its experts when it has one."""

    model: LiteLLM
    tokenizer: Any
    store: ExpertStore | None = None  # None: every expert resident
    prefetcher: Prefetcher | None = None


def load_for_inference(
    path: str | os.PathLike,
    *,
    tierset: TierSet | str | None = None,
    device: str | torch.device = "cpu",
    hot_budget: int | str | None = None,
    warm_budget: int | str | None = None,
    policy: str = "layer-cycle",
    prefetch: bool = False,
    dtype: torch.dtype | None = None,
) -> InferenceModel:
    """The checkpoint whole in memory, or with its experts in a store when ``hot_budget`` is
    given (``path`` may then be a URL) — the one choice `generate`, `eval`, `serve` and
    `tiers profile` make.  ``tierset`` limits which tiers are loaded, or, in a store, which
    tiers it may read; ``prefetch`` starts a :class:`Prefetcher` when there is a warm level to
    read into; ``dtype`` is the one computed in (default: the checkpoint's own)."""
    if hot_budget is None:
        if warm_budget is not None:
            raise LiteLLMError("--warm-budget needs --hot-budget (the experts on the compute device); give both, or neither")
        from ..checkpoint import load_checkpoint

        loaded = load_checkpoint(path, tierset=tierset, device=device, dtype=dtype)
        return InferenceModel(loaded.model.eval().requires_grad_(False), loaded.tokenizer)  # as the store's: decoding needs no graph
    if prefetch and not parse_bytes(warm_budget or 0, "warm budget"):
        raise LiteLLMError("--prefetch reads the experts it predicts into the warm level, and a warm budget of 0 has none; give --warm-budget (e.g. 1GB) or leave --prefetch out")
    stored = load_with_store(path, hot_budget=hot_budget, warm_budget=warm_budget or 0, policy=policy, device=device, dtype=dtype, tierset=tierset)
    prefetcher = Prefetcher(stored.model, stored.store) if prefetch else None
    return InferenceModel(stored.model, stored.tokenizer, stored.store, prefetcher)
