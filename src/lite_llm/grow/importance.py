"""Layer importance measured on sample data: how much each block changes the hidden state.

The score of block i is ``1 - mean cos(h_in, h_out)`` over sample tokens (ShortGPT's "block
influence"): a block that barely turns the residual stream scores near zero.  Depth growth
can place new blocks after the most important ones (``llama_pro`` with ``importance=``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..model import LiteLLM


@torch.no_grad()
def layer_importance(model: LiteLLM, input_ids: torch.Tensor) -> list[float]:
    """One score per block for ``input_ids`` (B, S)."""
    scores: list[float] = []

    def hook(module, args, output):  # noqa: ANN001 - torch hook signature
        h_in, h_out = args[0].float(), output[0].float()
        scores.append(float(1.0 - F.cosine_similarity(h_in, h_out, dim=-1).mean()))

    handles = [block.register_forward_hook(hook) for block in model.layers]
    try:
        model.eval()
        model(input_ids)
    finally:
        for h in handles:
            h.remove()
    return scores
