"""The decoder: embeddings, pre-norm blocks (attention + dense or tiered-MoE FFN), LM head.

``model(input_ids, tierset=..., labels=...)`` returns a :class:`ModelOutput` with logits, the
training loss (LM + load balance + z-loss), its parts, and per-layer routing statistics.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig, TierSet
from ..errors import ConfigError, PromptError
from .layers import Attention, DenseFFN, KVCache, RMSNorm, rope_tables
from .moe import TieredMoE
from .router import Routes

IGNORE_INDEX = -100


@dataclass
class LayerRouting:
    """Routing statistics of one MoE block for one forward pass (detached)."""

    layer: int
    tier_probs: torch.Tensor  # (T,) batch-mean p(tier)
    tier_routes: torch.Tensor  # (T,) number of routes per tier
    expert_routes: torch.Tensor  # (E_total,) number of routes per flat expert
    routes: Routes | None = None  # the full decision, when asked for
    tier_weights: torch.Tensor | None = None  # (T,) batch-mean routing weight per tier (when training)


@dataclass
class ModelOutput:
    """What :meth:`LiteLLM.forward` returns: logits (B, S, V) and, with ``labels``, the loss
    ``lm_loss + balance_loss + z_loss`` (MoE) or ``lm_loss`` (dense) and its parts."""

    logits: torch.Tensor
    loss: torch.Tensor | None = None
    lm_loss: torch.Tensor | None = None
    balance_loss: torch.Tensor | None = None
    z_loss: torch.Tensor | None = None
    routing: list[LayerRouting] = field(default_factory=list)


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then h + ffn(norm(h))."""

    def __init__(self, config: ModelConfig, layer: int, expert_device: torch.device | str | None = None) -> None:
        super().__init__()
        self.layer = layer
        self.attn_norm = RMSNorm(config.d_model, config.norm_eps)
        self.attn = Attention(config)
        self.ffn_norm = RMSNorm(config.d_model, config.norm_eps)
        self.ffn: DenseFFN | TieredMoE = (
            TieredMoE(config, layer, expert_device) if config.is_moe_layer(layer) else DenseFFN(config.d_model, config.intermediate_size)
        )

    @property
    def is_moe(self) -> bool:
        return isinstance(self.ffn, TieredMoE)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, allowed: torch.Tensor | None, step: int | None, start_pos: int | None
    ) -> tuple[torch.Tensor, Routes | None]:
        h = x + self.attn(self.attn_norm(x), cos, sin, start_pos)
        if isinstance(self.ffn, TieredMoE):
            out, routes = self.ffn(self.ffn_norm(h), allowed, step)
            return h + out, routes
        return h + self.ffn(self.ffn_norm(h)), None


class LiteLLM(nn.Module):
    """A Llama-style decoder whose FFNs may be tiered mixtures of experts."""

    def __init__(self, config: ModelConfig, expert_device: torch.device | str | None = None) -> None:
        """``expert_device="meta"`` builds the expert banks without memory, for a model whose
        experts an expert source serves (``model/expert_source.py``)."""
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.layers = nn.ModuleList(Block(config, i, expert_device) for i in range(config.n_layers))
        self.norm = RMSNorm(config.d_model, config.norm_eps)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self._allowed_cache: dict[str, torch.Tensor] = {}

    # ------------------------------------------------------------------------------ set-up
    def reset_parameters(self, seed: int = 0) -> None:
        """Initialise every weight from a generator seeded by ``seed`` (independent of global RNG).

        Normal(0, init_std) for matrices, with the residual-writing projections (``o_proj``,
        ``down_proj``) scaled by 1/sqrt(2 * n_layers) as in GPT-2; norms at one; biases at zero.
        """
        cfg = self.config
        gen = torch.Generator().manual_seed(seed)
        residual_std = cfg.init_std / (2 * cfg.n_layers) ** 0.5
        with torch.no_grad():
            for name, p in self.named_parameters():
                if name.endswith("norm.weight"):
                    p.fill_(1.0)
                elif name.endswith(".bias"):
                    p.zero_()
                else:
                    std = residual_std if name.endswith(("o_proj.weight", "down_proj.weight", "down_proj")) else cfg.init_std
                    p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32) * std)

    def setup_kv_cache(self, batch: int, max_len: int, dtype: torch.dtype | None = None, reserve: int | None = None) -> None:
        """Give every layer a KV cache of up to ``max_len`` positions (for generation), of
        ``reserve`` positions at first (see :class:`KVCache`)."""
        dtype = dtype or self.embed.weight.dtype
        device = self.embed.weight.device
        cfg = self.config
        for block in self.layers:
            block.attn.kv_cache = KVCache(batch, cfg.n_kv_heads, max_len, cfg.head_dim, dtype, device, reserve)

    def clear_kv_cache(self) -> None:
        """Drop every layer's KV cache (back to full-sequence forwards)."""
        for block in self.layers:
            block.attn.kv_cache = None

    def allowed_tiers(self, tierset: TierSet | str | Iterable[str] | None) -> torch.Tensor:
        """Boolean mask (T,) of the tiers a TierSet allows in this model."""
        ts = TierSet.coerce(tierset)
        key = str(ts)
        if key not in self._allowed_cache:
            names = set(ts.resolve(self.config))
            mask = torch.tensor([t.name in names for t in self.config.tiers], dtype=torch.bool)
            self._allowed_cache[key] = mask
        return self._allowed_cache[key].to(self.embed.weight.device)

    def allowed_rows(self, tiersets: Sequence[TierSet | str | Iterable[str] | None]) -> torch.Tensor:
        """Boolean mask (N, T): row i allows the tiers of ``tiersets[i]`` — one TierSet per
        request when a server decodes several in one batch (the router masks per row)."""
        return torch.stack([self.allowed_tiers(t) for t in tiersets])

    # ------------------------------------------------------------------------------ forward
    def forward(
        self,
        input_ids: torch.Tensor,
        tierset: TierSet | str | Iterable[str] | None = None,
        labels: torch.Tensor | None = None,
        step: int | None = None,
        start_pos: int | None = None,
        return_routes: bool = False,
    ) -> ModelOutput:
        """Run the model on ``input_ids`` (B, S).

        ``labels`` (B, S) are the targets aligned with the inputs (shifted inside, -100 ignored).
        ``start_pos`` is the position of ``input_ids[:, 0]`` when decoding with a KV cache.
        ``step`` seeds the optional routing exploration noise.  Under ``torch.no_grad()`` the
        load-balance and z-losses are not computed (reported as 0): they only exist to train.
        ``lm_loss`` is the mean cross-entropy over the non-ignored targets, in fp32 (fp64 for an
        fp64 model).  Ids that are not integers, outside the vocabulary or past ``max_seq_len``
        raise :class:`PromptError`; a TierSet naming a tier the model lacks, :class:`TierSetError`.
        """
        cfg = self.config
        input_ids = _checked_ids(input_ids, "input_ids", cfg.vocab_size)
        b, s = input_ids.shape
        if start_pos is not None and not (isinstance(start_pos, int) and start_pos >= 0):
            raise PromptError(f"start_pos must be a non-negative integer (the position of input_ids[:, 0]), got {start_pos!r}")
        offset = start_pos or 0
        if offset + s > cfg.max_seq_len:
            raise PromptError(
                f"a sequence of {offset + s} positions exceeds this model's max_seq_len={cfg.max_seq_len}; give at most {cfg.max_seq_len} tokens"
            )
        if labels is not None:
            labels = _checked_ids(labels, "labels", cfg.vocab_size, like=input_ids)
        positions = torch.arange(offset, offset + s, device=input_ids.device)
        cos, sin = rope_tables(cfg.head_dim, cfg.rope_theta, positions)
        # resolved for a dense model too: a TierSet naming a tier it lacks is an error, not ignored
        allowed = self.allowed_tiers(tierset)
        if not cfg.is_moe:
            allowed = None

        x = self.embed(input_ids)
        routing: list[LayerRouting] = []
        balance = x.new_zeros((), dtype=torch.float32)
        z = x.new_zeros((), dtype=torch.float32)
        for block in self.layers:
            x, routes = block(x, cos, sin, allowed, step, start_pos)
            if routes is not None:
                balance = balance + routes.balance_loss
                z = z + routes.z_loss
                routing.append(
                    LayerRouting(
                        block.layer,
                        routes.tier_probs,
                        routes.tier_counts(block.ffn.tier_offsets),
                        routes.expert_counts,
                        routes if return_routes else None,
                        routes.tier_weights(block.ffn.tier_offsets) if torch.is_grad_enabled() else None,
                    )
                )
        logits = self.lm_head(self.norm(x))
        out = ModelOutput(logits=logits, routing=routing)
        if cfg.is_moe:
            out.balance_loss, out.z_loss = balance, z
        if labels is not None:
            # at least fp32 (bf16 logits would round the loss); an fp64 model keeps fp64
            shifted = logits[:, :-1].reshape(-1, logits.shape[-1])
            out.lm_loss = F.cross_entropy(
                shifted.to(torch.promote_types(shifted.dtype, torch.float32)), labels[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX
            )
            out.loss = out.lm_loss + balance + z if cfg.is_moe else out.lm_loss
        return out

    # ------------------------------------------------------------------------------ counting
    def num_params(self) -> int:
        """Parameters actually held (shared embedding counted once)."""
        return sum(p.numel() for p in self.parameters())


def _checked_ids(ids: torch.Tensor, what: str, vocab_size: int, like: torch.Tensor | None = None) -> torch.Tensor:
    """``ids`` as token ids (B, S) the embedding and the loss take, or one sentence saying why they cannot be: checked
    here because the embedding and the loss would fail deep inside torch (an IndexError, or a
    device-side assert on a GPU).  ``labels`` (``like`` given) must match the inputs' shape and
    may hold -100 (ignored)."""
    if not isinstance(ids, torch.Tensor):
        raise PromptError(f"{what} must be a torch.Tensor of token ids of shape (batch, seq), got {type(ids).__name__}")
    if ids.dtype == torch.bool or ids.is_floating_point() or ids.is_complex():
        raise PromptError(f"{what} must hold integer token ids (e.g. torch.long), got dtype {str(ids.dtype).removeprefix('torch.')}")
    if like is None and ids.dim() != 2:
        raise PromptError(f"{what} must be a (batch, seq) tensor, got shape {tuple(ids.shape)}; add a batch dimension with ids[None] or flatten the extra ones")
    if like is None and ids.numel() == 0:
        raise PromptError(f"{what} of shape {tuple(ids.shape)} holds no token; give at least one row of one token")
    if like is not None and ids.shape != like.shape:
        raise PromptError(f"{what} must have the shape of input_ids {tuple(like.shape)}, got {tuple(ids.shape)}")
    lo, hi = torch.stack(torch.aminmax(ids)).tolist()  # one pass, and one device sync on a GPU
    if lo < 0:
        bad = ids[ids < 0] if like is None else ids[(ids < 0) & (ids != IGNORE_INDEX)]
        if bad.numel():
            ignored = f" or {IGNORE_INDEX} (ignored)" if like is not None else ""
            raise PromptError(f"{what} hold {int(bad[0])}, but token ids must lie in [0, {vocab_size}){ignored}")
    if hi >= vocab_size:
        raise PromptError(f"{what} hold token id {hi}, outside this model's vocabulary of {vocab_size}; encode with the model's tokenizer")
    if like is None and ids.dtype in (torch.long, torch.int32):
        return ids  # what the embedding takes as it is
    return ids.long()  # the loss takes int64 targets only


def stored_state(model: LiteLLM) -> dict[str, torch.Tensor]:
    """The tensors a checkpoint stores: the state dict, detached, without ``lm_head.weight``
    when it is tied to the embedding (stored once, re-tied by :func:`load_stored`)."""
    state = {k: v.detach() for k, v in model.state_dict().items()}
    if model.config.tie_embeddings:
        state.pop("lm_head.weight", None)
    return state


def load_stored(model: LiteLLM, tensors: Mapping[str, torch.Tensor]) -> LiteLLM:
    """Put stored tensors (as :func:`stored_state` gives them) into ``model``: every name and
    shape checked, the tensors assigned as they are (dtypes kept), the tied head re-tied."""
    state = dict(tensors)
    if model.config.tie_embeddings:
        state["lm_head.weight"] = state["embed.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    if model.config.tie_embeddings:
        model.lm_head.weight = model.embed.weight
    return model


def build_model(
    config: ModelConfig, *, seed: int = 0, device: torch.device | str | None = None, dtype: torch.dtype | None = None
) -> LiteLLM:
    """Build and initialise a model for ``config`` — the one public way to get a model."""
    if not isinstance(config, ModelConfig):
        raise ConfigError(f"build_model needs a ModelConfig, got {type(config).__name__}; build one with ModelConfig(...) or ModelConfig.from_dict(...)")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ConfigError(f"build_model's seed must be a whole number >= 0, got {seed!r}")
    if isinstance(device, str):
        try:
            device = torch.device(device)
        except RuntimeError:  # torch's message lists two dozen device types
            raise ConfigError(f"build_model's device {device!r} is not a device; give 'cpu', 'cuda' or 'cuda:N'") from None
    if device is not None and device.type == "cuda" and not torch.cuda.is_available():  # torch would assert deep in torch.cuda
        raise ConfigError(f"build_model's device {str(device)!r} needs a CUDA GPU, and this torch sees none (torch {torch.__version__}); use 'cpu'")
    model = LiteLLM(config)
    model.reset_parameters(seed)
    if device is not None or dtype is not None:
        model = model.to(device=device, dtype=dtype)
    return model
