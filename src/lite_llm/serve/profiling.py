"""Measuring a checkpoint's TierSet profile: latency per decoded token, resident bytes, utility.

What is measured, and why so:

* **latency** — KV-cached greedy decoding exactly as :func:`lite_llm.generate.generate_ids`
  runs it (prefill once, then one single-position forward per token), after one warm-up run per
  TierSet; the figure is the median over ``repeats`` runs of (decode time / tokens).  The
  repeats are interleaved across TierSets (repeat 1 of every set, then repeat 2, …), so a burst
  of load from another process spreads over all sets instead of biasing one.
* **memory** — bytes of the weights the TierSet needs resident (dense + its tiers' router heads
  and experts), counted from the manifest's tensor listings, not RSS: a number that is the same
  on every run and every machine.
* **utility** — minus the mean bits per byte on the named validation domains, from the
  existing evaluation (:func:`lite_llm.eval.evaluate`) under that TierSet.
* **active expert bytes** — from the routes decoding actually took: the latency model's input.
"""

from __future__ import annotations

import math
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch

from ..config import ModelConfig, TierSet
from ..errors import DataError, LiteLLMError
from .selection import TierSetProfile, TierSetTable, candidate_tiersets, resident_bytes, tierset_label


def expert_bytes_per_tier(manifest: Mapping[str, Any], config: ModelConfig) -> dict[str, float]:
    """Bytes of one expert of each tier (its share of the tier's expert shards, as stored)."""
    out: dict[str, float] = {}
    for t in config.tiers:
        total = 0
        for shard in manifest["shards"]:
            if shard["tier"] == t.name and shard.get("kind") == "experts":
                for info in shard["tensors"].values():
                    dtype = getattr(torch, str(info.get("dtype", "float32")))
                    total += math.prod(int(s) for s in info.get("shape", ())) * torch.empty((), dtype=dtype).element_size()
        out[t.name] = total / (config.n_layers * t.num_groups * t.experts_per_group)
    return out


@torch.no_grad()
def decode_once(model: Any, prompt: Sequence[int], tokens: int, tierset: TierSet) -> tuple[float, torch.Tensor]:
    """Greedy KV-cached decoding of ``tokens`` tokens after ``prompt``: (seconds spent decoding,
    excluding the prefill; routes per tier summed over layers and decoded tokens)."""
    device = model.embed.weight.device
    model.setup_kv_cache(batch=1, max_len=len(prompt) + tokens + 1)
    routes = torch.zeros(len(model.config.tiers), dtype=torch.long)
    try:
        logits = model(torch.tensor([list(prompt)], device=device), tierset=tierset, start_pos=0).logits[0, -1]
        pos = len(prompt)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        for _ in range(tokens):
            token = int(logits.argmax())
            out = model(torch.tensor([[token]], device=device), tierset=tierset, start_pos=pos)
            logits = out.logits[0, -1]
            for layer in out.routing:
                routes += layer.tier_routes.to("cpu", torch.long)
            pos += 1
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start, routes
    finally:
        model.clear_kv_cache()


def open_domains(data: Mapping[str, str | Path], vocab_size: int, model_tokenizer: Any = None, checkpoint: object = "the checkpoint") -> dict[str, Any]:
    """``{domain: TokenData}`` for ``DOMAIN=PATH`` pairs, each checked: the folder is a prepared
    dataset, it holds the domain, and it was tokenized by the model's tokenizer
    (``model_tokenizer``; without one, only its vocabulary size can be checked)."""
    from ..data import TokenData
    from ..data.compat import check_data_tokenizer

    if not data:
        raise DataError("name at least one validation domain, as --data DOMAIN=PATH (a folder from `lite-llm data prepare`)")
    opened: dict[Path, Any] = {}
    out = {}
    for domain, path in data.items():
        path = Path(path)
        if path not in opened:
            opened[path] = TokenData(path)
        dataset = opened[path]
        if domain not in dataset.domains:
            raise DataError(f"the data in {path} has no domain {domain!r}; it has {', '.join(dataset.domains)}")
        check_data_tokenizer(dataset.tokenizer, path, model_tokenizer, vocab_size, checkpoint)
        out[domain] = dataset
    return out


def profile_checkpoint(
    checkpoint: str | Path,
    data: Mapping[str, str | Path],
    *,
    device: str | torch.device = "cpu",
    hot_budget: int | str | None = None,
    warm_budget: int | str | None = None,
    tokens: int = 32,
    repeats: int = 5,
    prompt_tokens: int = 16,
    eval_batches: int = 4,
    batch_size: int = 4,
    seq_len: int = 64,
    candidates: Sequence[Sequence[str]] | None = None,
    progress: Callable[[str], None] | None = None,
) -> TierSetTable:
    """Measure every candidate TierSet of ``checkpoint`` (see the module docstring) on
    ``device``, with the experts in a store of ``hot_budget``/``warm_budget`` bytes when given
    (as `generate --hot-budget` serves them), else all resident.  ``data`` maps each validation
    domain to its prepared dataset folder.  Returns the table; :func:`save_profile` stores it."""
    from ..checkpoint import read_manifest
    from ..checkpoint.load import load_tokenizer
    from ..checkpoint.manifest import TOKENIZER_DIR
    from ..eval import evaluate
    from ..store import load_for_inference, parse_bytes

    if tokens < 1 or repeats < 1 or prompt_tokens < 1:
        raise LiteLLMError(f"tokens, repeats and prompt tokens must be >= 1, got {tokens}, {repeats} and {prompt_tokens}")
    manifest = read_manifest(checkpoint)
    config = ModelConfig.from_dict(manifest["model_config"], allow_unknown=True)
    order = tuple(t.name for t in config.tiers)
    if not order:
        raise LiteLLMError(f"checkpoint {checkpoint} has no tiers of experts, so there is no TierSet to choose; profile a tiered model")
    if prompt_tokens + tokens + 1 > config.max_seq_len:
        raise LiteLLMError(f"{prompt_tokens} prompt tokens and {tokens} decoded ones exceed the model's {config.max_seq_len} positions; ask for fewer --tokens")
    tokenizer_dir = Path(checkpoint) / TOKENIZER_DIR
    domains = open_domains(data, config.vocab_size, load_tokenizer(tokenizer_dir) if tokenizer_dir.is_dir() else None, checkpoint)
    sets = [tuple(TierSet.of(*c).resolve(config)) for c in candidates] if candidates is not None else candidate_tiersets(order)
    dense_bytes, tier_bytes = resident_bytes(manifest)
    per_expert = expert_bytes_per_tier(manifest, config)
    tier_active = {t.name: config.k_group_of(t) * config.k_expert_of(t) * config.n_layers * per_expert[t.name] for t in config.tiers}

    loaded = load_for_inference(checkpoint, device=device, hot_budget=hot_budget, warm_budget=warm_budget)
    model, store = loaded.model, loaded.store

    first = next(iter(domains))
    prompt = next(iter(domains[first].val_batches(first, 1, prompt_tokens, 1)))[0].tolist()

    def use(tiers: tuple[str, ...]) -> TierSet:
        if store is not None:
            store.set_allowed_tiers(list(tiers))
        return TierSet.of(*tiers)

    samples: dict[tuple[str, ...], list[float]] = {s: [] for s in sets}
    routes: dict[tuple[str, ...], torch.Tensor] = {s: torch.zeros(len(order), dtype=torch.long) for s in sets}
    for s in sets:  # warm-up: caches, the allocator, the store's hot level
        decode_once(model, prompt, tokens, use(s))
    for r in range(repeats):
        for s in sets:
            seconds, counts = decode_once(model, prompt, tokens, use(s))
            samples[s].append(seconds * 1000.0 / tokens)
            routes[s] += counts
        if progress is not None:
            progress(f"timed repeat {r + 1} of {repeats}")
    profiles = []
    for s in sets:
        ts = use(s)
        bpb = {d: evaluate(model, ds, [d], batch_size=batch_size, seq_len=seq_len, max_batches=eval_batches, tierset=ts)[d].bpb for d, ds in domains.items()}
        active = sum(float(routes[s][i]) * per_expert[t] for i, t in enumerate(order)) / (repeats * tokens)
        profiles.append(
            TierSetProfile(
                s, statistics.median(samples[s]), dense_bytes + sum(tier_bytes.get(t, 0) for t in s),
                -sum(bpb.values()) / len(bpb), bpb, tuple(samples[s]), active,
            )
        )
        if progress is not None:
            progress(f"scored {tierset_label(s, order)}")
    return TierSetTable(
        profiles, str(torch.device(device)), order,
        parse_bytes(hot_budget, "hot budget") if hot_budget is not None else None,
        parse_bytes(warm_budget, "warm budget") if warm_budget is not None else None,
        tuple(domains), tokens, dense_bytes, tier_bytes, tier_active,
        {"repeats": repeats, "prompt_tokens": prompt_tokens, "eval_batches": eval_batches, "batch_size": batch_size, "seq_len": seq_len,
         "threads": torch.get_num_threads(), "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())},
    )
