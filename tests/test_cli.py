"""The `lite-llm` command: happy paths end to end, and one-sentence errors with exit code 1."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

from typer.testing import CliRunner

from lite_llm.cli import app

runner = CliRunner()


def _ok(args: list[str]) -> str:
    result = runner.invoke(app, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def _fails(args: list[str], fragment: str) -> str:
    result = runner.invoke(app, args)
    assert result.exit_code == 1, result.output
    message = result.stderr if hasattr(result, "stderr") and result.stderr else result.output
    assert fragment in message, message
    assert "Traceback" not in result.output
    lines = [l for l in message.strip().splitlines() if l.strip()]
    assert len(lines) <= 3, message  # one sentence (rich may wrap it)
    return message


def test_every_command_has_help_with_examples():
    for command in (["init"], ["train"], ["eval"], ["inspect"], ["generate"], ["plot"], ["quickstart"], ["data", "prepare"], ["tokenizer", "train"]):
        out = _ok([*command, "--help"])
        assert "Example" in out, command


def test_init_inspect_generate(tmp_path):
    ckpt = tmp_path / "ckpt"
    _ok(["init", "--preset", "tiny", "-o", str(ckpt)])
    out = _ok(["inspect", str(ckpt)])
    assert "tier_1b" in out and "tier_10b" in out and "verified" in out
    result = runner.invoke(app, ["generate", str(ckpt), "--prompt", "ab", "--max-new-tokens", "8", "--temperature", "0", "--tiers", "upto:tier_1b"])
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("ab")  # the text alone on stdout; the threads header went to stderr
    assert result.stderr.startswith("threads: ")


def test_inspect_fails_on_a_corrupt_shard(tmp_path):
    ckpt = tmp_path / "ckpt"
    _ok(["init", "--preset", "tiny", "-o", str(ckpt)])
    shard = next(ckpt.glob("tier-tier_10b-experts*.safetensors"))
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0xFF
    shard.write_bytes(bytes(data))
    result = runner.invoke(app, ["inspect", str(ckpt)])
    assert result.exit_code == 1
    assert shard.name in result.output


def test_errors_are_one_sentence(tmp_path):
    _fails(["init", "--preset", "huge", "-o", str(tmp_path / "x")], "unknown preset 'huge'")
    assert not (tmp_path / "x").exists()
    _fails(["inspect", str(tmp_path / "missing")], "missing")
    _ok(["init", "--preset", "tiny", "-o", str(tmp_path / "c")])
    _fails(["generate", str(tmp_path / "c"), "--tiers", "tier_9"], "unknown tier")
    _fails(["data", "prepare", f"x={tmp_path / 'nothing-here'}", "-o", str(tmp_path / "d")], "nothing-here")


def test_prepare_train_eval_plot(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(6):
        (corpus / f"doc{i}.txt").write_text(("The quick brown fox jumps over the lazy dog. " * 40) + str(i))
    data = tmp_path / "data"
    _ok(["data", "prepare", f"fox={corpus}", "code=stdlib-code", "--max-mb", "0.2", "-o", str(data)])
    run = tmp_path / "run"
    _ok(["train", "--data", str(data), "--preset", "tiny", "--steps", "3", "--batch-size", "2", "--seq-len", "32", "-o", str(run), "--quiet"])
    ckpt = next((run / "checkpoints").iterdir())
    scores = tmp_path / "scores.json"
    _ok(["eval", str(ckpt), "--data", str(data), "--batches", "2", "--seq-len", "32", "--json", str(scores)])
    assert set(json.loads(scores.read_text())) == {"fox", "code"}
    out = _ok(["plot", str(run)])
    assert "loss.png" in out and (run / "plots" / "loss.png").exists()


def test_killed_run_resumes_exactly(tmp_path, small_dataset):
    """A real kill (SIGKILL) of a training process, then `--resume`: every later loss is bitwise equal."""
    exe = [sys.executable, "-m", "lite_llm.cli"]
    common = ["train", "--data", str(small_dataset), "--preset", "tiny", "--steps", "16", "--batch-size", "4",
              "--seq-len", "32", "--save-every", "2", "--eval-every", "0", "--quiet"]
    straight = tmp_path / "straight"
    subprocess.run([*exe, *common, "-o", str(straight)], check=True, capture_output=True)

    killed = tmp_path / "killed"
    proc = subprocess.Popen([*exe, *common, "-o", str(killed)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not (killed / "checkpoints" / "step-00000006").exists():
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = subprocess.run([*exe, *common, "-o", str(killed), "--resume"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "resumed from" in done.stdout

    def losses(run: Path) -> dict[int, float]:
        out = {}
        for line in (run / "metrics.jsonl").read_text().splitlines():
            record = json.loads(line)
            out[record["step"]] = record["loss"]  # a resumed step overwrites the killed run's record
        return out

    assert losses(killed) == losses(straight)


def _leaf_commands(command, path=()):
    if hasattr(command, "commands"):
        for name, sub in command.commands.items():
            yield from _leaf_commands(sub, (*path, name))
    else:
        yield path, command


def test_every_command_help_has_an_example_of_itself():
    import typer.main

    leaves = list(_leaf_commands(typer.main.get_command(app)))
    assert len(leaves) >= 17  # quickstart, init, data prepare, tokenizer train, train, rollback, eval, ... ewc estimate
    missing = [" ".join(path) for path, command in leaves if f"lite-llm {' '.join(path)}" not in (command.help or "").split("Example", 1)[-1]]
    assert missing == []


def test_help_paragraphs_are_not_cut_where_the_docstring_was_wrapped():
    """Typer keeps a docstring's line breaks after its first paragraph: in a wide terminal a
    paragraph came out cut where the source wrapped it (`plan`: "... own checks (tier" / "budgets,
    ..."). Every prose paragraph of every command's help must read as one line at 400 columns."""
    import inspect

    import typer.main

    cut = []
    for path, command in _leaf_commands(typer.main.get_command(app)):
        out = CliRunner().invoke(app, [*path, "--help"], env={"COLUMNS": "400"}).output
        lines = {" ".join(line.strip(" │").split()) for line in out.splitlines()}
        for paragraph in inspect.cleandoc(command.callback.__doc__ or "").split("\n\n")[1:]:
            if "\n" in paragraph and not paragraph.startswith(" ") and "\n " not in paragraph:
                joined = " ".join(paragraph.split())
                if joined not in lines:
                    cut.append((" ".join(path), joined[:60]))
    assert cut == []


def test_every_train_config_field_is_a_train_option_and_reaches_the_run(tmp_path, small_dataset):
    """TrainConfig declares each setting once; `lite-llm train` takes every field from it."""
    import dataclasses

    from lite_llm.cli.train_options import flag_of
    from lite_llm.train import TrainConfig

    help_text = CliRunner().invoke(app, ["train", "--help"], env={"COLUMNS": "200"}).output
    missing = [f.name for f in dataclasses.fields(TrainConfig) if flag_of(f.name) + " " not in help_text]
    assert missing == []
    out = tmp_path / "run"
    teacher = tmp_path / "teacher"  # --distill-domains needs a teacher: without one it is refused, not ignored
    assert CliRunner().invoke(app, ["init", "--preset", "tiny", "-o", str(teacher)]).exit_code == 0
    args = ["train", "--data", str(small_dataset), "--preset", "tiny", "-o", str(out), "--quiet", "--steps", "2", "--batch-size", "2",
            "--seq-len", "16", "--eval-batches", "1", "--weight-decay", "0.25", "--beta2", "0.9", "--keep-last", "2",
            "--domains", "code=3,prose=1", "--no-keep-memory", "--distill-from", str(teacher), "--distill-domains", "prose, code", "--tiers", "tier_1b"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    saved = json.loads((out / "checkpoints" / "step-00000002" / "training" / "state.json").read_text())["train_config"]
    assert (saved["weight_decay"], saved["beta2"], saved["keep_last"], saved["keep_freed_cpu_memory"]) == (0.25, 0.9, 2, False)
    assert saved["domains"] == {"code": 3.0, "prose": 1.0} and saved["distill_domains"] == ["prose", "code"] and saved["tierset"] == "tier_1b"
    assert TrainConfig.from_dict(saved).eval_every == TrainConfig().eval_every  # not given: TrainConfig's default

    bad = CliRunner().invoke(app, ["train", "--data", str(small_dataset), "--preset", "tiny", "-o", str(tmp_path / "b"), "--domains", "code:1"])
    assert bad.exit_code == 1 and "cannot read --domains weight 'code:1'" in bad.output
    bad = CliRunner().invoke(app, ["train", "--data", str(small_dataset), "--preset", "tiny", "-o", str(tmp_path / "b"), "--batch-size", "0"])
    assert bad.exit_code == 2 and "greater than or equal to 1" in bad.output and "--batch-size" in bad.output


def test_a_full_disk_is_one_sentence_and_leaves_nothing(tmp_path, monkeypatch):
    import errno
    import os

    import lite_llm.checkpoint.save as save

    def full_disk(path, *args, **kwargs):
        Path(path).write_bytes(b"\0" * 100)  # a shard half written when the disk filled up
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(save, "write_safetensors", full_disk)
    message = _fails(["init", "--preset", "tiny", "-o", str(tmp_path / "ckpt")], "the disk is full writing")
    assert "nothing half-written was kept" in message
    assert list(tmp_path.iterdir()) == []  # neither the checkpoint nor its temporary directory
