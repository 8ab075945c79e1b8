"""A real pretrained model: SmolLM2-135M-Instruct (Llama architecture, GGUF Q4_1).

transformers dequantises the GGUF; our model, given the same weights through the shared name
mapping, must reproduce transformers' logits.  `make fetch-smollm2` downloads the file (CI
does); without it the test is skipped and says why."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lite_llm import build_model
from lite_llm.interop import config_from_hf, from_hf_state_dict

GGUF = Path(__file__).resolve().parents[2] / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"

pytestmark = [
    pytest.mark.realmodel,
    pytest.mark.skipif(not GGUF.exists(), reason=f"{GGUF} is absent; run `make fetch-smollm2` to fetch it"),
]


def test_smollm2_logits_match_transformers():
    pytest.importorskip("accelerate", reason="transformers needs accelerate to load GGUF files")
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoModelForCausalLM.from_pretrained(GGUF.parent, gguf_file=GGUF.name, dtype=torch.float32).eval()
    cfg = config_from_hf(hf.config)
    assert (cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.tie_embeddings) == (576, 30, 9, 3, True)
    ours = build_model(cfg).eval()
    ours.load_state_dict(from_hf_state_dict(hf.state_dict(), cfg))
    assert ours.num_params() == cfg.num_params() == sum(p.numel() for p in hf.parameters())
    ids = torch.randint(0, cfg.vocab_size, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = ours(ids).logits, hf(ids).logits
    assert (a - b).abs().max().item() <= 1e-4
