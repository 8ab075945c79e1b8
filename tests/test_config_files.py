"""Every kind of file the project reads goes through one loader: a malformed file, an unknown
key or a wrong type is one sentence naming the file, and the CLI exits 1 without a traceback."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from lite_llm.cli import app
from lite_llm.config import ModelConfig
from lite_llm.errors import ConfigError
from lite_llm.grow.recipe import Recipe
from lite_llm.train import TrainConfig
from lite_llm.train.curriculum import CurriculumConfig

LOADERS = {"model": ModelConfig.from_file, "train": TrainConfig.from_file, "curriculum": CurriculumConfig.from_file, "recipe": Recipe.from_file}

MALFORMED = "a: [1, 2\nb: 3\n"  # an unclosed flow sequence: the parser stops at line 2
UNKNOWN = {
    "model": "preset: tiny\nd_model: 64\nd_modle: 32\n",
    "train": "steps: 10\nlearning_rate_typo: 0.1\n",
    "curriculum": "tier: tier_b\nphases: []\nwhatever: 1\n",
    "recipe": "steps:\n  - method: llama_pro\n    target_layers: 4\n    not_a_param: 1\n",
}
WRONG_TYPE = {
    "model": "preset: tiny\nd_model: true\n",
    "train": "lr: [1, 2]\n",
    "curriculum": "tier: tier_b\nphases: 7\n",
    "recipe": "steps: 3\n",
}


@pytest.mark.parametrize("kind", sorted(LOADERS))
def test_malformed_yaml_names_the_file_and_line(kind, tmp_path):
    path = tmp_path / f"{kind}.yaml"
    path.write_text(MALFORMED)
    with pytest.raises(ConfigError) as err:
        LOADERS[kind](path)
    message = str(err.value)
    assert str(path) in message and "is not valid YAML at line 2" in message and "\n" not in message


@pytest.mark.parametrize("kind", sorted(LOADERS))
def test_an_unknown_key_is_named_with_its_file(kind, tmp_path):
    path = tmp_path / f"{kind}.yaml"
    path.write_text(UNKNOWN[kind])
    with pytest.raises(ConfigError) as err:
        LOADERS[kind](path)
    message = str(err.value)
    key = {"model": "d_modle", "train": "learning_rate_typo", "curriculum": "whatever", "recipe": "not_a_param"}[kind]
    assert str(path) in message and key in message and "\n" not in message


def test_an_unknown_model_key_names_its_line(tmp_path):
    path = tmp_path / "model.yaml"
    path.write_text(UNKNOWN["model"])
    with pytest.raises(ConfigError, match=r"model\.yaml, line 3: unknown key 'd_modle'"):
        ModelConfig.from_file(path)


@pytest.mark.parametrize("kind", sorted(LOADERS))
def test_a_wrong_type_is_one_sentence_naming_the_file(kind, tmp_path):
    path = tmp_path / f"{kind}.yaml"
    path.write_text(WRONG_TYPE[kind])
    with pytest.raises(ConfigError) as err:
        LOADERS[kind](path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_json_errors_name_line_and_column(tmp_path):
    path = tmp_path / "model.json"
    path.write_text('{"d_model": 64,\n "n_layers": }')
    with pytest.raises(ConfigError, match=r"is not valid JSON at line 2, column 14"):
        ModelConfig.from_file(path)


@pytest.mark.parametrize("text", [MALFORMED, UNKNOWN["model"], WRONG_TYPE["model"]])
def test_init_with_a_bad_config_exits_1_with_one_sentence(text, tmp_path):
    path = tmp_path / "model.yaml"
    path.write_text(text)
    result = CliRunner().invoke(app, ["init", "--config", str(path), "-o", str(tmp_path / "ckpt")])
    assert result.exit_code == 1, result.output
    assert "error:" in result.output and "Traceback" not in result.output and str(path.name) in result.output
    assert not (tmp_path / "ckpt").exists()


@pytest.mark.parametrize(
    "text, field, wanted",
    [
        ("moe_layers: 3\n", "moe_layers", "a list of integers, or null"),
        ("rope_theta: x\n", "rope_theta", "a finite number"),
        ("norm_eps: .nan\n", "norm_eps", "a finite number"),
        ("tie_embeddings: 1\n", "tie_embeddings", "true or false"),
        ("tiers: 3\n", "tiers", "a list of tiers"),
        ("head_dim: '16'\n", "head_dim", "an integer, or null"),
        ("routing: {tier_temperature: hot}\n", "routing.tier_temperature", "a finite number"),
        ("tiers: [{name: tier_a, num_groups: 1, experts_per_group: 2, k_expert: two}]\n", "tiers[tier_a].k_expert", "an integer, or null"),
        ("tiers: [{name: tier_a, placement: 3}]\n", "tiers[tier_a].placement", "one of hot, warm, cold, archive"),
    ],
)
def test_every_model_field_of_the_wrong_type_is_named(text, field, wanted, tmp_path):
    """A field of the wrong type is refused by name before any check compares it (these used
    to end in a TypeError from the comparison or the list conversion)."""
    path = tmp_path / "model.yaml"
    path.write_text("preset: tiny\n" + text)
    with pytest.raises(ConfigError) as err:
        ModelConfig.from_file(path)
    message = str(err.value)
    assert f"{field} must be {wanted}, got" in message or f"{field} must be a list of tiers" in message, message
    assert "\n" not in message
