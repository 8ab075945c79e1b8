"""safetensors, one tensor at a time: a reader that never maps a whole file and a writer that
never holds a whole shard.

Growing a model bigger than memory means reading source tensors on demand and writing output
tensors as they are produced.  ``safetensors.safe_open`` memory-maps the file, so every page a
growth touches stays resident (and counts in RSS) until the file is closed; and
``safetensors.torch.save_file`` wants the whole shard as a dict of tensors.  The format itself
is simple (an 8-byte little-endian header length, a JSON header of dtype/shape/offsets, then
the raw bytes), so both directions are written here against it: reads are ``readinto`` a
fresh tensor, writes go tensor by tensor and hash the bytes on the way out.  Files written
here are ordinary safetensors files that ``safetensors`` reads.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterator, Mapping, Sequence

import torch

from ..errors import CheckpointError
from .atomic import EarlyWriteback

_TO_CODE: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
}
_FROM_CODE = {code: dtype for dtype, code in _TO_CODE.items()}
_MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit


class TensorSpec(tuple):
    """(dtype, shape) of a tensor to be written."""

    def __new__(cls, dtype: torch.dtype, shape: Sequence[int]) -> "TensorSpec":
        return super().__new__(cls, (dtype, tuple(int(s) for s in shape)))

    @property
    def dtype(self) -> torch.dtype:
        return self[0]

    @property
    def shape(self) -> tuple[int, ...]:
        return self[1]

    @property
    def nbytes(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n * torch.empty((), dtype=self.dtype).element_size()


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The raw bytes of a tensor without copying (after making it contiguous on the CPU)."""
    t = t.detach().to("cpu").contiguous()
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


class SafetensorsReader:
    """Lazy reader of one safetensors file: the header at open, each tensor on request."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        try:
            size = self.path.stat().st_size
            with open(self.path, "rb") as f:
                head = f.read(8)
                if len(head) < 8:
                    raise ValueError("file is shorter than the 8-byte header length")
                (n,) = struct.unpack("<Q", head)
                if n > min(_MAX_HEADER, size - 8):
                    raise ValueError(f"header length {n} does not fit in a file of {size} bytes")
                header = json.loads(f.read(n))
        except (OSError, ValueError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"{self.path} cannot be read as safetensors ({exc}); restore it from a backup or re-save the checkpoint") from None
        self.metadata: dict[str, str] = header.pop("__metadata__", None) or {}
        self._data_start = 8 + n
        self._entries: dict[str, tuple[torch.dtype, tuple[int, ...], int, int]] = {}
        for name, info in header.items():
            try:
                dtype = _FROM_CODE[info["dtype"]]
                begin, end = (int(x) for x in info["data_offsets"])
                shape = tuple(int(s) for s in info["shape"])
            except (KeyError, TypeError, ValueError):
                raise CheckpointError(f"{self.path} has a malformed header entry for {name!r}; restore it from a backup or re-save the checkpoint") from None
            if not 0 <= begin <= end <= size - self._data_start or end - begin != TensorSpec(dtype, shape).nbytes:
                raise CheckpointError(f"{self.path} is truncated or corrupt: tensor {name!r} lies outside the file; restore it from a backup or re-save the checkpoint")
            self._entries[name] = (dtype, shape, begin, end)

    def keys(self) -> list[str]:
        return list(self._entries)

    def spec(self, name: str) -> TensorSpec:
        dtype, shape, _, _ = self._entries[name]
        return TensorSpec(dtype, shape)

    def location(self, name: str) -> tuple[Path, int, int]:
        """(file, byte offset, byte count) of ``name``'s raw little-endian data, for copying it
        unchanged without decoding it."""
        _, _, begin, end = self._entries[name]
        return self.path, self._data_start + begin, end - begin

    def get(self, name: str) -> torch.Tensor:
        """A fresh (writable, 64-byte aligned) tensor holding ``name``."""
        dtype, shape, begin, end = self._entries[name]
        out = torch.empty(shape, dtype=dtype)
        if end > begin:
            buf = tensor_bytes(out)  # a view of ``out``: torch.empty is contiguous and on the CPU
            with open(self.path, "rb") as f:
                f.seek(self._data_start + begin)
                got = f.readinto(buf)
            if got != end - begin:
                raise CheckpointError(f"{self.path} is truncated: tensor {name!r} ends past the end of the file; restore it from a backup or re-save the checkpoint")
        return out


def safetensors_header(specs: Mapping[str, TensorSpec], metadata: Mapping[str, str] | None = None) -> bytes:
    """The bytes a safetensors file of ``specs`` (in that order) starts with: the 8-byte header
    length and the JSON header, padded to 8 bytes; the tensors' data follows back to back."""
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    offset = 0
    for name, spec in specs.items():
        code = _TO_CODE.get(spec.dtype)
        if code is None:
            raise CheckpointError(f"tensor {name} has dtype {spec.dtype}, which safetensors cannot store")
        header[name] = {"dtype": code, "shape": list(spec.shape), "data_offsets": [offset, offset + spec.nbytes]}
        offset += spec.nbytes
    blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
    blob += b" " * (-len(blob) % 8)
    return struct.pack("<Q", len(blob)) + blob


class RowChunks:
    """A tensor of ``dtype`` and ``shape`` handed to a writer as consecutive row ranges, each
    made (``read(start, stop)``) only when the writer reaches it: an embedding-sized table
    written this way is never whole in memory (a widened SmolLM2's 226 MB embedding was most
    of its growth's peak).  Iterating yields the ranges of ``rows_per_chunk`` rows in order."""

    def __init__(self, dtype: torch.dtype, shape: Sequence[int], read: Callable[[int, int], torch.Tensor], rows_per_chunk: int) -> None:
        if not shape or rows_per_chunk < 1:
            raise ValueError(f"row chunks need a tensor with rows and at least one row a chunk, got shape {tuple(shape)} and {rows_per_chunk}")
        self.dtype, self.shape, self.read, self.rows_per_chunk = dtype, tuple(int(s) for s in shape), read, rows_per_chunk

    def __iter__(self) -> Iterator[torch.Tensor]:
        rows = self.shape[0]
        for start in range(0, rows, self.rows_per_chunk):
            yield self.read(start, min(start + self.rows_per_chunk, rows))


def checked_pieces(name: str, spec: TensorSpec, produced: torch.Tensor | RowChunks) -> Iterator[torch.Tensor]:
    """The tensor ``produced`` for ``spec`` as the pieces to write in order (itself, or its row
    ranges), each checked against ``spec``: the header was already written from the specs, and
    a silent mismatch would corrupt the file."""

    def refuse(what: str) -> CheckpointError:
        return CheckpointError(f"tensor {name} came out as {what} but {spec.dtype} {spec.shape} was planned; this is a bug in the operation that produced it")

    if produced.dtype != spec.dtype or tuple(produced.shape) != spec.shape:
        raise refuse(f"{produced.dtype} {tuple(produced.shape)}")
    if isinstance(produced, torch.Tensor):
        yield produced
        return
    rows = 0
    for piece in produced:
        if piece.dtype != spec.dtype or tuple(piece.shape[1:]) != spec.shape[1:] or rows + piece.shape[0] > spec.shape[0]:
            raise refuse(f"a row range of {piece.dtype} {tuple(piece.shape)} after {rows} rows")
        rows += piece.shape[0]
        yield piece
    if rows != spec.shape[0]:
        raise refuse(f"{rows} rows")


def write_safetensors(
    path: str | os.PathLike,
    specs: Mapping[str, TensorSpec],
    produce: Callable[[str], torch.Tensor | RowChunks],
    metadata: Mapping[str, str] | None = None,
    *,
    fsync: bool = True,
) -> str:
    """Write the tensors named in ``specs`` (in that order) to ``path``, asking ``produce`` for
    each only when it is written; fsync (unless the caller will); return the file's sha256.

    ``produce`` may hand a large tensor over as :class:`RowChunks`, written range by range.  A
    produced tensor whose dtype or shape differs from its spec is refused: the header was
    already written from the specs, and a silent mismatch would corrupt the file.
    """
    blob = safetensors_header(specs, metadata)
    digest = hashlib.sha256()
    # Hashing a tensor overlaps writing it (hashlib and file I/O release the GIL).  Tensors
    # are produced on this thread, one at a time: producing the next one ahead would overlap
    # more but hold two large tensors at once and fragment memory across threads.
    with open(path, "wb") as f, ThreadPoolExecutor(max_workers=1, thread_name_prefix="safetensors-hash") as pool:
        writeback = EarlyWriteback(f.fileno())
        for chunk in (blob[:8], blob[8:]):
            digest.update(chunk)
            f.write(chunk)
        writeback.wrote(len(blob))
        for name, spec in specs.items():
            for piece in checked_pieces(name, spec, produce(name)):
                data = tensor_bytes(piece)
                hashed = pool.submit(digest.update, data)
                f.write(data)
                writeback.wrote(data.nbytes)
                hashed.result()
                del piece, data
        f.flush()
        if fsync:
            os.fsync(f.fileno())
    return digest.hexdigest()


def iter_specs(tensors: Mapping[str, torch.Tensor]) -> Iterator[tuple[str, TensorSpec]]:
    """(name, spec) of in-memory tensors."""
    for name, t in tensors.items():
        yield name, TensorSpec(t.dtype, t.shape)
