"""Growth edge cases a user hit (issue 16, point 9), each through the command a user types:
the corrected result or the one-sentence refusal, and the files before and after."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from lite_llm import ModelConfig
from lite_llm.checkpoint import load_checkpoint, save_checkpoint
from lite_llm.cli import app
from lite_llm.data import ByteTokenizer
from lite_llm.grow.validate import sample_ids

from .helpers import random_model

runner = CliRunner()


def tree_sha256(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def text(result) -> str:
    return " ".join(result.output.split())


@pytest.fixture
def tiny(tmp_path):
    """The `tiny` preset (2 layers, two tiers, k_tier=1) with random weights and a byte tokenizer."""
    path = save_checkpoint(tmp_path / "src", random_model(ModelConfig.from_preset("tiny")), tokenizer=ByteTokenizer())
    return path, tree_sha256(path)


def logits(path: Path, ids: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    model = load_checkpoint(path).model.to(dtype).eval()
    with torch.no_grad():
        return model(ids).logits


IDS = torch.randint(0, 256, (3, 40), generator=torch.Generator().manual_seed(5))


# ----------------------------------------------------------------------------------- llama_pro
def test_llama_pro_to_three_times_the_depth_is_bitwise_exact(tiny, tmp_path):
    src, before = tiny
    out = tmp_path / "deep"
    result = runner.invoke(app, ["expand", str(src), "--method", "llama_pro", "--target-layers", "6", "-o", str(out)])
    assert result.exit_code == 0, result.output  # was: layer indices [-1] are out of range
    assert tree_sha256(src) == before
    assert torch.equal(logits(src, IDS), logits(out, IDS))
    a, b = load_checkpoint(src).model.state_dict(), load_checkpoint(out).model.state_dict()
    for j, (i, silenced) in enumerate([(0, False), (0, True), (0, True), (1, False), (1, True), (1, True)]):
        assert torch.equal(b[f"layers.{j}.attn.q_proj.weight"], a[f"layers.{i}.attn.q_proj.weight"])
        assert bool(b[f"layers.{j}.attn.o_proj.weight"].any()) is not silenced
    (record,) = json.loads((out / "progressive.json").read_text())["expansions"]
    assert record["exact"] and record["preservation"]["max_abs"] == 0.0


# ----------------------------------------------------------------------------------- add-tier k_tier
ADD = ["--tier", "tier_new", "--groups", "2", "--experts-per-group", "4", "--expert-hidden", "64"]


def test_add_tier_raising_k_tier_is_refused_in_one_sentence_and_nothing_is_written(tiny, tmp_path):
    src, before = tiny
    out = tmp_path / "out"
    result = runner.invoke(app, ["add-tier", str(src), *ADD, "--k-tier", "2", "-o", str(out)])
    assert result.exit_code == 1
    assert text(result) == (
        "error: k_tier=2 changes which tiers every token uses (it would mix 2 of the 2 existing tiers instead of 1), so the model's output "
        "cannot be preserved; add --change-routing (in a recipe or --set: change_routing: true) to add the tier as a recorded non-exact change with "
        "its measured loss jump, or leave k_tier out to keep the output exact"
    )
    assert not out.exists() and tree_sha256(src) == before


def test_add_tier_with_change_routing_records_the_measured_change(tiny, tmp_path):
    src, before = tiny
    out = tmp_path / "out"
    result = runner.invoke(app, ["add-tier", str(src), *ADD, "--k-tier", "2", "--change-routing", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert tree_sha256(src) == before
    (record,) = json.loads((out / "progressive.json").read_text())["expansions"]
    assert record["exact"] is False and record["params"]["change_routing"] is True
    assert record["note"].startswith("k_tier 1 -> 2: every token now mixes 2 old tiers instead of 1; not function-preserving")
    # The recorded figures are what the two checkpoints compute on the same sample tokens.
    ids = sample_ids(256, ByteTokenizer())
    a, b = load_checkpoint(src).model.eval(), load_checkpoint(out).model.eval()
    with torch.no_grad():
        oa, ob = a(ids, labels=ids), b(ids, labels=ids)
    p = record["preservation"]
    assert p["bitwise"] is False and p["tokens"] == ids.numel()
    assert p["max_abs"] == pytest.approx(float((oa.logits.double() - ob.logits.double()).abs().max()), rel=1e-6) and p["max_abs"] > 1e-4
    assert p["loss_jump"] == pytest.approx(float(ob.lm_loss) - float(oa.lm_loss), abs=1e-6)
    assert f"loss jump {p['loss_jump']:+.4f}" in text(result) and "recorded as not exact" in text(result)
    # Every old tensor is still the source's, bitwise; only the routing (k_tier) changed.
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sb[n], t) for n, t in sa.items())
    assert load_checkpoint(out).config.routing.k_tier == 2


def test_change_routing_without_a_routing_change_is_refused(tiny, tmp_path):
    src, before = tiny
    result = runner.invoke(app, ["add-tier", str(src), *ADD, "--change-routing", "-o", str(tmp_path / "out")])
    assert result.exit_code == 1
    assert text(result) == (
        "error: change_routing was given but the routing does not change (every token still mixes 1 of the 2 existing tiers), "
        "so adding the tier is exact; leave change_routing out"
    )
    assert not (tmp_path / "out").exists() and tree_sha256(src) == before


# ----------------------------------------------------------------------------------- ffn_width on MoE
def test_ffn_width_on_an_moe_model_grows_the_experts_exactly(tiny, tmp_path):
    src, before = tiny
    out = tmp_path / "wide"
    result = runner.invoke(app, ["expand", str(src), "--method", "ffn_width", "--set", "intermediate_size=256", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert tree_sha256(src) == before
    cfg, grown = load_checkpoint(src).config, load_checkpoint(out).config
    # Closed form: every expert of both tiers gains 3 * d * (256 - 64) weights in each layer.
    added = cfg.n_layers * sum(t.num_experts for t in cfg.tiers) * 3 * cfg.d_model * (256 - 64)
    assert grown.num_params() == cfg.num_params() + added
    assert [t.expert_hidden for t in grown.tiers] == [256, 256]
    want, got = logits(src, IDS, torch.float64), logits(out, IDS, torch.float64)
    assert float((want - got).abs().max()) <= 1e-6 * float(want.abs().max())  # the split shares' fp32 rounding only
    assert not torch.equal(want, got)  # the weights really changed (shares 0.6/0.4 of each column)


def test_ffn_width_grows_one_named_tier(tiny, tmp_path):
    src, _ = tiny
    out = tmp_path / "wide"
    result = runner.invoke(app, ["expand", str(src), "--method", "ffn_width", "--set", "expert_hidden=96", "--set", "tier=tier_10b", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert [t.expert_hidden for t in load_checkpoint(out).config.tiers] == [64, 96]
    want, got = logits(src, IDS, torch.float64), logits(out, IDS, torch.float64)
    assert float((want - got).abs().max()) <= 1e-6 * float(want.abs().max())


@pytest.mark.parametrize(
    "sets, message",
    [
        (["intermediate_size=64"], "every FFN of this model is a mixture of experts, so intermediate_size=64 grows the experts, but tiers[tier_1b].expert_hidden is already 64"),
        (["intermediate_size=256", "expert_hidden=128"], "this model has no dense FFN layer (every block is a mixture of experts), so intermediate_size would change nothing"),
        (["tier=tier_x", "expert_hidden=128"], "unknown tier 'tier_x'; this model has tiers tier_1b, tier_10b"),
    ],
)
def test_ffn_width_on_moe_bad_input_is_one_sentence(tiny, tmp_path, sets, message):
    src, before = tiny
    args = ["expand", str(src), "--method", "ffn_width", "-o", str(tmp_path / "out")]
    for item in sets:
        args += ["--set", item]
    result = runner.invoke(app, args)
    assert result.exit_code == 1 and message in text(result) and "Traceback" not in result.output
    assert not (tmp_path / "out").exists() and tree_sha256(src) == before


# ----------------------------------------------------------------------------------- export
def test_export_of_an_moe_model_warns_in_one_plain_line(tmp_path):
    dense = save_checkpoint(tmp_path / "dense", random_model(ModelConfig.from_preset("tiny-dense")), tokenizer=ByteTokenizer())
    moe = tmp_path / "moe"
    assert runner.invoke(app, ["expand", str(dense), "--method", "upcycle", "--set", "num_experts=4", "-o", str(moe)]).exit_code == 0
    result = runner.invoke(app, ["export", str(moe), "-o", str(tmp_path / "hf")])
    assert result.exit_code == 0, result.output
    lines = [line for line in result.output.splitlines() if "warning" in line.lower()]
    assert lines == [
        f"warning: the tokenizer of {moe} is not exported: it has no Hugging Face tokenizer.json (a byte tokenizer has no Hugging Face equivalent)"
    ]
    assert "UserWarning" not in result.output and ".py:" not in result.output
    assert (tmp_path / "hf" / "config.json").is_file()


def test_add_tier_over_an_advisory_budget_warns_in_one_plain_line(tiny, tmp_path):
    src, _ = tiny
    result = runner.invoke(app, ["add-tier", str(src), *ADD, "--budget", "10k", "--budget-mode", "advisory", "-o", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    lines = [line for line in result.output.splitlines() if "warning" in line.lower()]
    assert len(lines) == 1 and lines[0].startswith("warning: tiers[tier_new] needs 198K parameters (198016) but its budget is 10K")
    assert "UserWarning" not in result.output
