"""Lazy tensor mappings: how growth operations stay pure and still stream.

A growth operation maps ``(config, tensors) -> (config, tensors)``.  The tensors it returns
are a :class:`LazyTensors`: each output name holds a small closure that computes the tensor
from the input mapping when it is looked up, and nothing is cached.  Chaining operations
chains closures; writing the result (``write_checkpoint`` with specs) asks for one tensor at a
time, so a chain of growths over a checkpoint opened with ``open_checkpoint`` never holds
more than a few tensors in memory.  Looking a tensor up twice computes it twice: materialise
with ``dict(lazy)`` when that matters more than memory.

A tensor passed through unchanged is produced by a :class:`Ref` rather than an opaque closure,
so a writer can ask :func:`origin` where its bytes already lie: a source file holding them can
then be copied byte for byte (the one-pass Hugging Face growth does) instead of decoded and
encoded again.  Likewise a tensor that is all zeros by construction (a silenced block's
residual writers) is produced by a :class:`Zeros`, made from the source's header without
reading the source, and known to be zero (:func:`known_zeros`) without being made.  And a
tensor computed row by row from a source (a widened embedding) is a :class:`RowWise`: made a
few rows at a time, and readable by rows (:func:`row_reader`) without being made whole — so
a writer can take it range by range too (:func:`row_chunks`).
"""

from __future__ import annotations

import math
import mmap
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Callable

import torch

from ..checkpoint.lazy import LazyMapping
from ..checkpoint.load import expected_tensors
from ..checkpoint.stream import RowChunks, TensorSpec, tensor_bytes
from ..config import ModelConfig

Tensors = Mapping[str, torch.Tensor]
Producer = Callable[[], torch.Tensor]


class LazyTensors(LazyMapping):
    """name -> tensor, each computed by its producer when looked up (never cached)."""

    def __init__(self, producers: dict[str, Producer]) -> None:
        self._producers = self._names = producers

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._producers[name]()

    def reference(self, name: str) -> tuple[Tensors, str] | None:
        """(mapping, name) that ``name`` is an unchanged copy of, or None when it is computed."""
        producer = self._producers[name]
        return (producer.tensors, producer.name) if isinstance(producer, Ref) else None

    def producer(self, name: str) -> Producer:
        """What computes ``name`` (:func:`known_zeros` and :func:`row_reader` ask what kind it is)."""
        return self._producers[name]


class Ref:
    """A producer returning ``tensors[name]`` unchanged, and saying so (see :func:`origin`)."""

    __slots__ = ("tensors", "name")

    def __init__(self, tensors: Tensors, name: str) -> None:
        self.tensors = tensors
        self.name = name

    def __call__(self) -> torch.Tensor:
        return self.tensors[self.name]


def ref(tensors: Tensors, name: str) -> Producer:
    """A producer that returns input tensor ``name`` unchanged."""
    return Ref(tensors, name)


class Zeros:
    """A producer of zeros with the dtype and shape of ``tensors[name]`` (a silenced block's
    residual writers), saying so (:func:`known_zeros`): a check knows them zero without reading
    them, and making them reads nothing either when ``tensors[name]`` is stored (its file's
    header has the shape)."""

    __slots__ = ("tensors", "name")

    def __init__(self, tensors: Tensors, name: str) -> None:
        self.tensors = tensors
        self.name = name

    def __call__(self) -> torch.Tensor:
        spec = stored_spec(self.tensors, self.name)
        return torch.zeros_like(self.tensors[self.name]) if spec is None else torch.zeros(spec.shape, dtype=spec.dtype)


def _producer(tensors: Tensors, name: str) -> Producer | None:
    """What computes ``tensors[name]``, followed back through the steps that passed it on
    unchanged; None when it is stored (or its mapping does not say)."""
    mapping, key = origin(tensors, name)
    return mapping.producer(key) if isinstance(mapping, LazyTensors) else None


def known_zeros(tensors: Tensors, name: str) -> bool:
    """Whether ``tensors[name]`` is all zeros by construction (a :class:`Zeros`, passed on
    unchanged through any number of steps): known without computing it."""
    return isinstance(_producer(tensors, name), Zeros)


def stored_spec(tensors: Tensors, name: str) -> TensorSpec | None:
    """The dtype and shape of ``tensors[name]`` from its file's header when it is a stored
    tensor passed on unchanged (nothing read); None when it is computed."""
    mapping, key = origin(tensors, name)
    spec = getattr(mapping, "spec", None)
    return spec(key) if spec is not None else None


def origin(tensors: Tensors, name: str) -> tuple[Tensors, str]:
    """The mapping (and the name in it) that ``tensors[name]`` is an unchanged copy of, following
    chains of :class:`Ref` back through every growth step to the first computed tensor or the
    source; ``(tensors, name)`` itself when the tensor is computed."""
    while True:
        reference = getattr(tensors, "reference", None)
        found = reference(name) if reference is not None else None
        if found is None:
            return tensors, name
        tensors, name = found


class StoredRows:
    """Row ranges of a tensor read straight from the file that stores it (``tensors[name]``
    would read all of it): an embedding-sized table whose sample rows, or whose head slices,
    are all a check needs."""

    def __init__(self, path: Path, offset: int, dtype: torch.dtype, shape: tuple[int, ...]) -> None:
        self.path, self.offset, self.dtype, self.shape = path, offset, dtype, shape
        self.row_bytes = math.prod(shape[1:]) * dtype.itemsize

    def __call__(self, start: int, stop: int) -> torch.Tensor:
        if not 0 <= start <= stop <= self.shape[0]:
            raise IndexError(f"rows {start}:{stop} are outside a tensor of {self.shape[0]} rows")
        out = torch.empty((stop - start, *self.shape[1:]), dtype=self.dtype)
        want = (stop - start) * self.row_bytes
        fd = os.open(self.path, os.O_RDONLY)
        try:
            got = os.preadv(fd, [tensor_bytes(out)], self.offset + start * self.row_bytes) if want else 0
        finally:
            os.close(fd)
        if got != want:
            raise OSError(f"{self.path} ended {want - got} bytes early reading rows {start}:{stop}; the file is truncated")
        return out

    def copy_into(self, out: torch.Tensor) -> torch.Tensor:
        """The whole tensor copied into ``out`` (its shape; any dtype: converted on the way)
        straight from a mapping of the file: no intermediate tensor, so none of its fresh
        pages to fault in and no second copy of the bytes (the float32 check of a SOLAR
        growth of a 1.7 GB bf16 Llama reads 2.5 GB of blocks so: 3.4 -> 3.0 s).  The mapping
        is private and writable only so that torch may view it without a warning; it is never
        written, so no page is copied (the kernel maps the page cache's pages in as they are
        read, many per fault)."""
        nbytes = math.prod(self.shape) * self.dtype.itemsize
        start = self.offset - self.offset % mmap.ALLOCATIONGRANULARITY
        with open(self.path, "rb") as f:
            if os.fstat(f.fileno()).st_size < self.offset + nbytes:
                raise OSError(f"{self.path} ends before its tensor at bytes {self.offset}:{self.offset + nbytes}; the file is truncated")
            if nbytes == 0:
                return out
            mapped = mmap.mmap(f.fileno(), self.offset - start + nbytes, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE, offset=start)
        try:  # no name holds the view, so the mapping can be closed even if the copy failed
            out.copy_(torch.frombuffer(mapped, dtype=torch.uint8, count=nbytes, offset=self.offset - start).view(self.dtype).view(self.shape))
        finally:
            mapped.close()
        return out


def stored_rows(tensors: Tensors, name: str) -> StoredRows | None:
    """A reader of row ranges of ``tensors[name]`` from its file, when it is a stored tensor
    passed on unchanged (its :func:`origin` mapping knows its ``location`` and ``spec``); None
    when it is computed (then see :func:`row_reader`)."""
    mapping, key = origin(tensors, name)
    location, spec = getattr(mapping, "location", None), getattr(mapping, "spec", None)
    where = location(key) if location is not None and spec is not None else None
    if where is None:
        return None
    path, offset, _ = where
    stored = spec(key)
    return StoredRows(path, offset, stored.dtype, tuple(stored.shape)) if len(stored.shape) >= 1 else None


def derive(fn: Callable[..., torch.Tensor], tensors: Tensors, *names: str) -> Producer:
    """A producer computing ``fn(tensors[n0], tensors[n1], ...)``."""
    return lambda: fn(*(tensors[n] for n in names))


def stored_names(config: ModelConfig) -> list[str]:
    """The names a checkpoint of ``config`` stores, in writing order (tied ``lm_head`` excluded)."""
    return list(expected_tensors(config))


def expected_specs(config: ModelConfig, dtype: torch.dtype) -> dict[str, TensorSpec]:
    """name -> (dtype, shape) of every stored tensor of ``config`` when held in ``dtype``."""
    return {name: TensorSpec(dtype, shape) for name, shape in expected_tensors(config).items()}


def layer_prefix(i: int) -> str:
    return f"layers.{i}."


def layer_names(names: list[str] | Tensors, i: int) -> list[str]:
    """The names of layer ``i``'s tensors, without the ``layers.{i}.`` prefix."""
    prefix = layer_prefix(i)
    return [n[len(prefix):] for n in names if n.startswith(prefix)]


ROW_CHUNK_BYTES = 8 * 1024**2  # of the source, per row range a RowWise producer computes


class RowWise:
    """A producer of ``fn(tensors[name])`` for an ``fn`` that treats each row alone (a widened
    embedding's or head's tiling): made row range by row range from the source's rows
    (:func:`row_reader`), so the whole source is never held beside the output (for a
    widened SmolLM2 the 113 MB source beside its 226 MB result), and a check that needs a few
    rows (the sample's embeddings) or one slice at a time (a head) computes only those."""

    __slots__ = ("tensors", "name", "fn")

    def __init__(self, tensors: Tensors, name: str, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.tensors, self.name, self.fn = tensors, name, fn

    def __call__(self) -> torch.Tensor:
        rows = row_reader(self.tensors, self.name)
        if rows is None:
            return self.fn(self.tensors[self.name])
        n, step = rows.shape[0], _rows_per_chunk(rows)
        first = self.fn(rows(0, min(step, n)))
        out = torch.empty((n, *first.shape[1:]), dtype=first.dtype)
        out[: first.shape[0]] = first
        for start in range(step, n, step):
            out[start : start + step] = self.fn(rows(start, min(start + step, n)))
        return out


class RowReader:
    """Row ranges ``[start, stop)`` of a tensor, and its whole shape, without the whole tensor."""

    def __init__(self, shape: tuple[int, ...], read: Callable[[int, int], torch.Tensor]) -> None:
        self.shape, self._read = shape, read

    def __call__(self, start: int, stop: int) -> torch.Tensor:
        return self._read(start, stop)


def _rows_per_chunk(rows: StoredRows | RowReader) -> int:
    row_bytes = max(1, math.prod(rows.shape[1:])) * 4
    return max(1, ROW_CHUNK_BYTES // row_bytes)


def row_reader(tensors: Tensors, name: str) -> StoredRows | RowReader | None:
    """Row ranges of ``tensors[name]`` without making the whole tensor: from its file when it is
    stored (:func:`stored_rows`), through a :class:`RowWise` producer's ``fn`` from its
    source's rows; None when only the whole tensor exists."""
    stored = stored_rows(tensors, name)
    if stored is not None:
        return stored
    producer = _producer(tensors, name)
    if not isinstance(producer, RowWise):
        return None
    source = row_reader(producer.tensors, producer.name)
    if source is None:
        return None
    fn = producer.fn
    one_row = fn(source(0, min(1, source.shape[0])))
    return RowReader((source.shape[0], *one_row.shape[1:]), lambda start, stop: fn(source(start, stop)))


def row_chunks(tensors: Tensors, name: str, dtype: torch.dtype, before_each: Callable[[], None] = lambda: None) -> RowChunks | None:
    """``tensors[name]`` in ``dtype`` as :class:`RowChunks` for a writer, when it can be read by
    rows (:func:`row_reader`) and is larger than one chunk; None otherwise (then write it
    whole).  ``before_each`` runs before each range is made (it may raise to stop the writer)."""
    rows = row_reader(tensors, name)
    if rows is None or (step := _rows_per_chunk(rows)) >= rows.shape[0]:
        return None

    def read(start: int, stop: int) -> torch.Tensor:
        before_each()
        piece = rows(start, stop)
        return piece if piece.dtype == dtype else piece.to(dtype)

    return RowChunks(dtype, rows.shape, read, step)
