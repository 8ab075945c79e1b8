"""Nothing lost to a mistyped command, and one sentence instead of a traceback (issue 16,
point 7): every command that writes refuses an existing output unless --overwrite, empty
sources and TierSets are refused, and malformed configs are named, not dumped."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lite_llm.cli import app
from lite_llm.config import ModelConfig, TierSet
from lite_llm.errors import ConfigError, TierSetError
from lite_llm.train import TrainConfig

runner = CliRunner()


def _run(args: list[str]) -> tuple[int, str]:
    result = runner.invoke(app, args)
    out = result.output + (result.stderr if result.stderr_bytes else "")
    return result.exit_code, out.replace("\n", "")


def _hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def test_init_over_an_existing_checkpoint_is_refused_unless_overwrite(tmp_path):
    ckpt = tmp_path / "ckpt"
    assert _run(["init", "--preset", "tiny", "-o", str(ckpt), "--seed", "1"])[0] == 0
    before = _hashes(ckpt)
    code, out = _run(["init", "--preset", "tiny", "-o", str(ckpt), "--seed", "2"])
    assert code == 1 and "already exists; pass --overwrite" in out and "Traceback" not in out
    assert _hashes(ckpt) == before
    code, out = _run(["init", "--preset", "tiny", "-o", str(ckpt), "--seed", "2", "--overwrite"])
    assert code == 0, out
    assert _hashes(ckpt) != before


def test_data_prepare_and_tokenizer_train_refuse_existing_outputs(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("hello world " * 200)
    data = tmp_path / "data"
    assert _run(["data", "prepare", f"x={corpus}", "-o", str(data)])[0] == 0
    before = _hashes(data)
    code, out = _run(["data", "prepare", f"x={corpus}", "-o", str(data)])
    assert code == 1 and "already exists; pass --overwrite" in out
    assert _hashes(data) == before
    tok = tmp_path / "tok"
    tok.mkdir()
    (tok / "mine.txt").write_text("keep")
    code, out = _run(["tokenizer", "train", str(corpus), "--vocab-size", "300", "-o", str(tok)])
    assert code == 1 and "already exists" in out and _hashes(tok) == {"mine.txt": hashlib.sha256(b"keep").hexdigest()}


def test_an_empty_source_is_refused(tmp_path):
    for spec in ("x=", "=stdlib-code"):
        code, out = _run(["data", "prepare", spec, "-o", str(tmp_path / "d")])
        assert code == 1 and "empty" in out and "DOMAIN=SPEC" in out
        assert not (tmp_path / "d").exists()


@pytest.mark.parametrize("value", ["inf", "nan", "0", "-5"])
def test_a_cap_that_is_not_a_positive_size_is_refused(value, tmp_path):
    code, out = _run(["data", "prepare", "x=stdlib-code", "--max-mb", value, "-o", str(tmp_path / "d")])
    assert code == 1 and "--max-mb must be a positive number of megabytes" in out and "Traceback" not in out, out
    assert not (tmp_path / "d").exists()


def test_empty_tiersets_are_refused():
    for text in ("", " ", ",", "upto:", "only: ,"):
        with pytest.raises(TierSetError):
            TierSet.parse(text)
    assert TierSet.parse("all") == TierSet.all()


def test_bools_are_not_integers_and_lists_are_not_numbers():
    with pytest.raises(ConfigError, match="d_model must be an integer, got True"):
        ModelConfig.from_dict({**ModelConfig.from_preset("tiny").to_dict(), "d_model": True})
    with pytest.raises(ConfigError, match=r"train.lr must be a number, got \[1, 2\]"):
        TrainConfig.from_dict({"lr": [1, 2]})
    with pytest.raises(ConfigError, match="train.steps must be a positive integer, got True"):
        TrainConfig.from_dict({"steps": True})


def test_malformed_yaml_is_one_sentence_naming_the_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("d_model: 64\n  n_layers: [2\n")
    code, out = _run(["init", "--config", str(bad), "-o", str(tmp_path / "c")])
    assert code == 1 and "is not valid YAML at line" in out and "Traceback" not in out
    assert not (tmp_path / "c").exists()
    with pytest.raises(ConfigError, match="is not valid YAML at line"):
        TrainConfig.from_file(bad)


def test_output_is_not_wrapped_when_not_a_terminal(tmp_path):
    long_dir = tmp_path / ("a-rather-long-directory-name-" * 3)
    result = runner.invoke(app, ["init", "--preset", "tiny", "-o", str(long_dir)])
    assert result.exit_code == 0
    line = next(l for l in result.output.splitlines() if l.startswith("wrote"))
    assert str(long_dir) in line and "active per token" in line  # one line, however long


def test_tables_keep_their_natural_width_when_not_a_terminal(tmp_path):
    """A growth's record table in a real pipe (a subprocess, $COLUMNS unset): every cell whole on
    one row (rich fitted tables into 80 columns, eliding ``{"target_l…`` and wrapping it over
    three lines)."""
    import os
    import subprocess
    import sys

    assert runner.invoke(app, ["init", "--preset", "tiny", "-o", str(tmp_path / "a")]).exit_code == 0
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "FORCE_COLOR", "TTY_INTERACTIVE", "TTY_COMPATIBLE")}
    command = [sys.executable, "-c", "from lite_llm.cli import main; main()", "expand", str(tmp_path / "a"), "--method", "llama_pro", "--target-layers", "5", "-o", str(tmp_path / "b")]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    row = next(line for line in result.stdout.splitlines() if "llama_pro" in line)
    assert '{"target_layers": 5}' in row and "…" not in result.stdout


def test_a_manifest_disagreeing_with_the_shard_header_is_refused(tmp_path):
    import json

    from lite_llm.checkpoint import load_checkpoint, verify_checkpoint
    from lite_llm.errors import CheckpointError

    ckpt = tmp_path / "ckpt"
    assert _run(["init", "--preset", "tiny", "-o", str(ckpt)])[0] == 0
    manifest = json.loads((ckpt / "manifest.json").read_text())
    entry = manifest["shards"][0]["tensors"]
    name = next(iter(entry))
    entry[name]["dtype"] = "bfloat16"  # the shard holds float32
    (ckpt / "manifest.json").write_text(json.dumps(manifest))
    assert any("as float32 but its manifest entry says bfloat16" in p for p in verify_checkpoint(ckpt))
    with pytest.raises(CheckpointError, match="manifest lists bfloat16"):
        load_checkpoint(ckpt, verify=False)
    code, out = _run(["inspect", str(ckpt)])
    assert code == 1 and "bfloat16" in out and "Traceback" not in out


def test_a_json_report_path_that_cannot_be_written_is_refused_before_the_work(tmp_path):
    """``eval --json DIR`` used to run the whole evaluation and then end in IsADirectoryError."""
    ckpt = tmp_path / "ckpt"
    assert _run(["init", "--preset", "tiny", "-o", str(ckpt)])[0] == 0
    for bad, said in ((tmp_path, "is a directory"), (tmp_path / "missing" / "r.json", "does not exist")):
        code, out = _run(["validate", str(ckpt), str(ckpt), "--json", str(bad)])
        assert code == 1 and said in out and "Traceback" not in out, out
        code, out = _run(["eval", str(ckpt), "--data", str(tmp_path / "no-data"), "--json", str(bad)])
        assert code == 1 and said in out and "Traceback" not in out, out


def test_expand_says_when_its_check_found_a_new_parameter_without_gradient(tmp_path, monkeypatch):
    """``validate`` fails on a new parameter no gradient reaches; ``expand`` records the same
    finding in progressive.json and used to write it silently.  No growth here makes a dead
    parameter (tests/grow/test_streaming_validate.py finds real ones), so the check is told
    that one tier's experts got none."""
    import json

    from lite_llm.grow import streaming_validate

    real = streaming_validate._dead_parameters
    monkeypatch.setattr(streaming_validate, "_dead_parameters", lambda *a, **k: real(*a, **k) + ["ffn.experts.tier_10b.gate_up_proj"])
    src, out = tmp_path / "t", tmp_path / "grown"
    assert _run(["init", "--preset", "tiny", "-o", str(src)])[0] == 0
    result = runner.invoke(app, ["expand", str(src), "--method", "llama_pro", "--target-layers", "4", "-o", str(out)])
    assert result.exit_code == 0, result.output
    dead = json.loads((out / "progressive.json").read_text())["expansions"][-1]["gradient_flow_dead"]
    assert dead and all(name.endswith(".ffn.experts.tier_10b.gate_up_proj") for name in dead), dead
    said = (result.output + (result.stderr if result.stderr_bytes else "")).replace("\n", "")
    assert "warning: step 1 (llama_pro): no gradient reached" in said and dead[0] in said


def test_a_grown_model_inside_its_source_is_refused_and_the_source_kept(tmp_path):
    src = tmp_path / "t"
    assert _run(["init", "--preset", "tiny", "-o", str(src)])[0] == 0
    before = _hashes(src)
    code, out = _run(["expand", str(src), "--method", "llama_pro", "--target-layers", "4", "-o", str(src / "inner")])
    assert code == 1 and "nested in each other" in out and "Traceback" not in out, out
    assert _hashes(src) == before and not (src / "inner").exists()
