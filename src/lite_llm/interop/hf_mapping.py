"""The one table between Lite LLM parameter names and Hugging Face Llama/Mixtral names.

Lite LLM's attention, norms and dense FFN use Llama's numerics and tensor layouts, and its
expert banks use the 3-D layout of transformers' ``MixtralExperts`` (``gate_up_proj`` (E, 2H, d)
with the gate half first, ``down_proj`` (E, d, H)), so the mapping is renaming only.  Import,
export and the oracle tests all go through these functions.
"""

from __future__ import annotations

import re
from typing import Any, Iterable, Mapping, TypeVar

import torch

from ..config import ModelConfig, RoutingConfig, TierConfig
from ..errors import ConfigError

_V = TypeVar("_V")

# (Lite LLM pattern, Hugging Face pattern); {i} is the layer index.
_DENSE_TABLE: list[tuple[str, str]] = [
    ("embed.weight", "model.embed_tokens.weight"),
    ("norm.weight", "model.norm.weight"),
    ("lm_head.weight", "lm_head.weight"),
    ("layers.{i}.attn_norm.weight", "model.layers.{i}.input_layernorm.weight"),
    ("layers.{i}.ffn_norm.weight", "model.layers.{i}.post_attention_layernorm.weight"),
    ("layers.{i}.attn.q_proj.weight", "model.layers.{i}.self_attn.q_proj.weight"),
    ("layers.{i}.attn.k_proj.weight", "model.layers.{i}.self_attn.k_proj.weight"),
    ("layers.{i}.attn.v_proj.weight", "model.layers.{i}.self_attn.v_proj.weight"),
    ("layers.{i}.attn.o_proj.weight", "model.layers.{i}.self_attn.o_proj.weight"),
    ("layers.{i}.attn.q_proj.bias", "model.layers.{i}.self_attn.q_proj.bias"),
    ("layers.{i}.attn.k_proj.bias", "model.layers.{i}.self_attn.k_proj.bias"),
    ("layers.{i}.attn.v_proj.bias", "model.layers.{i}.self_attn.v_proj.bias"),
    ("layers.{i}.ffn.gate_proj.weight", "model.layers.{i}.mlp.gate_proj.weight"),
    ("layers.{i}.ffn.up_proj.weight", "model.layers.{i}.mlp.up_proj.weight"),
    ("layers.{i}.ffn.down_proj.weight", "model.layers.{i}.mlp.down_proj.weight"),
]


def _moe_table(tier: str) -> list[tuple[str, str]]:
    return [
        ("layers.{i}.ffn.router.heads.%s.expert_gate" % tier, "model.layers.{i}.mlp.gate.weight"),
        ("layers.{i}.ffn.experts.%s.gate_up_proj" % tier, "model.layers.{i}.mlp.experts.gate_up_proj"),
        ("layers.{i}.ffn.experts.%s.down_proj" % tier, "model.layers.{i}.mlp.experts.down_proj"),
    ]


def _compile(table: list[tuple[str, str]], reverse: bool) -> list[tuple[re.Pattern[str], str]]:
    rules = []
    for ours, theirs in table:
        src, dst = (theirs, ours) if reverse else (ours, theirs)
        pattern = re.escape(src).replace(r"\{i\}", r"(?P<i>\d+)")
        rules.append((re.compile(f"^{pattern}$"), dst))
    return rules


def _rename(state: Mapping[str, _V], rules: list[tuple[re.Pattern[str], str]]) -> tuple[dict[str, _V], list[str]]:
    out, unmapped = {}, []
    for name, tensor in state.items():
        for pattern, target in rules:
            match = pattern.match(name)
            if match:
                out[target.replace("{i}", match.groupdict().get("i") or "")] = tensor
                break
        else:
            unmapped.append(name)
    return out, unmapped


def _table(config: ModelConfig) -> list[tuple[str, str]]:
    table = list(_DENSE_TABLE)
    if config.is_moe:
        table += _moe_table(_check_single_tier(config))
    return table


def hf_names_to_lite(hf_names: Iterable[str], config: ModelConfig) -> tuple[dict[str, str], list[str]]:
    """Lite LLM name -> Hugging Face name for each of ``hf_names`` (the fused Mixtral layout
    for experts), and the names that map to nothing.

    Works on names alone, so an importer can plan a conversion before reading any tensor.
    """
    return _rename({n: n for n in hf_names}, _compile(_table(config), reverse=True))


def lite_names_to_hf(names: Iterable[str], config: ModelConfig) -> dict[str, str]:
    """Lite LLM name -> Hugging Face name (fused Mixtral layout for experts) for each of
    ``names`` that has one; router parts with no Hugging Face counterpart are left out."""
    renamed, _ = _rename({n: n for n in names}, _compile(_table(config), reverse=False))
    return {ours: theirs for theirs, ours in renamed.items()}


# Router state Lite LLM has and Mixtral (or a GGUF MoE) does not: with one tier of one group
# the tier and group probabilities are 1 whatever these hold, so zeros are exact on import.
ROUTER_ONLY_STATE = re.compile(r"^layers\.\d+\.ffn\.router\.heads\.[a-z0-9_]+\.(tier_gate|group_gate|tier_bias|group_bias|expert_bias)$")

# Mixtral's on-disk expert layouts.  Classic (the Hub's checkpoints, and what transformers'
# ``save_pretrained`` still writes): ``model.layers.{i}.block_sparse_moe.`` holding ``gate.weight``
# and ``experts.{j}.w1/w2/w3.weight`` (w1 = gate, w3 = up, w2 = down, each (out, in)).  Fused
# (transformers 5 in memory, the table above): ``model.layers.{i}.mlp.`` holding ``gate.weight``
# and ``experts.gate_up_proj`` (E, 2H, d) / ``experts.down_proj`` (E, d, H).
MIXTRAL_CLASSIC_EXPERT = re.compile(r"^model\.layers\.(?P<i>\d+)\.(?:block_sparse_moe|mlp)\.experts\.(?P<j>\d+)\.(?P<w>w[123])\.weight$")
MIXTRAL_FUSED_EXPERTS = re.compile(r"^model\.layers\.(?P<i>\d+)\.mlp\.experts\.(?P<kind>gate_up_proj|down_proj)$")


def mixtral_classic_expert(layer: int | str, expert: int, w: str) -> str:
    """The classic name of expert ``expert``'s ``w`` (``w1``, ``w2`` or ``w3``) in ``layer``."""
    return f"model.layers.{layer}.block_sparse_moe.experts.{expert}.{w}.weight"


def mixtral_block_to_fused(name: str) -> str:
    """``...block_sparse_moe.X`` -> ``...mlp.X`` (the module's transformers 5 name)."""
    return name.replace(".block_sparse_moe.", ".mlp.")


def mixtral_block_to_classic(name: str) -> str:
    """``model.layers.{i}.mlp.X`` -> ``model.layers.{i}.block_sparse_moe.X``."""
    return name.replace(".mlp.", ".block_sparse_moe.")


def _check_single_tier(config: ModelConfig) -> str:
    if len(config.tiers) != 1 or config.tiers[0].num_groups != 1:
        raise ConfigError(
            "only a model with one tier of one group maps onto Mixtral; export multi-tier models with their own modelling code"
        )
    if config.moe_layers is not None and len(config.moe_layers) != config.n_layers:
        raise ConfigError("Mixtral has experts in every layer; this model mixes dense and MoE layers")
    return config.tiers[0].name


def to_hf_state_dict(state: Mapping[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """Rename a Lite LLM state dict to Hugging Face Llama (dense) or Mixtral (one tier, one group) names.

    Router tensors with no Mixtral counterpart (the tier and group gates of a single-tier,
    single-group model, which cannot change the routing) and bias buffers are dropped.
    """
    out, _ = _rename(state, _compile(_table(config), reverse=False))
    if config.tie_embeddings:
        out.pop("lm_head.weight", None)
    return out


def from_hf_state_dict(state: Mapping[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """Rename a Hugging Face Llama/Mistral/Qwen2/Mixtral state dict to Lite LLM names.

    Fills the parts Lite LLM has and Hugging Face does not: zero tier/group gates and bias
    buffers for Mixtral (one tier and one group: their probabilities are 1 whatever the
    weights), and ``lm_head`` from the embedding when embeddings are tied.
    """
    table = list(_DENSE_TABLE)
    tier = _check_single_tier(config) if config.is_moe else None
    if tier:
        table += _moe_table(tier)
    out, unmapped = _rename(state, _compile(table, reverse=True))
    unmapped = [n for n in unmapped if not n.endswith("rotary_emb.inv_freq")]
    if unmapped:
        raise ConfigError(f"cannot map Hugging Face tensor(s) {', '.join(unmapped[:3])}; is this a supported architecture?")
    if tier:
        d, e = config.d_model, config.tiers[0].num_experts
        for i in config.moe_layer_indices:
            prefix = f"layers.{i}.ffn.router.heads.{tier}."
            out[prefix + "tier_gate"] = torch.zeros(1, d)
            out[prefix + "group_gate"] = torch.zeros(1, d)
            out[prefix + "tier_bias"] = torch.zeros(1)
            out[prefix + "group_bias"] = torch.zeros(1)
            out[prefix + "expert_bias"] = torch.zeros(e)
    if config.tie_embeddings:
        out["lm_head.weight"] = out["embed.weight"]
    return out


def hf_config_dict(config: ModelConfig) -> dict[str, Any]:
    """The ``config.json`` fields of the Hugging Face model equivalent to ``config``."""
    common = {
        "vocab_size": config.vocab_size,
        "hidden_size": config.d_model,
        "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.n_kv_heads,
        "head_dim": config.head_dim,
        "rms_norm_eps": config.norm_eps,
        "rope_theta": config.rope_theta,
        "max_position_embeddings": config.max_seq_len,
        # transformers 5 reads rope_parameters, older versions rope_theta; both say the same.
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},
        "tie_word_embeddings": config.tie_embeddings,
        "hidden_act": "silu",
        "attention_bias": config.attention_bias,
        "torch_dtype": "float32",
    }
    if not config.is_moe and config.attention_bias:
        # Llama's attention_bias also adds an o_proj bias that Lite LLM does not have; Qwen2 has
        # exactly Lite LLM's q/k/v biases and is otherwise Llama.
        return {**common, "model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "intermediate_size": config.intermediate_size, "use_sliding_window": False}
    if not config.is_moe and config.d_model % config.n_heads:
        # A width growth keeps the heads and their size, so d_model need not divide into them;
        # transformers' LlamaConfig refuses that, Mistral (Llama with an optional sliding
        # window, left off here) takes head_dim as given.
        return {**common, "model_type": "mistral", "architectures": ["MistralForCausalLM"], "intermediate_size": config.intermediate_size, "sliding_window": None}
    if not config.is_moe:
        return {**common, "model_type": "llama", "architectures": ["LlamaForCausalLM"], "intermediate_size": config.intermediate_size, "mlp_bias": False}
    tier = config.tiers[0]
    _check_single_tier(config)
    if config.attention_bias:
        raise ConfigError("Mixtral has no attention bias; this model cannot be exported as Mixtral")
    return {
        **common,
        "model_type": "mixtral",
        "architectures": ["MixtralForCausalLM"],
        "intermediate_size": tier.expert_hidden,
        "num_local_experts": tier.num_experts,
        "num_experts_per_tok": config.k_expert_of(tier),
        "router_jitter_noise": 0.0,
        "output_router_logits": False,
    }


def _check_computable(model_type: str, get: Any) -> None:
    """Refuse config fields that change what the model computes in ways Lite LLM does not: the
    weights would still load (an activation has no tensor) or fail on a tensor named as if the
    config were wrong, so the reason must come from the config."""
    act = get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise ConfigError(f"this {model_type} model uses the {act!r} activation, but Lite LLM computes SwiGLU with silu; it cannot be imported")
    if get("mlp_bias", False):
        raise ConfigError(f"this {model_type} model has biases in its MLP (mlp_bias), which Lite LLM does not have; it cannot be imported")
    if model_type != "qwen2" and get("attention_bias", False):
        raise ConfigError(
            f"this {model_type} model has attention_bias, which also biases o_proj; Lite LLM has biases on q, k and v only (as Qwen2), so it cannot be imported"
        )


def config_from_hf(hf: Mapping[str, Any] | Any) -> ModelConfig:
    """A Lite LLM config from a Hugging Face Llama, Mistral, Qwen2 or Mixtral config."""
    get = (lambda k, default=None: hf.get(k, default)) if isinstance(hf, Mapping) else (lambda k, default=None: getattr(hf, k, default))
    model_type = get("model_type")
    if model_type not in ("llama", "mistral", "qwen2", "mixtral"):
        raise ConfigError(f"unsupported Hugging Face architecture {model_type!r}; supported: llama, mistral, qwen2, mixtral")
    # transformers 5 folds rope_theta into rope_parameters (alias rope_scaling) with rope_type "default".
    rope = get("rope_parameters") or get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default")) if isinstance(rope, Mapping) else "default"
    if rope_type != "default":
        raise ConfigError(f"RoPE scaling {rope_type!r} is not supported yet; only plain RoPE models can be imported")
    rope_theta = (rope.get("rope_theta") if isinstance(rope, Mapping) else None) or get("rope_theta", 10000.0) or 10000.0
    _check_computable(model_type, get)
    n_heads = get("num_attention_heads")
    d = get("hidden_size")
    fields: dict[str, Any] = dict(
        name=f"hf-{model_type}",
        vocab_size=get("vocab_size"),
        d_model=d,
        n_layers=get("num_hidden_layers"),
        n_heads=n_heads,
        n_kv_heads=get("num_key_value_heads") or n_heads,
        head_dim=get("head_dim") or d // n_heads,
        intermediate_size=get("intermediate_size"),
        rope_theta=float(rope_theta),
        norm_eps=float(get("rms_norm_eps", 1e-5)),
        max_seq_len=int(get("max_position_embeddings", 2048)),
        tie_embeddings=bool(get("tie_word_embeddings", False)),
        attention_bias=bool(get("attention_bias", model_type == "qwen2")),
    )
    if model_type == "mixtral":
        fields["tiers"] = [
            TierConfig("tier_0", num_groups=1, experts_per_group=get("num_local_experts"), expert_hidden=get("intermediate_size"))
        ]
        fields["routing"] = RoutingConfig(k_tier=1, k_group=1, k_expert=get("num_experts_per_tok"))
    return ModelConfig(**fields)
