"""CheckpointManager: step directories, keep-last pruning, protected checkpoints."""

from __future__ import annotations

import pytest

from lite_llm import CheckpointError
from lite_llm.checkpoint import CheckpointManager, load_checkpoint

from .conftest import state_equal, tied_dense_model


@pytest.fixture(scope="module")
def small():
    return tied_dense_model()


def _steps(manager):
    return [CheckpointManager.step_of(p) for p in manager.list()]


def test_keeps_the_last_n(tmp_path, small):
    manager = CheckpointManager(tmp_path, keep_last=2)
    assert manager.latest() is None and manager.list() == []
    for step in (100, 200, 300, 400):
        path = manager.save(step, small, progressive={"training": {"step": step}})
        assert path == tmp_path / "checkpoints" / f"step-{step:08d}"
    assert [p.name for p in manager.list()] == ["step-00000300", "step-00000400"]
    assert manager.latest() == tmp_path / "checkpoints" / "step-00000400"
    loaded = load_checkpoint(manager.latest())
    assert loaded.progressive["training"] == {"step": 400} and state_equal(small, loaded.model)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-00000300", "step-00000400"]


def test_never_deletes_the_one_just_written(tmp_path, small):
    manager = CheckpointManager(tmp_path, keep_last=1)
    manager.save(500, small)
    manager.save(300, small)  # a rollback writes an older step
    assert _steps(manager) == [300, 500]
    manager.save(600, small)
    assert _steps(manager) == [600]


def test_protected_checkpoints_survive(tmp_path, small):
    manager = CheckpointManager(tmp_path, keep_last=1, protected={100})
    manager.save(100, small)
    manager.save(200, small, protect=True)  # persisted
    manager.save(300, small)
    manager.save(400, small)
    assert _steps(manager) == [100, 200, 400]
    # A new manager (a restarted run) still honours the persisted protection, not the argument.
    again = CheckpointManager(tmp_path, keep_last=1)
    again.save(500, small)
    assert _steps(again) == [200, 500]
    again.unprotect(200)
    again.protect(tmp_path / "checkpoints" / "step-00000500")
    again.save(600, small)
    assert _steps(again) == [500, 600]


def test_protected_set_can_be_edited_in_place(tmp_path, small):
    manager = CheckpointManager(tmp_path, keep_last=1)
    first = manager.save(1, small)
    manager.protected.add(first)  # e.g. the curriculum's pre-integration checkpoint
    manager.save(2, small)
    manager.save(3, small)
    assert _steps(manager) == [1, 3]
    manager.protected.discard(first)
    manager.save(4, small)
    assert _steps(manager) == [4]


def test_ignores_incomplete_and_foreign_entries(tmp_path, small):
    manager = CheckpointManager(tmp_path, keep_last=5)
    manager.save(10, small)
    (tmp_path / "checkpoints" / "step-00000020").mkdir()  # no manifest: incomplete
    (tmp_path / "checkpoints" / ".step-00000030.tmp-1-abc").mkdir()
    (tmp_path / "checkpoints" / "notes").mkdir()
    assert _steps(manager) == [10]
    assert manager.latest().name == "step-00000010"


def test_large_steps_sort_numerically(tmp_path, small):
    manager = CheckpointManager(tmp_path, keep_last=2)
    manager.save(99_999_999, small)
    manager.save(100_000_000, small)
    assert manager.latest().name == "step-100000000"


def test_keep_last_must_be_positive(tmp_path):
    with pytest.raises(CheckpointError, match="keep_last must be an integer >= 1"):
        CheckpointManager(tmp_path, keep_last=0)
