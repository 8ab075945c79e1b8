"""The streaming safetensors writer: tensors handed over whole or as row ranges."""

from __future__ import annotations

import hashlib

import pytest
import torch
from safetensors.torch import load_file, save_file

from lite_llm.checkpoint.stream import RowChunks, TensorSpec, write_safetensors
from lite_llm.errors import CheckpointError


def _tensors() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {"table": torch.randn(23, 5, generator=gen), "bias": torch.randn(7, generator=gen).to(torch.bfloat16), "scalar": torch.tensor(3.0)}


def _chunked(t: torch.Tensor, step: int, reads: list[tuple[int, int]] | None = None) -> RowChunks:
    def read(start: int, stop: int) -> torch.Tensor:
        if reads is not None:
            reads.append((start, stop))
        return t[start:stop].clone()

    return RowChunks(t.dtype, t.shape, read, step)


@pytest.mark.parametrize("step", [1, 4, 23, 50])
def test_a_tensor_written_as_row_ranges_is_the_file_of_writing_it_whole(step, tmp_path):
    """The oracle is safetensors' own writer: the same tensors read back from both files, and our
    file's bytes (hence the returned sha256) the same whether the table came whole or in ranges,
    each range made only when the writer reached it, in order."""
    tensors = _tensors()
    specs = {n: TensorSpec(t.dtype, t.shape) for n, t in tensors.items()}
    whole = write_safetensors(tmp_path / "whole.safetensors", specs, tensors.__getitem__)
    reads: list[tuple[int, int]] = []
    chunked = write_safetensors(
        tmp_path / "chunked.safetensors", specs, lambda n: _chunked(tensors[n], step, reads) if n == "table" else tensors[n]
    )
    assert reads == [(s, min(s + step, 23)) for s in range(0, 23, step)]
    assert chunked == whole == hashlib.sha256((tmp_path / "chunked.safetensors").read_bytes()).hexdigest()
    assert (tmp_path / "chunked.safetensors").read_bytes() == (tmp_path / "whole.safetensors").read_bytes()
    save_file(tensors, tmp_path / "reference.safetensors")
    back, reference = load_file(tmp_path / "chunked.safetensors"), load_file(tmp_path / "reference.safetensors")
    assert back.keys() == reference.keys() and all(torch.equal(back[n], reference[n]) for n in reference)


@pytest.mark.parametrize(
    "bad, message",
    [
        (lambda t: RowChunks(t.dtype, t.shape, lambda a, b: t[a:b].double(), 4), "a row range of torch.float64"),
        (lambda t: RowChunks(t.dtype, t.shape, lambda a, b: t[a:b, :4], 4), r"a row range of torch.float32 \(4, 4\)"),
        (lambda t: RowChunks(t.dtype, t.shape, lambda a, b: t[a : b - 1] if a == 0 else t[a:b], 4), "22 rows"),
        (lambda t: RowChunks(t.dtype, t.shape, lambda a, b: t[a : b + 1], 4), r"a row range of torch.float32 \(5, 5\) after 20 rows"),
        (lambda t: RowChunks(t.dtype, (22, 5), lambda a, b: t[a:b], 4), r"torch.float32 \(22, 5\)"),
    ],
    ids=["dtype", "row-shape", "too-few-rows", "too-many-rows", "whole-shape"],
)
def test_row_ranges_that_do_not_add_up_to_the_planned_tensor_are_refused(bad, message, tmp_path):
    t = _tensors()["table"]
    with pytest.raises(CheckpointError, match=f"^tensor table came out as ({message}).* was planned; this is a bug"):
        write_safetensors(tmp_path / "x.safetensors", {"table": TensorSpec(t.dtype, t.shape)}, lambda n: bad(t))


def test_row_chunks_need_rows():
    with pytest.raises(ValueError, match="need a tensor with rows"):
        RowChunks(torch.float32, (), lambda a, b: torch.zeros(()), 1)
    with pytest.raises(ValueError, match="at least one row a chunk"):
        RowChunks(torch.float32, (3, 2), lambda a, b: torch.zeros(b - a, 2), 0)
