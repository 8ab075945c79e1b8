"""The growth commands swept as a demanding user would: each defect found is one test here.

Every case runs the command (typer's CliRunner), asserts its one-sentence message (or the
corrected result), that no traceback reached the user, and that nothing was written or
changed: the source's hashes are the same and the output folder does not exist.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from .test_issue16_safety import _hashes, _run


@pytest.fixture(scope="module")
def dense(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("sweep") / "td"
    assert _run(["init", "--preset", "tiny-dense", "-o", str(path)])[0] == 0
    return path


@pytest.fixture(scope="module")
def tiered(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("sweep") / "t"
    assert _run(["init", "--preset", "tiny", "-o", str(path)])[0] == 0
    return path


def _refused(args: list[str], source: Path, out: Path, said: str) -> str:
    """Run ``args``; assert exit 1, ``said`` in the one-line message, no traceback, the source
    unchanged and no output."""
    before = _hashes(source)
    code, text = _run(args)
    assert code == 1 and said in text and "Traceback" not in text, text
    assert _hashes(source) == before and not out.exists()
    return text


@pytest.mark.parametrize(
    "method, given, needs",
    [
        ("width", [], "needs d_model"),
        ("heads", [], "needs n_heads"),
        ("add_experts", ["--set", "count=2"], "needs tier"),
        ("add_tier", ["--set", "tier=tier_x"], "needs num_groups, experts_per_group, expert_hidden"),
    ],
)
def test_a_missing_required_parameter_is_named_not_a_type_error(method, given, needs, tiered, tmp_path):
    """``expand --method width`` without d_model ended in Python's TypeError (missing keyword)."""
    out = tmp_path / "g"
    text = _refused(["expand", str(tiered), "--method", method, *given, "-o", str(out)], tiered, out, needs)
    assert "--set NAME=VALUE" in text


def test_a_recipe_step_missing_a_parameter_is_refused_before_anything_runs(dense, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("steps:\n  - method: llama_pro\n    target_layers: 3\n  - method: heads\n    mode: gqa\n")
    out = tmp_path / "g"
    _refused(["expand", str(dense), "--recipe", str(recipe), "-o", str(out)], dense, out, "step 2: growth method 'heads' needs n_heads")


@pytest.mark.parametrize(
    "value, said",
    [
        ("5", "positions must be a non-empty list of layer indices"),  # was TypeError: 'int' object is not iterable
        ("[0.5]", "got [0.5]"),  # was read as [0] and recorded as [0.5]
        ('["a"]', "got ['a']"),  # was "invalid literal for int()"
        ("[]", "got []"),  # was a copy of the source, recorded as a growth
    ],
)
def test_llama_pro_positions_must_be_a_list_of_layer_indices(value, said, dense, tmp_path):
    out = tmp_path / "g"
    _refused(["expand", str(dense), "--method", "llama_pro", "--set", f"positions={value}", "-o", str(out)], dense, out, said)


def test_llama_pro_importance_must_be_numbers(dense, tmp_path):
    """Strings ended in ``TypeError: bad operand type for unary -: 'str'``."""
    out = tmp_path / "g"
    args = ["expand", str(dense), "--method", "llama_pro", "--target-layers", "3", "--set", 'importance=["a","b"]', "-o", str(out)]
    _refused(args, dense, out, "importance must be a list of 2 numbers (one score per layer) or 'measured'")


@pytest.fixture(scope="module")
def five_layers(dense, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("sweep") / "five"
    assert _run(["expand", str(dense), "--method", "llama_pro", "--target-layers", "5", "-o", str(path)])[0] == 0
    return path


@pytest.mark.parametrize(
    "given, said",
    [
        # drop and target_layers that disagree: target_layers was ignored, yet recorded
        (["--set", "drop=1", "--target-layers", "4"], "solar's drop=1 makes 2*(n - drop) layers, not target_layers=4; give one of them"),
        # drop >= n/2 kept or shrank the model (5 -> 4 layers) and recorded it as a growth
        (["--set", "drop=3"], "solar's drop must be between 1 and 2 for a 5-layer model"),
        # out of solar's reach: the message said "drop ... got -1", which the user never gave
        (["--target-layers", "10"], "solar reaches at most 8 layers from 5 (drop 1); target_layers=10 needs stack or llama_pro"),
    ],
)
def test_solar_refuses_what_it_cannot_grow_to(given, said, five_layers, tmp_path):
    out = tmp_path / "g"
    text = _refused(["expand", str(five_layers), "--method", "solar", *given, "-o", str(out)], five_layers, out, said)
    assert "got -" not in text


@pytest.mark.parametrize("given", [["--target-layers", "4"], ["--set", "drop=1"]])
def test_solar_on_two_layers_says_it_cannot_deepen_them(given, dense, tmp_path):
    """``--target-layers 4`` on 2 layers said "drop must be between 1 and 1 ..., got 0";
    ``drop=1`` (n/2) gave the two blocks back as they were and recorded a solar growth."""
    out = tmp_path / "g"
    text = _refused(["expand", str(dense), "--method", "solar", *given, "-o", str(out)], dense, out, "solar cannot deepen a 2-layer model")
    assert "got 0" not in text


def test_solar_still_grows_and_records_what_it_did(five_layers, tmp_path):
    out = tmp_path / "g"
    code, text = _run(["expand", str(five_layers), "--method", "solar", "--target-layers", "8", "-o", str(out)])
    assert code == 0, text
    record = json.loads((out / "progressive.json").read_text())["expansions"][-1]
    assert record["method"] == "solar" and record["params"] == {"target_layers": 8}
    assert record["source_config"]["n_layers"] == 5 and record["target_config"]["n_layers"] == 8


@pytest.mark.parametrize(
    "method, sets",
    [
        ("llama_pro", ["--target-layers", "100000000"]),  # was killed for memory building a 100M-block plan
        ("stack", ["--set", "times=10000000"]),
        ("interpolate", ["--set", "times=100000000"]),
        ("width", ["--set", "d_model=1000000000"]),  # was RuntimeError: DefaultCPUAllocator: can't allocate memory
        ("ffn_width", ["--set", "intermediate_size=10000000000"]),  # was MemoryError
        ("heads", ["--set", "n_heads=100000000"]),  # was minutes of building a head plan, then killed
        ("upcycle", ["--set", "num_experts=1000000000"]),  # was RuntimeError from the allocator
    ],
)
def test_a_growth_that_needs_terabytes_is_refused_before_it_is_built_with_its_size(method, sets, dense, tmp_path):
    out = tmp_path / "g"
    text = _refused(["expand", str(dense), "--method", method, *sets, "-o", str(out)], dense, out, "parameters (")
    assert " TB in float32), more than the " in text and "free at" in text and "grow less, or write the output to a disk with room" in text


def test_add_tier_that_needs_terabytes_is_refused_before_it_is_built(tiered, tmp_path):
    out = tmp_path / "g"
    args = ["add-tier", str(tiered), "--tier", "tier_x", "--groups", "100000", "--experts-per-group", "100000", "--budget", "1000T", "-o", str(out)]
    _refused(args, tiered, out, "adding the tier 'tier_x' would make a model of 247T parameters (988 TB in float32)")


def test_the_size_check_leaves_a_growth_that_fits_alone(dense, tmp_path):
    out = tmp_path / "g"
    code, text = _run(["expand", str(dense), "--method", "width", "--set", "d_model=128", "-o", str(out)])
    assert code == 0 and "wrote" in text, text


def test_a_failing_recipe_step_is_named_and_leaves_nothing(dense, tmp_path):
    """Two steps that contradict each other: the message named the second step's numbers
    ("larger than the current 4 layers") without saying it was the second step."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text("steps:\n  - method: llama_pro\n    target_layers: 4\n  - method: llama_pro\n    target_layers: 3\n")
    out = tmp_path / "g"
    _refused(["expand", str(dense), "--recipe", str(recipe), "-o", str(out)], dense, out, "step 2 (llama_pro): target_layers must be an integer larger than the current 4 layers")


def test_a_recipe_whose_exact_step_fails_its_check_leaves_nothing(dense, tmp_path):
    """The check refuses the third step beside the writer: the first two were already being
    written, and no output (nor temporary folder) may remain."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text("steps:\n  - method: llama_pro\n    target_layers: 3\n  - method: heads\n    n_heads: 8\n  - method: width\n    d_model: 100\n    tolerance: 1.0e-300\n")
    out = tmp_path / "g"
    _refused(["expand", str(dense), "--recipe", str(recipe), "-o", str(out)], dense, out, "is meant to be exact but changed the logits")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.yaml"]


@pytest.mark.parametrize(
    "args, said",
    [
        (["--to", "abc"], "--to 'abc' is not a size (e.g. 350M, 7B), a checkpoint directory, a config file or a preset"),  # was "unknown preset 'abc'"
        (["--to", "-5"], "--to '-5' is not a size"),
        (["--to", "1M", "--tokens-per-param", "-1"], "--tokens-per-param must be a positive number"),  # printed negative FLOPs, exit 0
        (["--to", "1M", "--tokens-per-param", "nan"], "--tokens-per-param must be a positive number"),
    ],
)
def test_plan_refuses_what_it_cannot_read(args, said, dense):
    code, text = _run(["plan", "--from", str(dense), *args])
    assert code == 1 and said in text and "Traceback" not in text, text


def test_plan_from_a_missing_path_says_so(tmp_path):
    code, text = _run(["plan", "--from", str(tmp_path / "nope"), "--to", "1M"])
    assert code == 1 and "is not a checkpoint directory, a config file or a preset" in text and "Traceback" not in text, text


def test_plan_write_recipe_into_a_directory_is_refused_before_the_work(dense, tmp_path):
    """``--write-recipe DIR`` planned, printed the plan, then ended in IsADirectoryError."""
    before = _hashes(tmp_path)
    code, text = _run(["plan", "--from", str(dense), "--to", "1M", "--strategy", "depth_first", "--write-recipe", str(tmp_path)])
    assert code == 1 and "--write-recipe" in text and "is a directory" in text and "Traceback" not in text and "growth path" not in text, text
    assert _hashes(tmp_path) == before


def test_a_written_plan_runs_as_a_recipe(dense, tmp_path):
    recipe, out = tmp_path / "grow.yaml", tmp_path / "g"
    code, text = _run(["plan", "--from", str(dense), "--to", "300K", "--strategy", "depth_first", "--write-recipe", str(recipe)])
    assert code == 0 and recipe.is_file(), text
    code, text = _run(["expand", str(dense), "--recipe", str(recipe), "-o", str(out)])
    assert code == 0, text
    steps = [s["method"] for s in __import__("yaml").safe_load(recipe.read_text())["steps"]]
    assert [r["method"] for r in json.loads((out / "progressive.json").read_text())["expansions"]] == steps


def test_a_recipe_path_that_is_a_directory_is_not_called_missing(dense, tmp_path):
    out = tmp_path / "g"
    (tmp_path / "recipes").mkdir()
    text = _refused(["expand", str(dense), "--recipe", str(tmp_path / "recipes"), "-o", str(out)], dense, out, "is a directory; give the path of the recipe file")
    assert "does not exist" not in text


@pytest.mark.parametrize("seed", ["abc", "1.5", "-1"])
def test_a_seed_that_is_not_a_whole_number_is_refused(seed, dense, tmp_path):
    """``seed=abc`` said ``invalid literal for int()``; ``seed=1.5`` grew with seed 1 and
    recorded 1.5; ``seed=-1`` was taken."""
    out = tmp_path / "g"
    _refused(["expand", str(dense), "--method", "width", "--set", "d_model=128", "--set", f"seed={seed}", "-o", str(out)],
             dense, out, "seed must be a whole number from 0 to 2**63-1")
