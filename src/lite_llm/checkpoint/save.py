"""Writing a checkpoint directory atomically."""

from __future__ import annotations

import hashlib
import json
import os
import re
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Mapping

import safetensors.torch
import torch

from ..errors import CheckpointError
from ..config import ModelConfig
from ..model import LiteLLM, stored_state
from . import atomic
from .manifest import (
    DENSE,
    EXTRA_TENSORS,
    FORMAT_NAME,
    MANIFEST,
    MODEL_VERSION_DEFAULT,
    PROGRESSIVE,
    TOKENIZER_DIR,
    TRAINING_DIR,
    TRAINING_META,
    TRAINING_TENSORS,
    fill_progressive,
    one_line,
    parse_version,
    sha256_file,
    shard_file_names,
    shard_owner,
    shard_stem,
    split_by_bytes,
)
from . import manifest as _manifest
from .stream import RowChunks, TensorSpec, iter_specs, tensor_bytes, write_safetensors
from .training import TrainingState

_EXTRA_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]*$")
_RESERVED = {TOKENIZER_DIR, TRAINING_DIR, MANIFEST, PROGRESSIVE}


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _json_bytes(data: Any, what: str, *, allow_nan: bool = True) -> bytes:
    """UTF-8 JSON.  User state (progressive, training meta) may hold inf/nan (an initial "best
    loss" often is), written as Python's json writes them; the manifest is strict JSON."""
    try:
        return (json.dumps(data, indent=2, allow_nan=allow_nan) + "\n").encode("utf-8")
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{what} cannot be written as JSON ({one_line(exc)}); keep it to dicts, lists, strings, numbers, booleans and None") from None


def _prepare(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached, contiguous CPU tensors with no shared storage (safetensors refuses it)."""
    out: dict[str, torch.Tensor] = {}
    seen: set[tuple[str, int]] = set()
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise CheckpointError(f"value {name!r} is a {type(t).__name__}, not a tensor; only tensors can be stored in safetensors files")
        t = t.detach().to("cpu").contiguous()
        key = (t.device.type, t.untyped_storage().data_ptr())
        if t.numel() and key in seen:
            t = t.clone()
        elif t.numel():
            seen.add(key)
        out[name] = t
    return out


def _write_safetensors(path: Path, tensors: Mapping[str, torch.Tensor], metadata: dict[str, str]) -> None:
    safetensors.torch.save_file(_prepare(tensors), str(path), metadata=metadata)


def _file_entry(root: Path, rel: str, **extra: Any) -> dict[str, Any]:
    path = root / rel
    return {"path": rel, **extra, "bytes": path.stat().st_size, "sha256": sha256_file(path)}


def _tensor_meta(tensors: Mapping[str, torch.Tensor]) -> dict[str, dict[str, Any]]:
    return {name: {"dtype": _dtype_name(t.dtype), "shape": list(t.shape)} for name, t in tensors.items()}


def save_checkpoint(
    path: str | os.PathLike,
    model: LiteLLM,
    *,
    tokenizer: Any = None,
    progressive: dict | None = None,
    training: TrainingState | None = None,
    extra_dirs: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
    max_shard_bytes: int = 2 * 1024**3,
    model_version: str = MODEL_VERSION_DEFAULT,
) -> Path:
    """Write ``model`` (and optional tokenizer, progressive state, training state and extra
    tensor directories) as a checkpoint directory at ``path``, atomically.

    ``model_version`` is recorded in the manifest; re-saving a grown model (a training run
    resumed from it) should pass its version on, or the manifest says ``1.0.0`` again.

    Everything is written into a hidden temporary directory next to ``path``, fsynced, then
    swapped into place; an existing checkpoint at ``path`` is replaced only once the new one is
    complete.  Any exception removes the temporary directory and leaves ``path`` as it was.
    Returns ``path``.
    """
    if not isinstance(model, LiteLLM):
        raise CheckpointError(
            f"save_checkpoint needs a LiteLLM model (from build_model or load_checkpoint), got {type(model).__name__}; write tensors of another kind with write_checkpoint"
        )
    from .quantization import float_banks_config

    return write_checkpoint(
        path,
        float_banks_config(model.config),  # the model holds float banks, whatever it was loaded from
        stored_state(model),
        tokenizer=tokenizer,
        progressive=progressive,
        training=training,
        extra_dirs=extra_dirs,
        max_shard_bytes=max_shard_bytes,
        model_version=model_version,
    )


def write_checkpoint(
    path: str | os.PathLike,
    config: ModelConfig,
    tensors: Mapping[str, torch.Tensor],
    *,
    specs: Mapping[str, TensorSpec] | None = None,
    tokenizer: Any = None,
    progressive: dict | Callable[[], dict] | None = None,
    training: TrainingState | None = None,
    extra_dirs: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
    max_shard_bytes: int = 2 * 1024**3,
    before_commit: Callable[[], None] | None = None,
    model_version: str = MODEL_VERSION_DEFAULT,
    rows: Callable[[str], RowChunks | None] | None = None,
) -> Path:
    """Write a checkpoint of ``config`` whose stored tensors (tied ``lm_head`` excluded) are
    ``tensors``, atomically, as :func:`save_checkpoint` does.

    ``tensors`` may be lazy (a mapping that computes each tensor when it is looked up, as the
    growth operations return): give ``specs`` (name -> dtype and shape, in writing order) and
    each tensor is produced, written, hashed and dropped one at a time, so a checkpoint larger
    than memory can be written.  ``rows`` may offer a tensor as :class:`RowChunks` instead
    (None: take it from ``tensors``), so not even one embedding-sized table is held whole.
    ``tokenizer`` is an object with ``save(dir)``.
    ``progressive`` may be a callable returning the record, called once the weights are
    written (growth checks its result beside the writer, and the record holds the figures).
    ``before_commit`` runs once everything is written, before the swap into place; if it
    raises, nothing is left behind (growth verifies its source there, in parallel).
    ``model_version`` (major.minor.patch) is the model's version in the manifest: growth
    that older readers can ignore (a new tier) bumps its minor version.
    """
    target = Path(path)
    if max_shard_bytes <= 0:
        raise CheckpointError(f"max_shard_bytes must be positive, got {max_shard_bytes}; pass a size in bytes such as 2 * 1024**3")
    if parse_version(model_version) is None:
        raise CheckpointError(f"model_version must be a major.minor.patch version such as 1.1.0, got {model_version!r}")
    if not callable(progressive):
        progressive_bytes = _json_bytes(fill_progressive(progressive), "progressive")  # a bad record fails before any work
    training_meta = _json_bytes(training.meta, "training.meta") if training is not None else None
    extra_dirs = dict(extra_dirs or {})
    for name in extra_dirs:
        if not isinstance(name, str) or not _EXTRA_NAME.match(name) or name in _RESERVED:
            raise CheckpointError(
                f"extra directory name {name!r} is not allowed; use lower-case letters, digits, '_', '-' or '.' and avoid {', '.join(sorted(_RESERVED))}"
            )
    if specs is None:
        specs = dict(iter_specs(tensors))
    if target.exists() and not (target.is_dir() and ((target / MANIFEST).is_file() or not any(target.iterdir()))):
        raise CheckpointError(f"refusing to overwrite {target}, which is not a lite-llm checkpoint; choose another path or remove it first")

    with atomic.building_dir(target, MANIFEST, before_commit) as tmp:
        shards = _write_shards(tmp, config, tensors, specs, max_shard_bytes, rows)
        if callable(progressive):
            progressive_bytes = _json_bytes(fill_progressive(progressive()), "progressive")
        files = _write_files(tmp, tokenizer, progressive_bytes, training, training_meta, extra_dirs)
        manifest = _manifest_of(config, shards, files, model_version)
        atomic.write_bytes_durable(tmp / MANIFEST, _json_bytes(manifest, "manifest", allow_nan=False))
    return target


def _write_shards(
    tmp: Path,
    config: ModelConfig,
    tensors: Mapping[str, torch.Tensor],
    specs: Mapping[str, TensorSpec],
    max_shard_bytes: int,
    rows: Callable[[str], RowChunks | None] | None = None,
) -> list[dict[str, Any]]:
    """One safetensors file per (tier, kind) group (split at ``max_shard_bytes``), streamed."""

    def produce(name: str) -> torch.Tensor | RowChunks:
        chunks = rows(name) if rows is not None else None
        return chunks if chunks is not None else tensors[name]

    tier_names = [t.name for t in config.tiers]
    groups: dict[tuple[str, str], list[str]] = {(DENSE, DENSE): []}
    for name in tier_names:
        groups[(name, "router")] = []
        groups[(name, "experts")] = []
    for name in specs:
        groups[shard_owner(name, set(tier_names))].append(name)

    shards = []
    # Each finished shard is fsynced in the background while the next one is written: the
    # disk flushes one file while the CPU produces the next.  All are durable before return.
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="shard-fsync") as syncer:
        syncs = []
        for (tier, kind), names in groups.items():
            if not names:
                continue
            pieces = split_by_bytes([(n, specs[n].nbytes) for n in names], max_shard_bytes)
            for file_name, piece in zip(shard_file_names(shard_stem(tier, kind), len(pieces)), pieces):
                piece_specs = {n: specs[n] for n in piece}
                meta = {"format": "pt", "lite_llm_tier": tier, "lite_llm_kind": kind}
                produce_here, expert_hashes = _hashing_experts(produce) if kind == "experts" else (produce, None)
                sha = write_safetensors(tmp / file_name, piece_specs, produce_here, meta, fsync=False)
                syncs.append(syncer.submit(atomic.fsync_file, tmp / file_name))
                dtypes = sorted({_dtype_name(s.dtype) for s in piece_specs.values()})
                shards.append(
                    {
                        "path": file_name,
                        "tier": tier,
                        "kind": kind,
                        "dtype": dtypes[0] if len(dtypes) == 1 else "mixed",
                        "bytes": (tmp / file_name).stat().st_size,
                        "sha256": sha,
                        "tensors": {n: {"dtype": _dtype_name(s.dtype), "shape": list(s.shape)} for n, s in piece_specs.items()},
                        **({"expert_sha256": expert_hashes} if expert_hashes is not None else {}),
                    }
                )
        for done in syncs:
            done.result()
    return shards


def _hashing_experts(
    produce: Callable[[str], torch.Tensor | RowChunks],
) -> tuple[Callable[[str], torch.Tensor | RowChunks], dict[str, list[str]]]:
    """``produce`` for an expert shard, also recording the sha256 of every expert's bytes
    (row ``e`` of each bank): what a reader fetching one expert from an archive checks."""
    hashes: dict[str, list[str]] = {}

    def hashed(name: str, rows: torch.Tensor) -> torch.Tensor:
        hashes[name].extend(hashlib.sha256(tensor_bytes(row)).hexdigest() for row in rows.detach().contiguous().cpu())
        return rows

    def produce_hashing(name: str) -> torch.Tensor | RowChunks:
        produced = produce(name)
        hashes[name] = []
        if isinstance(produced, RowChunks):
            read = produced.read
            return RowChunks(produced.dtype, produced.shape, lambda start, stop: hashed(name, read(start, stop)), produced.rows_per_chunk)
        return hashed(name, produced)

    return produce_hashing, hashes


def _write_files(
    tmp: Path,
    tokenizer: Any,
    progressive_bytes: bytes,
    training: TrainingState | None,
    training_meta: bytes | None,
    extra_dirs: dict[str, Mapping[str, torch.Tensor]],
) -> list[dict[str, Any]]:
    files = []
    atomic.write_bytes_durable(tmp / PROGRESSIVE, progressive_bytes)
    files.append(_file_entry(tmp, PROGRESSIVE, kind="progressive"))
    if tokenizer is not None:
        tok_dir = tmp / TOKENIZER_DIR
        tok_dir.mkdir()
        tokenizer.save(tok_dir)
        for p in sorted(tok_dir.rglob("*")):
            if p.is_file():
                files.append(_file_entry(tmp, p.relative_to(tmp).as_posix(), kind="tokenizer"))
    if training is not None:
        (tmp / TRAINING_DIR).mkdir()
        _write_safetensors(tmp / TRAINING_TENSORS, training.tensors, {"format": "pt"})
        atomic.write_bytes_durable(tmp / TRAINING_META, training_meta or b"{}\n")
        files.append(_file_entry(tmp, TRAINING_TENSORS, kind="training", tensors=_tensor_meta(training.tensors)))
        files.append(_file_entry(tmp, TRAINING_META, kind="training"))
    for name, tensors in extra_dirs.items():
        (tmp / name).mkdir()
        rel = f"{name}/{EXTRA_TENSORS}"
        _write_safetensors(tmp / rel, tensors, {"format": "pt"})
        files.append(_file_entry(tmp, rel, kind="extra", name=name, tensors=_tensor_meta(tensors)))
    return files


def _manifest_of(
    config: ModelConfig, shards: list[dict[str, Any]], files: list[dict[str, Any]], model_version: str = MODEL_VERSION_DEFAULT
) -> dict[str, Any]:
    from ..version import __version__

    return {
        "format": FORMAT_NAME,
        "format_version": _manifest.FORMAT_VERSION,
        "model_version": model_version,
        "created_at": _now(),
        "lite_llm_version": __version__,
        "model_config": config.to_dict(),
        "tiers": {
            t.name: {
                "budget": t.budget,
                "placement": t.placement,
                "k_group": config.k_group_of(t),
                "k_expert": config.k_expert_of(t),
                "created_at": t.created_at,
                "num_params": config.tier_params(t),
            }
            for t in config.tiers
        },
        "num_params": config.num_params(),
        "shards": shards,
        "files": files,
    }
