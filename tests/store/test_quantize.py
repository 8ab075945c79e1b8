"""Quantized tiers: the round trip's error against its closed-form bound, a quantized
checkpoint loads and serves the same numbers whole and through the store, the bytes shrink,
and bad requests are one sentence."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from lite_llm.checkpoint import load_checkpoint, verify_checkpoint
from lite_llm.checkpoint.quantization import dequantize, group_size, quantize
from lite_llm.cli import app
from lite_llm.errors import ConfigError
from lite_llm.grow.quantize import quantize_checkpoint
from lite_llm.store import load_with_store

from .test_store import EXPERT_A, PROMPT, checkpoint  # noqa: F401  (the module's checkpoint fixture)


@pytest.mark.parametrize("kind,qmax", [("int8", 127), ("int4", 7)])
def test_round_trip_error_is_at_most_half_a_step(kind, qmax):
    w = torch.randn(3, 40, 192, generator=torch.Generator().manual_seed(0))
    q, s = quantize(w, kind)
    assert q.dtype == (torch.int8 if kind == "int8" else torch.uint8)
    assert q.shape == (3, 40, 192 if kind == "int8" else 96) and s.shape == (3, 40, 192 // group_size(192))
    back = dequantize(q, s, kind)
    step = (w.reshape(3, 40, -1, 64).abs().amax(-1) / qmax)[..., None].expand(3, 40, 3, 64).reshape(w.shape)
    assert torch.all((w - back).abs() <= step / 2 + 1e-7)
    assert torch.equal(dequantize(*quantize(back, kind), kind), back)  # already on the grid: exact


def test_group_size_falls_back_to_what_divides_the_row():
    assert [group_size(n) for n in (128, 96, 48, 30)] == [64, 32, 16, 30]


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_a_quantized_checkpoint_is_smaller_verifies_and_serves_the_same_numbers(checkpoint, tmp_path, kind):  # noqa: F811
    out = quantize_checkpoint(checkpoint, tmp_path / kind, tier="tier_a", to=kind)
    assert verify_checkpoint(out) == []
    manifest = json.loads((out / "manifest.json").read_text())
    before = {s["tier"]: s["bytes"] for s in json.loads((checkpoint / "manifest.json").read_text())["shards"] if s["kind"] == "experts"}
    after = {s["tier"]: s["bytes"] for s in manifest["shards"] if s["kind"] == "experts"}
    assert after["tier_b"] == before["tier_b"]
    assert after["tier_a"] < before["tier_a"] * (0.3 if kind == "int8" else 0.17)
    record = json.loads((out / "progressive.json").read_text())["expansions"][-1]
    assert record["method"] == "quantize" and 0 < record["preservation"]["relative_weight_error_max"] < (0.01 if kind == "int8" else 0.15)

    whole = load_checkpoint(out).model.eval()
    original = load_checkpoint(checkpoint).model.eval()
    assert whole.config.tier("tier_a").quantization == kind
    with torch.no_grad():
        got, ref = whole(PROMPT).logits, original(PROMPT).logits
        stored = load_with_store(out, hot_budget=2 * EXPERT_A, warm_budget=4 * EXPERT_A)
        assert torch.equal(stored.model(PROMPT).logits, got)  # both dequantize the same bytes the same way
    assert 0 < (got - ref).abs().max() < (0.05 if kind == "int8" else 0.5) * ref.abs().max()
    assert stored.store.stats().cold_bytes > 0


def test_refusals_are_one_sentence(checkpoint, tmp_path):  # noqa: F811
    with pytest.raises(ConfigError, match="cannot quantize to 'int3'"):
        quantize_checkpoint(checkpoint, tmp_path / "a", tier="tier_a", to="int3")
    once = quantize_checkpoint(checkpoint, tmp_path / "b", tier="tier_a", to="int8")
    with pytest.raises(ConfigError, match="tier tier_a is already int8"):
        quantize_checkpoint(once, tmp_path / "c", tier="tier_a", to="int4")
    result = CliRunner().invoke(app, ["quantize", str(checkpoint), "--tier", "tier_z", "--to", "int8", "-o", str(tmp_path / "d")])
    assert result.exit_code == 1 and "unknown tier 'tier_z'" in result.stderr and not (tmp_path / "d").exists()


def test_cli_quantize_and_inspect(checkpoint, tmp_path):  # noqa: F811
    runner = CliRunner()
    result = runner.invoke(app, ["quantize", str(checkpoint), "--tier", "tier_b", "--to", "int4", "-o", str(tmp_path / "q")])
    assert result.exit_code == 0, result.output
    assert "tier tier_b as int4, relative weight error max" in result.stdout
    shown = runner.invoke(app, ["inspect", str(tmp_path / "q")], env={"COLUMNS": "250"})
    assert shown.exit_code == 0, shown.output
    row = next(line for line in shown.stdout.splitlines() if "tier_b" in line and "x" in line)
    assert "int4" in row and "cold" in row


def test_growing_a_quantized_checkpoint_is_refused(checkpoint, tmp_path):  # noqa: F811
    from lite_llm.grow.tiers import add_tier_checkpoint

    once = quantize_checkpoint(checkpoint, tmp_path / "q", tier="tier_a", to="int8")
    with pytest.raises(ConfigError, match="cannot add a tier to a checkpoint whose tier\\(s\\) tier_a are quantized"):
        add_tier_checkpoint(once, tmp_path / "grown", tier="tier_c")
    assert not (tmp_path / "grown").exists()
