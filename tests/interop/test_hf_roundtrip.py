"""Hugging Face folders in and out: import_hf and export_hf against transformers itself.

Every import is judged by transformers' logits for the folder it read, every export by
``AutoModelForCausalLM.from_pretrained`` of the folder it wrote (fp32, max abs <= 1e-5)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lite_llm import CheckpointError, ConfigError, ModelConfig, RoutingConfig, TierConfig, build_model
from lite_llm.checkpoint import load_checkpoint, save_checkpoint
from lite_llm.data.tokenizer import BPETokenizer
from lite_llm.interop import export_hf, hf_import, import_hf

transformers = pytest.importorskip("transformers")
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

VOCAB = 101
SHAPE = dict(vocab_size=VOCAB, hidden_size=48, intermediate_size=40, num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-6)
TEXT = "the quick brown fox jumps over the lazy dog; naïve café, 1234!"


def _ids(vocab: int = VOCAB) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 13), generator=torch.Generator().manual_seed(0))


def _perturb(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Move norms, biases and gates off their initial values (ones, zeros) so that a swapped
    or dropped one cannot hide."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "bias" in name or "gate" in name:
                p.add_(torch.randn(p.shape, generator=gen) * 0.1)
    return model.eval()


def _max_diff(ours: torch.nn.Module, theirs: torch.nn.Module, vocab: int = VOCAB) -> float:
    ids = _ids(vocab)
    with torch.no_grad():
        return (ours.eval()(ids).logits - theirs.eval()(ids).logits).abs().max().item()


def _only(tmp_path: Path, *names: str) -> None:
    """Nothing but ``names`` in ``tmp_path``: no output folder, no temporary left behind."""
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names)


def _tiny_tokenizer() -> BPETokenizer:
    return BPETokenizer.train(texts=[TEXT * 20, "hello world " * 50], vocab_size=300, min_frequency=1)


# ------------------------------------------------------------------------------- import
HF_MODELS = {
    "llama-gqa-untied": lambda: LlamaForCausalLM(LlamaConfig(**SHAPE, tie_word_embeddings=False, rope_theta=50000.0)),
    "llama-tied": lambda: LlamaForCausalLM(LlamaConfig(**{**SHAPE, "num_key_value_heads": 6}, tie_word_embeddings=True)),
    "qwen2-bias": lambda: Qwen2ForCausalLM(Qwen2Config(**SHAPE, tie_word_embeddings=False)),
    "mistral": lambda: MistralForCausalLM(MistralConfig(**SHAPE, tie_word_embeddings=False)),
    "mixtral": lambda: MixtralForCausalLM(MixtralConfig(**SHAPE, num_local_experts=4, num_experts_per_tok=2, tie_word_embeddings=False)),
}


@pytest.mark.parametrize("kind", list(HF_MODELS))
def test_import_matches_transformers(kind, tmp_path):
    torch.manual_seed(0)
    hf = _perturb(HF_MODELS[kind]())
    # The untied Llama is saved in small shards to exercise model.safetensors.index.json.
    hf.save_pretrained(tmp_path / "hf", max_shard_size="20KB" if kind == "llama-gqa-untied" else "1GB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").exists() == (kind == "llama-gqa-untied")
    out = import_hf(tmp_path / "hf", tmp_path / "ckpt")
    loaded = load_checkpoint(out)
    assert loaded.config.tie_embeddings == hf.config.tie_word_embeddings
    # Lite LLM's MoE router also has a tier and a group gate (1 x d each) per layer.
    extra = 2 * 48 * loaded.config.n_layers if loaded.config.is_moe else 0
    assert loaded.model.num_params() == sum(p.numel() for p in hf.parameters()) + extra
    assert _max_diff(loaded.model, hf) <= 1e-5


def test_import_fused_mixtral_layout(tmp_path):
    """transformers 5's fused expert banks (mlp.experts.gate_up_proj / down_proj) import too."""
    torch.manual_seed(1)
    hf = _perturb(HF_MODELS["mixtral"]())
    hf.save_pretrained(tmp_path / "classic")
    classic = load_file(tmp_path / "classic" / "model.safetensors")
    fused = {}
    for name, t in classic.items():
        if ".experts." in name:
            continue
        fused[name.replace(".block_sparse_moe.", ".mlp.")] = t
    experts = range(hf.config.num_local_experts)
    for i in range(hf.config.num_hidden_layers):
        w = {(j, k): classic[f"model.layers.{i}.block_sparse_moe.experts.{j}.{k}.weight"] for j in experts for k in ("w1", "w2", "w3")}
        fused[f"model.layers.{i}.mlp.experts.gate_up_proj"] = torch.stack([torch.cat([w[j, "w1"], w[j, "w3"]]) for j in experts])
        fused[f"model.layers.{i}.mlp.experts.down_proj"] = torch.stack([w[j, "w2"] for j in experts])
    (tmp_path / "fused").mkdir()
    save_file(fused, tmp_path / "fused" / "model.safetensors")
    (tmp_path / "fused" / "config.json").write_text((tmp_path / "classic" / "config.json").read_text())
    loaded = load_checkpoint(import_hf(tmp_path / "fused", tmp_path / "ckpt"))
    assert _max_diff(loaded.model, hf) <= 1e-5


def test_import_sliding_window_clamps_context(tmp_path):
    hf = LlamaForCausalLM(LlamaConfig(**SHAPE)).eval()
    hf.save_pretrained(tmp_path / "hf")
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**cfg, "model_type": "mistral", "sliding_window": 64}))
    with pytest.warns(UserWarning, match="sliding-window attention over 64 tokens"):
        out = import_hf(tmp_path / "hf", tmp_path / "ckpt")
    assert load_checkpoint(out).config.max_seq_len == 64


def test_import_copies_tokenizer_and_casts(tmp_path):
    hf = LlamaForCausalLM(LlamaConfig(**SHAPE)).eval()
    hf.save_pretrained(tmp_path / "hf")
    tok = _tiny_tokenizer()
    tok.backend.save(str(tmp_path / "hf" / "tokenizer.json"))
    (tmp_path / "hf" / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>"}))
    loaded = load_checkpoint(import_hf(tmp_path / "hf", tmp_path / "ckpt", dtype=torch.bfloat16))
    assert loaded.model.embed.weight.dtype == torch.bfloat16
    assert loaded.tokenizer.encode(TEXT) == tok.encode(TEXT)
    assert (loaded.path / "tokenizer" / "tokenizer_config.json").is_file()


def _write_llama_folder(folder: Path, drop: str | None = None, extra: str | None = None) -> None:
    hf = LlamaForCausalLM(LlamaConfig(**SHAPE)).eval()
    hf.save_pretrained(folder)
    if drop or extra:
        state = load_file(folder / "model.safetensors")
        state.pop(drop, None)
        if extra:
            state[extra] = torch.zeros(3)
        save_file(state, folder / "model.safetensors")


@pytest.mark.parametrize(
    "case, error, message",
    [
        ("gpt2", ConfigError, "cannot import Hugging Face architecture 'gpt2' from .*; supported model types are llama, mistral, qwen2, mixtral"),
        ("no-config", ConfigError, "has no config.json; pass a Hugging Face model folder"),
        ("no-weights", CheckpointError, "has no model.safetensors or model.safetensors.index.json; download"),
        ("missing-tensor", CheckpointError, "lacks tensor model.layers.1.mlp.up_proj.weight that the model needs"),
        ("unmapped-tensor", ConfigError, "holds tensor\\(s\\) model.layers.0.mlp.extra.weight that a llama model"),
    ],
)
def test_import_errors_leave_nothing(case, error, message, tmp_path):
    src = tmp_path / "hf"
    if case == "missing-tensor":
        _write_llama_folder(src, drop="model.layers.1.mlp.up_proj.weight")
    elif case == "unmapped-tensor":
        _write_llama_folder(src, extra="model.layers.0.mlp.extra.weight")
    else:
        _write_llama_folder(src)
    if case == "gpt2":
        (src / "config.json").write_text(json.dumps({"model_type": "gpt2", "vocab_size": 50}))
    elif case == "no-config":
        (src / "config.json").unlink()
    elif case == "no-weights":
        (src / "model.safetensors").unlink()
    with pytest.raises(error, match=message) as info:
        import_hf(src, tmp_path / "ckpt")
    assert "\n" not in str(info.value)
    _only(tmp_path, "hf")


def test_import_failure_midway_leaves_nothing(tmp_path, monkeypatch):
    _write_llama_folder(tmp_path / "hf")
    real, calls = hf_import.HFWeights.__getitem__, []

    def failing(self, name):
        calls.append(name)
        if len(calls) == 5:
            raise OSError("disk went away")
        return real(self, name)

    monkeypatch.setattr(hf_import.HFWeights, "__getitem__", failing)
    with pytest.raises(OSError, match="disk went away"):
        import_hf(tmp_path / "hf", tmp_path / "ckpt")
    _only(tmp_path, "hf")


# ------------------------------------------------------------------------------- export
def _lite(cfg: ModelConfig, seed: int = 3) -> torch.nn.Module:
    return _perturb(build_model(cfg, seed=seed), seed)


DENSE = dict(vocab_size=VOCAB, d_model=48, n_layers=2, n_heads=6, n_kv_heads=2, intermediate_size=40, norm_eps=1e-6, rope_theta=50000.0, max_seq_len=256)
LITE_MODELS = {
    "dense-gqa-untied": (lambda: ModelConfig(**DENSE), "LlamaForCausalLM"),
    "dense-tied-bias": (lambda: ModelConfig(**{**DENSE, "tie_embeddings": True, "attention_bias": True}), "Qwen2ForCausalLM"),
    "moe-single-tier": (
        lambda: ModelConfig(
            **DENSE,
            tiers=[TierConfig("tier_0", num_groups=1, experts_per_group=4, expert_hidden=24)],
            routing=RoutingConfig(k_expert=2, expert_temperature=0.7),
        ),
        "MixtralForCausalLM",
    ),
}


@pytest.mark.parametrize("kind", list(LITE_MODELS))
def test_export_loads_in_transformers(kind, tmp_path):
    make_config, architecture = LITE_MODELS[kind]
    ours = _lite(make_config())
    save_checkpoint(tmp_path / "ckpt", ours)
    # The dense model is written in small shards to exercise the index.
    shard = 20_000 if kind == "dense-gqa-untied" else 5 * 1024**3
    out = export_hf(tmp_path / "ckpt", tmp_path / "hf", max_shard_bytes=shard)
    files = {p.name for p in out.iterdir()}
    assert {"config.json", "generation_config.json"} <= files
    assert ("model.safetensors.index.json" in files) == (kind == "dense-gqa-untied")
    assert json.loads((out / "config.json").read_text())["architectures"] == [architecture]
    theirs = AutoModelForCausalLM.from_pretrained(out)
    assert type(theirs).__name__ == architecture
    assert sum(p.numel() for p in theirs.parameters()) == ours.num_params() - (ours.config.n_layers * 48 * 2 if ours.config.is_moe else 0)
    assert _max_diff(ours, theirs) <= 1e-5


def test_export_writes_classic_mixtral_layout(tmp_path):
    make_config, _ = LITE_MODELS["moe-single-tier"]
    save_checkpoint(tmp_path / "ckpt", _lite(make_config()))
    names = set(load_file(export_hf(tmp_path / "ckpt", tmp_path / "hf") / "model.safetensors"))
    assert "model.layers.1.block_sparse_moe.experts.3.w2.weight" in names
    assert "model.layers.0.block_sparse_moe.gate.weight" in names
    assert not any("gate_up_proj" in n for n in names)


def test_export_import_round_trip_with_tokenizer(tmp_path):
    ours = _lite(ModelConfig(**DENSE))
    tok = _tiny_tokenizer()
    save_checkpoint(tmp_path / "ckpt", ours, tokenizer=tok)
    out = export_hf(tmp_path / "ckpt", tmp_path / "hf", dtype=torch.float64)
    assert json.loads((out / "config.json").read_text())["dtype"] == "float64"
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == tok.eos_id
    hf_tok = AutoTokenizer.from_pretrained(out)
    assert hf_tok.encode(TEXT, add_special_tokens=False) == tok.encode(TEXT)
    back = load_checkpoint(import_hf(out, tmp_path / "back", dtype=torch.float32))
    assert back.tokenizer.encode(TEXT) == tok.encode(TEXT)
    for name, tensor in ours.state_dict().items():
        assert torch.equal(back.model.state_dict()[name], tensor), name


def _two_tiers() -> ModelConfig:
    return ModelConfig(**DENSE, tiers=[TierConfig("tier_a", 1, 2, 16), TierConfig("tier_b", 1, 2, 16)])


@pytest.mark.parametrize(
    "make_config, message",
    [
        (_two_tiers, "export supports dense \\(Llama\\) and single-tier single-group MoE \\(Mixtral\\) models; this model has tiers tier_a, tier_b"),
        (lambda: ModelConfig(**DENSE, tiers=[TierConfig("tier_0", 2, 2, 16)]), "tier tier_0 has 2 expert groups"),
        (lambda: ModelConfig(**DENSE, tiers=[TierConfig("tier_0", 1, 2, 16)], moe_layers=[1]), "experts in layer\\(s\\) 1 only and dense FFNs elsewhere"),
    ],
    ids=["two-tiers", "two-groups", "mixed-layers"],
)
def test_export_refuses_unrepresentable_models(make_config, message, tmp_path):
    save_checkpoint(tmp_path / "ckpt", build_model(make_config(), seed=0))
    with pytest.raises(ConfigError, match=message) as info:
        export_hf(tmp_path / "ckpt", tmp_path / "hf")
    assert "\n" not in str(info.value) and "keep it in the Lite LLM format" in str(info.value)
    _only(tmp_path, "ckpt")


def test_export_refuses_curriculum_bias_and_nonempty_target(tmp_path):
    model = build_model(LITE_MODELS["moe-single-tier"][0](), seed=0)
    model.state_dict()["layers.1.ffn.router.heads.tier_0.expert_bias"][2] = -30.0
    save_checkpoint(tmp_path / "ckpt", model)
    with pytest.raises(ConfigError, match="layer 1's router has a non-zero expert_bias"):
        export_hf(tmp_path / "ckpt", tmp_path / "hf")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="already exists and is not empty; pass --overwrite"):
        export_hf(tmp_path / "ckpt", tmp_path / "taken")
    _only(tmp_path, "ckpt", "taken")
