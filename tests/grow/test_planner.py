"""The planner: every plan it proposes passes the growth operations' own checks, ends within
its tolerance of the target, in steps a user would take; its counts are what expand builds;
the cost model is the one documented; no plan is one sentence with the closest size."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import warnings
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from lite_llm import ModelConfig
from lite_llm.checkpoint import load_checkpoint, save_checkpoint
from lite_llm.cli import app
from lite_llm.config import format_size
from lite_llm.errors import ConfigError
from lite_llm.grow import LazyTensors, get_op, stored_names
from lite_llm.grow.expand import expand_checkpoint
from lite_llm.grow.planner import DEFAULT_TOLERANCE, STRATEGIES, PlanError, plan_growth
from lite_llm.grow.recipe import GrowthStep
from lite_llm.config import flops_per_token

from .helpers import random_model

runner = CliRunner()
SOURCE = ModelConfig.from_preset("tiny-dense")


def tree_sha256(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def rerun(source: ModelConfig, steps: list[dict]) -> ModelConfig:
    """The recipe's steps run again by the registered operations on placeholder tensors, and
    the final config rebuilt from its dict (every config check, budgets included, again)."""
    config = source
    for step in steps:
        params = {k: v for k, v in step.items() if k != "method"}
        names = stored_names(config)
        config, _ = get_op(step["method"])(config, LazyTensors({n: (lambda: None) for n in names}), **params)
    return ModelConfig.from_dict(config.to_dict())


def assert_sane(source: ModelConfig, plan) -> None:
    """Steps a user would take: depth at most 2x per step and 4x overall, width doublings at
    most 8x, every tier a power of two of experts up to 64, no tier over its strict budget."""
    before = source
    for s in plan.steps:
        if s.step.method == "llama_pro":
            assert before.n_layers < s.config.n_layers <= 2 * before.n_layers
        if s.step.method == "width":
            assert s.config.d_model == 2 * before.d_model
        before = s.config
    final = plan.final
    assert final.n_layers <= 4 * source.n_layers and final.d_model <= 8 * source.d_model
    old = {t.name for t in source.tiers}
    for tier in final.tiers:
        if tier.name not in old or tier.num_experts != source.tier(tier.name).num_experts:
            e = tier.num_experts
            assert e <= 64 and e & (e - 1) == 0, (tier.name, e)
        if tier.budget is not None and tier.budget_mode == "strict":
            assert final.tier_params(tier) <= tier.budget


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_plans_reach_the_target_with_documented_costs(strategy):
    target = 8 * SOURCE.num_params()
    plan = plan_growth(SOURCE, target, strategy, tokens_per_param=10, seq_len=128)
    assert abs(plan.final.num_params() / target - 1) <= DEFAULT_TOLERANCE
    before = SOURCE
    for s in plan.steps:
        assert s.params == s.config.num_params() and s.added_params == s.params - before.num_params()
        assert s.tokens == int(10 * s.added_params)
        assert s.flops == flops_per_token(s.config, 128) * s.tokens
        before = s.config
    assert plan.scratch_flops == flops_per_token(plan.final, 128) * 10 * plan.final.num_params()
    if strategy == "moe":  # experts add parameters, not compute per token
        assert plan.final.num_active_params() < 2 * SOURCE.num_params()
    else:
        assert plan.growth_flops < plan.scratch_flops


def test_strategies_take_different_paths():
    methods = {s: [p.step.method for p in plan_growth(SOURCE, 10 * SOURCE.num_params(), s).steps] for s in STRATEGIES}
    assert methods["depth_first"] == ["llama_pro", "llama_pro", "width", "heads", "ffn_width"]
    assert methods["width_first"] == ["width", "heads", "ffn_width", "llama_pro", "llama_pro"]
    assert methods["balanced"] == ["llama_pro", "width", "heads", "ffn_width", "llama_pro"]
    assert methods["moe"][0] == "upcycle" and "width" not in methods["moe"]


GRID = [
    (preset, factor)
    for preset in ("tiny-dense", "tiny", "small", "smollm2-135m")
    for factor in (1.5, 3, 8, 30, 200)
]


@pytest.mark.parametrize("preset, factor", GRID)
def test_every_proposed_plan_passes_its_own_checks(preset, factor):
    """Whatever the source and the target, a plan is proposed only if it reruns cleanly and
    lands within the tolerance; otherwise the refusal is one sentence naming the closest size."""
    source = ModelConfig.from_preset(preset)
    target = int(factor * source.num_params())
    for strategy in STRATEGIES:
        try:
            plan = plan_growth(source, target, strategy)
        except PlanError as exc:
            message = str(exc)
            assert "\n" not in message and message.startswith(f"no {strategy} plan reaches {format_size(target)} within 10%")
            assert "the closest that passes the checks is" in message or "every growth of this model is refused" in message
            continue
        final = rerun(source, plan.recipe()["steps"])
        assert final.num_params() == plan.final.num_params()
        assert abs(final.num_params() / target - 1) <= DEFAULT_TOLERANCE, (strategy, final.num_params(), target)
        assert_sane(source, plan)


def test_the_help_example_small_to_350m_moe_is_a_plan_that_passes_the_budget_check(tmp_path):
    recipe = tmp_path / "grow.yaml"
    result = runner.invoke(app, ["plan", "--from", "small", "--to", "350M", "--strategy", "moe", "--write-recipe", str(recipe)])
    assert result.exit_code == 0, result.output
    small = ModelConfig.from_preset("small")
    steps = yaml.safe_load(recipe.read_text())["steps"]
    final = rerun(small, steps)  # the strict 5M budgets of tier_1b/tier_10b hold: only new tiers grow
    assert abs(final.num_params() / 350e6 - 1) <= DEFAULT_TOLERANCE
    assert [t.num_experts for t in final.tiers[:2]] == [8, 8] and all(s["method"] == "add_tier" for s in steps)
    assert all(t.num_experts in (2, 4, 8, 16, 32, 64) for t in final.tiers[2:])
    assert final.num_active_params() < 2 * small.num_params()  # per-token compute stays bounded


def test_a_dense_model_to_1b_with_moe_upcycles_to_a_sane_expert_count():
    source = ModelConfig.from_preset("smollm2-135m")
    plan = plan_growth(source, 10**9, "moe")
    upcycle = [s.step.params for s in plan.steps if s.step.method == "upcycle"]
    assert len(upcycle) == 1 and upcycle[0]["num_experts"] in (2, 4, 8, 16, 32, 64)  # was 16242 in one step
    assert abs(plan.final.num_params() / 1e9 - 1) <= DEFAULT_TOLERANCE
    assert_sane(source, plan)


def test_dense_strategies_on_a_budget_bound_model_say_why_in_one_sentence(tmp_path):
    """`small`'s tiers are at their strict budgets: depth and width growth would break them."""
    with pytest.raises(PlanError) as info:
        plan_growth(ModelConfig.from_preset("small"), 350 * 10**6, "balanced")
    assert str(info.value) == (
        "no balanced plan reaches 350M within 10% in steps of at most 4x the layers and 8x the width: every growth of this model is refused "
        "(a depth growth to 5 layers would give tiers[tier_1b] 5.91M parameters (5912320), over its strict budget of 5M); "
        "pass --raise-budgets to let the planner raise the strict budgets first (budget steps: tier_1b to 170M, tier_10b to 170M; "
        "the plan then ends at 369M), or try another --strategy"
    )
    result = runner.invoke(app, ["plan", "--from", "small", "--to", "350M"])  # all strategies: moe has a plan
    assert result.exit_code == 0, result.output
    out = " ".join(result.output.split())
    assert "moe: 10.4M → 350M" in out and all(f"{s}: no {s} plan reaches 350M" in out for s in ("depth_first", "width_first", "balanced"))


def test_no_plan_names_the_closest_achievable_size():
    # tiny-dense: one more layer is +36%, so 140K (+18%) has no plan within 10%.
    three = get_op("llama_pro")(SOURCE, LazyTensors({n: (lambda: None) for n in stored_names(SOURCE)}), target_layers=3)[0]
    with pytest.raises(PlanError) as info:
        plan_growth(SOURCE, 140_000, "depth_first")
    assert f"the closest that passes the checks is {format_size(three.num_params())}; aim near that" in str(info.value)
    plan = plan_growth(SOURCE, 140_000, "depth_first", tolerance=0.4)  # a looser tolerance takes it
    assert plan.final.num_params() == three.num_params() and plan.tolerance == 0.4
    result = runner.invoke(app, ["plan", "--from", "tiny-dense", "--to", "140K", "--strategy", "depth_first"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "error: no depth_first plan reaches 140K within 10%" in " ".join(result.output.split())


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_planned_recipe_builds_the_planned_model_exactly(strategy, tmp_path):
    """Each strategy's recipe, executed by expand on a real checkpoint (validated: exact steps
    keep the logits), reaches the planned size, within the tolerance of the target."""
    src = save_checkpoint(tmp_path / "src", random_model(SOURCE))
    before = tree_sha256(src)
    recipe = tmp_path / "grow.yaml"
    result = runner.invoke(app, ["plan", "--from", str(src), "--to", "900K", "--strategy", strategy, "--write-recipe", str(recipe)])
    assert result.exit_code == 0, result.output
    assert "growth path" in result.output and "from scratch" in result.output
    steps = yaml.safe_load(recipe.read_text())["steps"]
    planned = plan_growth(SOURCE, 900_000, strategy)
    assert [s["method"] for s in steps] == [p.step.method for p in planned.steps]
    out = expand_checkpoint(src, tmp_path / "out", [GrowthStep(s.pop("method"), s) for s in steps], validate="always", tolerance=1e-3)
    assert all(r["exact"] and r["preservation"]["max_abs"] < 1e-3 for r in out.records)  # fp32 rounding of logits near 10
    assert load_checkpoint(out.path).model.num_params() == planned.final.num_params()
    assert abs(planned.final.num_params() / 900_000 - 1) <= DEFAULT_TOLERANCE
    assert tree_sha256(src) == before


def test_a_moe_plan_on_a_tiered_model_builds_too(tmp_path):
    tiny = ModelConfig.from_preset("tiny")
    src = save_checkpoint(tmp_path / "src", random_model(tiny))
    planned = plan_growth(tiny, 6 * tiny.num_params(), "moe")
    assert {s.step.method for s in planned.steps} <= {"add_experts", "add_tier"}
    out = expand_checkpoint(src, tmp_path / "out", [GrowthStep(s.step.method, dict(s.step.params)) for s in planned.steps])
    assert load_checkpoint(out.path).model.num_params() == planned.final.num_params()
    assert all(r["exact"] and r["preservation"]["max_abs"] < 1e-4 for r in out.records)  # new experts and tiers are unroutable


def test_plan_errors():
    with pytest.raises(ConfigError, match="unknown strategy 'deep'"):
        plan_growth(SOURCE, 10**6, "deep")
    with pytest.raises(ConfigError, match="must be larger"):
        plan_growth(SOURCE, 1000, "balanced")
    with pytest.raises(ConfigError, match="tolerance must be a fraction between 0 and 1"):
        plan_growth(SOURCE, 10**6, "balanced", tolerance=2)
    result = runner.invoke(app, ["plan", "--from", "tiny-dense", "--to", "lots"])
    assert result.exit_code == 1 and "Traceback" not in result.output


def test_plan_to_a_big_target_is_quick():
    plan = plan_growth(ModelConfig.from_preset("smollm2-135m"), 7 * 10**9, "balanced")
    assert abs(plan.final.num_params() / 7e9 - 1) <= DEFAULT_TOLERANCE
    assert math.isclose(plan.final.d_model / 576, 4)  # two width doublings, depth 4x: balanced


# ----------------------------------------------------------------------------------- budgets
DENSE = ("depth_first", "width_first", "balanced")


def expected_tier_params(config: ModelConfig, tier: str) -> int:
    """A tier's parameters counted by hand from the shape: per MoE layer, its experts (gate, up
    and down: 3 x d_model x expert_hidden each) and its router heads (d_model x (1 + groups +
    experts))."""
    t = config.tier(tier)
    experts = t.num_groups * t.experts_per_group
    return len(config.moe_layer_indices) * (experts * 3 * config.d_model * t.expert_hidden + config.d_model * (1 + t.num_groups + experts))


@pytest.mark.parametrize("strategy", DENSE)
def test_raise_budgets_starts_with_budget_steps_sized_to_the_final_model(strategy):
    """`small` to 350M: every dense growth breaks the 5M strict budgets, so with raise_budgets
    the plan starts by raising both to exactly what the final model's tiers hold."""
    small = ModelConfig.from_preset("small")
    plan = plan_growth(small, 350 * 10**6, strategy, raise_budgets=True)
    steps = plan.recipe()["steps"]
    final = rerun(small, steps)  # the real ops, budgets checked, from the real `small`
    need = {name: expected_tier_params(final, name) for name in ("tier_1b", "tier_10b")}
    assert need == {"tier_1b": 169_970_688, "tier_10b": 169_970_688}  # 9 layers x (8 experts x 3 x 1024 x 768 + 1024 x 11)
    assert steps[:2] == [{"method": "budget", "tier": "tier_1b", "size": need["tier_1b"]}, {"method": "budget", "tier": "tier_10b", "size": need["tier_10b"]}]
    assert all(s["method"] != "budget" for s in steps[2:])
    assert final.num_params() == plan.final.num_params() and abs(final.num_params() / 350e6 - 1) <= DEFAULT_TOLERANCE
    assert [final.tier(n).budget for n in need] == list(need.values()) and [final.tier(n).budget_mode for n in need] == ["strict", "strict"]
    for s in plan.steps[:2]:  # exact, nothing added, nothing to train
        assert (s.params, s.added_params, s.tokens, s.flops) == (small.num_params(), 0, 0, 0.0)
    with pytest.raises(ConfigError, match=r"over its strict budget of 5M"):  # the budget steps are what lets the rest pass
        rerun(small, steps[2:])


def test_plan_raise_budgets_recipe_expands_on_a_real_checkpoint(tmp_path):
    """The written recipe, budget steps first, runs through `lite-llm expand --recipe` on a
    checkpoint made by `lite-llm init` whose tiers sit exactly at their strict budgets."""
    tiny = ModelConfig.from_preset("tiny")
    bound = tiny.replace(tiers=[dataclasses.replace(t, budget=tiny.tier_params(t)) for t in tiny.tiers])
    (tmp_path / "model.json").write_text(json.dumps(bound.to_dict()))
    result = runner.invoke(app, ["init", "--config", str(tmp_path / "model.json"), "-o", str(tmp_path / "src")])
    assert result.exit_code == 0, result.output
    target = 6 * bound.num_params()
    recipe = tmp_path / "grow.yaml"
    args = ["plan", "--from", str(tmp_path / "src"), "--to", str(target), "--strategy", "balanced", "--write-recipe", str(recipe)]
    result = runner.invoke(app, args + ["--raise-budgets"])
    assert result.exit_code == 0, result.output
    rows = [line.split("│")[1:-1] for line in result.output.splitlines() if "│ budget" in line]
    assert [[c.strip() for c in r][-2:] for r in rows] == [["0", "0.00e+00"], ["0", "0.00e+00"]]  # shown like any step, free
    steps = yaml.safe_load(recipe.read_text())["steps"]
    plan = plan_growth(bound, target, "balanced", raise_budgets=True)
    assert steps == plan.recipe()["steps"] and [s["method"] for s in steps[:2]] == ["budget", "budget"]
    final = rerun(bound, steps)
    assert [s["size"] for s in steps[:2]] == [expected_tier_params(final, "tier_1b"), expected_tier_params(final, "tier_10b")]
    result = runner.invoke(app, ["expand", str(tmp_path / "src"), "--recipe", str(recipe), "-o", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    grown = load_checkpoint(tmp_path / "out")
    assert grown.model.num_params() == plan.final.num_params() == sum(p.numel() for p in grown.model.parameters())
    assert [grown.config.tier(t).budget for t in ("tier_1b", "tier_10b")] == [s["size"] for s in steps[:2]]


def test_plan_without_raise_budgets_names_it_and_writes_nothing(tmp_path):
    recipe = tmp_path / "grow.yaml"
    result = runner.invoke(app, ["plan", "--from", "small", "--to", "350M", "--strategy", "depth_first", "--write-recipe", str(recipe)])
    out = " ".join(result.output.split())
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "over its strict budget of 5M" in out and "pass --raise-budgets to let the planner raise the strict budgets first" in out
    assert "(budget steps: tier_1b to 170M, tier_10b to 170M; the plan then ends at 369M)" in out
    assert not recipe.exists() and list(tmp_path.iterdir()) == []
    result = runner.invoke(app, ["plan", "--from", "small", "--to", "350M", "--raise-budgets"])  # all strategies now have a plan
    out = " ".join(result.output.split())
    assert result.exit_code == 0 and "plan reaches" not in out
    assert all(f"{s}: 10.4M → 369M" in out for s in DENSE) and "moe: 10.4M → 350M" in out


def test_raise_budgets_is_not_suggested_where_it_would_not_help():
    """A target past the step caps has no plan with or without budgets: the sentence does not
    send the user to an option that would fail too."""
    small = ModelConfig.from_preset("small")
    for raise_budgets in (False, True):
        with pytest.raises(PlanError) as info:
            plan_growth(small, 10**11, "depth_first", raise_budgets=raise_budgets)
        assert "--raise-budgets" not in str(info.value) and str(info.value).startswith("no depth_first plan reaches 100B within 10%")


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_raise_budgets_adds_no_step_where_no_strict_budget_is_exceeded(strategy):
    """No tiers, advisory budgets, or strict ones the plan stays within: the same plan as
    without the option, with no budget step."""
    small = ModelConfig.from_preset("small")
    advisory = small.replace(tiers=[dataclasses.replace(t, budget_mode="advisory") for t in small.tiers])
    cases = [(SOURCE, 8 * SOURCE.num_params()), (advisory, 350 * 10**6)]
    if strategy == "moe":  # small's moe plan to 350M adds tiers only: its 5M budgets hold
        cases.append((small, 350 * 10**6))
    for source, target in cases:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # an advisory budget warns when exceeded
            raised = plan_growth(source, target, strategy, raise_budgets=True)
            honoured = plan_growth(source, target, strategy)
        assert raised.recipe() == honoured.recipe()
        assert all(s.step.method != "budget" for s in raised.steps)
