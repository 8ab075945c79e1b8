"""GGUF import: synthetic files written with gguf.GGUFWriter (fast, always run) and the real
SmolLM2-135M Q4_1 file against transformers' own GGUF loader (when present).

The synthetic files hold the weights of a transformers model, permuted as llama.cpp's
converter permutes Q and K, so the imported model must reproduce that model's logits."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from lite_llm import CheckpointError, ConfigError
from lite_llm.checkpoint import load_checkpoint
from lite_llm.interop import import_gguf
from lite_llm.interop.gguf_import import unpermute_rotary

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")
from transformers import LlamaConfig, LlamaForCausalLM, MixtralConfig, MixtralForCausalLM  # noqa: E402

REAL_GGUF = Path(__file__).resolve().parents[2] / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
SHAPE = dict(vocab_size=83, hidden_size=48, intermediate_size=40, num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6, rope_theta=50000.0)


def llama_cpp_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf.py ``LlamaModel.permute``, verbatim in numpy."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _perturbed(model: torch.nn.Module) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "gate" in name:
                p.add_(torch.randn(p.shape, generator=gen) * 0.1)
    return model.eval()


def _classic_state(model: torch.nn.Module, tmp_path: Path) -> dict[str, np.ndarray]:
    """The model's weights in the on-disk (classic Mixtral) names, whatever the transformers version."""
    model.save_pretrained(tmp_path / "hf")
    return {k: v.float().numpy() for k, v in load_file(tmp_path / "hf" / "model.safetensors").items()}


def _write_gguf(path: Path, config, state: dict[str, np.ndarray], arch: str = "llama") -> None:
    """A GGUF file as llama.cpp's converter writes it (F32 tensors, Q and K permuted)."""
    h, kv = config.num_attention_heads, config.num_key_value_heads
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(h)
    writer.add_head_count_kv(kv)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(50000.0)
    writer.add_vocab_size(config.vocab_size)
    experts = getattr(config, "num_local_experts", 0)
    if experts:
        writer.add_expert_count(experts)
        writer.add_expert_used_count(config.num_experts_per_tok)
    tensors = {"token_embd.weight": state["model.embed_tokens.weight"], "output_norm.weight": state["model.norm.weight"]}
    if "lm_head.weight" in state:
        tensors["output.weight"] = state["lm_head.weight"]
    for i in range(config.num_hidden_layers):
        p, b = f"model.layers.{i}.", f"blk.{i}."
        tensors[b + "attn_norm.weight"] = state[p + "input_layernorm.weight"]
        tensors[b + "ffn_norm.weight"] = state[p + "post_attention_layernorm.weight"]
        tensors[b + "attn_q.weight"] = llama_cpp_permute(state[p + "self_attn.q_proj.weight"], h)
        tensors[b + "attn_k.weight"] = llama_cpp_permute(state[p + "self_attn.k_proj.weight"], kv)
        tensors[b + "attn_v.weight"] = state[p + "self_attn.v_proj.weight"]
        tensors[b + "attn_output.weight"] = state[p + "self_attn.o_proj.weight"]
        if experts:
            e = p + "block_sparse_moe."
            tensors[b + "ffn_gate_inp.weight"] = state[e + "gate.weight"]
            for ours, w in (("ffn_gate_exps", "w1"), ("ffn_up_exps", "w3"), ("ffn_down_exps", "w2")):
                tensors[b + ours + ".weight"] = np.stack([state[f"{e}experts.{j}.{w}.weight"] for j in range(experts)])
        else:
            for ours, theirs in (("ffn_gate", "gate_proj"), ("ffn_up", "up_proj"), ("ffn_down", "down_proj")):
                tensors[f"{b}{ours}.weight"] = state[f"{p}mlp.{theirs}.weight"]
    for name, array in tensors.items():
        writer.add_tensor(name, np.ascontiguousarray(array, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _max_diff(ours: torch.nn.Module, theirs: torch.nn.Module, vocab: int, length: int = 13) -> float:
    ids = torch.randint(0, vocab, (2, length), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return (ours.eval()(ids).logits - theirs.eval()(ids).logits).abs().max().item()


def test_unpermute_inverts_llama_cpp_permute():
    w = torch.randn(6 * 8, 5)
    permuted = torch.from_numpy(llama_cpp_permute(w.numpy(), 6).copy())
    assert not torch.equal(permuted, w)
    assert torch.equal(unpermute_rotary(permuted, 6), w)


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_synthetic_llama_gguf_matches_source_model(tied, tmp_path):
    torch.manual_seed(0)
    hf = _perturbed(LlamaForCausalLM(LlamaConfig(**SHAPE, tie_word_embeddings=tied)))
    _write_gguf(tmp_path / "m.gguf", hf.config, _classic_state(hf, tmp_path))
    loaded = load_checkpoint(import_gguf(tmp_path / "m.gguf", tmp_path / "ckpt"))
    cfg = loaded.config
    assert (cfg.vocab_size, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.tie_embeddings, cfg.rope_theta) == (83, 6, 2, 8, tied, 50000.0)
    assert loaded.tokenizer is None  # the synthetic file has no token list
    assert _max_diff(loaded.model, hf, 83) <= 1e-5


def test_synthetic_mixtral_gguf_matches_source_model(tmp_path):
    torch.manual_seed(1)
    hf = _perturbed(MixtralForCausalLM(MixtralConfig(**SHAPE, num_local_experts=4, num_experts_per_tok=2, tie_word_embeddings=False)))
    _write_gguf(tmp_path / "m.gguf", hf.config, _classic_state(hf, tmp_path))
    loaded = load_checkpoint(import_gguf(tmp_path / "m.gguf", tmp_path / "ckpt"))
    assert loaded.config.tiers[0].num_experts == 4 and loaded.config.routing.k_expert == 2
    assert _max_diff(loaded.model, hf, 83) <= 1e-5


def test_gguf_errors_leave_nothing(tmp_path):
    hf = LlamaForCausalLM(LlamaConfig(**SHAPE)).eval()
    (tmp_path / "src").mkdir()
    _write_gguf(tmp_path / "src" / "gpt2.gguf", hf.config, _classic_state(hf, tmp_path / "src"), arch="gpt2")
    with pytest.raises(ConfigError, match="cannot import GGUF architecture 'gpt2' from .*; supported architectures are llama"):
        import_gguf(tmp_path / "src" / "gpt2.gguf", tmp_path / "ckpt")
    (tmp_path / "src" / "junk.gguf").write_bytes(b"GGUF" + bytes(range(200)))
    with pytest.raises(CheckpointError, match="cannot be read as a GGUF file") as info:
        import_gguf(tmp_path / "src" / "junk.gguf", tmp_path / "ckpt")
    assert "\n" not in str(info.value)
    with pytest.raises(CheckpointError, match="does not exist"):
        import_gguf(tmp_path / "src" / "absent.gguf", tmp_path / "ckpt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


@pytest.mark.realmodel
@pytest.mark.skipif(not REAL_GGUF.exists(), reason=f"{REAL_GGUF} is absent; run `make fetch-smollm2` to fetch it")
def test_smollm2_gguf_import_matches_transformers(tmp_path):
    pytest.importorskip("accelerate", reason="transformers needs accelerate to load GGUF files")
    loaded = load_checkpoint(import_gguf(REAL_GGUF, tmp_path / "ckpt"))
    assert (loaded.config.d_model, loaded.config.n_layers, loaded.config.n_kv_heads, loaded.config.tie_embeddings) == (576, 30, 3, True)
    hf = transformers.AutoModelForCausalLM.from_pretrained(REAL_GGUF.parent, gguf_file=REAL_GGUF.name, dtype=torch.float32)
    assert _max_diff(loaded.model, hf, loaded.config.vocab_size, length=24) <= 1e-4
    hf_tok = transformers.AutoTokenizer.from_pretrained(REAL_GGUF.parent, gguf_file=REAL_GGUF.name)
    text = "Hello world! The quick brown fox, 1234 — naïve café.\n  def f(x): return x"
    assert loaded.tokenizer is not None, "transformers is installed, so the tokenizer should have been converted"
    assert loaded.tokenizer.encode(text) == hf_tok.encode(text, add_special_tokens=False)
