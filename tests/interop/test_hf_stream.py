"""One-pass growth of Hugging Face folders (issue 16, point 3): `lite-llm expand HF_FOLDER
--format hf` against transformers itself (the grown folder loads and computes the source's
logits) and against a SOLAR stack built by hand from the source's state dict."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from lite_llm.cli import app

transformers = pytest.importorskip("transformers")
runner = CliRunner()


@pytest.fixture(scope="module")
def hf_llama(tmp_path_factory) -> tuple[Path, "transformers.LlamaForCausalLM"]:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False,
    )
    model = transformers.LlamaForCausalLM(cfg).eval()
    path = tmp_path_factory.mktemp("hf") / "llama"
    model.save_pretrained(path)
    return path, model


def _expand(*args: str) -> tuple[int, str]:
    result = runner.invoke(app, ["expand", *args])
    return result.exit_code, (result.output + (result.stderr if result.stderr_bytes else "")).replace("\n", "")


def _logits(folder: Path, ids: torch.Tensor) -> torch.Tensor:
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(ids).logits


def _state(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    state: dict[str, torch.Tensor] = {}
    for shard in sorted(folder.glob("*.safetensors")):
        state.update(load_file(shard))
    return state


def test_llama_pro_hf_to_hf_in_one_pass_is_bitwise(hf_llama, tmp_path):
    src, model = hf_llama
    code, out = _expand(str(src), "--method", "llama_pro", "--target-layers", "6", "-o", str(tmp_path / "g"), "--format", "hf")
    assert code == 0, out
    assert json.loads((tmp_path / "g" / "config.json").read_text())["num_hidden_layers"] == 6
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(_logits(tmp_path / "g", ids), model(ids).logits)
    record = json.loads((tmp_path / "g" / "progressive.json").read_text())["expansions"][-1]
    assert record["method"] == "llama_pro" and record["preservation"]["max_abs"] == 0.0


def test_an_unchecked_one_pass_growth_reads_no_tensor(hf_llama, tmp_path, monkeypatch):
    """Opening the folder asks only headers (a membership test on the lazy mapping used to read
    the tensor), passed-on tensors are copied as raw bytes, and LLaMA-Pro's zeroed writers are
    made from the headers' shapes: no tensor is decoded at all, and the output is still bitwise."""
    from lite_llm.checkpoint.stream import SafetensorsReader

    src, model = hf_llama
    read: list[str] = []
    real_get = SafetensorsReader.get
    monkeypatch.setattr(SafetensorsReader, "get", lambda self, name: read.append(name) or real_get(self, name))
    code, out = _expand(str(src), "--method", "llama_pro", "--target-layers", "6", "-o", str(tmp_path / "g"), "--format", "hf", "--validate", "never")
    assert code == 0, out
    assert read == []
    monkeypatch.undo()
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(_logits(tmp_path / "g", ids), model(ids).logits)


def test_solar_equals_the_stack_built_by_hand(hf_llama, tmp_path):
    src, _ = hf_llama
    code, out = _expand(str(src), "--method", "solar", "--target-layers", "6", "-o", str(tmp_path / "s"), "--format", "hf")
    assert code == 0, out
    source, grown = _state(src), _state(tmp_path / "s")
    n, m = 4, 1  # 2 * (n - m) = 6: blocks [0, 3) then [1, 4)
    order = list(range(0, n - m)) + list(range(m, n))
    expected = {k: v for k, v in source.items() if not k.startswith("model.layers.")}
    for new, old in enumerate(order):
        prefix = f"model.layers.{old}."
        expected.update({f"model.layers.{new}." + k[len(prefix):]: v for k, v in source.items() if k.startswith(prefix)})
    assert sorted(grown) == sorted(expected)
    for name, tensor in expected.items():
        assert grown[name].dtype == tensor.dtype and torch.equal(grown[name], tensor), name
    preservation = json.loads((tmp_path / "s" / "progressive.json").read_text())["expansions"][-1]["preservation"]
    assert preservation["loss_jump"] != 0.0  # SOLAR is not exact: the jump is measured and recorded


def test_a_recipe_with_an_hf_source_and_output(hf_llama, tmp_path):
    src, model = hf_llama
    recipe = tmp_path / "grow.yaml"
    recipe.write_text(f"source: {src}\noutput: {tmp_path / 'r'}\nformat: hf\nsteps:\n  - {{method: llama_pro, target_layers: 8}}\n")
    code, out = _expand("--recipe", str(recipe))
    assert code == 0, out
    ids = torch.randint(0, 128, (1, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(_logits(tmp_path / "r", ids), model(ids).logits)


def test_an_hf_source_to_our_checkpoint(hf_llama, tmp_path):
    from lite_llm.checkpoint import load_checkpoint

    src, model = hf_llama
    code, out = _expand(str(src), "--method", "llama_pro", "--target-layers", "5", "-o", str(tmp_path / "c"))
    assert code == 0, out
    ids = torch.randint(0, 128, (1, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(load_checkpoint(tmp_path / "c").model(ids).logits, model(ids).logits)


def test_bad_sources_and_outputs_are_one_sentence_and_leave_nothing(hf_llama, tmp_path):
    src, _ = hf_llama
    before = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in src.iterdir()}
    (tmp_path / "empty").mkdir()
    code, out = _expand(str(tmp_path / "empty"), "--method", "llama_pro", "--target-layers", "6", "-o", str(tmp_path / "x"), "--format", "hf")
    assert code == 1 and "neither a lite-llm checkpoint" in out and "Traceback" not in out
    assert not (tmp_path / "x").exists()
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    code, out = _expand(str(src), "--method", "llama_pro", "--target-layers", "6", "-o", str(taken), "--format", "hf")
    assert code == 1 and "already exists" in out
    assert [p.name for p in taken.iterdir()] == ["keep.txt"]
    code, out = _expand(str(src), "--method", "llama_pro", "--target-layers", "6", "-o", str(tmp_path / "y"), "--format", "gguf")
    assert code == 1 and "format must be one of checkpoint, hf" in out and not (tmp_path / "y").exists()
    assert before == {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in src.iterdir()}  # the source untouched


def test_a_refused_check_leaves_no_folder(hf_llama, tmp_path, monkeypatch):
    """The check runs beside the HF writer: a step claimed exact that changed the logits is
    refused with its figures, and no folder (not even a temporary one) is left."""
    from tests.grow.helpers import break_llama_pro

    src, _ = hf_llama
    break_llama_pro(monkeypatch, scale=1.01)
    code, out = _expand(str(src), "--method", "llama_pro", "--target-layers", "6", "-o", str(tmp_path / "g"), "--format", "hf")
    assert code == 1 and "meant to be exact but changed the logits by" in out and "Traceback" not in out, out
    assert list(tmp_path.iterdir()) == []


def test_raw_copies_stop_once_the_check_has_failed(hf_llama, tmp_path, monkeypatch):
    """Tensors passed on unchanged are copied as raw bytes, not through the grown mapping; the
    writer still asks, before each copy, whether the check beside it has failed."""
    from lite_llm.grow import expand
    from lite_llm.interop import hf_weights
    from tests.grow.helpers import RefusalMidWrite

    src, _ = hf_llama
    copies: list[int] = []
    real_copy = hf_weights._copy_range
    monkeypatch.setattr(hf_weights, "_copy_range", lambda *args: copies.append(args[2]) or real_copy(*args))
    code, _ = _expand(str(src), "--method", "solar", "--target-layers", "6", "-o", str(tmp_path / "all"), "--format", "hf", "--validate", "never")
    assert code == 0 and len(copies) > 2  # SOLAR's reordered blocks break the copy into several runs
    copies.clear()

    meeting = RefusalMidWrite()

    def hold_the_first(*args):
        copies.append(args[2])
        meeting.writer_step()
        return real_copy(*args)

    monkeypatch.setattr(expand, "_check_step", meeting.refuse)
    monkeypatch.setattr(hf_weights, "_copy_range", hold_the_first)
    code, out = _expand(str(src), "--method", "solar", "--target-layers", "6", "-o", str(tmp_path / "g"), "--format", "hf")
    assert code == 1 and "refused by the test" in out, out
    assert len(copies) == 1, copies
    assert sorted(p.name for p in tmp_path.iterdir()) == ["all"]


def test_a_widened_hf_folder_gets_its_tables_range_by_range(hf_llama, tmp_path, monkeypatch):
    """Width growth written as a Hugging Face folder: the widened embedding and head go to the
    file row range by row range (never made whole), the files are byte for byte those of
    writing them whole (the oracle, with the row path off), and transformers computes the
    original's logits from the widened folder."""
    from lite_llm.grow import tensors as lazy
    from lite_llm.grow.recipe import GrowthStep
    from lite_llm.interop import hf_stream

    src, model = hf_llama
    monkeypatch.setattr(lazy, "ROW_CHUNK_BYTES", 3 * 64 * 4)  # three source rows a chunk
    made_whole: list[str] = []
    real_call = lazy.RowWise.__call__
    monkeypatch.setattr(lazy.RowWise, "__call__", lambda self: made_whole.append(self.name) or real_call(self))
    step = [GrowthStep("width", {"d_model": 128})]
    hf_stream.expand_model(src, tmp_path / "rows", step, output_format="hf")
    assert made_whole == []
    monkeypatch.setattr(hf_stream, "row_chunks", lambda *args: None)
    hf_stream.expand_model(src, tmp_path / "whole", step, output_format="hf", validate="never")
    assert sorted(made_whole) == ["embed.weight", "lm_head.weight"]
    assert (tmp_path / "rows" / "model.safetensors").read_bytes() == (tmp_path / "whole" / "model.safetensors").read_bytes()
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(_logits(tmp_path / "rows", ids), model(ids).logits, rtol=0, atol=1e-5)
