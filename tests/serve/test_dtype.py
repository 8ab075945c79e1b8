"""`--dtype` on `generate`, `eval` and `serve`: computing in bfloat16 from a float32 checkpoint.

The oracle is the same model stored in bfloat16 (cast by the library and saved, a path that
shares nothing with the load-time cast): every command with `--dtype bfloat16` on the float32
checkpoint must give exactly what it gives on the bfloat16 one — tokens, bits per byte and
served text — and the bits per byte must stay near float32's.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import torch
from typer.testing import CliRunner

from lite_llm.checkpoint import load_checkpoint, save_checkpoint
from lite_llm.cli import app
from lite_llm.generate import generate_ids
from lite_llm.store import load_for_inference

from .conftest import CORPUS, free_port, wait_healthy

runner = CliRunner()


def _ok(args: list[str]) -> str:
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result.stdout


@pytest.fixture(scope="module")
def pair(byte_ckpt, tmp_path_factory) -> tuple[Path, Path]:
    """The float32 byte checkpoint and the same weights stored in bfloat16."""
    loaded = load_checkpoint(byte_ckpt)
    stored16 = save_checkpoint(tmp_path_factory.mktemp("dtype") / "bf16", loaded.model.to(torch.bfloat16), tokenizer=loaded.tokenizer)
    return byte_ckpt, stored16


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("dtype-data")
    (root / "text").mkdir()
    for i, text in enumerate(CORPUS[:4]):
        (root / "text" / f"doc{i}.txt").write_text(text * 20)
    assert runner.invoke(app, ["data", "prepare", f"text={root / 'text'}", "-o", str(root / "data")]).exit_code == 0
    return root / "data"


def test_the_cast_model_is_the_model_stored_in_that_dtype(pair):
    fp32, bf16 = pair
    cast, stored = load_for_inference(fp32, dtype=torch.bfloat16).model, load_checkpoint(bf16).model
    assert {p.dtype for p in cast.parameters()} == {torch.bfloat16}
    assert all(torch.equal(a, b) for a, b in zip(cast.state_dict().values(), stored.state_dict().values()))
    assert {p.dtype for p in load_for_inference(fp32).model.parameters()} == {torch.float32}  # the default keeps the stored dtype


def test_generate_in_bfloat16_gives_the_bfloat16_checkpoints_tokens(pair):
    fp32, bf16 = pair
    args = ["--prompt", "def ", "--max-new-tokens", "24", "--temperature", "0"]
    cast = _ok(["generate", fp32, *args, "--dtype", "bfloat16"])
    assert cast == _ok(["generate", bf16, *args])
    assert cast != _ok(["generate", fp32, *args])  # this model's greedy text parts from float32's at the fourth token
    assert cast == _ok(["generate", fp32, *args, "--dtype", "bfloat16", "--hot-budget", "1MB"])  # experts from disk, cast as read


def test_eval_in_bfloat16_gives_the_bfloat16_checkpoints_scores_near_float32s(pair, dataset, tmp_path):
    fp32, bf16 = pair
    scores = {}
    for name, args in (("cast", [fp32, "--dtype", "bfloat16"]), ("stored", [bf16]), ("fp32", [fp32])):
        _ok(["eval", *args, "--data", dataset, "--batches", "2", "--batch-size", "2", "--seq-len", "64", "--json", tmp_path / f"{name}.json"])
        scores[name] = json.loads((tmp_path / f"{name}.json").read_text())["text"]["bpb"]
    assert scores["cast"] == scores["stored"]
    assert scores["cast"] != scores["fp32"] and abs(scores["cast"] - scores["fp32"]) < 0.02 * scores["fp32"]


def test_an_unknown_dtype_is_one_sentence(pair):
    result = runner.invoke(app, ["generate", str(pair[0]), "--prompt", "x", "--dtype", "int8"])
    assert result.exit_code == 1 and "unknown dtype 'int8'; use float32, bfloat16 or float16" in result.output
    assert "Traceback" not in result.output


def test_serve_in_bfloat16_answers_what_the_bfloat16_checkpoint_generates(pair):
    fp32, bf16 = pair
    model16 = load_checkpoint(bf16)
    expected = model16.tokenizer.decode(list(generate_ids(model16.model, model16.tokenizer.encode("def "), 16, temperature=0)))
    port = free_port()
    env = {**os.environ, "LITE_LLM_DEVICE": "cpu"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "lite_llm.cli", "serve", str(fp32), "--port", str(port), "--dtype", "bfloat16", "--threads", "1"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    try:
        wait_healthy(f"http://127.0.0.1:{port}", timeout=60, proc=proc)
        reply = httpx.post(
            f"http://127.0.0.1:{port}/v1/completions",
            json={"model": fp32.name, "prompt": "def ", "max_tokens": 16, "temperature": 0}, timeout=60,
        )
        assert reply.status_code == 200, reply.text
        assert reply.json()["choices"][0]["text"] == expected
    finally:
        proc.terminate()
        proc.wait(30)
