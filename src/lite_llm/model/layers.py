"""The dense building blocks: RMSNorm, rotary embeddings, grouped-query attention with a KV
cache, and the SwiGLU feed-forward.  Numerics follow Hugging Face's Llama so that the same
weights give the same logits (checked by the oracle tests)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig


class RMSNorm(nn.Module):
    """Root-mean-square norm, computed in fp32 for lower-precision inputs (fp64 stays fp64, so
    a model evaluated in fp64 — the growth checks — is fp64 throughout)."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.to(torch.promote_types(dtype, torch.float32))
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


def rope_tables(head_dim: int, theta: float, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables of shape (len(positions), head_dim) in fp32, halves duplicated (Llama layout)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=positions.device).float() / head_dim))
    freqs = positions.float()[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (B, H, S, D) queries or keys by the tables for their S positions."""
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return x * cos + _rotate_half(x) * sin


KV_ROOM = 256
"""Positions a KV cache holds past the prompt at first: a request that may run to the whole
context (a chat request without ``max_tokens``) would otherwise hold the whole context's
cache from its first token (377 MB for SmolLM2 in float32), most of it never written."""


class KVCache(nn.Module):
    """Keys and values of one attention layer, for incremental decoding, up to ``max_len``
    positions.

    ``reserve`` positions are allocated at first (all ``max_len`` when not given); a write
    past them grows the buffers to twice their length (at most ``max_len``), copying what is
    there, so the copies cost O(1) per position.  Attention reads ``[:end]`` either way, the
    same values, so growing changes no logit."""

    def __init__(
        self, batch: int, n_kv_heads: int, max_len: int, head_dim: int, dtype: torch.dtype,
        device: torch.device | None = None, reserve: int | None = None,
    ) -> None:
        super().__init__()
        self.max_len = max_len
        length = max_len if reserve is None else max(1, min(reserve, max_len))
        shape = (batch, n_kv_heads, length, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    @property
    def allocated(self) -> int:
        """Positions the buffers hold now (``max_len`` once grown to it)."""
        return self.k.shape[2]

    def update(self, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        end = start + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"the KV cache holds {self.max_len} positions but generation reached {end}; allocate a longer cache")
        if end > self.allocated:
            self._grow(min(self.max_len, max(end, 2 * self.allocated)))
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]

    def _grow(self, length: int) -> None:
        for name in ("k", "v"):
            old = getattr(self, name)
            new = old.new_zeros((*old.shape[:2], length, old.shape[3]))
            new[:, :, : old.shape[2]] = old
            setattr(self, name, new)


class Attention(nn.Module):
    """Grouped-query attention: query head h reads KV head h // (n_heads / n_kv_heads)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        d, hd = config.d_model, config.head_dim
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, hd
        self.q_proj = nn.Linear(d, config.n_heads * hd, bias=config.attention_bias)
        self.k_proj = nn.Linear(d, config.n_kv_heads * hd, bias=config.attention_bias)
        self.v_proj = nn.Linear(d, config.n_kv_heads * hd, bias=config.attention_bias)
        self.o_proj = nn.Linear(config.n_heads * hd, d, bias=False)
        self.kv_cache: KVCache | None = None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, start_pos: int | None = None) -> torch.Tensor:
        b, s, _ = x.shape
        # Head counts are read from the projections' outputs (-1), not the config: a tensor-
        # parallel copy (dist/tensor_parallel.py) holds only its share of the heads.
        q = self.q_proj(x).view(b, s, -1, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, s, -1, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, s, -1, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        mask, causal = None, True
        if start_pos is not None and self.kv_cache is not None:
            k, v = self.kv_cache.update(start_pos, k, v)
            if start_pos > 0:
                causal = False
                if s > 1:  # a chunk after a prefix: each query sees the prefix and its own past
                    q_pos = torch.arange(start_pos, start_pos + s, device=x.device)
                    mask = torch.arange(k.shape[2], device=x.device)[None, :] <= q_pos[:, None]
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=causal and s > 1, enable_gqa=self.n_kv_heads != self.n_heads
        )
        return self.o_proj(out.transpose(1, 2).reshape(b, s, -1))


class DenseFFN(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

    def __init__(self, d_model: int, hidden: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(d_model, hidden, bias=False)
        self.up_proj = nn.Linear(d_model, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
