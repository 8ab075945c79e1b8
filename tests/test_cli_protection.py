"""`lite-llm ewc estimate`, `train` with every forgetting-prevention flag, and the retention
report of `eval --against`, whose figures are checked against a direct evaluation."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from lite_llm.checkpoint import CheckpointManager, load_checkpoint
from lite_llm.cli import app
from lite_llm.data import TokenData
from lite_llm.eval import evaluate
from lite_llm.train import load_ewc

runner = CliRunner()


def _ok(args: list[str]) -> str:
    result = runner.invoke(app, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def test_estimate_train_protected_and_report_retention(tmp_path, small_dataset):
    base = tmp_path / "base"
    _ok(["init", "--preset", "tiny", "-o", base])
    out = _ok(["ewc", "estimate", base, "--data", small_dataset, "--domain", "prose", "--samples", "4", "--seq-len", "32", "-o", tmp_path / "base-ewc"])
    assert "Fisher of 'prose' over 4 sequences" in out
    assert load_ewc(tmp_path / "base-ewc").meta["samples"] == 4

    run = tmp_path / "run"
    _ok([
        "train", "--data", small_dataset, "--init", tmp_path / "base-ewc", "-o", run, "--steps", "3", "--batch-size", "4", "--seq-len", "32",
        "--domains", "code=1", "--replay", "prose=1", "--replay-share", "0.25", "--freeze", "layers.0.*@2", "--freeze", "embed.*",
        "--ewc", tmp_path / "base-ewc", "--ewc-weight", "10", "--distill-from", base, "--distill-domains", "prose", "--quiet",
    ])
    final = CheckpointManager(run).latest()
    saved = json.loads((final / "training" / "state.json").read_text())["train_config"]
    assert saved["replay"] == {"prose": 1.0} and saved["replay_share"] == 0.25
    assert saved["freeze"] == [{"patterns": ["layers.0.*"], "thaw_at": 2}, {"patterns": ["embed.*"], "thaw_at": None}]
    assert saved["ewc_weight"] == 10.0 and saved["distill_domains"] == ["prose"]
    assert set(json.loads((final / "training" / "state.json").read_text())["callbacks"]) >= {"freeze_schedule", "ewc", "distillation"}
    trained, started = load_checkpoint(final), load_checkpoint(base)
    assert (trained.model.embed.weight == started.model.embed.weight).all()  # frozen for good
    assert "ewc" not in trained.progressive  # the estimate stays with base-ewc: nothing stale is claimed

    report = tmp_path / "report"
    out = _ok(["eval", final, "--against", base, "--data", small_dataset, "--domains", "prose,code", "--batches", "2", "--batch-size", "4", "--seq-len", "32", "--report", report])
    assert "retention against base" in out
    written = json.loads((report / "retention.json").read_text())
    assert (report / "retention.md").read_text().startswith("| model |")
    assert (report / "retention.png").stat().st_size > 0
    data = TokenData(small_dataset)
    for label, model in ((written["base"], started.model), (next(m for m in written["scores"] if m != written["base"]), trained.model)):
        direct = evaluate(model, data, ["prose", "code"], batch_size=4, seq_len=32, max_batches=2)
        for d in ("prose", "code"):
            assert written["scores"][label][d] == pytest.approx(direct[d].bpb, rel=1e-6)
    row = next(r for r in written["rows"] if r["model"] != written["base"])
    assert row["prose_change"] == pytest.approx(written["scores"][row["model"]]["prose"] / written["scores"][written["base"]]["prose"] - 1)


def test_bad_freeze_flag_is_one_sentence(tmp_path, small_dataset):
    result = runner.invoke(app, ["train", "--data", str(small_dataset), "--preset", "tiny", "-o", str(tmp_path / "r"), "--freeze", "layers.0.*@soon"])
    assert result.exit_code == 1
    assert "write PATTERN or PATTERN@STEP" in result.output and "Traceback" not in result.output


def test_train_measures_si_importance_and_the_next_run_protects_it(tmp_path, small_dataset):
    """`--si-strength` alone measures (every checkpoint holds si/); `--si-from` with it adds the
    penalty and consolidates the earlier task's importance into the new run's."""
    from lite_llm.train import load_si

    common = ["--data", small_dataset, "--steps", "2", "--batch-size", "4", "--seq-len", "32", "--quiet"]
    _ok(["train", *common, "--preset", "tiny", "--domains", "prose=1", "--si-strength", "1", "--si-damping", "0.01", "-o", tmp_path / "prose"])
    first = CheckpointManager(tmp_path / "prose").latest()
    assert load_si(first).meta["tasks"] == 1 and load_si(first).meta["damping"] == 0.01
    _ok(["train", *common, "--init", first, "--domains", "code=1", "--si-from", first, "--si-strength", "0.5", "-o", tmp_path / "code"])
    second = CheckpointManager(tmp_path / "code").latest()
    saved = json.loads((second / "training" / "state.json").read_text())["train_config"]
    assert saved["si_from"] == str(first) and saved["si_strength"] == 0.5 and saved["si_damping"] == 1e-3
    assert load_si(second).meta["tasks"] == 2 and load_si(second).meta["steps"] == 4
    result = runner.invoke(app, ["train", *map(str, common), "--preset", "tiny", "--si-from", str(first), "-o", str(tmp_path / "bad")])
    assert result.exit_code == 1 and "needs a positive train.si_strength" in result.output and "Traceback" not in result.output
