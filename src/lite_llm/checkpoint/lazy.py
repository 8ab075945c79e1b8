"""A checkpoint's tensors as a lazy mapping: nothing is read until a tensor is looked up.

This is how growth reads its source (a model bigger than memory is read one tensor at a
time) and how tools that only need a few tensors avoid building a model.
"""

from __future__ import annotations

import os
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from ..config import ModelConfig
from ..errors import CheckpointError
from . import atomic
from .load import build_config, config_from_manifest, read_progressive, verify_checkpoint
from .manifest import MANIFEST, SHARD_KINDS, TOKENIZER_DIR, manifest_in, safe_member
from .stream import SafetensorsReader, TensorSpec


class LazyMapping(Mapping[str, torch.Tensor]):
    """A name -> tensor mapping whose names are known without its values: membership,
    iteration and length answer from ``self._names`` (a container of the names), because
    ``Mapping``'s defaults look the tensor up — read, compute or produce it — just to test a
    name.  Subclasses set ``_names`` and define ``__getitem__``."""

    _names: Collection[str]

    def __contains__(self, name: object) -> bool:
        return name in self._names

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


class LazyTensorFiles(LazyMapping):
    """name -> tensor over a set of safetensors files, each tensor read when looked up."""

    def __init__(self, files: list[Path], fix: str = "restore the checkpoint from a backup or re-save it") -> None:
        self._where: dict[str, SafetensorsReader] = {}
        self._names = self._where
        for path in files:
            reader = SafetensorsReader(path)
            for name in reader.keys():
                if name in self._where:
                    raise CheckpointError(f"tensor {name} appears in both {self._where[name].path} and {path}; {fix}")
                self._where[name] = reader

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._where[name].get(name)

    def spec(self, name: str) -> TensorSpec:
        return self._where[name].spec(name)

    def location(self, name: str) -> tuple[Path, int, int]:
        """(file, byte offset, byte count) of ``name``'s raw data (see :meth:`SafetensorsReader.location`)."""
        return self._where[name].location(name)


@dataclass
class CheckpointTensors:
    """A checkpoint opened for streaming: its config, manifest, progressive state, the path of
    its tokenizer, and its stored tensors (tied ``lm_head`` excluded) as a lazy mapping."""

    path: Path
    config: ModelConfig
    manifest: dict
    progressive: dict
    tensors: LazyTensorFiles

    @property
    def tokenizer_dir(self) -> Path | None:
        d = self.path / TOKENIZER_DIR
        return d if d.is_dir() else None

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the embedding (the model's working dtype)."""
        return self.tensors.spec("embed.weight").dtype

    def manifest_sha256(self) -> str:
        import hashlib

        return hashlib.sha256((self.path / MANIFEST).read_bytes()).hexdigest()


def check_sound(path: str | os.PathLike) -> None:
    """Raise :class:`CheckpointError` with the first problem :func:`verify_checkpoint` finds."""
    problems = verify_checkpoint(path)
    if problems:
        more = f" (and {len(problems) - 1} more problem(s))" if len(problems) > 1 else ""
        raise CheckpointError(problems[0] + more)


def open_checkpoint(path: str | os.PathLike, *, verify: bool = True) -> CheckpointTensors:
    """Open the checkpoint at ``path`` for lazy reading.

    ``verify`` checks every file's sha256 first (one sequential read of the checkpoint) and
    that the shards supply exactly the tensors the config needs, so a corrupt source is
    refused before anything is written from it.
    """
    root = atomic.resolve_dir(Path(path), MANIFEST)
    manifest = manifest_in(root)
    if verify:
        check_sound(root)
    raw, skipped = config_from_manifest(manifest, root)
    if skipped:
        raise CheckpointError(f"checkpoint {root} has tier(s) {', '.join(skipped)} that this lite-llm cannot read; upgrade lite-llm before growing it")
    config = build_config(raw, manifest, root / MANIFEST)
    files = [
        safe_member(root, shard["path"], root / MANIFEST)
        for shard in manifest["shards"]
        if shard["kind"] in SHARD_KINDS
    ]
    progressive = read_progressive(root, manifest, verify=False)  # hashed by check_sound when verify
    return CheckpointTensors(root, config, manifest, progressive, LazyTensorFiles(files))
