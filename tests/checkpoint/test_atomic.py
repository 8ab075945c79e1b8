"""Atomic saves: an interrupted save leaves the previous checkpoint loadable and no debris."""

from __future__ import annotations

import os

import pytest
from lite_llm.checkpoint import save as save_module

from lite_llm import CheckpointError
from lite_llm.checkpoint import atomic, load_checkpoint, save_checkpoint, verify_checkpoint

from .conftest import state_equal, tiny_model


def _debris(parent):
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


@pytest.fixture(params=["exchange", "two-renames"])
def swap_mode(request, monkeypatch):
    if request.param == "two-renames":
        monkeypatch.setattr(atomic, "USE_EXCHANGE", False)
    return request.param


def test_overwrite_replaces_the_checkpoint(tmp_path, swap_mode):
    old, new = tiny_model(seed=1), tiny_model(seed=2)
    path = save_checkpoint(tmp_path / "ckpt", old)
    save_checkpoint(path, new)
    assert state_equal(new, load_checkpoint(path).model)
    assert _debris(tmp_path) == []


def test_failure_while_writing_shards_keeps_the_old_checkpoint(tmp_path, monkeypatch, swap_mode):
    old = tiny_model(seed=1)
    path = save_checkpoint(tmp_path / "ckpt", old)
    real, calls = save_module.write_safetensors, []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        return real(*args, **kwargs)

    monkeypatch.setattr(save_module, "write_safetensors", flaky)
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint(path, tiny_model(seed=2))
    assert state_equal(old, load_checkpoint(path).model)
    assert verify_checkpoint(path) == []
    assert _debris(tmp_path) == []


def test_failure_while_renaming_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    monkeypatch.setattr(atomic, "USE_EXCHANGE", False)
    old = tiny_model(seed=1)
    path = save_checkpoint(tmp_path / "ckpt", old)
    real = os.replace

    def failing(src, dst):
        if ".tmp-" in os.fspath(src):
            raise OSError(5, "Input/output error")
        return real(src, dst)

    monkeypatch.setattr(os, "replace", failing)
    with pytest.raises(OSError, match="Input/output error"):
        save_checkpoint(path, tiny_model(seed=2))
    assert state_equal(old, load_checkpoint(path).model)
    assert _debris(tmp_path) == []


def test_failure_of_the_exchange_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    old = tiny_model(seed=1)
    path = save_checkpoint(tmp_path / "ckpt", old)

    def broken(a, b):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(atomic, "_exchange", broken)
    with pytest.raises(OSError):
        save_checkpoint(path, tiny_model(seed=2))
    assert state_equal(old, load_checkpoint(path).model)
    assert _debris(tmp_path) == []


def test_failed_first_save_leaves_nothing(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("disk gone")

    monkeypatch.setattr(save_module, "write_safetensors", broken)
    with pytest.raises(RuntimeError):
        save_checkpoint(tmp_path / "ckpt", tiny_model())
    assert list(tmp_path.iterdir()) == []


def test_crash_between_the_two_renames_is_recovered(tmp_path):
    """Simulate a process killed after moving the old checkpoint aside, before moving the new one in."""
    old = tiny_model(seed=1)
    path = save_checkpoint(tmp_path / "ckpt", old)
    aside = tmp_path / ".ckpt.old-123-deadbeef"
    os.replace(path, aside)
    (tmp_path / ".ckpt.tmp-123-deadbeef").mkdir()  # the unfinished new one
    assert state_equal(old, load_checkpoint(path).model)  # reads the old one where it lies
    new = tiny_model(seed=2)
    save_checkpoint(path, new)  # restores, cleans up, then writes
    assert state_equal(new, load_checkpoint(path).model)
    assert _debris(tmp_path) == []


def test_refuses_to_overwrite_something_that_is_not_a_checkpoint(tmp_path):
    precious = tmp_path / "data"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    with pytest.raises(CheckpointError, match="refusing to overwrite"):
        save_checkpoint(precious, tiny_model())
    assert (precious / "notes.txt").read_text() == "keep me"


def test_invalid_inputs_fail_before_anything_is_written(tmp_path):
    with pytest.raises(CheckpointError, match="progressive cannot be written as JSON"):
        save_checkpoint(tmp_path / "a", tiny_model(), progressive={"bad": object()})
    with pytest.raises(CheckpointError, match="extra directory name 'training' is not allowed"):
        save_checkpoint(tmp_path / "b", tiny_model(), extra_dirs={"training": {}})
    assert list(tmp_path.iterdir()) == []


def test_exchange_swaps_two_directories_where_supported(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "x").write_text("a")
    (b / "x").write_text("b")
    if not atomic._exchange(a, b):
        pytest.skip("renameat2(RENAME_EXCHANGE) is not available here; the two-rename fallback is tested above")
    assert (a / "x").read_text() == "b" and (b / "x").read_text() == "a"


def test_early_writeback_hands_every_written_range_to_the_disk_once_in_order(tmp_path, monkeypatch):
    calls: list[tuple[int, int, int, int]] = []
    monkeypatch.setattr(atomic, "_sync_file_range", lambda fd, offset, nbytes, flags: calls.append((fd, offset, nbytes, flags)) or 0)
    with open(tmp_path / "f", "wb") as f:
        writeback = atomic.EarlyWriteback(f.fileno(), every=100)
        for n in (30, 80, 10, 150, 99):  # 110 pending -> flush; 160 -> flush; 99 stays pending
            writeback.wrote(n)
        assert calls == [(f.fileno(), 0, 110, 2), (f.fileno(), 110, 160, 2)]


def test_early_writeback_stops_asking_where_it_is_refused_and_does_nothing_without_the_call(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(atomic, "_sync_file_range", lambda *args: calls.append(args) or -1)
    writeback = atomic.EarlyWriteback(3, every=10)
    for _ in range(5):
        writeback.wrote(10)
    assert len(calls) == 1
    monkeypatch.setattr(atomic, "_sync_file_range", False)
    writeback = atomic.EarlyWriteback(3, every=10)
    writeback.wrote(100)
    assert writeback.written == 100


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity"), reason="Linux only")
def test_early_writeback_is_accepted_by_linux_for_a_regular_file_and_changes_no_byte(tmp_path):
    data = os.urandom(3 * 4096 + 17)
    with open(tmp_path / "f", "wb") as f:
        writeback = atomic.EarlyWriteback(f.fileno(), every=4096)
        for start in range(0, len(data), 1000):
            f.write(data[start : start + 1000])
            f.flush()
            writeback.wrote(len(data[start : start + 1000]))
        assert atomic._load_sync_file_range() and writeback._call  # never refused here
    assert (tmp_path / "f").read_bytes() == data
