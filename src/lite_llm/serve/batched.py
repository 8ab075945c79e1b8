"""One decode step for many sequences at once, each at its own position with its own KV cache
and TierSet — the arithmetic of continuous batching.

What it guarantees: the logits of row i are bitwise those that ``generate_ids`` computes for
that sequence alone (a one-token forward of a batch of one through its KV cache).  How:

* every matrix product runs under :func:`~lite_llm.model.rowwise.row_invariant`, so the
  projections, router gates, experts and LM head compute each row as a one-row product (on CPU
  a batched ``F.linear`` rounds rows differently from a lone row; see that module);
* attention runs per row, over that row's own cache (rows have different lengths; no padding,
  no mask), with RoPE at the row's own position, through the same ``scaled_dot_product_attention``
  call a lone sequence makes;
* the router takes a per-row tier mask (N, T), which routes a row bitwise as its own (T,) mask;
* everything else is elementwise or a reduction along a row (norms, softmax, top-k), which do
  not mix rows.  One caveat, stated rather than hidden: an elementwise op with a transcendental
  (SiLU's ``exp``) over a contiguous (N, H) tensor may take the vector path for elements a lone
  row computes in the scalar tail, when H is not a multiple of the SIMD width (16 floats on
  AVX512).  Every preset's widths are multiples of 16; the tests check equality on a model with
  unaligned widths too.

Checked by ``tests/serve/test_batched.py`` (greedy and seeded sampling, mixed TierSets, rows
joining and leaving) against ``generate_ids`` token for token.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import torch
import torch.nn.functional as F

from ..model.layers import KV_ROOM, KVCache, apply_rope, rope_tables
from ..model.moe import TieredMoE
from ..model.rowwise import linear, row_invariant

if TYPE_CHECKING:
    from ..model import LiteLLM


def new_row_cache(model: "LiteLLM", prompt_len: int, max_len: int) -> list[KVCache]:
    """One sequence's KV cache: a batch-of-one cache of up to ``max_len`` positions per layer,
    ``KV_ROOM`` past the prompt at first, as ``generate_ids`` allocates it."""
    cfg = model.config
    dtype, device = model.embed.weight.dtype, model.embed.weight.device
    return [KVCache(1, cfg.n_kv_heads, max_len, cfg.head_dim, dtype, device, reserve=prompt_len + KV_ROOM) for _ in model.layers]


@torch.no_grad()
def prefill(
    model: "LiteLLM", prompt_ids: Sequence[int], cache: list[KVCache], tierset, *, every_position: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run one sequence's prompt through the model into ``cache``: the call ``generate_ids``
    makes, so its last logits (V,) are bitwise the same.  Returns (logits, tier routes (T,));
    with ``every_position`` the logits of every prompt position (S, V), the last row those."""
    device = model.embed.weight.device
    for block, layer_cache in zip(model.layers, cache):
        block.attn.kv_cache = layer_cache
    try:
        out = model(torch.tensor([list(prompt_ids)], device=device), tierset=tierset, start_pos=0)
    finally:
        for block in model.layers:
            block.attn.kv_cache = None
    routes = sum((r.tier_routes for r in out.routing), torch.zeros(len(model.config.tiers), dtype=torch.long))
    return (out.logits[0] if every_position else out.logits[0, -1]), routes


@torch.no_grad()
def decode_step(
    model: "LiteLLM", tokens: Sequence[int], positions: Sequence[int], caches: Sequence[list[KVCache]], allowed: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Feed token ``tokens[i]`` at position ``positions[i]`` of sequence i (its cache
    ``caches[i]``, its tiers ``allowed[i]``); returns the next-token logits (N, V) and the routes
    each tier received in this step (T,).  See the module docstring for what makes row i equal
    to a lone sequence's step."""
    cfg = model.config
    n = len(tokens)
    device = model.embed.weight.device
    heads, kv_heads, hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    tier_routes = torch.zeros(len(cfg.tiers), dtype=torch.long)
    tables = [rope_tables(hd, cfg.rope_theta, torch.arange(p, p + 1, device=device)) for p in positions]
    cos = torch.stack([c for c, _ in tables])[:, None]  # (N, 1, 1, hd): row i at its own position
    sin = torch.stack([s for _, s in tables])[:, None]
    with row_invariant():
        x = model.embed(torch.tensor(list(tokens), device=device))  # (N, d)
        for layer, block in enumerate(model.layers):
            attn = block.attn
            a = block.attn_norm(x)
            q = linear(a, attn.q_proj.weight, attn.q_proj.bias).view(n, 1, heads, hd).transpose(1, 2)
            k = linear(a, attn.k_proj.weight, attn.k_proj.bias).view(n, 1, kv_heads, hd).transpose(1, 2)
            v = linear(a, attn.v_proj.weight, attn.v_proj.bias).view(n, 1, kv_heads, hd).transpose(1, 2)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            rows = []
            for i in range(n):
                keys, values = caches[i][layer].update(positions[i], k[i : i + 1], v[i : i + 1])
                rows.append(F.scaled_dot_product_attention(q[i : i + 1], keys, values, enable_gqa=kv_heads != heads))
            out = torch.cat(rows).transpose(1, 2).reshape(n, heads * hd)
            h = x + linear(out, attn.o_proj.weight)
            f = block.ffn_norm(h)
            if isinstance(block.ffn, TieredMoE):
                moe_out, routes = block.ffn(f, allowed)
                tier_routes += routes.tier_counts(block.ffn.tier_offsets).cpu()
                x = h + moe_out
            else:
                ffn = block.ffn
                x = h + linear(F.silu(linear(f, ffn.gate_proj.weight)) * linear(f, ffn.up_proj.weight), ffn.down_proj.weight)
            _run_forward_hooks(block, x)
        logits = linear(model.norm(x), model.lm_head.weight)
    return logits, tier_routes


def _run_forward_hooks(block: torch.nn.Module, x: torch.Tensor) -> None:
    """Call the block's forward hooks as ``block(...)`` would after computing ``x`` (N, d): this
    step computes the block by hand, and what is attached from outside through hooks (the
    expert store's :class:`~lite_llm.store.prefetch.Prefetcher`, which guesses the next layer's
    experts from this block's output) must still hear of it.  The output is given in the
    block's own shape, (N, 1, d) as a batch of one-token rows, first in a tuple."""
    hooks = block._forward_hooks
    if not hooks:
        return
    rows = x.unsqueeze(1)
    for hook_id, hook in list(hooks.items()):
        if hook_id not in block._forward_hooks_with_kwargs:
            hook(block, (rows,), (rows,))
