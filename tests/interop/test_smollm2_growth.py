"""Growth on a real pretrained model: SmolLM2-135M-Instruct (GGUF) imported, grown by
LLaMA-Pro (30 -> 36 layers), by hidden width (576 -> 1152) and by upcycling to 8 experts —
each preserving its logits — then exported and reloaded by transformers.

The import itself is checked against transformers loading the same GGUF in
test_gguf_import.py.  Without the file (``make fetch-smollm2``) these tests skip."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lite_llm.checkpoint import load_checkpoint
from lite_llm.grow.expand import expand_checkpoint
from lite_llm.grow.recipe import GrowthStep
from lite_llm.interop import export_hf, import_gguf

GGUF = Path(__file__).resolve().parents[2] / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"

pytestmark = [
    pytest.mark.realmodel,
    pytest.mark.skipif(not GGUF.exists(), reason=f"{GGUF} is absent; run `make fetch-smollm2` to fetch it"),
]


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    path = import_gguf(GGUF, tmp_path_factory.mktemp("smollm2") / "ckpt")
    loaded = load_checkpoint(path)
    ids = torch.tensor([loaded.tokenizer.encode("The capital of France is Paris. def add(a, b):\n    return a + b")[:24]])
    with torch.no_grad():
        logits = loaded.model(ids).logits
    return path, ids, logits


def _grow(smollm2, tmp_path, step: GrowthStep):
    path, ids, reference = smollm2
    result = expand_checkpoint(path, tmp_path / step.method, [step], validate="never")
    grown = load_checkpoint(result.path)
    with torch.no_grad():
        diff = float((grown.model(ids).logits - reference).abs().max())
    return grown, diff


def _transformers_logits(folder: Path, ids: torch.Tensor) -> torch.Tensor:
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return hf(ids).logits


def test_llama_pro_30_to_36_is_exact_and_exports(smollm2, tmp_path):
    grown, diff = _grow(smollm2, tmp_path, GrowthStep("llama_pro", {"target_layers": 36}))
    assert grown.config.n_layers == 36 and diff == 0.0
    folder = export_hf(grown.path, tmp_path / "hf")
    assert float((_transformers_logits(folder, smollm2[1]) - smollm2[2]).abs().max()) <= 1e-4


def test_hidden_width_576_to_1152_preserves_logits(smollm2, tmp_path):
    grown, diff = _grow(smollm2, tmp_path, GrowthStep("width", {"d_model": 1152}))
    assert grown.config.d_model == 1152 and grown.config.tie_embeddings
    assert diff <= 1e-4  # logits of magnitude ~20 over 30 layers in fp32


def test_upcycle_to_8_experts_preserves_logits_and_exports_as_mixtral(smollm2, tmp_path):
    grown, diff = _grow(smollm2, tmp_path, GrowthStep("upcycle", {"num_experts": 8, "k_expert": 2}))
    assert grown.config.tiers[0].num_experts == 8 and diff <= 1e-4
    folder = export_hf(grown.path, tmp_path / "hf")
    assert "mixtral" in (folder / "config.json").read_text()
    assert float((_transformers_logits(folder, smollm2[1]) - smollm2[2]).abs().max()) <= 1e-4
