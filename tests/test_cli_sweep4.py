"""A fourth sweep, of flags that were silently dropped and of --overwrite where it was missing.

Each defect found is a test: the command, its one-sentence refusal or its corrected result,
and the files before and after (hashes unchanged where nothing should change)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lite_llm.checkpoint.lazy import open_checkpoint

from .test_issue16_safety import _hashes, _run

TRAIN = ["--batch-size", "2", "--seq-len", "32", "--eval-every", "0", "--quiet"]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    """A two-domain byte dataset, a tiny MoE and a tiny dense checkpoint, and a finished 2-step run."""
    root = tmp_path_factory.mktemp("sweep4")
    for domain, words in (("code", "def class return import self"), ("prose", "the quick brown fox jumps")):
        (root / domain).mkdir()
        for i in range(3):
            (root / domain / f"d{i}.txt").write_text(" ".join([words] * 400))
    w = {"root": root, "data": root / "data", "tiny": root / "tiny", "dense": root / "dense", "run": root / "run"}
    assert _run(["data", "prepare", f"code={root / 'code'}", f"prose={root / 'prose'}", "-o", str(w["data"])])[0] == 0
    assert _run(["init", "--preset", "tiny", "-o", str(w["tiny"])])[0] == 0
    assert _run(["init", "--preset", "tiny-dense", "-o", str(w["dense"])])[0] == 0
    code, out = _run(["train", "--data", str(w["data"]), "--preset", "tiny", "--steps", "2", "-o", str(w["run"]), *TRAIN])
    assert code == 0, out
    return w


@pytest.mark.parametrize("start, words", [
    (["--init", "{tiny}", "--preset", "tiny"], "--init and --preset each choose the model to start from"),
    (["--preset", "tiny", "--model-config", "{root}/model.yaml"], "--preset and --model-config each choose the model to start from"),
])
def test_two_starting_models_are_refused_instead_of_one_being_dropped(world, tmp_path, start, words):
    (world["root"] / "model.yaml").write_text("d_model: 64\n")
    args = [a.format(**{k: str(v) for k, v in world.items()}) for a in start]
    code, out = _run(["train", "--data", str(world["data"]), *args, "--steps", "1", "-o", str(tmp_path / "new"), *TRAIN])
    assert code == 1 and words in out and "give only one of --init, --preset and --model-config" in out, out
    assert not (tmp_path / "new").exists()


def test_resume_with_init_is_refused_and_the_run_is_untouched(world):
    before = _hashes(world["run"])
    code, out = _run(["train", "--data", str(world["data"]), "-o", str(world["run"]), "--resume", "--init", str(world["dense"]), "--steps", "3", *TRAIN])
    assert code == 1 and "cannot resume with --init" in out and "continues from its own latest checkpoint" in out, out
    assert _hashes(world["run"]) == before


@pytest.mark.parametrize("flags, words", [
    (["--ewc-weight", "10"], "train.ewc_from (--ewc) and train.ewc_weight (--ewc-weight) go together"),
    (["--domains", "cod=1"], "train.domains (--domains) names unknown domain(s) cod"),
    (["--distill-from", "{tiny}", "--distill-domains", "prse"], "train.distill_domains (--distill-domains) names unknown domain(s) prse"),
])
def test_training_errors_name_the_flags_typed(world, tmp_path, flags, words):
    args = [a.format(tiny=world["tiny"]) for a in flags]
    code, out = _run(["train", "--data", str(world["data"]), "--preset", "tiny", "--steps", "1", "-o", str(tmp_path / "new"), *args, *TRAIN])
    assert code == 1 and words in out, out


def _layers(path: Path) -> int:
    return open_checkpoint(path, verify=False).config.n_layers


@pytest.mark.parametrize("command", ["expand", "add-tier", "quantize", "ewc", "export"])
def test_every_writer_refuses_an_existing_output_and_replaces_it_with_overwrite(world, tmp_path, command):
    """Without --overwrite the output is refused and left as it was; with it the new one replaces
    it whole (a second expand to 6 layers over a 4-layer growth gives 6 layers)."""
    out = tmp_path / "out"
    src = str(world["dense"] if command == "export" else world["tiny"])
    make = {
        "expand": lambda layers: ["expand", src, "--method", "llama_pro", "--target-layers", str(layers), "-o", str(out)],
        "add-tier": lambda layers: ["add-tier", src, "--tier", f"tier_{layers}", "-o", str(out)],
        "quantize": lambda layers: ["quantize", src, "--tier", "tier_1b", "--to", "int8" if layers == 4 else "int4", "-o", str(out)],
        "ewc": lambda layers: ["ewc", "estimate", src, "--data", str(world["data"]), "--domain", "prose", "--samples", "2", "--seq-len", str(8 * layers), "-o", str(out)],
        "export": lambda layers: ["export", src, "-o", str(out), "--dtype", "float32" if layers == 4 else "bfloat16"],
    }[command]
    assert _run(make(4))[0] == 0
    before = _hashes(out)
    code, message = _run(make(6))
    assert code == 1 and "--overwrite" in message and "Traceback" not in message, message
    assert _hashes(out) == before
    code, message = _run([*make(6), "--overwrite"])
    assert code == 0, message
    after = _hashes(out)
    assert after != before
    if command == "expand":
        assert _layers(out) == 6
    if command == "export":
        assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert not [p for p in tmp_path.iterdir() if p.name != "out"]  # no temporary or old copy left beside it


@pytest.mark.parametrize("command", [
    ["export", "{dense}", "-o", "{target}", "--overwrite"],
    ["expand", "{dense}", "--method", "llama_pro", "--target-layers", "4", "-o", "{target}", "--overwrite"],
    ["tokenizer", "train", "{code}", "--vocab-size", "300", "-o", "{target}", "--overwrite"],
])
def test_overwrite_replaces_only_a_model_never_another_folder(world, tmp_path, command):
    target = tmp_path / "notes"
    target.mkdir()
    (target / "a.txt").write_text("mine")
    code, out = _run([a.format(dense=world["dense"], code=world["root"] / "code", target=target) for a in command])
    assert code == 1 and "refusing to overwrite" in out, out
    assert [p.name for p in target.iterdir()] == ["a.txt"] and (target / "a.txt").read_text() == "mine"


def test_a_replaced_retention_report_is_said_so(world, tmp_path):
    report = tmp_path / "report"
    args = ["eval", str(world["tiny"]), "--against", str(world["dense"]), "--data", str(world["data"]), "--batches", "1", "--batch-size", "2", "--seq-len", "16", "--report", str(report)]
    code, out = _run(args)
    assert code == 0 and "replacing" not in out, out
    code, out = _run(args)
    assert code == 0 and "(replacing the earlier retention.json, retention.md" in out, out


@pytest.mark.parametrize("command", [["tiers", "profile", "file:///tmp/ckpt", "--data", "code=data"], ["tiers", "choose", "file:///tmp/ckpt", "--memory", "1MB"]])
def test_tiers_says_a_url_is_not_a_checkpoint_directory(command):
    code, out = _run(command)
    assert code == 1 and "is a URL; give the checkpoint's folder" in out and "file:/tmp" not in out.replace("file:///tmp", ""), out
