"""Growing checkpoints on disk: recipes, records in progressive.json, streaming output that
loads and verifies, validation, and clean refusals that leave nothing behind."""

from __future__ import annotations

import json
import threading
import time

import pytest
import torch
from typer.testing import CliRunner

from lite_llm.checkpoint import load_checkpoint, save_checkpoint, verify_checkpoint
from lite_llm.cli import app
from lite_llm.data import ByteTokenizer
from lite_llm.errors import ConfigError
from lite_llm.grow import expand
from lite_llm.grow.expand import GrowthError, expand_checkpoint
from lite_llm.grow.recipe import GrowthStep, Recipe
from lite_llm.grow.validate import validate_models

from .helpers import RefusalMidWrite, break_llama_pro, dense_shapes, moe_shapes, random_model, sample_ids

runner = CliRunner()


@pytest.fixture
def source(tmp_path):
    model = random_model(dense_shapes()["gqa3-tied"])
    path = save_checkpoint(tmp_path / "src", model, tokenizer=ByteTokenizer(), progressive={"training": {"step": 7, "tokens": 1234}})
    return model, path


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def test_expand_writes_a_verified_checkpoint_with_a_record(source, tmp_path):
    model, path = source
    result = expand_checkpoint(path, tmp_path / "out", [GrowthStep("llama_pro", {"target_layers": 6})])
    assert verify_checkpoint(result.path) == []
    loaded = load_checkpoint(result.path)
    ids = sample_ids(model.config)
    assert torch.equal(_logits(model, ids), _logits(loaded.model, ids))
    assert loaded.tokenizer is not None
    progressive = json.loads((result.path / "progressive.json").read_text())
    assert progressive["training"] == {"step": 7, "tokens": 1234}  # S's own cost stays on record
    (record,) = progressive["expansions"]
    assert record["method"] == "llama_pro" and record["params"] == {"target_layers": 6}
    assert record["exact"] is True and record["preservation"]["max_abs"] == 0.0
    assert record["source_config"]["n_layers"] == 4 and record["target_config"]["n_layers"] == 6
    assert len(record["source_manifest_sha256"]) == 64 and record["timestamp"].endswith("Z")
    assert record["params_after"] == loaded.model.num_params()


def test_streaming_without_validation_gives_the_same_checkpoint(source, tmp_path):
    model, path = source
    steps = [GrowthStep("llama_pro", {"positions": [0, 3]}), GrowthStep("solar", {"drop": 2})]
    validated = expand_checkpoint(path, tmp_path / "a", steps, validate="always")
    streamed = expand_checkpoint(path, tmp_path / "b", steps, validate="never", max_shard_bytes=2000)
    assert len([p for p in streamed.path.glob("dense-*.safetensors")]) > 1  # really split into pieces
    a, b = load_checkpoint(validated.path).model, load_checkpoint(streamed.path).model
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert [r["preservation"] for r in streamed.records] == [None, None]
    assert validated.records[1]["exact"] is False and validated.records[1]["preservation"]["max_abs"] > 0


def test_recipe_chains_steps_and_measures_importance(source, tmp_path):
    model, path = source
    recipe_file = tmp_path / "grow.yaml"
    recipe_file.write_text(
        f"source: {path}\noutput: {tmp_path / 'grown'}\nsteps:\n"
        "  - method: llama_pro\n    target_layers: 6\n    importance: measured\n"
        "  - method: interpolate\n    identity: true\n"
    )
    result = runner.invoke(app, ["expand", "--recipe", str(recipe_file)])
    assert result.exit_code == 0, result.output
    grown = load_checkpoint(tmp_path / "grown")
    assert grown.config.n_layers == 12
    records = grown.progressive["expansions"]
    assert [r["method"] for r in records] == ["llama_pro", "interpolate"]
    assert len(records[0]["params"]["importance"]) == 4
    ids = sample_ids(model.config)
    assert torch.equal(_logits(model, ids), _logits(grown.model, ids))


def test_cli_one_flag_form_and_validate(source, tmp_path):
    model, path = source
    out = tmp_path / "deeper"
    result = runner.invoke(app, ["expand", str(path), "--method", "llama_pro", "--target-layers", "8", "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "llama_pro" in result.output and "0.00e+00" in result.output
    report_file = tmp_path / "report.json"
    result = runner.invoke(app, ["validate", str(path), str(out), "--json", str(report_file)])
    assert result.exit_code == 0, result.output
    report = json.loads(report_file.read_text())
    assert report["max_abs"] == 0.0 and report["passed"] and report["params_grown"] == report["params_analytic"]
    assert report["dead_params"] == [] and len(report["new_params"]) > 0


def test_validate_flags_a_broken_growth(source, tmp_path):
    model, _ = source
    broken = random_model(model.config, seed=5)
    report = validate_models(model, broken, sample_ids(model.config), exact_expected=True)
    assert not report.preserved and not report.passed and report.max_abs > 1e-3


def test_an_exact_step_that_changed_the_logits_is_refused_and_leaves_nothing(source, tmp_path, monkeypatch):
    _, path = source
    break_llama_pro(monkeypatch, scale=1.01)
    with pytest.raises(GrowthError, match="meant to be exact but changed the logits by .* nothing was written"):
        expand_checkpoint(path, tmp_path / "out", [GrowthStep("llama_pro", {"target_layers": 6})])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]  # no output, no temporary folder


def test_a_failed_check_stops_the_writer_beside_it(source, tmp_path, monkeypatch):
    """The check runs beside the writer: once it has failed, the writer stops at its next
    tensor instead of writing the rest for nothing."""
    _, path = source
    meeting = RefusalMidWrite()
    produced: list[str] = []

    def hold_the_first(name: str) -> None:
        produced.append(name)
        meeting.writer_step()

    break_llama_pro(monkeypatch, scale=1.0, on_produce=hold_the_first)
    monkeypatch.setattr(expand, "_check_step", meeting.refuse)
    with pytest.raises(GrowthError, match="refused by the test"):
        expand_checkpoint(path, tmp_path / "out", [GrowthStep("llama_pro", {"target_layers": 6})])
    assert len(produced) == 1, produced
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_a_writer_that_fails_at_the_embedding_does_not_hang_the_check(source, tmp_path, monkeypatch):
    """The writer holds the turn at the embedding-sized tensors while it writes one; if it fails
    there, the check beside it (waiting for its turn) must still finish."""
    _, path = source

    def fail_in_the_writer(name: str) -> None:
        if name == "embed.weight" and not threading.current_thread().name.startswith("check-growth"):
            raise OSError("the disk went away (test)")

    break_llama_pro(monkeypatch, scale=1.0, on_produce=fail_in_the_writer)
    outcome: list[BaseException] = []

    def grow() -> None:
        try:
            expand_checkpoint(path, tmp_path / "out", [GrowthStep("llama_pro", {"target_layers": 6})])
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            outcome.append(exc)

    worker = threading.Thread(target=grow, daemon=True)
    worker.start()
    worker.join(60)
    assert not worker.is_alive(), "the growth hung"
    assert len(outcome) == 1 and "the disk went away" in str(outcome[0])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_a_writer_that_never_asks_for_the_record_still_commits_nothing_refused(source, tmp_path, monkeypatch):
    """``before_commit`` itself waits for the check: a writer of another format that writes no
    record (so never waits for the check) cannot commit a refused growth."""
    _, path = source

    def refuse_late(*args, **kwargs):
        time.sleep(0.3)  # after the writer has written everything
        raise GrowthError("refused by the test")

    def write_without_record(out, grown, *, max_shard_bytes, before_commit):
        tmp = out.with_name(out.name + ".partial")
        tmp.mkdir()
        for name in grown.tensors:
            torch.save(grown.tensors[name], tmp / f"{name}.pt")
        try:
            before_commit()
        except BaseException:
            __import__("shutil").rmtree(tmp)
            raise
        tmp.rename(out)
        return out

    monkeypatch.setattr(expand, "_check_step", refuse_late)
    with pytest.raises(GrowthError, match="refused by the test"):
        expand_checkpoint(path, tmp_path / "out", [GrowthStep("llama_pro", {"target_layers": 6})], write_output=write_without_record)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_a_writer_that_fails_stops_the_check_at_its_next_block(source, tmp_path, monkeypatch):
    """After the writer failed, the check beside it stops at its next block instead of
    computing to the end for a growth that is already lost."""
    from lite_llm.grow import streaming_validate

    _, path = source
    blocks: list[int] = []
    real_run = streaming_validate._Model.run

    def slow_run(self, layer, x, buffers):
        blocks.append(layer)
        time.sleep(0.2)
        return real_run(self, layer, x, buffers)

    def fail_in_the_writer(name: str) -> None:
        if not threading.current_thread().name.startswith("check-growth"):
            raise OSError("the disk went away (test)")

    monkeypatch.setattr(streaming_validate._Model, "run", slow_run)
    break_llama_pro(monkeypatch, scale=1.0, on_produce=fail_in_the_writer)
    with pytest.raises(OSError, match="the disk went away"):
        expand_checkpoint(path, tmp_path / "out", [GrowthStep("llama_pro", {"target_layers": 6})])
    assert len(blocks) <= 2, blocks  # a whole check runs the 4 shared blocks (the 2 new ones are proven silent)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--method", "grow_more"], "unknown growth method 'grow_more'; known methods:"),
        (["--method", "llama_pro", "--set", "positions=[0, 9]"], r"layer indices \[9\] are out of range for a model with 4 layers"),
        (["--method", "llama_pro", "--set", "layers=3"], "has no parameter 'layers'"),
        (["--method", "llama_pro"], "needs target_layers"),
        (["--method", "heads", "--set", "n_heads=7"], "n_heads=7 would break groups"),
        (["--method", "heads", "--set", "n_heads=8", "--set", "mode=gqa"], "n_heads=8 is a GQA growth that would break groups"),
        (["--method", "width", "--set", "d_model=20"], "d_model"),
    ],
)
def test_bad_growth_input_is_one_sentence_and_leaves_nothing(source, tmp_path, args, message):
    _, path = source
    out = tmp_path / "out"
    result = runner.invoke(app, ["expand", str(path), *args, "-o", str(out)])
    assert result.exit_code == 1
    assert message.replace("\\", "") in result.output or __import__("re").search(message, result.output), result.output
    assert "Traceback" not in result.output
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_recipe_errors_name_the_step(tmp_path):
    with pytest.raises(ConfigError, match="recipe step 2: unknown growth method 'deeper'"):
        Recipe.from_dict({"steps": [{"method": "stack"}, {"method": "deeper"}]})
    with pytest.raises(ConfigError, match="needs a non-empty 'steps' list"):
        Recipe.from_dict({"steps": []})
    bad = tmp_path / "bad.yaml"
    bad.write_text("steps: [method: stack\n")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        Recipe.from_file(bad)


def test_expand_refuses_its_own_source_and_a_corrupt_one(source, tmp_path):
    _, path = source
    with pytest.raises(Exception, match="is the source checkpoint"):
        expand_checkpoint(path, path, [GrowthStep("stack", {})])
    shard = next(path.glob("dense*.safetensors"))
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(Exception, match="sha256"):
        expand_checkpoint(path, tmp_path / "out", [GrowthStep("stack", {})])
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("shape", sorted(moe_shapes()))
def test_bf16_checkpoint_grows_in_its_dtype(shape, tmp_path):
    model = random_model(moe_shapes()[shape]).to(torch.bfloat16)
    path = save_checkpoint(tmp_path / "src", model)
    result = expand_checkpoint(path, tmp_path / "out", [GrowthStep("llama_pro", {"target_layers": 5})])
    grown = load_checkpoint(result.path).model
    assert grown.embed.weight.dtype == torch.bfloat16
    assert result.records[0]["preservation"]["max_abs"] == 0.0


def test_unsupported_architecture_import_is_one_sentence_and_leaves_nothing(tmp_path):
    folder = tmp_path / "gpt2"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_embd": 64}))
    result = runner.invoke(app, ["import", str(folder), "-o", str(tmp_path / "out")])
    assert result.exit_code == 1 and "gpt2" in result.output and "Traceback" not in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpt2"]


def test_growth_bumps_the_model_version(source, tmp_path):
    from lite_llm.checkpoint import read_manifest

    _, path = source
    assert read_manifest(path)["model_version"] == "1.0.0"
    result = expand_checkpoint(path, tmp_path / "deeper", [GrowthStep("llama_pro", {"target_layers": 5})])
    assert read_manifest(result.path)["model_version"] == "2.0.0"  # shapes changed: a major change
