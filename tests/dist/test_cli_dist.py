"""`torchrun ... lite-llm train --parallel`: the real launch, consolidation, growth on the result."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.dist.launcher import free_port

TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]
CLI = [sys.executable, "-m", "lite_llm.cli"]


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", LITE_LLM_DEVICE="cpu")
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[2] / "src") + os.pathsep + env.get("PYTHONPATH", "")
    return env


def torchrun(n: int, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    cmd = TORCHRUN + ["--nproc-per-node", str(n), "--master-port", str(free_port()), "-m", "lite_llm.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=_env())


def cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(CLI + list(args), capture_output=True, text=True, timeout=timeout, env=_env())


TRAIN = ["--steps", "4", "--batch-size", "4", "--seq-len", "32", "--eval-batches", "1", "--eval-batch-size", "2", "--quiet"]


def test_torchrun_train_consolidate_grow_and_train_again(small_dataset, tmp_path):
    run = tmp_path / "run"
    done = torchrun(2, "train", "--data", str(small_dataset), "--preset", "tiny", "-o", str(run), "--parallel", "ep=2", *TRAIN)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("checkpoint:") == 1  # rank 0 alone prints
    final = run / "checkpoints" / "step-00000004"
    assert (final / "manifest.json").is_file()
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [0, 1, 2, 3]  # one writer

    ckpt = tmp_path / "ckpt"
    made = cli("checkpoint", "consolidate", str(run), "-o", str(ckpt))
    assert made.returncode == 0, made.stderr
    grown = tmp_path / "grown"
    added = cli("add-tier", str(ckpt), "--tier", "tier_new", "--groups", "2", "--experts-per-group", "2", "-o", str(grown))
    assert added.returncode == 0, added.stderr[-2000:]
    again = torchrun(2, "train", "--data", str(small_dataset), "--init", str(grown), "-o", str(tmp_path / "run2"), "--parallel", "dp=1,ep=2", *TRAIN)
    assert again.returncode == 0, again.stderr[-3000:]


def test_degrees_that_do_not_fit_are_one_sentence(small_dataset, tmp_path):
    bad = torchrun(2, "train", "--data", str(small_dataset), "--preset", "tiny", "-o", str(tmp_path / "r"), "--parallel", "dp=2,ep=2", *TRAIN)
    assert bad.returncode != 0
    assert "needs dp x ep x tp x pp = 4 processes, but torchrun started 2" in bad.stderr + bad.stdout
    # every rank says it once, with no traceback from our code (torchrun then reports the failed ranks itself)
    assert "src/lite_llm/" not in bad.stderr


def test_parallel_without_torchrun_says_how_to_launch(small_dataset, tmp_path):
    bad = cli("train", "--data", str(small_dataset), "--preset", "tiny", "-o", str(tmp_path / "r"), "--parallel", "ep=2", *TRAIN)
    assert bad.returncode == 1 and "launch with torchrun" in bad.stdout + bad.stderr
