"""`generate` and `eval` with --hot-budget: the same text and scores as with every expert in
memory (the oracle), the store's statistics on --stats, bad budgets as one sentence."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from lite_llm.cli import app

from .test_store import EXPERT_A, checkpoint  # noqa: F401  (the module's checkpoint fixture)

runner = CliRunner()


def _run(args):
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    return result


def test_generate_with_a_small_budget_prints_what_everything_resident_prints(checkpoint):  # noqa: F811
    args = ["generate", str(checkpoint), "--prompt", "def f(x):", "--max-new-tokens", "20", "--temperature", "0"]
    want = _run(args).stdout
    got = _run([*args, "--hot-budget", str(2 * EXPERT_A), "--warm-budget", "200kB", "--stats"])
    assert got.stdout == want
    assert "expert store: hot" in got.stderr and "evictions" in got.stderr


def test_eval_with_a_budget_scores_what_everything_resident_scores(checkpoint, small_dataset, tmp_path):  # noqa: F811
    common = ["eval", str(checkpoint), "--data", str(small_dataset), "--batches", "2", "--seq-len", "32", "--batch-size", "2"]
    _run([*common, "--json", str(tmp_path / "a.json")])
    _run([*common, "--json", str(tmp_path / "b.json"), "--hot-budget", "150kB", "--cache-policy", "lru"])
    assert json.loads((tmp_path / "a.json").read_text()) == json.loads((tmp_path / "b.json").read_text())


def test_bad_budgets_are_one_sentence(checkpoint):  # noqa: F811
    for extra, message in (
        (["--hot-budget", "10"], f"the least that works is {EXPERT_A} bytes"),
        (["--hot-budget", "lots"], "cannot read 'lots' as a hot budget"),
        (["--warm-budget", "1GB"], "--warm-budget needs --hot-budget"),
        (["--hot-budget", "1MB", "--cache-policy", "fifo"], "unknown cache policy 'fifo'"),
    ):
        result = runner.invoke(app, ["generate", str(checkpoint), "--prompt", "a", *extra])
        assert result.exit_code == 1, result.output
        assert message in result.stderr and "Traceback" not in result.output
