"""The planner: plans reach the target, their counts are what expand builds, and the cost
model is the one documented."""

from __future__ import annotations

import pytest
import yaml
from typer.testing import CliRunner

from lite_llm import ModelConfig
from lite_llm.checkpoint import load_checkpoint, save_checkpoint
from lite_llm.cli import app
from lite_llm.errors import ConfigError
from lite_llm.grow.planner import STRATEGIES, plan_growth
from lite_llm.train.flops import flops_per_token

from .helpers import random_model

runner = CliRunner()
SOURCE = ModelConfig.from_preset("tiny-dense")


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_plans_reach_the_target_with_documented_costs(strategy):
    target = 8 * SOURCE.num_params()
    plan = plan_growth(SOURCE, target, strategy, tokens_per_param=10, seq_len=128)
    assert plan.final.num_params() >= target
    assert plan.final.num_params() < 3 * target  # does not wildly overshoot
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
    assert methods["depth_first"][0] == "llama_pro" and set(methods["depth_first"]) == {"llama_pro"}
    assert methods["width_first"][:3] == ["width", "heads", "ffn_width"]
    assert methods["balanced"][0] == "llama_pro" and "width" in methods["balanced"]
    assert methods["moe"] == ["upcycle"]


def test_planned_recipe_builds_the_planned_model(tmp_path):
    src = save_checkpoint(tmp_path / "src", random_model(SOURCE))
    recipe = tmp_path / "grow.yaml"
    result = runner.invoke(app, ["plan", "--from", str(src), "--to", "600K", "--strategy", "balanced", "--write-recipe", str(recipe)])
    assert result.exit_code == 0, result.output
    assert "growth path" in result.output and "from scratch" in result.output
    steps = yaml.safe_load(recipe.read_text())["steps"]
    planned = plan_growth(SOURCE, 600_000, "balanced")
    assert [s["method"] for s in steps] == [p.step.method for p in planned.steps]
    result = runner.invoke(app, ["expand", str(src), "--recipe", str(recipe), "-o", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert load_checkpoint(tmp_path / "out").model.num_params() == planned.final.num_params()


def test_plan_errors():
    with pytest.raises(ConfigError, match="unknown strategy 'deep'"):
        plan_growth(SOURCE, 10**6, "deep")
    with pytest.raises(ConfigError, match="must be larger"):
        plan_growth(SOURCE, 1000, "balanced")
    result = runner.invoke(app, ["plan", "--from", "tiny-dense", "--to", "lots"])
    assert result.exit_code == 1 and "Traceback" not in result.output


def test_plan_to_a_big_target_is_quick():
    plan = plan_growth(ModelConfig.from_preset("smollm2-135m"), 7 * 10**9, "balanced")
    assert plan.final.num_params() >= 7 * 10**9
