"""The growth commands' fifth sweep: each defect found is one test here.

Every refusal asserts its one-sentence message, that no traceback reached the user, and that
nothing was written or changed (file hashes before and after).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from lite_llm.cli import app
from lite_llm.config import ModelConfig

runner = CliRunner()


def _run(args: list[str], stdin: str | None = None) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of ``lite-llm ARGS``, each with its whitespace collapsed (rich
    wraps long lines at the console's width)."""
    result = runner.invoke(app, args, input=stdin)
    err = result.stderr if result.stderr_bytes else ""
    return result.exit_code, " ".join(result.stdout.split()), " ".join(err.split())


def _hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def _refused(args: list[str], said: str, *unchanged: Path) -> str:
    """Run ``args``; assert exit 1, one ``error:`` line saying ``said``, no traceback, and every
    folder in ``unchanged`` as it was."""
    before = [_hashes(p) for p in unchanged]
    code, out, err = _run(args)
    text = out + " " + err
    assert code == 1 and said in text and "Traceback" not in text, text
    assert text.count("error:") == 1, text
    assert [_hashes(p) for p in unchanged] == before
    return text


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("sweep5") / "tiny"
    assert _run(["init", "--preset", "tiny", "-o", str(path)])[0] == 0
    return path


@pytest.fixture(scope="module")
def deeper(tiny: Path) -> Path:
    """``tiny`` grown by two LLaMA-Pro blocks: a pair ``validate`` passes."""
    out = tiny.parent / "deeper"
    code, text, err = _run(["expand", str(tiny), "--method", "llama_pro", "--target-layers", "4", "-o", str(out)])
    assert code == 0, text + err
    return out


# ------------------------------------------------------------------ 1: plan --write-recipe


def test_plan_write_recipe_never_replaces_a_checkpoints_manifest(tiny, tmp_path):
    """``--write-recipe CKPT/manifest.json`` replaced the manifest by YAML: the checkpoint was lost."""
    for extra in ([], ["--overwrite"]):
        text = _refused(
            ["plan", "--from", "tiny-dense", "--to", "400K", "--strategy", "depth_first", "--write-recipe", str(tiny / "manifest.json"), *extra],
            f"is inside the checkpoint folder {tiny.resolve()}, which is never written into (not even with --overwrite); give a path outside it",
            tiny,
        )
        assert "growth path" not in text  # refused before the work
    _refused(["plan", "--from", "tiny-dense", "--to", "400K", "--strategy", "depth_first", "--write-recipe", str(tiny / "grow.yaml")], "inside the checkpoint folder", tiny)
    assert not (tiny / "grow.yaml").exists()


def test_plan_write_recipe_replaces_an_existing_file_only_with_overwrite(tmp_path):
    recipe = tmp_path / "grow.yaml"
    recipe.write_text("mine\n")
    args = ["plan", "--from", "tiny-dense", "--to", "400K", "--strategy", "depth_first", "--write-recipe", str(recipe)]
    _refused(args, f"--write-recipe {recipe} already exists; pass --overwrite to replace it, or give another file name", tmp_path)
    assert recipe.read_text() == "mine\n"
    code, out, err = _run([*args, "--overwrite"])
    assert code == 0 and f"wrote {recipe}" in out, out + err
    assert [s["method"] for s in yaml.safe_load(recipe.read_text())["steps"]]


# ----------------------------------------------------------------------- 2: validate --json


def test_validate_json_never_replaces_a_checkpoints_manifest(tiny, deeper):
    for extra in ([], ["--overwrite"]):
        _refused(
            ["validate", str(tiny), str(deeper), "--json", str(deeper / "manifest.json"), *extra],
            f"--json {deeper / 'manifest.json'} is inside the checkpoint folder {deeper.resolve()}, which is never written into",
            tiny,
            deeper,
        )


def test_validate_json_replaces_an_existing_file_only_with_overwrite(tiny, deeper, tmp_path):
    report = tmp_path / "report.json"
    report.write_text("{}\n")
    _refused(["validate", str(tiny), str(deeper), "--json", str(report)], f"--json {report} already exists; pass --overwrite to replace it", tmp_path)
    assert report.read_text() == "{}\n"
    code, out, err = _run(["validate", str(tiny), str(deeper), "--json", str(report), "--overwrite"])
    assert code == 0, out + err
    assert json.loads(report.read_text())["passed"] is True


# ------------------------------------------------------------------ 3: budget warnings plain


@pytest.fixture(scope="module")
def over_advisory(tiny: Path) -> tuple[Path, str, str]:
    """``tiny`` grown past an advisory budget of its tier_1b, and what expand printed."""
    recipe = tiny.parent / "over.yaml"
    recipe.write_text("steps:\n  - {method: budget, tier: tier_1b, size: 200000, mode: advisory}\n  - {method: width, d_model: 128}\n")
    out = tiny.parent / "over"
    code, text, err = _run(["expand", str(tiny), "--recipe", str(recipe), "-o", str(out)])
    assert code == 0, text + err
    return out, text, err


def test_expand_prints_an_advisory_budget_warning_as_one_plain_line(over_advisory):
    """It came as ``<string>:20: UserWarning: tiers[tier_1b] needs ...``: a crash to the eye."""
    _, out, err = over_advisory
    assert "UserWarning" not in out + err and "<string>" not in out + err, err
    assert err.count("warning: tiers[tier_1b] needs") == 1 and "but its budget is 200K; raise the budget" in err, err


def test_plan_warns_plainly_of_its_final_model_only(tmp_path):
    """The search's candidates each warned in Python's form; only the plan shown may warn."""
    base = ModelConfig.from_preset("tiny")
    config = base.replace(tiers=[dataclasses.replace(t, budget=200_000, budget_mode="advisory") for t in base.tiers])
    path = tmp_path / "advisory.yaml"
    path.write_text(yaml.safe_dump(config.to_dict()))
    code, out, err = _run(["plan", "--from", str(path), "--to", "2.5M", "--strategy", "width_first"])
    assert code == 0, out + err
    assert "UserWarning" not in err and "<string>" not in err, err
    names = [t.name for t in config.tiers]
    assert err.count("warning:") == len(names), err  # one per tier of the final model, none for a candidate
    for name in names:
        assert f"warning: the width_first plan's final model: tiers[{name}] needs" in err, err


# ------------------------------------------------------------- 4: recipe source:/output: vs the command line


def test_a_recipe_source_that_differs_from_the_checkpoint_given_is_refused(tiny, tmp_path):
    """The positional checkpoint silently won over the recipe's ``source:``."""
    other = tmp_path / "elsewhere"
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"source: {other}\nsteps:\n  - {{method: width, d_model: 128}}\n")
    out = tmp_path / "g"
    _refused(
        ["expand", str(tiny), "--recipe", str(recipe), "-o", str(out)],
        f"the checkpoint {tiny} and the source: {other} of recipe {recipe} name different paths; give the same one in both, or leave one out",
        tiny,
    )
    assert not out.exists()


def test_a_recipe_output_that_differs_from_dash_o_is_refused(tiny, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"output: {tmp_path / 'a'}\nsteps:\n  - {{method: width, d_model: 128}}\n")
    _refused(["expand", str(tiny), "--recipe", str(recipe), "-o", str(tmp_path / "b")], f"-o {tmp_path / 'b'} and the output: {tmp_path / 'a'} of recipe", tiny)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_a_recipe_naming_the_same_paths_as_the_command_line_runs(tiny, tmp_path):
    out = tmp_path / "g"
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"source: {tiny.resolve()}\noutput: {out}\nsteps:\n  - {{method: width, d_model: 128}}\n")
    code, text, err = _run(["expand", f"{tiny}/", "--recipe", str(recipe), "-o", str(tmp_path / "." / "g")])
    assert code == 0 and (out / "manifest.json").is_file(), text + err


def test_a_recipe_source_that_is_not_a_string_is_refused(tiny, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("source: 3\nsteps:\n  - {method: width, d_model: 128}\n")
    _refused(["expand", "--recipe", str(recipe), "-o", str(tmp_path / "g")], f"recipe {recipe}: source must be a path, got 3", tmp_path)


# ---------------------------------------------------------------------- 5: what validate checked


def test_validate_says_which_blocks_its_gradient_check_covered(tiny, deeper, tmp_path):
    """``new parameters with gradient 16/16`` read as every new parameter of the model."""
    report = tmp_path / "report.json"
    code, out, err = _run(["validate", str(tiny), str(deeper), "--json", str(report)])
    assert code == 0, out + err
    data = json.loads(report.read_text())
    blocks = sorted({int(name.split(".")[1]) for name in data["new_params"]})
    assert len(blocks) == 2  # the first and the last grown block, by design
    assert f"new parameters with gradient (blocks {blocks[0]} and {blocks[1]} checked)" in out, out
    assert f"{len(data['new_params'])}/{len(data['new_params'])}" in out


# -------------------------------------------------------------------------- 6: a recipe on stdin


def test_a_recipe_is_read_from_standard_input(tiny, tmp_path):
    out = tmp_path / "g"
    code, text, err = _run(["expand", str(tiny), "--recipe", "-", "-o", str(out)], stdin="steps:\n  - {method: width, d_model: 128}\n")
    assert code == 0 and (out / "manifest.json").is_file(), text + err
    _refused(["expand", str(tiny), "--recipe", "/dev/null", "-o", str(tmp_path / "h")], "recipe /dev/null needs a non-empty 'steps' list", tiny)


def test_a_recipe_is_read_from_dev_stdin(tiny, tmp_path):
    """``--recipe /dev/stdin`` said ``recipe /dev/stdin does not exist``."""
    out = tmp_path / "g"
    cli = Path(sys.executable).with_name("lite-llm")
    done = subprocess.run(
        [str(cli), "expand", str(tiny), "--recipe", "/dev/stdin", "-o", str(out)],
        input="steps:\n  - {method: width, d_model: 128}\n", capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0 and (out / "manifest.json").is_file(), done.stdout + done.stderr
