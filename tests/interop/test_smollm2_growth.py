"""Growth on a real pretrained model: SmolLM2-135M-Instruct (GGUF) imported, grown by every
method claimed exact — LLaMA-Pro (30 -> 36 layers), hidden width (576 -> 1152), heads (9 -> 18),
upcycling to 8 experts, FFN width, and a two-step recipe — each passing the DEFAULT check (the
streamed float64 sample, or for LLaMA-Pro the proof of identity, and the sample on request)
with its figures recorded, then exported and reloaded by transformers, whose
logits agree with the source's to the recorded tolerance.

The import itself is checked against transformers loading the same GGUF in
test_gguf_import.py.  Without the file (``make fetch-smollm2``) these tests skip."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from lite_llm.checkpoint import load_checkpoint, read_manifest
from lite_llm.grow.expand import expand_checkpoint
from lite_llm.grow.recipe import GrowthStep, Recipe
from lite_llm.grow.validate import DEFAULT_TOLERANCE, SAMPLE_TOKENS
from lite_llm.interop import export_hf, import_gguf

GGUF = Path(__file__).resolve().parents[2] / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"

pytestmark = [
    pytest.mark.realmodel,
    pytest.mark.skipif(not GGUF.exists(), reason=f"{GGUF} is absent; run `make fetch-smollm2` to fetch it"),
]


def _hf_logits(folder: Path, ids: torch.Tensor) -> torch.Tensor:
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return hf(ids).logits.double()


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    """The imported checkpoint, sample ids, and the source's logits in transformers (the
    reference every export is compared with)."""
    pytest.importorskip("transformers")
    work = tmp_path_factory.mktemp("smollm2")
    path = import_gguf(GGUF, work / "ckpt")
    ids = torch.tensor([load_checkpoint(path).tokenizer.encode("The capital of France is Paris. def add(a, b):\n    return a + b")[:24]])
    reference = _hf_logits(export_hf(path, work / "hf-source"), ids)
    shutil.rmtree(work / "hf-source")
    return path, ids, reference


def _grow_and_export(smollm2, tmp_path, steps: list[GrowthStep], **kwargs) -> list[dict]:
    """Grow with the default validation, check the recorded figures, export, and compare the
    export's logits in transformers with the source's to the recorded tolerance."""
    path, ids, reference = smollm2
    result = expand_checkpoint(path, tmp_path / "grown", steps, **kwargs)
    records = json.loads((result.path / "progressive.json").read_text())["expansions"]
    assert [r["method"] for r in records] == [s.method for s in steps] and len(result.reports) == len(steps)
    for record in records:
        p = record["preservation"]
        assert record["exact"] is True and p["preserved"] is True and p["tolerance"] == DEFAULT_TOLERANCE
        if p["proved"]:  # the identity by construction (LLaMA-Pro under validate: auto): nothing evaluated
            assert p["tokens"] == 0 and p["max_abs"] == p["max_rel"] == p["loss_jump"] == 0.0 and p["loss_original"] is None
            continue
        assert p["tokens"] == SAMPLE_TOKENS
        assert p["max_rel"] <= DEFAULT_TOLERANCE and p["max_abs"] == pytest.approx(p["max_rel"] * p["logits_scale"], rel=1e-9)
        assert 15 < p["logits_scale"] < 100  # real logits, not a degenerate sample
        assert abs(p["loss_jump"]) <= 1e-6 and 0.5 < p["loss_original"] < 10
    folder = export_hf(result.path, tmp_path / "hf")
    shutil.rmtree(result.path)  # keep the disk light: the export is what is compared from here
    grown = _hf_logits(folder, ids)
    relative = float((grown - reference).abs().max() / reference.abs().max())
    assert relative <= records[-1]["preservation"]["tolerance"], relative  # transformers agrees (fp32 rounding only)
    return records


@pytest.mark.parametrize("validate", ["auto", "always"])
def test_llama_pro_30_to_36_is_bitwise_and_exports(smollm2, tmp_path, validate):
    """By default proved (every original block passed on, the new ones' writers zero); under
    ``always`` the float64 sample measures what the proof says: no logit moves."""
    (record,) = _grow_and_export(smollm2, tmp_path, [GrowthStep("llama_pro", {"target_layers": 36})], validate=validate)
    assert record["target_config"]["n_layers"] == 36 and record["preservation"]["max_abs"] == 0.0
    assert record["preservation"]["proved"] is (validate == "auto")


def test_hidden_width_576_to_1152(smollm2, tmp_path):
    (record,) = _grow_and_export(smollm2, tmp_path, [GrowthStep("width", {"d_model": 1152})])
    assert record["target_config"]["d_model"] == 1152 and 0 < record["preservation"]["max_rel"] <= 1e-6


def test_heads_9_to_18(smollm2, tmp_path):
    (record,) = _grow_and_export(smollm2, tmp_path, [GrowthStep("heads", {"n_heads": 18})])
    assert record["target_config"]["n_heads"] == 18 and record["preservation"]["max_rel"] <= 1e-6


def test_upcycle_to_8_experts_exports_as_mixtral(smollm2, tmp_path):
    (record,) = _grow_and_export(smollm2, tmp_path, [GrowthStep("upcycle", {"num_experts": 8, "k_expert": 2})])
    assert record["target_config"]["tiers"][0]["num_groups"] * record["target_config"]["tiers"][0]["experts_per_group"] == 8
    assert record["preservation"]["max_rel"] <= 1e-6


def test_ffn_width_1536_to_2048(smollm2, tmp_path):
    (record,) = _grow_and_export(smollm2, tmp_path, [GrowthStep("ffn_width", {"intermediate_size": 2048})])
    assert record["target_config"]["intermediate_size"] == 2048 and record["preservation"]["max_rel"] <= 1e-6


def test_two_step_recipe(smollm2, tmp_path):
    recipe = Recipe.from_dict({"steps": [{"method": "llama_pro", "target_layers": 32}, {"method": "heads", "n_heads": 18}]})
    records = _grow_and_export(smollm2, tmp_path, recipe.steps, tolerance=recipe.tolerance)
    assert records[0]["preservation"]["max_abs"] == 0.0 and records[0]["preservation"]["proved"] and not records[1]["preservation"]["proved"]
    assert records[1]["source_config"]["n_layers"] == 32
    assert read_manifest(smollm2[0])["num_params"] == records[0]["params_before"]
