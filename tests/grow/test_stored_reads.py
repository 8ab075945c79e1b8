"""Reading stored tensors straight from their files: row ranges, and whole tensors copied into a
buffer of another dtype; the oracle is safetensors' own reader of the same file."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from lite_llm.checkpoint.stream import SafetensorsReader
from lite_llm.grow.tensors import stored_rows


class _Stored(dict):
    """A mapping over one file that knows where its tensors lie, as an opened checkpoint does."""

    def __init__(self, path) -> None:
        self.reader = SafetensorsReader(path)
        super().__init__({n: None for n in self.reader.keys()})

    def __getitem__(self, name):
        return self.reader.get(name)

    def spec(self, name):
        return self.reader.spec(name)

    def location(self, name):
        return self.reader.location(name)


@pytest.fixture
def stored(tmp_path):
    gen = torch.Generator().manual_seed(0)
    tensors = {  # odd sizes: every tensor but the first starts off a page boundary
        "a": torch.randn(3, 5, generator=gen).to(torch.bfloat16),
        "b": torch.randn(1001, 37, generator=gen),
        "c": torch.randn(70, 1200, generator=gen).to(torch.bfloat16),
        "empty": torch.zeros(0, 4),
    }
    save_file(tensors, tmp_path / "t.safetensors")
    return tmp_path / "t.safetensors", _Stored(tmp_path / "t.safetensors")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_a_whole_tensor_copied_from_its_mapping_is_the_file_s_tensor(stored, dtype):
    path, mapping = stored
    reference = load_file(path)
    for name in ("a", "b", "c", "empty"):
        rows = stored_rows(mapping, name)
        out = torch.full(reference[name].shape, float("nan"), dtype=dtype)
        assert rows.copy_into(out) is out
        assert torch.equal(out, reference[name].to(dtype)), name
        stop = min(3, reference[name].shape[0])
        assert torch.equal(rows(min(1, stop), stop), reference[name][1:3]), name


def test_a_truncated_file_is_one_sentence_not_a_crash(stored):
    path, mapping = stored
    rows = stored_rows(mapping, "c")
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size - 10)
    with pytest.raises(OSError, match="ends before its tensor at bytes .*; the file is truncated"):
        rows.copy_into(torch.empty(70, 1200))
