"""The ``budget`` step: a growth that takes a tier past its strict budget says how to raise it,
and a budget step (alone or first in a recipe) raises it without touching a weight.

Found by following the README: no model with a budgeted tier (the ``small`` preset's
``tier_1b`` has 5M) could be grown deeper at all — ``expand --set budget=...`` was "no
parameter 'budget'", and the error said only "raise the budget"."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import yaml

from lite_llm.checkpoint import load_checkpoint, save_checkpoint
from lite_llm.errors import ConfigError

from ..test_issue16_safety import _hashes, _run
from .helpers import grow, moe_shapes, random_model, sample_ids


def _budgeted(slack: int = 0):
    """The two-tier test model with tier_a's strict budget exactly its size (+ ``slack``)."""
    config = moe_shapes()["two-tier"]
    need = config.tier_params(config.tier("tier_a"))
    tiers = [dataclasses.replace(config.tiers[0], budget=need + slack), config.tiers[1]]
    return random_model(config.replace(tiers=tiers)), need


def test_a_budget_step_changes_the_budget_and_nothing_else():
    model, need = _budgeted()
    raised = grow(model, "budget", tier="tier_a", size="1M")
    assert raised.config.tier("tier_a").budget == 1_000_000
    assert raised.config.replace(tiers=model.config.tiers) == model.config  # only the budget moved
    ids = sample_ids(model.config)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, raised(ids).logits)
    assert grow(model, "budget", tier="tier_a", size="none").config.tier("tier_a").budget is None
    assert grow(model, "budget", tier="tier_a", mode="advisory").config.tier("tier_a").budget_mode == "advisory"


@pytest.mark.parametrize(
    "params, message",
    [
        (dict(tier="tier_x", size="1M"), "budget: unknown tier 'tier_x'; this model's tiers are tier_a, tier_b"),
        (dict(tier="tier_a"), "budget needs size"),
        (dict(tier="tier_a", size="lots"), "cannot read 'lots' as a parameter count"),
        (dict(tier="tier_a", size=10), "already holds"),
        (dict(tier="tier_a", mode="loose"), "budget_mode must be one of strict, advisory"),
    ],
)
def test_a_bad_budget_step_is_one_sentence(params, message):
    model, _ = _budgeted()
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        grow(model, "budget", **params)


def test_growth_past_a_strict_budget_names_the_budget_step_with_the_size_needed():
    model, need = _budgeted()
    for method, params in (("llama_pro", dict(target_layers=4)), ("add_experts", dict(tier="tier_a", count=1))):
        with pytest.raises(ConfigError) as info:
            grow(model, method, **params)
        text = str(info.value)
        assert "over its strict budget" in text and "--method budget --set tier=tier_a --set size=" in text, text
        size = int(text.split("--set size=")[1].split(",")[0])
        deeper = grow(grow(model, "budget", tier="tier_a", size=size), method, **params)  # exactly the size named suffices
        assert deeper.config.tier("tier_a").budget == size


def test_the_cli_grows_a_budgeted_model_through_a_budget_step_in_a_recipe(tmp_path):
    model, need = _budgeted()
    src = save_checkpoint(tmp_path / "src", model)
    before = _hashes(src)
    code, out = _run(["expand", str(src), "--method", "llama_pro", "--target-layers", "4", "-o", str(tmp_path / "refused")])
    assert code == 1 and "--method budget --set tier=tier_a" in out and "Traceback" not in out, out
    code, out = _run(["expand", str(src), "--method", "budget", "--set", "tier=tier_a", "--set", "size=10M", "-o", str(tmp_path / "raised")])
    assert code == 0 and load_checkpoint(tmp_path / "raised").config.tier("tier_a").budget == 10_000_000, out
    recipe = {"source": str(src), "output": str(tmp_path / "deeper"), "steps": [
        {"method": "budget", "tier": "tier_a", "size": "10M"}, {"method": "llama_pro", "target_layers": 4}]}
    (tmp_path / "grow.yaml").write_text(yaml.safe_dump(recipe))
    code, out = _run(["expand", "--recipe", str(tmp_path / "grow.yaml")])
    assert code == 0, out
    grown = load_checkpoint(tmp_path / "deeper")
    assert grown.config.n_layers == 4 and grown.config.tier("tier_a").budget == 10_000_000
    assert [e["method"] for e in grown.progressive["expansions"]][-2:] == ["budget", "llama_pro"]
    ids = sample_ids(model.config)
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, grown.model(ids).logits, atol=1e-5, rtol=0)
    assert _hashes(src) == before
