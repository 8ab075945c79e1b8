"""The one Hugging Face weights writer: ``model.safetensors``, or shards plus the index
transformers reads them through, for ``export`` and for one-pass growth alike, so shard names
and the index cannot differ between them.

Tensors that pass through a growth unchanged are copied from their source file by the kernel
(``copy_file_range``) with no decoding and no resident copy; the others are produced and
written one at a time.  The disk starts on every 64 MB as soon as it is written
(:class:`~lite_llm.checkpoint.atomic.EarlyWriteback`), and each finished shard is fsynced in
the background while the next one is written.
"""

from __future__ import annotations

import errno
import json
import os
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import torch

from ..checkpoint import atomic
from ..checkpoint.manifest import split_by_bytes
from ..checkpoint.stream import RowChunks, TensorSpec, checked_pieces, safetensors_header, tensor_bytes
from ..errors import CheckpointError
from .hf_import import HF_INDEX_FILE, HF_WEIGHTS_FILE

RawSource = tuple[Path, int, int]  # file, byte offset, byte count
_COPY_CHUNK = 64 * 1024**2


def json_bytes(data: Mapping[str, Any]) -> bytes:
    """The bytes of a JSON file of a Hugging Face folder (indented as transformers writes them)."""
    return (json.dumps(data, indent=2) + "\n").encode("utf-8")


def write_json(path: Path, data: Mapping[str, Any]) -> None:
    """Write a JSON file durably (fsynced), so a folder's small files are as safe as its shards
    even where the caller has no tree-wide fsync after it."""
    atomic.write_bytes_durable(path, json_bytes(data))


def write_weights(
    folder: Path,
    specs: dict[str, TensorSpec],
    raw: Mapping[str, RawSource],
    produce: Callable[[str], torch.Tensor | RowChunks],
    max_shard_bytes: int,
    before_copy: Callable[[], None] = lambda: None,
) -> None:
    """``model.safetensors``, or shards of at most ``max_shard_bytes`` plus the index
    transformers reads them through: the one Hugging Face weights writer, used by ``export``
    (``raw`` empty) and by growth, so shard names and the index cannot differ between them.
    Tensors in ``raw`` are copied as bytes, the others asked of ``produce``.  Each finished
    shard is fsynced in the background while the next one is written.  ``before_copy`` runs
    before each raw copy (it may raise to stop the writing: a growth whose check beside the
    writer has failed)."""
    pieces = split_by_bytes([(n, s.nbytes) for n, s in specs.items()], max_shard_bytes)
    names = [HF_WEIGHTS_FILE] if len(pieces) == 1 else [f"model-{k:05d}-of-{len(pieces):05d}.safetensors" for k in range(1, len(pieces) + 1)]
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="hf-fsync") as syncer, _SourceFiles() as sources:
        syncs = []
        for file_name, piece in zip(names, pieces):
            write_safetensors_raw(folder / file_name, {n: specs[n] for n in piece}, raw, produce, sources, before_copy)
            syncs.append(syncer.submit(atomic.fsync_file, folder / file_name))
        for done in syncs:
            done.result()
    if len(pieces) > 1:
        weight_map = {n: file_name for file_name, piece in zip(names, pieces) for n in piece}
        write_json(folder / HF_INDEX_FILE, {"metadata": {"total_size": sum(s.nbytes for s in specs.values())}, "weight_map": weight_map})


class _SourceFiles:
    """Read-only descriptors of the source files, opened once each."""

    def __init__(self) -> None:
        self._fds: dict[Path, int] = {}

    def fd(self, path: Path) -> int:
        if path not in self._fds:
            self._fds[path] = os.open(path, os.O_RDONLY)
        return self._fds[path]

    def __enter__(self) -> "_SourceFiles":
        return self

    def __exit__(self, *exc: object) -> None:
        for fd in self._fds.values():
            os.close(fd)


def write_safetensors_raw(
    path: Path,
    specs: Mapping[str, TensorSpec],
    raw: Mapping[str, RawSource],
    produce: Callable[[str], torch.Tensor | RowChunks],
    sources: _SourceFiles,
    before_copy: Callable[[], None] = lambda: None,
) -> None:
    """One safetensors file of ``specs``, in order: tensors in ``raw`` copied byte for byte from
    their source file (runs that are contiguous there in one call), the others produced and
    written one at a time.  Not fsynced (the caller does)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    writeback = atomic.EarlyWriteback(fd)

    def copy(run: list[Any]) -> None:
        before_copy()
        _copy_range(sources.fd(run[0]), run[1], run[2], fd, run[0], writeback)

    try:
        _write_all(fd, memoryview(safetensors_header(specs, {"format": "pt"})), writeback)
        run: list[Any] = []  # [file, offset, count] of the pending contiguous raw copy
        for name, spec in specs.items():
            where = raw.get(name)
            if where is not None:
                if run and run[0] == where[0] and run[1] + run[2] == where[1]:
                    run[2] += where[2]
                    continue
                if run:
                    copy(run)
                run = list(where)
                continue
            if run:
                copy(run)
                run = []
            for piece in checked_pieces(name, spec, produce(name)):
                _write_all(fd, tensor_bytes(piece), writeback)
                del piece
        if run:
            copy(run)
    finally:
        os.close(fd)


def _write_all(fd: int, data: memoryview, writeback: atomic.EarlyWriteback) -> None:
    data = data.cast("B")
    while data:
        written = os.write(fd, data)
        writeback.wrote(written)
        data = data[written:]


_NO_IN_KERNEL_COPY = (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EPERM)


def _copy_range(src_fd: int, offset: int, count: int, dst_fd: int, src_path: Path, writeback: atomic.EarlyWriteback) -> None:
    """Append ``count`` bytes of ``src_fd`` from ``offset`` to ``dst_fd``: in the kernel
    (``copy_file_range``) where it can, else through a bounded buffer; ``writeback.every``
    bytes a call, so the disk starts on each range as soon as it is copied."""
    end = offset + count
    copy = getattr(os, "copy_file_range", None)
    while offset < end and copy is not None:
        try:
            n = copy(src_fd, dst_fd, min(writeback.every, end - offset), offset)
        except OSError as exc:
            if exc.errno not in _NO_IN_KERNEL_COPY:
                raise
            break
        if n == 0:
            raise CheckpointError(f"{src_path} is truncated: it ended while its tensors were being copied; download the model folder again")
        writeback.wrote(n)
        offset += n
    while offset < end:
        data = os.pread(src_fd, min(_COPY_CHUNK, end - offset), offset)
        if not data:
            raise CheckpointError(f"{src_path} is truncated: it ended while its tensors were being copied; download the model folder again")
        _write_all(dst_fd, memoryview(data), writeback)
        offset += len(data)
