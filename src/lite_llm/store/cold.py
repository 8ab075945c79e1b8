"""The cold level: experts read from the checkpoint's own safetensors shards, one expert's
slice at a time.

A tier's bank ``gate_up_proj`` (E, 2H, d) is stored row-major, so expert ``e`` is one
contiguous run of bytes at ``offset + e * row_bytes``; it is read with one ``pread`` into a
fresh tensor — only that expert's bytes leave the disk (or the page cache).

Every read first checks that the shard is still the file that was opened (inode, size,
modification time): a shard deleted, replaced or rewritten after loading is one sentence
naming the expert and the file, never an expert read from other bytes.  The first read of
each expert is also hashed against the per-expert sha256 the manifest records (when it records
them): the shards' own hashes are not checked at load (a full read of every expert), so this is
what keeps a shard corrupted in place — same size, other bytes — from being computed with.
Later reads of the same unchanged file are not hashed again (see ``_verified``).
"""

from __future__ import annotations

import hashlib
import math
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..checkpoint.lazy import CheckpointTensors
from ..checkpoint.quantization import BANKS, dequantize
from ..config import ModelConfig
from ..errors import CheckpointError
from .cache import Weights
from .policies import Key


class ExpertFileChanged(CheckpointError):
    """A cold shard is not the file that was opened any more."""


@dataclass(frozen=True)
class ExpertSlice:
    path: Any  # a local Path, or an archive's URL
    offset: int  # of expert 0's bytes
    row_bytes: int  # bytes of one expert
    row_shape: tuple[int, ...]
    dtype: torch.dtype
    tensor: str  # the bank's name in the checkpoint


def _identity(path: Path) -> tuple[int, int, int]:
    st = os.stat(path)
    return st.st_ino, st.st_size, st.st_mtime_ns


class ColdExperts:
    """Reads single experts from a checkpoint opened with :func:`~lite_llm.checkpoint.open_checkpoint`
    (a quantized tier's experts are read as stored and dequantized to float32)."""

    def __init__(self, source: CheckpointTensors) -> None:
        layout = {name: (*source.tensors.location(name), source.tensors.spec(name)) for name in source.tensors}
        self._setup(source.path, source.config, layout)
        self._hashes: dict[str, list[str]] = {}
        # Experts whose bytes matched their hash once: a later read of the same, unchanged file
        # (inode, size, mtime: _check_same_file) is not hashed again.  sha256 runs at ~1.6 GB/s
        # here, so hashing every read would add ~8 ms per decoded token at a 10% hot budget
        # (12.7 MB read per token, BENCHMARKS.md "Decoding with the experts on disk").
        self._verified: set[tuple[str, int]] = set()
        for shard in source.manifest.get("shards", []):
            if shard.get("kind") == "experts":
                self._hashes.update(shard.get("expert_sha256") or {})
        self._identity: dict[Path, tuple[int, int, int]] = {}
        for where in self._slices.values():
            if where.path not in self._identity:
                self._identity[where.path] = _identity(where.path)

    def _setup(self, root: object, config: ModelConfig, layout: dict[str, tuple[Any, int, int, Any]]) -> None:
        """Index the expert banks of ``layout`` (name -> (file, offset, bytes, spec))."""
        self.root = root
        self._slices: dict[tuple[int, str, str], ExpertSlice] = {}
        self._quantization = {t.name: t.quantization for t in config.tiers}
        self._lock = threading.Lock()
        self.bytes_read = 0
        for name, (path, offset, nbytes, spec) in layout.items():
            parts = name.split(".")
            # layers.{l}.ffn.experts.{tier}.{gate_up_proj|down_proj}[.qweight|.qscale]
            if len(parts) in (6, 7) and parts[0] == "layers" and parts[2:4] == ["ffn", "experts"]:
                experts = spec.shape[0]
                self._slices[(int(parts[1]), parts[4], ".".join(parts[5:]))] = ExpertSlice(
                    path, offset, nbytes // max(experts, 1), tuple(spec.shape[1:]), spec.dtype, name
                )

    def _parts(self, tier: str) -> tuple[str, ...]:
        if self._quantization.get(tier):
            return tuple(f"{bank}.{q}" for bank in BANKS for q in ("qweight", "qscale"))
        return BANKS

    def expert_bytes(self, layer: int, tier: str) -> int:
        """Bytes one expert of ``tier`` in ``layer`` takes on disk."""
        return sum(self._slices[(layer, tier, part)].row_bytes for part in self._parts(tier))

    def expert_elements(self, layer: int, tier: str) -> int:
        """Weights of one expert (in memory it takes this times the compute dtype's size)."""
        kind = self._quantization.get(tier)
        if not kind:
            return sum(math.prod(self._slices[(layer, tier, bank)].row_shape) for bank in BANKS)
        per_byte = 2 if kind == "int4" else 1
        return sum(math.prod(self._slices[(layer, tier, f"{bank}.qweight")].row_shape) * per_byte for bank in BANKS)

    def has(self, layer: int, tier: str) -> bool:
        return all((layer, tier, part) in self._slices for part in self._parts(tier))

    def read(self, key: Key) -> tuple[torch.Tensor, ...]:
        """Expert ``key``'s tensors as stored (fresh CPU tensors): ``(gate_up, down)``, or for a
        quantized tier ``(gate_up qweight, qscale, down qweight, qscale)`` — what warm holds."""
        return tuple(self._read_part(key, part) for part in self._parts(key[1]))

    def weights(self, key: Key, stored: tuple[torch.Tensor, ...]) -> Weights:
        """``(gate_up, down)`` of what :meth:`read` returned: a quantized tier's dequantized."""
        kind = self._quantization.get(key[1])
        if not kind:
            return stored[0], stored[1]
        return dequantize(stored[0], stored[1], kind), dequantize(stored[2], stored[3], kind)

    def _read_part(self, key: Key, part: str) -> torch.Tensor:
        layer, tier, expert = key
        where = self._slices[(layer, tier, part)]
        what = f"expert {expert} of tier {tier} in layer {layer}"
        out = torch.empty(where.row_shape, dtype=where.dtype)
        buf = memoryview(out.reshape(-1).view(torch.uint8).numpy())  # bytes of any dtype, bf16 included
        self._read_into(where, expert, buf, what)
        with self._lock:
            self.bytes_read += where.row_bytes
        return out

    def _read_into(self, where: ExpertSlice, expert: int, buf: memoryview, what: str) -> None:
        """Fill ``buf`` with expert ``expert``'s bytes of ``where`` from the local file."""
        self._check_same_file(where.path, what)
        with open(where.path, "rb", buffering=0) as f:
            got = os.preadv(f.fileno(), [buf], where.offset + expert * where.row_bytes)
        if got != where.row_bytes:
            raise ExpertFileChanged(f"{what} could not be read from {where.path} (short read: the file is truncated); restore the checkpoint")
        self._check_same_file(where.path, what)  # not rewritten while it was read
        want = self._hashes.get(where.tensor)
        if want is None or (where.tensor, expert) in self._verified:
            return
        if expert >= len(want) or hashlib.sha256(buf).hexdigest() != want[expert]:
            raise ExpertFileChanged(
                f"{what} in {where.path} does not match its sha256 in the manifest (the shard is corrupt); nothing was computed with it: "
                "restore the checkpoint from a backup or re-save it"
            )
        self._verified.add((where.tensor, expert))

    def _check_same_file(self, path: Path, what: str) -> None:
        try:
            now = _identity(path)
        except FileNotFoundError:
            raise ExpertFileChanged(f"{what} cannot be read: {path} was deleted after the model was loaded; restore it and load the model again") from None
        if now != self._identity[path]:
            raise ExpertFileChanged(
                f"{what} cannot be read: {path} changed after the model was loaded (another file or rewritten); load the model again"
            )
