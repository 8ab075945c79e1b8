"""A second sweep of the CLI as a demanding user drives it: distributed training (degrees,
resuming across world sizes and between torchrun and one process), sharded checkpoints that
are damaged or edited by hand, `plot` on damaged metrics, `quickstart` into a used folder and
`data prepare` given one source twice.  Each defect found is one test: one sentence instead of
a traceback, a misleading message or a silently wrong result, and the files left as they were."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lite_llm.dist.local import free_port

from .test_issue16_safety import _hashes, _run

TRAIN = ["--preset", "tiny", "--batch-size", "4", "--seq-len", "32", "--eval-batches", "1", "--eval-batch-size", "2", "--quiet"]


def _env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", LITE_LLM_DEVICE="cpu")
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1] / "src") + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _torchrun(n: int, *args: str, timeout: float = 90) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(n), "--master-addr", "127.0.0.1",
           "--master-port", str(free_port()), "-m", "lite_llm.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=_env())


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    corpus = tmp_path_factory.mktemp("corpus")
    for i in range(4):
        (corpus / f"f{i}.txt").write_text(" ".join(f"word{(i * 7 + j) % 23}" for j in range(6000)))
    out = tmp_path_factory.mktemp("data") / "d"
    assert _run(["data", "prepare", f"x={corpus}", "-o", str(out)])[0] == 0
    return out


@pytest.fixture(scope="module")
def dist_run(data, tmp_path_factory) -> Path:
    """A finished two-rank run: sharded checkpoints at steps 2 and 4, the consolidated step 4."""
    run = tmp_path_factory.mktemp("dist") / "run"
    done = _torchrun(2, "train", "--data", str(data), "-o", str(run), "--steps", "4", "--save-every", "2", "--parallel", "dp=2", *TRAIN)
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(p.name for p in (run / "sharded").iterdir()) == ["step-00000002", "step-00000004"]
    return run


def _copy(run: Path, tmp_path: Path) -> Path:
    target = tmp_path / "run"
    shutil.copytree(run, target)
    return target


def _as_rank(monkeypatch) -> None:
    """This process as rank 1 of 2 under torchrun: what is refused before the process group forms
    is refused here, with no peer needed."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")


# ------------------------------------------------------------------------------ --parallel in one process
def test_parallel_of_all_ones_trains_in_one_process(data, tmp_path):
    code, out = _run(["train", "--data", str(data), "-o", str(tmp_path / "r"), "--steps", "1", "--parallel", "dp=1", *TRAIN])
    assert code == 0, out
    assert (tmp_path / "r" / "checkpoints" / "step-00000001" / "manifest.json").is_file()


def test_parallel_in_one_process_says_how_many_processes_to_launch(data, tmp_path):
    code, out = _run(["train", "--data", str(data), "-o", str(tmp_path / "r"), "--steps", "1", "--parallel", "dp=2,tp=2", *TRAIN])
    assert code == 1 and "needs 4 processes" in out and "torchrun --nproc-per-node 4" in out and "Traceback" not in out, out
    assert not (tmp_path / "r").exists()


# ------------------------------------------------------------------------------ under torchrun
def test_an_existing_run_is_refused_by_every_rank_not_reported_as_a_lost_rank(dist_run, data, tmp_path):
    run = _copy(dist_run, tmp_path)
    before = _hashes(run)
    bad = _torchrun(2, "train", "--data", str(data), "-o", str(run), "--steps", "2", "--parallel", "dp=2", *TRAIN)
    text = bad.stdout + bad.stderr
    assert bad.returncode != 0
    assert "already holds a run; pass --resume" in text  # each rank says it (torchrun may stop one first)
    assert "lost contact" not in text and "src/lite_llm/" not in text
    assert _hashes(run) == before


def test_resume_under_torchrun_of_a_one_process_run_says_to_continue_it_in_one_process(data, tmp_path, monkeypatch):
    run = tmp_path / "single"
    assert _run(["train", "--data", str(data), "-o", str(run), "--steps", "1", *TRAIN])[0] == 0
    before = _hashes(run)
    _as_rank(monkeypatch)
    code, out = _run(["train", "--data", str(data), "-o", str(run), "--steps", "2", "--resume", "--quiet"])
    assert code == 1 and "holds checkpoints of a one-process run but no sharded checkpoint" in out and "drop --resume" not in out, out
    assert _hashes(run) == before


def test_a_curriculum_under_torchrun_is_refused_not_dropped(data, tmp_path, monkeypatch):
    """Was: ``--curriculum`` under torchrun set the run's steps from the plan and then trained
    with no curriculum at all, without a word."""
    import yaml

    plan = tmp_path / "curriculum.yaml"
    plan.write_text(yaml.safe_dump({"tier": "tier_new", "phases": [{"name": "integration", "steps": 2, "to_share": 0.4}]}))
    _as_rank(monkeypatch)
    run = tmp_path / "run"
    code, out = _run(["train", "--data", str(data), "-o", str(run), "--curriculum", str(plan), "--parallel", "dp=2", *TRAIN])
    assert code == 1 and "--curriculum runs in one process only for now" in out and "train without torchrun" in out, out
    assert not run.exists()


def test_a_refused_resume_change_names_every_setting_that_may_change(data, tmp_path):
    """Was: "only --steps, --eval-every and --save-every can change" while --log-every,
    --keep-last, --parallel and --pp-schedule may change too."""
    run = tmp_path / "run"
    assert _run(["train", "--data", str(data), "-o", str(run), "--steps", "1", *TRAIN])[0] == 0
    code, out = _run(["train", "--data", str(data), "-o", str(run), "--resume", "--steps", "2", "--lr", "0.5", "--quiet"])
    listed = "only --steps, --eval-every, --save-every, --log-every, --keep-last, --parallel, --pp-schedule can change when resuming"
    assert code == 1 and "cannot resume with --lr 0.5" in out and listed in out, out


def test_resume_under_torchrun_refuses_to_train_over_newer_one_process_steps(dist_run, data, tmp_path, monkeypatch):
    run = _copy(dist_run, tmp_path)
    # the run went on in one process from its last sharded checkpoint (step 4) to step 5
    code, out = _run(["train", "--data", str(data), "-o", str(run), "--steps", "5", "--resume", "--quiet"])
    assert code == 0 and (run / "checkpoints" / "step-00000005").is_dir(), out
    before = _hashes(run)
    _as_rank(monkeypatch)
    code, out = _run(["train", "--data", str(data), "-o", str(run), "--steps", "6", "--resume", "--quiet"])
    assert code == 1 and "step-00000005 is newer than the run's last sharded checkpoint step-00000004" in out, out
    assert _hashes(run) == before


def test_resume_under_torchrun_builds_the_runs_own_model_not_the_default_preset(data, tmp_path, monkeypatch):
    """Was: a distributed run of any model but the default preset could not be resumed as the
    README writes it (no --preset retyped): every rank built the tiny preset and failed on the
    first tensor of another shape.  A different --preset is refused, as in one process."""
    (tmp_path / "model.yaml").write_text("preset: tiny\nd_model: 48\n")
    run = tmp_path / "run"
    small = [a for a in TRAIN if a not in ("--preset", "tiny")]
    done = _torchrun(2, "train", "--data", str(data), "-o", str(run), "--steps", "2", "--parallel", "dp=2", "--model-config", str(tmp_path / "model.yaml"), *small)
    assert done.returncode == 0, done.stderr[-3000:]
    resumed = _torchrun(2, "train", "--data", str(data), "-o", str(run), "--steps", "3", "--resume", "--parallel", "dp=2", "--quiet")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout and (run / "sharded" / "step-00000003").is_dir(), resumed.stdout
    before = _hashes(run)
    _as_rank(monkeypatch)
    code, out = _run(["train", "--data", str(data), "-o", str(run), "--steps", "4", "--resume", "--preset", "tiny", "--quiet"])
    assert code == 1 and "cannot resume with a different model" in out, out
    assert _hashes(run) == before


def test_consolidate_in_one_process_prints_no_torch_warning(dist_run, tmp_path):
    """Was: torch's "UserWarning: torch.distributed is disabled ... assuming the intent is to load
    in a single process" on every consolidate and one-process resume — which is the intent."""
    import warnings

    from lite_llm.dist.checkpoint import consolidate

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        consolidate(dist_run / "sharded" / "step-00000004", tmp_path / "whole")
    assert not [w for w in caught if "torch.distributed is disabled" in str(w.message)], [str(w.message) for w in caught]
    assert (tmp_path / "whole" / "manifest.json").is_file()


def test_resume_from_under_torchrun_must_be_a_sharded_checkpoint(dist_run, data, tmp_path, monkeypatch):
    run = _copy(dist_run, tmp_path)
    before = _hashes(run)
    _as_rank(monkeypatch)
    code, out = _run(["train", "--data", str(data), "-o", str(run), "--steps", "6", "--resume-from", str(run / "checkpoints" / "step-00000004")])
    assert code == 1 and "is not a sharded checkpoint; under torchrun give one of" in out, out
    assert _hashes(run) == before


def test_resume_from_under_torchrun_continues_from_that_checkpoint_and_a_finished_run_says_so(dist_run, data, tmp_path):
    run = _copy(dist_run, tmp_path)
    before = _hashes(run)
    done = _torchrun(2, "train", "--data", str(data), "-o", str(run), "--resume", "--quiet")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "is finished at step 4; pass --steps N" in done.stdout and "checkpoint: None" not in done.stdout
    assert _hashes(run) == before  # nothing trained, nothing written
    again = _torchrun(2, "train", "--data", str(data), "-o", str(run), "--resume-from", str(run / "sharded" / "step-00000002"), "--quiet")
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resumed from {run / 'sharded' / 'step-00000002'} at step 2 of 4" in again.stdout  # not from step 4
    assert [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [0, 1, 2, 3]


def test_resume_from_a_sharded_checkpoint_in_one_process(dist_run, data, tmp_path):
    run = _copy(dist_run, tmp_path)
    code, out = _run(["train", "--data", str(data), "-o", str(run), "--resume-from", str(run / "sharded" / "step-00000004"), "--quiet"])
    assert code == 0 and "is finished at step 4" in out and "checkpoint: None" not in out, out
    code, out = _run(["train", "--data", str(data), "-o", str(run), "--resume-from", str(run / "sharded" / "step-00000002"), "--quiet"])
    assert code == 0 and "at step 2 of 4 (in one process)" in out, out
    assert f"removed {run / 'sharded' / 'step-00000004'}: it is of the run before --resume-from went back to step 2" in out  # the abandoned timeline


# ------------------------------------------------------------------------------ damaged sharded checkpoints
def _damaged(dist_run: Path, tmp_path: Path, how: str) -> Path:
    step = tmp_path / "step"
    shutil.copytree(dist_run / "sharded" / "step-00000004", step)
    shard = sorted(step.glob("*.safetensors"))[0]
    if how == "missing":
        shard.unlink()
    elif how.startswith("cut"):
        with open(shard, "r+b") as f:
            f.truncate(1000 if how == "cut-header" else shard.stat().st_size // 2)
    else:
        meta = json.loads((step / "lite_llm.json").read_text())
        meta["model_config"]["n_layers"] = int(how.split("=")[1])
        (step / "lite_llm.json").write_text(json.dumps(meta))
    return step


@pytest.mark.parametrize(
    "how, message",
    [
        ("missing", "holds only part of model/embed.weight: one of its shard files is missing"),
        ("cut-header", "is cut short or corrupt"),
        ("cut-data", "is cut short or corrupt"),
        ("n_layers=1", "holds layers.1.attn.k_proj.weight, which the model lacks; its lite_llm.json describes another model"),
        ("n_layers=3", "has no layers.2.attn_norm.weight; its lite_llm.json describes another model"),
    ],
)
def test_consolidating_a_damaged_sharded_checkpoint_is_one_sentence_and_writes_nothing(dist_run, tmp_path, how, message):
    step = _damaged(dist_run, tmp_path, how)
    before = _hashes(step)
    code, out = _run(["checkpoint", "consolidate", str(step), "-o", str(tmp_path / "out")])
    assert code == 1 and message in out and "Traceback" not in out, out
    assert not (tmp_path / "out").exists() and _hashes(step) == before


def test_resuming_past_a_sharded_checkpoint_with_a_missing_shard_takes_the_previous_one(dist_run, data, tmp_path):
    """As for ordinary checkpoints: a broken newest one is said so and the previous complete one
    is resumed from (it was a refusal, which left a run with a good step 2 unresumable)."""
    run = _copy(dist_run, tmp_path)
    shutil.rmtree(run / "checkpoints")  # so the sharded step 4 is the newest
    next(iter(sorted((run / "sharded" / "step-00000004").glob("*.safetensors")))).unlink()
    broken = _hashes(run / "sharded" / "step-00000004")
    code, out = _run(["train", "--data", str(data), "-o", str(run), "--steps", "6", "--resume", "--quiet"])
    assert code == 0, out
    assert "cannot resume from step-00000004" in out and "one of its shard files is missing" in out
    assert "resumed from" in out and "step-00000002 at step 2 of 6 (in one process)" in out
    assert (run / "checkpoints" / "step-00000006" / "manifest.json").is_file()
    assert _hashes(run / "sharded" / "step-00000004") == broken  # reported, not deleted


# ------------------------------------------------------------------------------ plot
def _metrics_run(tmp_path: Path, lines: list[str]) -> Path:
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    return run


GOOD = [json.dumps({"step": s, "loss": 5.0 - s, "val": {"x": {"loss": 5.0 - s, "bpb": 7.0 - s}}}) for s in range(3)]


def test_plot_names_a_corrupt_metrics_line(tmp_path):
    run = _metrics_run(tmp_path, [GOOD[0], '{"step": 1, "lo', GOOD[2]])
    code, out = _run(["plot", str(run)])
    assert code == 1 and f"line 2 of {run / 'metrics.jsonl'} is not a metrics record" in out and "Unterminated" not in out, out
    assert not (run / "plots").exists()


def test_plot_leaves_out_a_last_line_cut_short(tmp_path):
    run = _metrics_run(tmp_path, [*GOOD, '{"step": 3, "lo'])
    code, out = _run(["plot", str(run)])
    assert code == 0 and (run / "plots" / "loss.png").is_file(), out


def test_plot_into_a_file_is_one_sentence(tmp_path):
    run = _metrics_run(tmp_path, GOOD)
    target = tmp_path / "charts"
    target.write_text("mine")
    code, out = _run(["plot", str(run), "-o", str(target)])
    assert code == 1 and "is a file, and the charts need a folder" in out and "Traceback" not in out, out
    assert target.read_text() == "mine"


# ------------------------------------------------------------------------------ quickstart
def test_quickstart_refuses_a_folder_with_an_earlier_run_unless_overwrite(tmp_path):
    out = tmp_path / "q"
    (out / "run" / "checkpoints" / "step-00000300").mkdir(parents=True)
    (out / "run" / "metrics.jsonl").write_text(GOOD[0] + "\n")
    before = _hashes(out)
    code, text = _run(["quickstart", "-o", str(out), "--steps", "1"])
    assert code == 1 and "already holds a quickstart run" in text and "--overwrite" in text, text
    assert _hashes(out) == before and (out / "run" / "checkpoints" / "step-00000300").is_dir()
    (tmp_path / "file.txt").write_text("x")
    code, text = _run(["quickstart", "-o", str(tmp_path / "file.txt"), "--steps", "1"])
    assert code == 1 and "is a file" in text and (tmp_path / "file.txt").read_text() == "x", text


def test_quickstart_overwrite_replaces_the_earlier_run_and_charts_and_keeps_the_data(tmp_path):
    from lite_llm.quickstart import _clear_previous_run

    out = tmp_path / "q"
    (out / "run" / "checkpoints" / "step-00000300").mkdir(parents=True)
    (out / "plots").mkdir()
    (out / "plots" / "loss.png").write_bytes(b"png")
    (out / "data").mkdir()
    (out / "data" / "index.json").write_text("{}")
    data_before = _hashes(out / "data")
    _clear_previous_run(out, overwrite=True)  # what `quickstart --overwrite` does before it starts
    assert sorted(p.name for p in out.iterdir()) == ["data"] and _hashes(out / "data") == data_before


# ------------------------------------------------------------------------------ data prepare
def test_one_source_given_for_two_domains_is_refused(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("hello world " * 200)
    before = _hashes(corpus)
    for specs in ([f"a={corpus}", f"b={corpus}/"], ["a=stdlib-docs", "b=stdlib-docs"]):
        code, out = _run(["data", "prepare", *specs, "-o", str(tmp_path / "d")])
        assert code == 1 and "is given twice, for domains 'a' and 'b'" in out, out
        assert not (tmp_path / "d").exists()
    assert _hashes(corpus) == before


def test_resume_after_a_metrics_row_cut_short_drops_it_and_a_corrupt_row_is_named(data, tmp_path):
    """A run killed while writing metrics.jsonl leaves a cut last row: ``--resume`` ended in a
    bare "Unterminated string" from the JSON decoder.  Now that row goes with the re-run steps,
    and a damaged row in the middle is one sentence naming the file and the line."""
    import json

    run = tmp_path / "r"
    assert _run(["train", "--data", str(data), "-o", str(run), "--steps", "3", "--save-every", "2", *TRAIN])[0] == 0
    metrics = run / "metrics.jsonl"
    rows = metrics.read_text().splitlines()
    metrics.write_text("\n".join(rows) + '\n{"step": 3, "loss": 4.1')  # the row a kill cut short
    code, out = _run(["train", "--data", str(data), "-o", str(run), "--steps", "5", "--resume", *TRAIN])
    assert code == 0, out
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert steps == [0, 1, 2, 3, 4], steps  # the rows of steps 2 and 3 were re-run from the step-2 checkpoint, each once
    lines = metrics.read_text().splitlines()
    metrics.write_text("\n".join([lines[0], "garbage", *lines[1:]]) + "\n")
    code, out = _run(["train", "--data", str(data), "-o", str(run), "--steps", "6", "--resume", *TRAIN])
    assert code == 1 and f"line 2 of {metrics} is not a metrics record" in out and "Traceback" not in out, out
