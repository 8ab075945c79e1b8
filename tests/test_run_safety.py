"""Runs that cannot be lost or mixed, and resume as the README writes it (issue 16, points 7-8):
the run lock, refusing a fresh run into an old one, resuming with the saved settings,
extending a run, falling back past a corrupt checkpoint, and tidy metrics."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lite_llm.cli import app
from lite_llm.train.schedule import lr_at

runner = CliRunner()
TINY = ["--preset", "tiny", "--batch-size", "2", "--seq-len", "32", "--eval-every", "0", "--quiet"]


def _run(args: list[str]) -> tuple[int, str]:
    result = runner.invoke(app, args)
    out = result.output + (result.stderr if result.stderr_bytes else "")
    return result.exit_code, out.replace("\n", "")  # rich may wrap long lines


def _train(data: Path, run: Path, *extra: str) -> tuple[int, str]:
    return _run(["train", "--data", str(data), "-o", str(run), *extra])


def _hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture()
def run4(tmp_path, small_dataset):
    run = tmp_path / "run"
    code, out = _train(small_dataset, run, *TINY, "--steps", "4", "--save-every", "2")
    assert code == 0, out
    return run


def test_a_run_held_by_a_live_process_is_refused_and_untouched(run4, small_dataset):
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (run4 / ".lock").write_text(json.dumps({"pid": holder.pid, "host": socket.gethostname(), "started": "2026-12-02T00:00:00Z"}))
        before = _hashes(run4)
        code, out = _train(small_dataset, run4, "--resume", "--steps", "6")
        assert code == 1 and f"in use by pid {holder.pid} on host {socket.gethostname()}" in out and "Traceback" not in out
        assert _hashes(run4) == before
    finally:
        holder.kill()
        holder.wait()


def test_a_stale_lock_is_said_and_taken_over(run4, small_dataset):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (run4 / ".lock").write_text(json.dumps({"pid": int(dead.stdout), "host": socket.gethostname(), "started": "x"}))
    code, out = _train(small_dataset, run4, "--resume", "--steps", "6")
    assert code == 0, out
    assert "stale lock" in out and f"pid {int(dead.stdout)}" in out and "no longer running" in out
    assert not (run4 / ".lock").exists()  # released at the end


def test_a_fresh_run_into_an_old_one_needs_resume_or_overwrite(run4, small_dataset):
    before = _hashes(run4)
    code, out = _train(small_dataset, run4, *TINY, "--steps", "2")
    assert code == 1 and "already holds a run; pass --resume" in out and "Traceback" not in out
    assert _hashes(run4) == before
    code, out = _train(small_dataset, run4, *TINY, "--steps", "2", "--overwrite")
    assert code == 0, out
    assert [r["step"] for r in _rows(run4)] == [0, 1]
    assert sorted(p.name for p in (run4 / "checkpoints").iterdir()) == ["step-00000002"]


def test_resume_of_a_finished_run_with_no_flags_names_its_checkpoint(run4, small_dataset):
    before = _hashes(run4)
    code, out = _train(small_dataset, run4, "--resume")  # the README's command: no flags retyped
    assert code == 0, out
    assert "is finished at step 4" in out and f"checkpoint: {run4 / 'checkpoints' / 'step-00000004'}" in out
    assert _hashes(run4) == before


def test_extending_a_run_follows_the_recomputed_schedule_and_replaces_rows(run4, small_dataset):
    code, out = _train(small_dataset, run4, "--resume", "--steps", "7")
    assert code == 0, out
    assert "resumed from" in out and "at step 4 of 7" in out
    rows = _rows(run4)
    assert [r["step"] for r in rows] == list(range(7))  # no duplicates, nothing missing
    from lite_llm.train import TrainConfig

    defaults = TrainConfig()
    for r in rows[4:]:  # the documented rule: lr_at(step) over the new total
        expected = lr_at(r["step"], lr=defaults.lr, warmup_steps=defaults.warmup_steps, total_steps=7, min_lr_ratio=defaults.min_lr_ratio)
        assert r["lr"] == pytest.approx(expected, rel=1e-12, abs=0.0)


def test_resume_refuses_settings_that_cannot_change(run4, small_dataset):
    before = _hashes(run4)
    code, out = _train(small_dataset, run4, "--resume", "--steps", "6", "--batch-size", "3")
    assert code == 1 and "cannot resume with --batch-size 3: the run was trained with 2" in out
    code, out = _train(small_dataset, run4, "--resume", "--steps", "3")
    assert code == 1 and "would shorten it" in out
    assert _hashes(run4) == before


def test_a_corrupt_newest_checkpoint_falls_back_and_says_so(run4, small_dataset):
    newest = run4 / "checkpoints" / "step-00000004"
    shard = next(newest.glob("*.safetensors"))
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    code, out = _train(small_dataset, run4, "--resume", "--steps", "6")
    assert code == 0, out
    assert "cannot resume from step-00000004" in out and "previous complete checkpoint" in out
    assert "resumed from" in out and "step-00000002 at step 2" in out
    assert [r["step"] for r in _rows(run4)] == list(range(6))


def test_resume_from_picks_a_checkpoint_and_leftovers_are_cleaned(run4, small_dataset):
    leftover = run4 / "checkpoints" / ".step-00000000.deleting-123-abcd"
    leftover.mkdir()
    (leftover / "dense.safetensors").write_bytes(b"x")
    code, out = _train(small_dataset, run4, "--resume-from", str(run4 / "checkpoints" / "step-00000002"), "--steps", "5")
    assert code == 0, out
    assert not leftover.exists() and "interrupted run" in out
    assert "step-00000002 at step 2" in out
    assert [r["step"] for r in _rows(run4)] == list(range(5))
