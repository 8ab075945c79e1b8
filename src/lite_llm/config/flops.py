"""Training compute accounting.

Per token, forward + backward: ``6 * N_active`` for the weights (Kaplan et al.) plus
``12 * n_layers * seq_len * n_heads * head_dim`` for attention scores and mixing (the PaLM
appendix convention, which does not halve for the causal mask).  Embedding lookups are not
matmuls, so the embedding table is excluded from N_active here unless it is tied to the head.
"""

from __future__ import annotations

from .model import ModelConfig, TierSet


def flops_per_token(config: ModelConfig, seq_len: int, tierset: TierSet | str | None = None) -> int:
    active = config.num_active_params(tierset)
    if not config.tie_embeddings:
        active -= config.vocab_size * config.d_model  # the input embedding is a lookup
    attention = 12 * config.n_layers * seq_len * config.n_heads * config.head_dim
    return 6 * active + attention
