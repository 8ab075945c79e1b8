"""A distributed run's directory as safe as a one-process run's, and its metrics as true.

Each test is a defect found by driving `torchrun ... lite-llm train` as a user would: the lock
another run holds, --overwrite of a folder that is not a run, --resume-from a checkpoint of
another run, a corrupt newest sharded checkpoint, keep_last pruning after resuming behind newer
checkpoints, and routing statistics that covered rank 0's rows only."""

from __future__ import annotations

import json
import os
import shutil
import socket
from pathlib import Path

import pytest

from .test_cli_dist import TRAIN, cli, torchrun

ARGS = ["--preset", "tiny", *TRAIN[2:], "--steps", "6", "--save-every", "3", "--eval-every", "0"]


def _hashes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): hash(p.read_bytes()) for p in sorted(root.rglob("*")) if p.is_file()}


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def runs(small_dataset, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("dist-safety")
    one, dp = root / "one", root / "dp"
    done = cli("train", "--data", str(small_dataset), *ARGS, "-o", str(one))
    assert done.returncode == 0, done.stderr[-2000:]
    done = torchrun(2, "train", "--data", str(small_dataset), *ARGS, "--parallel", "dp=2", "-o", str(dp))
    assert done.returncode == 0, done.stderr[-2000:]
    return {"root": root, "one": one, "dp": dp, "data": small_dataset}


def test_routing_statistics_of_a_data_parallel_run_cover_every_ranks_rows(runs):
    one, dp = _metrics(runs["one"]), _metrics(runs["dp"])
    assert [m["step"] for m in dp] == [m["step"] for m in one]
    for a, b in zip(one, dp):
        assert sum(b["expert_routes"]) == sum(a["expert_routes"])  # was half: rank 0's rows
        # the same rows route alike (a near-tie may flip under other batch shapes' rounding)
        assert sum(abs(x - y) for x, y in zip(a["expert_routes"], b["expert_routes"])) <= 0.02 * sum(a["expert_routes"])
        for tier, share in a["tier_share"].items():
            assert b["tier_share"][tier] == pytest.approx(share, abs=0.01)
        for pa, pb in zip(a["tier_prob_layers"], b["tier_prob_layers"]):
            assert pb == pytest.approx(pa, abs=1e-3)


def test_a_run_held_by_a_live_process_is_refused_on_every_rank(runs, tmp_path):
    run = tmp_path / "held"
    shutil.copytree(runs["one"], run)
    (run / ".lock").write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": "now"}))
    before = _hashes(run)
    done = torchrun(2, "train", "--data", str(runs["data"]), *ARGS, "--parallel", "dp=2", "--overwrite", "-o", str(run))
    assert done.returncode != 0
    assert f"is in use by pid {os.getpid()}" in done.stdout + done.stderr
    assert _hashes(run) == before


@pytest.mark.parametrize("launch", ["one process", "torchrun"])
def test_overwrite_clears_only_a_run_directory(runs, tmp_path, launch):
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("important")
    args = ["train", "--data", str(runs["data"]), *ARGS, "--overwrite", "-o", str(notes)]
    done = cli(*args) if launch == "one process" else torchrun(2, *args, "--parallel", "dp=2")
    assert done.returncode != 0
    assert "it holds todo.txt, which is not part of a training run" in done.stdout + done.stderr
    assert [p.name for p in notes.iterdir()] == ["todo.txt"] and (notes / "todo.txt").read_text() == "important"


def test_resume_from_a_checkpoint_of_another_run_is_refused(runs, tmp_path):
    victim = tmp_path / "victim"
    shutil.copytree(runs["one"], victim)
    before = _hashes(victim)
    for other in (runs["one"] / "checkpoints" / "step-00000003", runs["dp"] / "sharded" / "step-00000003"):
        done = cli("train", "--data", str(runs["data"]), "-o", str(victim), "--resume-from", str(other))
        assert done.returncode == 1 and "is not a checkpoint of the run in" in done.stdout + done.stderr, done.stderr[-1000:]
    assert _hashes(victim) == before


def test_a_corrupt_newest_sharded_checkpoint_falls_back_to_the_previous_one(runs, tmp_path):
    run = tmp_path / "corrupt"
    shutil.copytree(runs["dp"], run)
    shutil.rmtree(run / "checkpoints")  # as if it crashed after its last sharded save, before the final consolidated one
    shard = next((run / "sharded" / "step-00000006").glob("*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:2000])  # cut short
    done = torchrun(2, "train", "--data", str(runs["data"]), "-o", str(run), "--resume", "--steps", "6", "--parallel", "dp=2")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "cannot resume from step-00000006" in done.stdout and "resumed from" in done.stdout and "step-00000003 at step 3" in done.stdout
    a = {m["step"]: m["loss"] for m in _metrics(run)}
    b = {m["step"]: m["loss"] for m in _metrics(runs["dp"])}
    assert sorted(a) == sorted(b) and max(abs(a[k] - b[k]) / b[k] for k in b) <= 1e-6  # the re-run steps replace their rows


def test_keep_last_never_prunes_the_checkpoint_just_written(tmp_path):
    """Resumed behind a newer sharded checkpoint (step 6) with keep_last 1, each new save was the
    oldest by name after step 6 and was deleted at once: nothing of the new progress survived."""
    import torch

    from lite_llm.dist.checkpoint import list_sharded, save_sharded
    from lite_llm.model import build_model
    from tests.conftest import two_tier_config

    model = build_model(two_tier_config(), seed=1)
    optimizer = torch.optim.AdamW(model.parameters())
    meta = {"model_config": model.config.to_dict(), "trainer": {"step": 0}, "progressive": {}}
    run = tmp_path / "run"
    for step in (3, 6):
        save_sharded(run, step, model, optimizer, meta, None, keep_last=3)
    newest = save_sharded(run, 4, model, optimizer, meta, None, keep_last=1)
    assert [p.name for p in list_sharded(run)] == ["step-00000004", "step-00000006"] and newest.name == "step-00000004"


def test_consolidate_refuses_a_sharded_checkpoint_older_than_the_runs_ordinary_one(runs, tmp_path):
    """After the README's sequence (torchrun, then the run went on in one process) the newest
    model is an ordinary checkpoint; consolidating the older sharded one gave the older model."""
    run = tmp_path / "went-on"
    shutil.copytree(runs["dp"], run)
    shutil.copytree(run / "checkpoints" / "step-00000006", run / "checkpoints" / "step-00000008")  # as if trained on to step 8
    done = cli("checkpoint", "consolidate", str(run), "-o", str(tmp_path / "ckpt"))
    assert done.returncode == 1 and "step-00000008 is newer than the run's last sharded checkpoint step-00000006" in done.stdout + done.stderr
    assert not (tmp_path / "ckpt").exists()
    done = cli("checkpoint", "consolidate", str(run), "--step", "6", "-o", str(tmp_path / "ckpt"))
    assert done.returncode == 0, done.stderr[-1000:]


def test_a_flipped_byte_in_a_shard_is_found_by_consolidation_and_resume(runs, tmp_path):
    """Sharded checkpoints carry each file's sha256 (written by rank 0 once all ranks have
    written): consolidation re-hashed a corrupted shard as good, and a resume trained on it."""
    run = tmp_path / "flipped"
    shutil.copytree(runs["dp"], run)
    shutil.rmtree(run / "checkpoints")
    (run / "sharded" / ".step-00000007.partial").mkdir()  # a save a killed run left unfinished
    shard = next((run / "sharded" / "step-00000006").glob("*.safetensors"))
    data = bytearray(shard.read_bytes())
    data[-100] ^= 0xFF  # same size, same header: only the hash can tell
    shard.write_bytes(bytes(data))
    done = cli("checkpoint", "consolidate", str(run), "--step", "6", "-o", str(tmp_path / "ckpt"))
    assert done.returncode == 1 and "does not match its sha256" in done.stdout + done.stderr and not (tmp_path / "ckpt").exists()
    done = torchrun(2, "train", "--data", str(runs["data"]), "-o", str(run), "--resume", "--steps", "6", "--parallel", "dp=2")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "cannot resume from step-00000006" in done.stdout and "does not match its sha256" in done.stdout
    assert "removed .step-00000007.partial, left by an interrupted run" in done.stdout
    assert not (run / "sharded" / ".step-00000007.partial").exists()


def test_ranks_hash_a_sharded_checkpoint_together_each_its_share(tmp_path):
    """Rank 0 hashed every file of a save alone while the other ranks waited, and every rank
    hashed the whole checkpoint again on resume: at scale, N readings of every shard."""
    from lite_llm.dist.local import run_ranks
    from tests.dist import workers

    results = run_ranks(workers.shared_hashing, 2, tmp_path / "out", str(tmp_path / "run"), timeout_s=120)
    files = results[0]["files"]
    assert len(files) >= 2
    for key in ("saved", "checked"):  # disjoint shares that cover every file, each rank some
        shares = [set(r[key]) for r in results]
        assert all(shares) and not shares[0] & shares[1] and shares[0] | shares[1] == set(files), (key, shares)
        assert all(len(r[key]) == len(set(r[key])) for r in results)
    assert all(r["again"] == [] for r in results)  # the save's own hashes stand: no second reading
    victim = results[0]["victim"]
    assert victim in results[1]["checked"] and victim not in results[0]["checked"]
    for r in results:  # the rank that did not hash the flipped file refuses it as well, in the same words
        assert r["refusal"] == results[0]["refusal"] and f"{victim} does not match its sha256" in r["refusal"]
