"""Hierarchical Sparse Expert Routing (HSER).

A token picks ``k_tier`` tiers, then ``k_group`` groups in each picked tier, then ``k_expert``
experts in each picked group.  The weight of an active expert is
``p(t) * p(g|t) * p(e|t,g)``, renormalised over the active set when configured.

Why it is built the way it is:

* Every tier owns its router heads (``heads[tier_name]``) so that a tier can be added, frozen
  or dropped without touching another tier's tensors.  A tier's three levels cost one matmul
  (its heads are concatenated), and tiers are kept apart so that a tier's logits are bitwise
  the same whichever other tiers exist (see :meth:`HSERRouter.gate_logits`).
* Tiers outside the TierSet are masked with ``-inf`` before the softmax: probability exactly
  zero, no gradient, never selected.
* Top-k is a *stable* sort: by score (descending), then by a seeded hash of (seed, layer,
  level, candidate), then by index.  Nothing depends on the token's place in the batch, so
  the same hidden state routes the same way in any batch, and exact ties are broken by the
  seed rather than by whatever the sort kernel happens to do.
* Routing reads only the hidden state and the router heads: it can run before any expert
  weight is present (the expert store prefetches from it).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ..config import ModelConfig
from .rowwise import linear

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def _fnv1a(text: str) -> int:
    h = 0xCBF29CE484222325
    for byte in text.encode():
        h = ((h ^ byte) * 0x100000001B3) & _MASK64
    return h


def seeded_hash(*parts: int | str) -> int:
    """A 64-bit hash of integers and strings that is the same on every machine and process
    (Python's ``hash`` of a string is salted per process, so it cannot be used)."""
    h = 0
    for part in parts:
        value = _fnv1a(part) if isinstance(part, str) else int(part) & _MASK64
        h = _splitmix64(h ^ value)
    return h


def tie_break_rank(keys: list[int]) -> list[int]:
    """Each candidate's position when ordered by hash key, then index: the order ties resolve in."""
    order = sorted(range(len(keys)), key=lambda i: (keys[i], i))
    rank = [0] * len(keys)
    for position, candidate in enumerate(order):
        rank[candidate] = position
    return rank


def stable_topk(scores: torch.Tensor, k: int, rank: torch.Tensor) -> torch.Tensor:
    """Indices of the ``k`` best candidates along the last dim; equal scores resolve by ``rank``.

    ``rank`` (broadcastable to ``scores``) gives each candidate's tie-break position (lower wins;
    all distinct).  ``torch.topk``'s choice among equal values is unspecified, so equal scores
    must never reach it undisambiguated.  Two ways, with identical results:

    * exact keys (any device): the fp32 score's bits as an order-preserving integer, times the
      candidate count, plus the inverted rank — one int64 ``topk`` with no ties left;
    * on CPU, first a plain ``topk`` of ``k + 1``: a row whose ``k + 1`` best scores are all
      distinct (every row of real logits, in practice) has a unique answer already, and only
      rows with a tie (or a NaN) go through the exact keys.  On CPU the check is free; on a GPU
      it would be a device sync per call, so the GPU always takes the keys (a few cheap ops).

    At N=4096, E=512 on CPU: 2.4 ms, against 13 ms for integer keys on every row and 27 ms for
    the fp64 keys used before (BENCHMARKS.md, dispatch, fifth round).
    """
    n = scores.shape[-1]
    if scores.dtype == torch.float64:  # an fp64 model's scores: fp32 keys would round them into ties
        return _topk_by_sort(scores, k, rank)
    if scores.device.type != "cpu" or k >= n:
        return _topk_by_exact_key(scores, k, rank)
    values, indices = torch.topk(scores.float(), k + 1, dim=-1, sorted=True)
    # topk puts NaNs first, so a row with any NaN has one in front
    tied = (values[..., 1:] == values[..., :-1]).any(-1) | values[..., 0].isnan()
    indices = indices[..., :k]
    if not bool(tied.any()):
        return indices
    indices = indices.clone()
    indices[tied] = _topk_by_exact_key(scores[tied], k, rank.expand_as(scores)[tied])
    return indices


def _topk_by_exact_key(scores: torch.Tensor, k: int, rank: torch.Tensor) -> torch.Tensor:
    """``stable_topk`` through integer keys: ``topk`` over ``order(score) * n + (n - 1 - rank)``.

    IEEE floats order like sign-magnitude integers, so ``+-(bits & 0x7fffffff)`` orders like
    the float itself (-0.0 and +0.0 both become 0, as they compare equal; -inf is the lowest).
    Every NaN, whatever its sign bit, gets one key above +inf: first, as ``torch.topk`` and
    ``torch.sort`` put NaNs, with ties among them broken by rank like any other.
    """
    s32 = scores.float()
    bits = s32.view(torch.int32)
    magnitude = bits & 0x7FFFFFFF
    ordered = torch.where(bits < 0, -magnitude, magnitude).long().masked_fill(s32.isnan(), 1 << 31)
    n = scores.shape[-1]
    keys = ordered * n + (n - 1 - rank)
    return torch.topk(keys, k, dim=-1, sorted=True).indices


def _topk_by_sort(scores: torch.Tensor, k: int, rank: torch.Tensor) -> torch.Tensor:
    """``stable_topk`` in the scores' own precision (fp64, whose order-preserving keys would not
    fit in int64 once multiplied by the candidate count): candidates laid out in tie-break
    order, then a stable descending sort by score, so equal scores keep that order.  NaNs sort
    first and -0.0 equals +0.0, as in the exact keys."""
    by_rank = rank.expand_as(scores).argsort(-1)
    top = scores.gather(-1, by_rank).sort(dim=-1, descending=True, stable=True).indices[..., :k]
    return by_rank.gather(-1, top)


class TierRouterHead(nn.Module):
    """The router parameters of one tier in one layer.

    ``tier_gate`` scores the tier, ``group_gate`` its groups and ``expert_gate`` the experts of
    every group (group-major).  The ``*_bias`` buffers are added to the logits; they are state,
    not learned: a curriculum uses them to keep a new tier or expert unroutable (large negative
    bias) and to ramp it in.
    """

    def __init__(self, d_model: int, num_groups: int, experts_per_group: int) -> None:
        super().__init__()
        self.num_groups, self.experts_per_group = num_groups, experts_per_group
        self.tier_gate = nn.Parameter(torch.zeros(1, d_model))
        self.group_gate = nn.Parameter(torch.zeros(num_groups, d_model))
        self.expert_gate = nn.Parameter(torch.zeros(num_groups * experts_per_group, d_model))
        self.register_buffer("tier_bias", torch.zeros(1))
        self.register_buffer("group_bias", torch.zeros(num_groups))
        self.register_buffer("expert_bias", torch.zeros(num_groups * experts_per_group))


@dataclass
class Routes:
    """The routing decision of one MoE layer for N tokens.

    ``expert_ids`` are flat ids (tier-major, then group, then expert; ``-1`` where a slot is
    unused), ``weights`` the joint weights (0 on unused slots).  A token uses at most K slots.
    """

    expert_ids: torch.Tensor  # (N, slots) long
    weights: torch.Tensor  # (N, slots) float
    valid: torch.Tensor  # (N, slots) bool
    balance_loss: torch.Tensor  # scalar
    z_loss: torch.Tensor  # scalar
    tier_probs: torch.Tensor  # (T,) batch-mean p(t), detached
    expert_counts: torch.Tensor  # (E_total,) routes per flat expert, detached

    def tier_weights(self, tier_offsets: list[int]) -> torch.Tensor:
        """Batch-mean routing weight each tier receives (T,): the share of the layer's output
        that comes from each tier (with k_tier=1, the fraction of tokens routed to it)."""
        with torch.no_grad():
            bounds = torch.tensor(tier_offsets[1:-1], device=self.expert_ids.device)
            tier = torch.bucketize(self.expert_ids.clamp_min(0), bounds, right=True)
            w = torch.where(self.valid, self.weights.detach().float(), 0.0)
            totals = torch.zeros(len(tier_offsets) - 1, device=w.device).index_add_(0, tier.flatten(), w.flatten())
            return totals / max(self.expert_ids.shape[0], 1)

    def tier_counts(self, tier_offsets: list[int]) -> torch.Tensor:
        """Routes per tier, from the per-expert counts."""
        bounds = list(tier_offsets)
        return torch.stack([self.expert_counts[a:b].sum() for a, b in zip(bounds[:-1], bounds[1:])])


class HSERRouter(nn.Module):
    """Three-level router over the tiers of ``config`` for block ``layer``."""

    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        routing = config.routing
        self.layer = layer
        self.routing = routing
        self.tier_names = [t.name for t in config.tiers]
        self.heads = nn.ModuleDict(
            {t.name: TierRouterHead(config.d_model, t.num_groups, t.experts_per_group) for t in config.tiers}
        )
        groups = [t.num_groups for t in config.tiers]
        epg = [t.experts_per_group for t in config.tiers]
        self.num_tiers = len(groups)
        self.max_groups, self.max_epg = max(groups), max(epg)
        self.k_tier = min(routing.k_tier, self.num_tiers)
        k_groups = [config.k_group_of(t) for t in config.tiers]
        k_experts = [config.k_expert_of(t) for t in config.tiers]
        self.max_k_group, self.max_k_expert = max(k_groups), max(k_experts)
        self.tier_offsets = [0]
        for t in config.tiers:
            self.tier_offsets.append(self.tier_offsets[-1] + t.num_experts)

        T, G, E = self.num_tiers, self.max_groups, self.max_epg
        # Static tables (derived from the config, so not saved with the weights).
        self.register_buffer("k_group_of_tier", torch.tensor(k_groups), persistent=False)
        self.register_buffer("k_expert_of_tier", torch.tensor(k_experts), persistent=False)
        self.register_buffer("epg_of_tier", torch.tensor(epg), persistent=False)
        self.register_buffer("offset_of_tier", torch.tensor(self.tier_offsets[:-1]), persistent=False)
        group_real = torch.zeros(T, G, dtype=torch.bool)
        expert_real = torch.zeros(T, G, E, dtype=torch.bool)
        for t, (g, e) in enumerate(zip(groups, epg)):
            group_real[t, :g] = True
            expert_real[t, :g, :e] = True
        self.register_buffer("group_real", group_real, persistent=False)
        self.register_buffer("expert_real", expert_real, persistent=False)
        # Whether any tier is padded (fewer groups or experts than the widest): known here, so
        # the forward never asks the device.
        self.groups_padded, self.experts_padded = not bool(group_real.all()), not bool(expert_real.all())
        # Padding value: -inf for missing candidates inside a real group, 0 inside a padded
        # group (a padded group is itself never selectable; 0 keeps its softmax finite).
        # Logits of masked tiers stay at these finite fills (their probability is zero anyway).
        self.register_buffer("group_fill", torch.where(group_real, 0.0, float("-inf")), persistent=False)
        fill = torch.where(group_real[..., None] & ~expert_real, float("-inf"), 0.0)
        self.register_buffer("expert_fill", fill.flatten(), persistent=False)
        self._build_tie_ranks()
        # A curriculum steering a tier's share sets this to see the per-token tier logits of
        # the last batch (biased, masked); nothing else reads them.
        self.record_tier_logits = False
        self.last_tier_logits: torch.Tensor | None = None
        # How the load-balance loss averages router probabilities over the batch.  Data
        # parallelism replaces it (from outside, ``dist/data_parallel.py``) with a mean over
        # every rank's tokens, so the loss of a split batch is the loss of the whole batch.
        self.batch_mean: Callable[[torch.Tensor], torch.Tensor] = _mean_over_tokens

    def _build_tie_ranks(self) -> None:
        """Tie-break ranks per level, from the seeded hash of (seed, layer, level, candidate).

        Candidates are named by tier *name* (not position), so a tier routes the same way
        whether or not other tiers are present in the model."""
        seed, layer = self.routing.seed, self.layer
        T, G, E = self.num_tiers, self.max_groups, self.max_epg
        big = _MASK64 + 1  # padded candidates sort after every real one
        tier_keys = [seeded_hash(seed, layer, "tier", name) for name in self.tier_names]
        group_rank = torch.empty(T, G, dtype=torch.long)
        expert_rank = torch.empty(T, G, E, dtype=torch.long)
        for t, name in enumerate(self.tier_names):
            head = self.heads[name]
            keys = [seeded_hash(seed, layer, "group", name, g) if g < head.num_groups else big + g for g in range(G)]
            group_rank[t] = torch.tensor(tie_break_rank(keys))
            for g in range(G):
                keys = [
                    seeded_hash(seed, layer, "expert", name, g, e) if g < head.num_groups and e < head.experts_per_group else big + e
                    for e in range(E)
                ]
                expert_rank[t, g] = torch.tensor(tie_break_rank(keys))
        self.register_buffer("tier_rank", torch.tensor(tie_break_rank(tier_keys)), persistent=False)
        self.register_buffer("group_rank", group_rank, persistent=False)
        self.register_buffer("expert_rank", expert_rank, persistent=False)

    # ------------------------------------------------------------------------------------
    def gate_logits(self, x: torch.Tensor, allowed: list[bool]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Raw gate outputs (N,T), (N,T,G), (N,T,G,E) in fp32 (fp64 for an fp64 model), padded.

        One matmul per allowed tier covers its three levels.  Tiers are few, and keeping the
        matmuls apart makes a tier's logits bitwise independent of which other tiers exist (a
        single matmul over all tiers changes the rounding when rows are added).  Masked tiers
        are not computed at all: their router weights need not even be present.  fp32 under
        autocast too: a bf16 gate matmul (8 mantissa bits) would turn near-ties between
        experts into exact ties and route on rounding.  An fp64 model routes in fp64, so that
        it is fp64 throughout (the growth checks evaluate in fp64).
        """
        if torch.is_autocast_enabled(x.device.type):  # autocast would run the gate matmul in bf16
            with torch.autocast(x.device.type, enabled=False):
                return self.gate_logits(x, allowed)
        n, T, G, E = x.shape[0], self.num_tiers, self.max_groups, self.max_epg
        x32 = x.to(torch.promote_types(x.dtype, torch.float32))  # fp32 at least; "x32" is fp64 for an fp64 model
        if T == 1 and allowed[0]:  # one tier fills the padded shape exactly: views, no copies
            logits = linear(x32, self._head_weight(self.tier_names[0], x32.dtype))
            return logits[:, :1], logits[:, 1 : 1 + G].view(n, 1, G), logits[:, 1 + G :].view(n, 1, G, E)
        tier_l = x32.new_full((n, T), float("-inf"))
        group_l = self.group_fill.to(x32.dtype).expand(n, T, G).clone()
        expert_l = self.expert_fill.view(1, T, G, E).to(x32.dtype).expand(n, T, G, E).clone()
        for t, name in enumerate(self.tier_names):
            if not allowed[t]:
                continue
            head = self.heads[name]
            g, e = head.num_groups, head.experts_per_group
            logits = linear(x32, self._head_weight(name, x32.dtype))
            tier_l[:, t] = logits[:, 0]
            group_l[:, t, :g] = logits[:, 1 : 1 + g]
            expert_l[:, t, :g, :e] = logits[:, 1 + g :].view(n, g, e)
        return tier_l, group_l, expert_l

    def _head_weight(self, name: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """One tier's three gates as one (1 + G + G*E, d) matrix in ``dtype`` (fp32, or fp64
        for an fp64 model): one matmul per tier."""
        head = self.heads[name]
        return torch.cat([head.tier_gate, head.group_gate, head.expert_gate]).to(dtype)

    def _biases(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The logit bias buffers of all tiers, padded like the logits."""
        T, G, E = self.num_tiers, self.max_groups, self.max_epg
        device = self.group_real.device
        tier_b, group_b, expert_b = torch.zeros(T, device=device), torch.zeros(T, G, device=device), torch.zeros(T, G, E, device=device)
        for t, name in enumerate(self.tier_names):
            head = self.heads[name]
            g, e = head.num_groups, head.experts_per_group
            tier_b[t] = head.tier_bias[0]
            group_b[t, :g] = head.group_bias
            expert_b[t, :g, :e] = head.expert_bias.view(g, e)
        return tier_b, group_b, expert_b

    def forward(self, x: torch.Tensor, allowed: torch.Tensor, step: int | None = None) -> Routes:
        """Route ``x`` (N, d) over the tiers where ``allowed`` (T,) is true.

        ``allowed`` may also be (N, T), a TierSet per row (a server batching requests): the gates
        of the union of the rows' tiers are computed, and each row's other tiers are set to
        ``-inf`` before the softmax.  A row then routes bitwise as it would alone with its own
        (T,) mask: each tier's gate logits come from their own matmul, a masked tier's logit is
        ``-inf`` either way, and a masked tier can only be picked (when ``k_tier`` exceeds the
        row's tiers) with weight 0, which makes its slots invalid whatever its group scores.
        """
        r = self.routing
        n, T, G, E = x.shape[0], self.num_tiers, self.max_groups, self.max_epg
        allowed_list = _tiers_any_row(allowed)
        raw_t, raw_g, raw_e = self.gate_logits(x, allowed_list)
        bias_t, bias_g, bias_e = self._biases()
        tier_l = _scaled(raw_t, r.tier_temperature) + bias_t
        group_l = _scaled(raw_g, r.group_temperature) + bias_g
        expert_l = _scaled(raw_e, r.expert_temperature) + bias_e
        if self.training and r.noise_std > 0 and step is not None:
            tier_l, group_l, expert_l = self._add_noise(step, tier_l, group_l, expert_l)
        tier_l = tier_l.masked_fill(~allowed, float("-inf"))  # already -inf; explicit for the noise path
        if self.record_tier_logits:
            self.last_tier_logits = tier_l.detach()

        p_tier = tier_l.softmax(-1)  # (N,T)
        p_group = group_l.softmax(-1)  # (N,T,G)
        p_expert = expert_l.softmax(-1)  # (N,T,G,E)

        # Level 1: tiers.
        kt, kg, ke = self.k_tier, self.max_k_group, self.max_k_expert
        sel_t = stable_topk(tier_l, kt, self.tier_rank)  # (N,kt)
        w_t = p_tier.gather(1, sel_t)
        # Level 2: groups inside each selected tier.
        top_g = stable_topk(group_l, kg, self.group_rank)  # (N,T,kg)
        sel_g = top_g.gather(1, sel_t[..., None].expand(n, kt, kg))  # (N,kt,kg)
        w_g = p_group.gather(1, sel_t[..., None].expand(n, kt, G)).gather(2, sel_g)
        ok_g = torch.arange(kg, device=x.device) < self.k_group_of_tier[sel_t][..., None]
        # Level 3: experts inside each selected group.
        pair = (sel_t[..., None] * G + sel_g).reshape(n, kt * kg)  # flat (tier, group) index
        if T * G == 1:  # one tier of one group: every token's pair is (0, 0), nothing to gather
            pair_l, pair_rank = expert_l.reshape(n, 1, E), self.expert_rank.view(1, 1, E)
        else:
            pair_l = expert_l.reshape(n, T * G, E).gather(1, pair[..., None].expand(n, kt * kg, E))
            pair_rank = self.expert_rank.reshape(T * G, E)[pair]
        sel_e = stable_topk(pair_l, ke, pair_rank)  # (N,kt*kg,ke)
        flat_e = (pair[..., None] * E + sel_e).reshape(n, -1)  # index into the (T*G*E) candidates
        w_e = p_expert.reshape(n, T * G * E).gather(1, flat_e).view(n, kt * kg, ke)
        ok_e = torch.arange(ke, device=x.device) < self.k_expert_of_tier[sel_t][..., None, None]

        weights = (w_t[:, :, None, None] * w_g[..., None] * w_e.view(n, kt, kg, ke)).reshape(n, -1)
        valid = (ok_g[..., None] & ok_e.view(n, kt, 1, ke).expand(n, kt, kg, ke)).reshape(n, -1) & (weights > 0)
        weights = torch.where(valid, weights, 0.0)
        if r.renormalize:
            # Summed slot by slot, in slot order: a vectorised sum's rounding depends on how many
            # slots there are, and adding a tier (more, empty slots) must not change old routes.
            total = weights[:, :1]
            for k in range(1, weights.shape[1]):
                total = total + weights[:, k : k + 1]
            weights = weights / total.clamp_min(torch.finfo(weights.dtype).tiny)
        expert_ids = (
            self.offset_of_tier[sel_t][:, :, None, None]
            + sel_g[..., None] * self.epg_of_tier[sel_t][:, :, None, None]
            + sel_e.view(n, kt, kg, ke)
        ).reshape(n, -1)
        expert_ids = expert_ids.masked_fill(~valid, -1)

        if torch.is_grad_enabled():
            balance, z = self._aux_losses(allowed_list, p_tier, p_group, p_expert, raw_t, raw_g, raw_e)
        else:  # inference: nothing to balance; skipping ~25 small ops matters when decoding
            balance = z = weights.new_zeros(())
        counts = torch.bincount(expert_ids[valid], minlength=self.tier_offsets[-1])
        return Routes(expert_ids, weights, valid, balance, z, p_tier.detach().mean(0), counts.detach())

    def expert_probabilities(self, x: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
        """(N, E_total) joint probability p(tier) p(group | tier) p(expert | group) of every
        flat expert for rows ``x`` — no top-k, no noise.  What a prefetcher ranks experts by
        when it applies this router to an earlier layer's hidden state (pre-gating)."""
        r = self.routing
        n = x.shape[0]
        raw_t, raw_g, raw_e = self.gate_logits(x, _tiers_any_row(allowed))
        bias_t, bias_g, bias_e = self._biases()
        p_tier = (_scaled(raw_t, r.tier_temperature) + bias_t).masked_fill(~allowed, float("-inf")).softmax(-1)
        p_group = (_scaled(raw_g, r.group_temperature) + bias_g).softmax(-1)
        p_expert = (_scaled(raw_e, r.expert_temperature) + bias_e).softmax(-1)
        joint = p_tier[:, :, None, None] * p_group[..., None] * p_expert  # (N, T, G, E), padded
        out = joint.new_zeros(n, self.tier_offsets[-1])
        for t, name in enumerate(self.tier_names):
            head = self.heads[name]
            g, e = head.num_groups, head.experts_per_group
            out[:, self.tier_offsets[t] : self.tier_offsets[t] + g * e] = joint[:, t, :g, :e].reshape(n, g * e)
        return torch.nan_to_num(out, nan=0.0)

    def _add_noise(self, step: int, *logits: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Exploration noise from a generator seeded by (seed, step, layer), never global RNG.

        Drawn on the CPU and moved: CUDA's generator is another algorithm, and the same noise
        on every device keeps a GPU run on the CPU run's routing (a few KB per layer)."""
        gen = torch.Generator()
        gen.manual_seed(seeded_hash(self.routing.seed, step, self.layer, "noise") & ((1 << 63) - 1))
        return tuple(
            l + torch.randn(l.shape, generator=gen, dtype=l.dtype).to(l.device) * self.routing.noise_std for l in logits
        )

    def _aux_losses(
        self,
        allowed: list[bool],
        p_tier: torch.Tensor,
        p_group: torch.Tensor,
        p_expert: torch.Tensor,
        raw_t: torch.Tensor,
        raw_g: torch.Tensor,
        raw_e: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Hierarchical load balance (KL of batch-mean probabilities to uniform, per level)
        and router z-loss, both over the allowed tiers only so masked tiers get no gradient."""
        r = self.routing
        # The allowed tiers' slices; with every tier allowed, the tensors themselves (no copies).
        idx = None if all(allowed) else torch.tensor([t for t, ok in enumerate(allowed) if ok], dtype=torch.long, device=p_tier.device)

        def pick(t: torch.Tensor, dim: int = 1) -> torch.Tensor:
            return t if idx is None else t.index_select(dim, idx)

        group_real, expert_real = pick(self.group_real, 0), pick(self.expert_real, 0)

        def kl_to_uniform(u: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
            # KL(u || uniform over the real candidates) = sum u log u + log(n_real), per row.
            # (u log u written with a clamp: xlogy's gradient is NaN where u == 0, which happens
            # for padded candidates and for tiers held unroutable by a large negative bias.)
            entropy_term = u * u.clamp_min(torch.finfo(u.dtype).tiny).log()
            return entropy_term.masked_fill(~real, 0).sum(-1) + real.sum(-1).clamp_min(1).log()

        u_t = self.batch_mean(pick(p_tier))
        u_g = self.batch_mean(pick(p_group))  # (A,G)
        u_e = self.batch_mean(pick(p_expert))  # (A,G,E)
        balance = (
            r.balance_alpha_tier * kl_to_uniform(u_t, torch.ones_like(u_t, dtype=torch.bool))
            + r.balance_alpha_group * kl_to_uniform(u_g, group_real).sum()
            + r.balance_alpha_expert * kl_to_uniform(u_e, expert_real)[group_real].sum()
        )
        lse_t = pick(raw_t).logsumexp(-1)
        lse_g = _masked(pick(raw_g), group_real, self.groups_padded).logsumexp(-1)  # (N,A)
        lse_e = _masked(pick(raw_e), expert_real, self.experts_padded).logsumexp(-1)[:, group_real]  # (N, real groups)
        z = r.z_loss_coef * (lse_t.square().mean() + lse_g.square().mean() + lse_e.square().mean())
        return balance, z


def _tiers_any_row(allowed: torch.Tensor) -> list[bool]:
    """Which tiers some row may use: the (T,) mask itself, or the union of an (N, T) one's rows
    (the gates to compute; each row's own mask is applied to the logits after)."""
    return (allowed if allowed.dim() == 1 else allowed.any(0)).tolist()


def _mean_over_tokens(t: torch.Tensor) -> torch.Tensor:
    """The batch mean over this process's tokens (dim 0)."""
    return t.mean(0)


def _scaled(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``logits / temperature``, skipping the pass over (N, ..., E) when it is 1 (exactly equal)."""
    return logits if temperature == 1.0 else logits / temperature


def _masked(logits: torch.Tensor, real: torch.Tensor, padded: bool) -> torch.Tensor:
    """``logits`` with padded candidates at -inf; no copy when the router has no padding."""
    return logits.masked_fill(~real, float("-inf")) if padded else logits
