"""The archive level: a checkpoint at any fsspec URL (``file://``, ``http(s)://``, ``s3://``
with ``s3fs`` installed), read with byte-range requests, every fetched expert's sha256
checked against the manifest before it is used.

Opening reads the manifest, the dense and router shards whole (each checked against its
sha256) and the expert shards' safetensors headers (8 bytes, then the header); nothing else.
An expert is one range request per bank (two, or four for a quantized tier).  A failed
request, a short answer or bytes whose hash is not the manifest's are one sentence naming the
expert and the URL; nothing read from such an answer is ever computed with.  A checkpoint
written before experts were hashed (no ``expert_sha256`` in its manifest) is refused here:
re-save it (any ``lite-llm`` command that writes a checkpoint records them).
"""

from __future__ import annotations

import hashlib
import json
import struct
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_safetensors_bytes

from ..checkpoint.load import build_config, config_from_manifest, load_tokenizer
from ..checkpoint.manifest import MANIFEST, TOKENIZER_DIR, validate_manifest
from ..checkpoint.stream import TensorSpec
from ..errors import CheckpointError
from .cold import ColdExperts, ExpertFileChanged, ExpertSlice

_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "I64": torch.int64,
           "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


def is_url(path: object) -> bool:
    return "://" in str(path)


HTTP_TIMEOUT_S = 60.0  # seconds an http(s) archive may take to connect, and between bytes of an answer


class ArchiveError(CheckpointError):
    """An archive that cannot be read, or that answered with other bytes."""


class Archive:
    """A checkpoint directory at ``url``, read through fsspec."""

    def __init__(self, url: str) -> None:
        try:
            import fsspec
        except ImportError:
            raise ArchiveError(f"reading {url} needs fsspec; pip install 'lite-llm[archive]'") from None
        self.url = url.rstrip("/")
        options: dict = {}
        if self.url.split("://", 1)[0] in ("http", "https"):
            # aiohttp's default is 5 minutes in all, then an empty error: a server that accepts and
            # never answers stalls every command that long.  A bound per connect and per read
            # instead (a large expert still streams as long as bytes keep coming).
            import aiohttp

            options["client_kwargs"] = {"timeout": aiohttp.ClientTimeout(total=None, sock_connect=HTTP_TIMEOUT_S, sock_read=HTTP_TIMEOUT_S)}
        try:
            self.fs, self.root = fsspec.core.url_to_fs(self.url, **options)
        except (ImportError, ValueError) as exc:
            raise ArchiveError(f"cannot open {url} ({exc}); install the fsspec backend for its scheme (s3fs for s3://, aiohttp for http://)") from None
        data = self.read(MANIFEST, "the manifest")
        try:
            parsed = json.loads(data)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ArchiveError(f"{self.url}/{MANIFEST} is not valid JSON ({exc}); point to a lite-llm checkpoint") from None
        where = f"{self.url}/{MANIFEST}"  # a URL, not a Path (which would fold s3:// into s3:/)
        self.manifest = validate_manifest(parsed, where)
        raw, skipped = config_from_manifest(self.manifest, self.url)
        self.config = build_config(raw, self.manifest, where)

    def member(self, rel: str) -> str:
        if rel.startswith("/") or ".." in rel.split("/"):
            raise ArchiveError(f"{self.url}/{MANIFEST} names {rel!r}, which is outside the checkpoint; restore the manifest")
        return f"{self.root}/{rel}"

    def read(self, rel: str, what: str, start: int | None = None, end: int | None = None) -> bytes:
        """Bytes ``[start, end)`` of ``rel`` (all of it by default), or one sentence."""
        try:
            data = self.fs.cat_file(self.member(rel), start=start, end=end)
        except FileNotFoundError:
            raise ArchiveError(f"{what} is not at {self.url}/{rel}; upload the whole checkpoint there") from None
        except Exception as exc:  # noqa: BLE001 - every backend raises its own kind
            if isinstance(exc, TimeoutError) or "Timeout" in type(exc).__name__:
                raise ArchiveError(
                    f"{what} could not be read from {self.url}/{rel}: the server sent nothing for {HTTP_TIMEOUT_S:g} s; check the server, then retry"
                ) from None
            raise ArchiveError(f"{what} could not be read from {self.url}/{rel} ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); check the URL and the server, then retry") from None
        if start is not None and end is not None and len(data) != end - start:
            raise ArchiveError(f"{what} from {self.url}/{rel}: asked for {end - start} bytes, got {len(data)} (the server ignores byte ranges or the file changed); nothing was used")
        return data

    def checked(self, entry: dict[str, Any], what: str) -> bytes:
        """A listed file whole, checked against its manifest sha256."""
        data = self.read(entry["path"], what)
        if hashlib.sha256(data).hexdigest() != entry["sha256"]:
            raise ArchiveError(f"{what} {self.url}/{entry['path']} does not match its sha256 in the manifest; nothing was used (re-upload the checkpoint)")
        return data

    def header(self, rel: str) -> tuple[int, dict[str, Any]]:
        """(data start, header) of a safetensors file, from two range reads."""
        (n,) = struct.unpack("<Q", self.read(rel, "a shard header", 0, 8))
        header = json.loads(self.read(rel, "a shard header", 8, 8 + n))
        return 8 + n, header

    def dense_state(self) -> dict[str, torch.Tensor]:
        """Every non-expert tensor (dense and router shards, each checked whole)."""
        state: dict[str, torch.Tensor] = {}
        for shard in self.manifest["shards"]:
            if shard["kind"] != "experts":
                state.update(load_safetensors_bytes(self.checked(shard, "shard")))
        return state

    def tokenizer(self) -> Any:
        files = [f for f in self.manifest.get("files", []) if isinstance(f, dict) and str(f.get("path", "")).startswith(TOKENIZER_DIR + "/")]
        if not files:
            return None
        with tempfile.TemporaryDirectory() as tmp:
            for entry in files:
                target = Path(tmp) / entry["path"]
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(self.checked(entry, "tokenizer file"))
            return load_tokenizer(Path(tmp) / TOKENIZER_DIR)


class ArchiveExperts(ColdExperts):
    """Single experts fetched from an :class:`Archive` by byte range, hash-checked."""

    def __init__(self, archive: Archive) -> None:
        self.archive = archive
        layout: dict[str, tuple[Any, int, int, TensorSpec]] = {}
        self._hashes: dict[str, list[str]] = {}
        for shard in archive.manifest["shards"]:
            if shard["kind"] != "experts":
                continue
            if "expert_sha256" not in shard:
                raise ArchiveError(
                    f"{archive.url}/{shard['path']} has no per-expert hashes in the manifest (written before they were recorded); "
                    "re-save the checkpoint (e.g. lite-llm quantize or any growth) and upload that"
                )
            self._hashes.update(shard["expert_sha256"])
            start, header = archive.header(shard["path"])
            for name, info in header.items():
                if name == "__metadata__":
                    continue
                begin, end = info["data_offsets"]
                layout[name] = (shard["path"], start + begin, end - begin, TensorSpec(_DTYPES[info["dtype"]], tuple(info["shape"])))
        self._setup(archive.url, archive.config, layout)

    def _read_into(self, where: ExpertSlice, expert: int, buf: memoryview, what: str) -> None:
        begin = where.offset + expert * where.row_bytes
        data = self.archive.read(where.path, what, begin, begin + where.row_bytes)
        want = self._hashes.get(where.tensor, [])
        if expert >= len(want) or hashlib.sha256(data).hexdigest() != want[expert]:
            raise ExpertFileChanged(
                f"{what} from {self.archive.url}/{where.path} does not match its sha256 in the manifest; nothing was computed with it (re-upload the checkpoint)"
            )
        buf[:] = data
