"""Defects found by the fifth sweep of the command line, each with its command and its result."""

from __future__ import annotations

import subprocess
import sys

CLI = [sys.executable, "-c", "from lite_llm.cli import main; main()"]


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(CLI + list(args), capture_output=True, text=True, timeout=60)


def test_piped_help_is_plain_lines_with_nothing_cut():
    """Was: help piped to a file came in boxes padded to 80 columns, option names cut with an
    ellipsis (--no-keep-memo…) and examples broken mid-command."""
    done = _run("train", "--help")
    assert done.returncode == 0
    lines = done.stdout.splitlines()
    assert not any(ch in done.stdout for ch in "╭│╰…")
    assert "--keep-memory / --no-keep-memory" in done.stdout
    first = next(i for i, line in enumerate(lines) if line.rstrip().endswith("--replay-share 0.25 \\"))
    assert lines[first + 1].strip().startswith("--ewc grown --ewc-weight 100")  # the continued example stays two lines
    steps = next(line for line in lines if line.strip().startswith("--steps "))
    assert "Total optimizer steps. Default: 200." in steps and "(200)" not in steps


def test_a_mistyped_option_is_one_line():
    """Was: click's usage block and rich's error box, seven lines for one mistake."""
    done = _run("generate", "ckpt", "--max-tokens", "4")
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.strip().splitlines() == [
        "error: No such option: --max-tokens (Possible options: --max-new-tokens); see `lite-llm generate --help`"
    ]
    done = _run("inspect")
    assert done.stderr.strip() == "error: Missing argument 'checkpoint'; see `lite-llm inspect --help`"


def test_a_group_without_its_command_prints_its_help():
    done = _run("data")
    assert done.returncode == 2 and done.stdout.startswith("Usage: lite-llm data [OPTIONS] COMMAND") and "prepare" in done.stdout


# ------------------------------------------------------------------------------ training
import os  # noqa: E402
import signal  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from .test_issue16_safety import _hashes, _run as _invoke  # noqa: E402

TRAIN = ["--batch-size", "2", "--seq-len", "32", "--eval-every", "0", "--eval-batches", "1", "--eval-batch-size", "2", "--quiet"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """Two small byte datasets and a finished 4-step run (checkpoints at steps 2 and 4) on the first."""
    root = tmp_path_factory.mktemp("sweep5")
    for name, words in (("a", "def class return import self"), ("b", "the quick brown fox jumps")):
        (root / name).mkdir()
        for i in range(3):
            (root / name / f"d{i}.txt").write_text(" ".join([f"{words} {i}"] * 300))
        assert _invoke(["data", "prepare", f"text={root / name}", "-o", str(root / f"data-{name}")])[0] == 0
    code, out = _invoke(["train", "--data", str(root / "data-a"), "--preset", "tiny", "--steps", "4", "--save-every", "2", "-o", str(root / "run"), *TRAIN])
    assert code == 0, out
    return {"root": root, "a": root / "data-a", "b": root / "data-b", "run": root / "run"}


def test_overwrite_never_deletes_the_checkpoint_the_new_run_starts_from(runs, tmp_path):
    """Was: --overwrite cleared the run first, then --init found its checkpoint gone: the whole run lost."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(runs["run"], run)
    before = _hashes(run)
    for flag in (["--init", str(run / "checkpoints" / "step-00000004")], ["--preset", "tiny", "--distill-from", str(run / "checkpoints" / "step-00000004")]):
        code, out = _invoke(["train", "--data", str(runs["a"]), *flag, "--steps", "2", "-o", str(run), "--overwrite", *TRAIN])
        assert code == 1 and f"--overwrite would delete {run / 'checkpoints' / 'step-00000004'}, which {flag[-2]} reads" in out, out
        assert _hashes(run) == before


def test_resume_on_another_dataset_is_refused(runs, tmp_path):
    """Was: --resume with another --data continued the run on it without a word."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(runs["run"], run)
    before = _hashes(run)
    code, out = _invoke(["train", "--data", str(runs["b"]), "-o", str(run), "--resume", "--steps", "6", "--quiet"])
    assert code == 1 and f"cannot resume with --data {runs['b']}: the run was trained on {runs['a']}" in out, out
    assert _hashes(run) == before
    code, out = _invoke(["train", "--data", str(runs["a"]), "-o", str(run), "--resume", "--steps", "6", "--quiet"])
    assert code == 0 and "resumed from" in out, out


@pytest.mark.parametrize("line, words", [
    ('bf16: "no"', "train.bf16 (--bf16) must be true or false, got 'no'"),
    ("bf16: 1", "train.bf16 (--bf16) must be true or false, got 1"),
    ('keep_freed_cpu_memory: "no"', "train.keep_freed_cpu_memory (--keep-memory) must be true or false, got 'no'"),
    ("parallel: 5", "train.parallel (--parallel) must be a string"),
    ('freeze: "layers.0.*"', "train.freeze (--freeze) must be a list of rules"),
])
def test_wrongly_typed_yes_no_and_text_settings_are_refused(runs, tmp_path, line, words):
    """Was: a TypeError traceback from deep in torch (bf16), or "no" stored and taken as yes."""
    (tmp_path / "c.yaml").write_text(f"steps: 2\n{line}\n")
    code, out = _invoke(["train", "--data", str(runs["a"]), "--preset", "tiny", "--config", str(tmp_path / "c.yaml"), "-o", str(tmp_path / "r"), "--quiet"])
    assert code == 1 and words in out and "Traceback" not in out, out
    assert not any((tmp_path / "r").rglob("*"))  # nothing of a run left behind


def test_freezing_everything_is_one_sentence_and_the_stopped_run_says_how_to_start_again(runs, tmp_path):
    run = tmp_path / "r"
    code, out = _invoke(["train", "--data", str(runs["a"]), "--preset", "tiny", "--steps", "2", "--freeze", "*", "-o", str(run), *TRAIN])
    assert code == 1 and "the freeze rules hold every parameter of the model, so nothing would train" in out, out
    code, out = _invoke(["train", "--data", str(runs["a"]), "--preset", "tiny", "--steps", "2", "-o", str(run), *TRAIN])
    assert code == 1 and "holds a run that stopped before its first checkpoint, so there is nothing to resume; pass --overwrite" in out, out


def test_init_refuses_both_a_preset_and_a_config(tmp_path):
    """Was: --preset tiny --config small.yaml wrote the config's model, the preset dropped."""
    (tmp_path / "small.yaml").write_text("preset: small\n")
    code, out = _invoke(["init", "--preset", "tiny", "--config", str(tmp_path / "small.yaml"), "-o", str(tmp_path / "c")])
    assert code == 1 and "give only one of --preset and --config" in out and not (tmp_path / "c").exists()


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_stopped_run_says_where_it_stopped_and_how_to_continue(runs, tmp_path, signum):
    """Was: Ctrl-C or SIGTERM ended the run with no word (SIGTERM also left its lock behind)."""
    run = tmp_path / "r"
    args = ["train", "--data", str(runs["a"]), "--preset", "tiny", "--steps", "100000", "--save-every", "5", "-o", str(run), *TRAIN]
    proc = subprocess.Popen(CLI + args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, "COLUMNS": "1000"})
    deadline = time.monotonic() + 60
    while not (run / "checkpoints" / "step-00000005").is_dir() and time.monotonic() < deadline:
        time.sleep(0.2)
    proc.send_signal(signum)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130, out
    assert "interrupted at step" in out and "the last checkpoint is" in out and f"-o {run} --resume` continues from it" in out, out
    assert not (run / ".lock").exists()
    last = out.split("the last checkpoint is ")[1].split(":")[0]
    assert Path(last).name == sorted(p.name for p in (run / "checkpoints").iterdir())[-1]
    assert _invoke(["inspect", last])[0] == 0


def test_a_key_given_twice_in_a_yaml_file_is_refused(runs, tmp_path):
    """Was: the last one won without a word (steps: 3, then steps: 5 trained 5 steps)."""
    (tmp_path / "dup.yaml").write_text("steps: 3\nbatch_size: 2\nsteps: 5\n")
    code, out = _invoke(["train", "--data", str(runs["a"]), "--preset", "tiny", "--config", str(tmp_path / "dup.yaml"), "-o", str(tmp_path / "r"), "--quiet"])
    assert code == 1 and "dup.yaml gives 'steps' twice (lines 1 and 3); keep one" in out, out


def test_a_change_on_resume_that_came_from_the_config_file_names_the_file(runs, tmp_path):
    """Was: "cannot resume with --lr 0.002", a flag the user never typed."""
    (tmp_path / "lr.yaml").write_text("lr: 0.002\n")
    code, out = _invoke(["train", "--data", str(runs["a"]), "-o", str(runs["run"]), "--resume", "--config", str(tmp_path / "lr.yaml"), "--quiet"])
    assert code == 1 and f"cannot resume with lr: 0.002 (from {tmp_path / 'lr.yaml'})" in out and f"remove lr from {tmp_path / 'lr.yaml'}" in out, out


def test_resume_from_an_earlier_checkpoint_removes_the_abandoned_later_ones(runs, tmp_path):
    """Was: a sharded step-20 of the old timeline stayed beside the new ordinary step-20, and a
    later resume under torchrun or `checkpoint consolidate --step 20` picked the abandoned one."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(runs["run"], run)
    stale = run / "sharded" / "step-00000010"
    stale.mkdir(parents=True)
    (stale / "lite_llm.json").write_text("{}")
    code, out = _invoke(["train", "--data", str(runs["a"]), "-o", str(run), "--resume-from", str(run / "checkpoints" / "step-00000002"), "--quiet"])
    assert code == 0, out
    assert f"removed {stale}: it is of the run before --resume-from went back to step 2" in out
    assert f"removed {run / 'checkpoints' / 'step-00000004'}" in out and not stale.exists()
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-00000002", "step-00000004"]  # step 4 trained again


def test_inspect_says_an_exceeded_advisory_budget_in_one_plain_line(tmp_path):
    """Was: `<string>:20: UserWarning: tiers[tier_1b] needs ...` on every inspect."""
    assert _invoke(["init", "--preset", "tiny", "-o", str(tmp_path / "t")])[0] == 0
    assert _invoke(["expand", str(tmp_path / "t"), "--method", "budget", "--set", "tier=tier_1b", "--set", "mode=advisory", "-o", str(tmp_path / "b")])[0] == 0
    assert _invoke(["expand", str(tmp_path / "b"), "--method", "budget", "--set", "tier=tier_10b", "--set", "mode=advisory", "-o", str(tmp_path / "b2")])[0] == 0
    assert _invoke(["expand", str(tmp_path / "b2"), "--method", "width", "--set", "d_model=512", "-o", str(tmp_path / "w")])[0] == 0
    done = _run("inspect", str(tmp_path / "w"))
    assert done.returncode == 0 and "UserWarning" not in done.stderr
    assert "warning: tiers[tier_1b] needs" in done.stderr and "but its budget is 1M" in done.stderr
