"""`torchrun ... lite-llm train --parallel`: the real launch, consolidation, growth on the result."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from lite_llm.dist.local import free_port

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


def test_torchrun_train_consolidate_expand_add_tier_and_train_again(small_dataset, tmp_path):
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
    deeper = tmp_path / "deeper"  # growth on the consolidated checkpoint, verified exact by expand's own check
    expanded = cli("expand", str(ckpt), "--method", "llama_pro", "--target-layers", "4", "-o", str(deeper))
    assert expanded.returncode == 0, expanded.stderr[-2000:]
    assert json.loads((deeper / "manifest.json").read_text())["model_config"]["n_layers"] == 4
    grown = tmp_path / "grown"
    added = cli("add-tier", str(deeper), "--tier", "tier_new", "--groups", "2", "--experts-per-group", "2", "-o", str(grown))
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


def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def _losses(run: Path) -> dict[int, float]:
    return {m["step"]: m["loss"] for m in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}


def test_a_killed_rank_stops_the_run_and_resume_continues_exactly(small_dataset, tmp_path):
    import signal
    import time

    args = ["train", "--data", str(small_dataset), "--preset", "tiny", "--parallel", "ep=2", *TRAIN[2:], "--steps", "10", "--save-every", "2"]
    whole = torchrun(2, *args, "-o", str(tmp_path / "whole"))
    assert whole.returncode == 0, whole.stderr[-2000:]

    run = tmp_path / "run"
    cmd = TORCHRUN + ["--nproc-per-node", "2", "--master-port", str(free_port()), "-m", "lite_llm.cli", *args, "-o", str(run)]
    launcher = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    deadline = time.monotonic() + 90
    while not (run / "sharded" / "step-00000004").is_dir() and time.monotonic() < deadline and launcher.poll() is None:
        time.sleep(0.05)
    workers = _children(launcher.pid)
    assert len(workers) == 2 and launcher.poll() is None
    os.kill(max(workers), signal.SIGKILL)
    killed_at = time.monotonic()
    out, err = launcher.communicate(timeout=90)
    assert launcher.returncode != 0
    assert time.monotonic() - killed_at < 60  # stopped, not hung
    assert "Signal 9" in err or "lost contact with another rank" in err + out

    resumed = torchrun(2, *args, "-o", str(run), "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from" in resumed.stdout
    assert _losses(run) == _losses(tmp_path / "whole")  # the same ranks, degrees and batches: bitwise


def test_a_distributed_run_continues_in_one_process(small_dataset, tmp_path):
    args = ["train", "--data", str(small_dataset), "--preset", "tiny", *TRAIN[2:], "--save-every", "2"]
    whole = cli(*args, "--steps", "6", "-o", str(tmp_path / "whole"))
    assert whole.returncode == 0, whole.stderr[-2000:]
    run = tmp_path / "run"
    part = torchrun(2, *args, "--steps", "6", "--parallel", "ep=2", "-o", str(run))
    assert part.returncode == 0
    import shutil

    shutil.rmtree(run / "checkpoints" / "step-00000006")  # as if it stopped after step 4
    shutil.rmtree(run / "sharded" / "step-00000006")
    rest = cli(*args, "--steps", "6", "-o", str(run), "--resume")
    assert rest.returncode == 0, rest.stderr[-2000:]
    assert "(in one process)" in rest.stdout
    a, b = _losses(run), _losses(tmp_path / "whole")
    assert sorted(a) == sorted(b) and max(abs(a[k] - b[k]) / b[k] for k in b) <= 1e-6


def test_tensor_parallel_run_follows_one_process_and_continues_at_dp2_tp2(small_dataset, tmp_path):
    """tp=2 for 4 steps, then the same run resumed at dp=2,tp=2 (four processes, 2-D weights
    loaded from a 1-D checkpoint) to the end: one process's losses throughout."""
    args = ["train", "--data", str(small_dataset), "--preset", "tiny", *TRAIN[2:], "--steps", "6", "--save-every", "2"]
    one = cli(*args, "-o", str(tmp_path / "one"))
    assert one.returncode == 0, one.stderr[-2000:]
    run = tmp_path / "tp"
    tp = torchrun(2, *args, "--parallel", "tp=2", "-o", str(run))
    assert tp.returncode == 0, tp.stderr[-3000:]
    a, b = _losses(run), _losses(tmp_path / "one")
    # a rowwise layer sums two partial products where one process sums once: rounding only
    assert sorted(a) == sorted(b) and max(abs(a[k] - b[k]) / b[k] for k in b) <= 1e-6
    import shutil

    shutil.rmtree(run / "checkpoints" / "step-00000006")  # as if it stopped after step 4
    shutil.rmtree(run / "sharded" / "step-00000006")
    rest = torchrun(4, *args, "--parallel", "dp=2,tp=2", "-o", str(run), "--resume")
    assert rest.returncode == 0, rest.stderr[-3000:]
    assert "parallel: dp=2,ep=1,tp=2,pp=1 on 4 ranks" in rest.stdout
    a = _losses(run)
    assert sorted(a) == sorted(b) and max(abs(a[k] - b[k]) / b[k] for k in b) <= 1e-6
    assert (run / "checkpoints" / "step-00000006" / "manifest.json").is_file()



def test_pipeline_parallel_run_is_one_process_and_consolidates(small_dataset, tmp_path):
    """``--parallel pp=2`` (1F1B over --grad-accum 2 microbatches) logs what one process logs,
    bitwise, and `checkpoint consolidate` of its sharded checkpoint is one process's model."""
    import torch

    from lite_llm.checkpoint import load_checkpoint

    args = ["train", "--data", str(small_dataset), "--preset", "tiny", *TRAIN, "--grad-accum", "2"]
    one = cli(*args, "-o", str(tmp_path / "one"))
    assert one.returncode == 0, one.stderr[-2000:]
    pp = torchrun(2, *args, "--parallel", "pp=2", "-o", str(tmp_path / "pp"))
    assert pp.returncode == 0, pp.stderr[-3000:]
    assert "parallel: dp=1,ep=1,tp=1,pp=2" in pp.stdout
    logged = {run: [(m["step"], m["loss"], m.get("val")) for m in map(json.loads, (tmp_path / run / "metrics.jsonl").read_text().splitlines())] for run in ("one", "pp")}
    assert logged["pp"] == logged["one"] and logged["pp"][-1][2] is not None  # losses and validation, bitwise

    made = cli("checkpoint", "consolidate", str(tmp_path / "pp"), "-o", str(tmp_path / "ckpt"))
    assert made.returncode == 0, made.stderr
    mine = load_checkpoint(tmp_path / "ckpt").model.state_dict()
    want = load_checkpoint(tmp_path / "one" / "checkpoints" / "step-00000004").model.state_dict()
    assert sorted(mine) == sorted(want) and all(torch.equal(v, mine[k]) for k, v in want.items())
