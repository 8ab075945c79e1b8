"""The name and shape of every tensor a model of a config holds, computed from the config.

Checkpoint checks, growth planning and streaming writers need the shapes of models that are
never built (a 7B target, a model larger than memory).  Building one on the meta device
works but costs seconds (it imports ``torch._dynamo``); this table costs microseconds.  It
must agree with the modules exactly — tests compare it with ``LiteLLM(config).state_dict()``
over many shapes — and lists names in ``state_dict`` order.
"""

from __future__ import annotations

from ..config import ModelConfig


def tensor_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """name -> shape of every state-dict tensor (``lm_head.weight`` included even when tied)."""
    d, hd = config.d_model, config.head_dim
    q, kv = config.n_heads * hd, config.n_kv_heads * hd
    shapes: dict[str, tuple[int, ...]] = {"embed.weight": (config.vocab_size, d)}
    for i in range(config.n_layers):
        p = f"layers.{i}."
        shapes[p + "attn_norm.weight"] = (d,)
        for proj, out in (("q_proj", q), ("k_proj", kv), ("v_proj", kv)):
            shapes[p + f"attn.{proj}.weight"] = (out, d)
            if config.attention_bias:
                shapes[p + f"attn.{proj}.bias"] = (out,)
        shapes[p + "attn.o_proj.weight"] = (d, q)
        shapes[p + "ffn_norm.weight"] = (d,)
        if config.is_moe_layer(i):
            for t in config.tiers:
                h = p + f"ffn.router.heads.{t.name}."
                g, e = t.num_groups, t.num_groups * t.experts_per_group
                shapes.update({h + "tier_gate": (1, d), h + "group_gate": (g, d), h + "expert_gate": (e, d)})
                shapes.update({h + "tier_bias": (1,), h + "group_bias": (g,), h + "expert_bias": (e,)})
            for t in config.tiers:
                x = p + f"ffn.experts.{t.name}."
                shapes[x + "gate_up_proj"] = (t.num_experts, 2 * t.expert_hidden, d)
                shapes[x + "down_proj"] = (t.num_experts, d, t.expert_hidden)
        else:
            shapes[p + "ffn.gate_proj.weight"] = (config.intermediate_size, d)
            shapes[p + "ffn.up_proj.weight"] = (config.intermediate_size, d)
            shapes[p + "ffn.down_proj.weight"] = (d, config.intermediate_size)
    shapes["norm.weight"] = (d,)
    shapes["lm_head.weight"] = (config.vocab_size, d)
    return shapes


_BUFFER_SUFFIXES = (".tier_bias", ".group_bias", ".expert_bias")  # the router's steering biases


def parameter_names(config: ModelConfig) -> list[str]:
    """The names ``LiteLLM(config).named_parameters()`` yields, in that order: every stored
    tensor except the router's bias buffers, and ``lm_head.weight`` only when untied."""
    names = [n for n in tensor_shapes(config) if not n.endswith(_BUFFER_SUFFIXES)]
    if config.tie_embeddings:
        names.remove("lm_head.weight")
    return names
