"""TierSet selection: the best TierSet that meets a latency and a memory budget.

A *profile table* (:class:`TierSetTable`, measured by :func:`lite_llm.serve.profiling.profile_checkpoint`
and stored in the checkpoint) lists, per candidate TierSet, the decode latency per token on one
device and budget, the bytes of weights it needs resident, and its utility (higher is better:
minus the mean bits per byte over the profiled validation domains).  Choosing is then "a small
knapsack problem": maximise utility subject to both budgets.

Everything here is pure — tables in, a choice out — so the HTTP server, the CLI and the
benchmark share one exact rule and the tests can check it against brute force:

* :func:`choose` — over a table's measured profiles, exhaustively (a table measures every subset
  when a model has at most :data:`ALL_SUBSETS_UP_TO` tiers); for larger models, whose tables hold
  only the cumulative and single-tier sets, it also asks :func:`select` for the best of *all*
  subsets under the fitted additive model (:func:`fit_tier_costs`) and marks that profile
  ``measured=False``.
* :func:`select` — over an additive cost model (:class:`TierCosts`): exhaustive up to
  :data:`EXHAUSTIVE_UP_TO` tiers, a Pareto dynamic program (:func:`select_dp`) beyond, which
  returns exactly what exhaustive search returns (same sums in the same order, same ties).
* :class:`LatencyModel` — per-token latency from a TierSet's measured parts (a fixed cost, the
  expert bytes a token reads, the tiers it gates over), fitted by least squares; its held-out
  error is what ``benchmarks/tier_select.py`` reports.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from ..errors import CheckpointError, LiteLLMError

PROFILE_NAME = "tierset-profile"
PROFILE_FOLDER = "serve"
TABLE_FORMAT = "lite-llm-tierset-profile"
TABLE_VERSION = 1
ALL_SUBSETS_UP_TO = 4  # a profile measures every non-empty subset of at most this many tiers
EXHAUSTIVE_UP_TO = 12  # select() enumerates 2**T subsets up to here (4,095 at 12), then uses the DP


class NoTierSetFits(LiteLLMError, ValueError):
    """No TierSet meets the budgets; the message names the smallest budgets that would."""


# --------------------------------------------------------------------------------- tables
@dataclass(frozen=True)
class TierSetProfile:
    """One TierSet's measured figures on one device and budget.

    ``utility`` is higher-is-better (minus the mean of ``bpb`` over the profiled domains);
    ``latency_samples_ms`` are the per-repeat figures whose median is ``latency_ms_per_token``;
    ``active_expert_bytes`` is the expert weight bytes one decoded token read on average (from
    the routes taken), the latency model's main input.  ``measured`` is False only for a
    TierSet :func:`choose` predicted from the fitted model rather than measured.
    """

    tiers: tuple[str, ...]
    latency_ms_per_token: float
    memory_bytes: int
    utility: float
    bpb: dict[str, float] = field(default_factory=dict, hash=False)
    latency_samples_ms: tuple[float, ...] = ()
    active_expert_bytes: float = 0.0
    measured: bool = True

    def to_dict(self) -> dict[str, Any]:
        return {
            "tiers": list(self.tiers), "latency_ms_per_token": self.latency_ms_per_token, "memory_bytes": self.memory_bytes,
            "utility": self.utility, "bpb": dict(self.bpb), "latency_samples_ms": list(self.latency_samples_ms),
            "active_expert_bytes": self.active_expert_bytes, "measured": self.measured,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "TierSetProfile":
        return cls(
            tuple(str(t) for t in d["tiers"]), float(d["latency_ms_per_token"]), int(d["memory_bytes"]), float(d["utility"]),
            {str(k): float(v) for k, v in dict(d.get("bpb", {})).items()}, tuple(float(x) for x in d.get("latency_samples_ms", ())),
            float(d.get("active_expert_bytes", 0.0)), bool(d.get("measured", True)),
        )


@dataclass
class TierSetTable:
    """Every profiled TierSet of one checkpoint on one device and expert-store budget.

    ``tier_order`` is the model's tier order (labels and tie-breaks follow it); ``dense_bytes``
    and ``tier_bytes`` are the resident weight bytes counted from the manifest (memory is
    additive exactly: dense + each tier's router heads and experts); ``tier_active_bytes`` is
    the expert bytes one token reads from a tier when it routes there (all layers), which the
    additive latency model needs for TierSets that were not measured.
    """

    profiles: list[TierSetProfile]
    device: str
    tier_order: tuple[str, ...] = ()
    hot_budget: int | None = None
    warm_budget: int | None = None
    domains: tuple[str, ...] = ()
    tokens: int = 0
    dense_bytes: int = 0
    tier_bytes: dict[str, int] = field(default_factory=dict)
    tier_active_bytes: dict[str, float] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def all_subsets_measured(self) -> bool:
        measured = {frozenset(p.tiers) for p in self.profiles if p.measured}
        return len(measured) >= 2 ** len(self.tier_order) - 1

    def label(self, tiers: Sequence[str]) -> str:
        return tierset_label(tiers, self.tier_order)

    def to_json(self) -> str:
        return json.dumps(
            {
                "format": TABLE_FORMAT, "version": TABLE_VERSION, "device": self.device, "tier_order": list(self.tier_order),
                "hot_budget": self.hot_budget, "warm_budget": self.warm_budget, "domains": list(self.domains), "tokens": self.tokens,
                "dense_bytes": self.dense_bytes, "tier_bytes": dict(self.tier_bytes), "tier_active_bytes": dict(self.tier_active_bytes),
                "metadata": self.metadata, "profiles": [p.to_dict() for p in self.profiles],
            },
            indent=2, allow_nan=False,
        ) + "\n"

    @classmethod
    def from_json(cls, text: str | bytes) -> "TierSetTable":
        try:
            d = json.loads(text)
            if not isinstance(d, dict) or d.get("format") != TABLE_FORMAT:
                raise ValueError(f"format is not {TABLE_FORMAT}")
            if int(d.get("version", 0)) > TABLE_VERSION:
                raise CheckpointError(f"the TierSet profile was written by a newer lite-llm (version {d['version']}); upgrade lite-llm or profile again")
            return cls(
                [TierSetProfile.from_dict(p) for p in d["profiles"]], str(d["device"]), tuple(d.get("tier_order", ())),
                d.get("hot_budget"), d.get("warm_budget"), tuple(d.get("domains", ())), int(d.get("tokens", 0)),
                int(d.get("dense_bytes", 0)), {k: int(v) for k, v in d.get("tier_bytes", {}).items()},
                {k: float(v) for k, v in d.get("tier_active_bytes", {}).items()}, dict(d.get("metadata", {})),
            )
        except CheckpointError:
            raise
        except (ValueError, KeyError, TypeError) as exc:
            detail = " ".join(str(exc).split()).rstrip(".")
            raise CheckpointError(f"the TierSet profile cannot be read ({detail}); run `lite-llm tiers profile` again") from None


def tierset_label(tiers: Sequence[str], order: Sequence[str]) -> str:
    """The TierSet's shortest string form: ``all``, ``upto:X``, ``only:X`` or ``a,b``."""
    tiers = tuple(t for t in order if t in set(tiers)) if order else tuple(tiers)
    order = tuple(order)
    if order and tiers == order:
        return "all"
    if order and len(tiers) > 1 and tiers == order[: len(tiers)]:
        return f"upto:{tiers[-1]}"
    if len(tiers) == 1:
        return f"upto:{tiers[0]}" if order and order[0] == tiers[0] else f"only:{tiers[0]}"
    return ",".join(tiers)


def candidate_tiersets(order: Sequence[str]) -> list[tuple[str, ...]]:
    """What a profile measures: every non-empty subset when there are at most
    :data:`ALL_SUBSETS_UP_TO` tiers (then :func:`choose` is exact over all of them); otherwise
    the cumulative sets and the single tiers (2T-1 sets, enough to fit the additive model)."""
    order = tuple(order)
    if len(order) <= ALL_SUBSETS_UP_TO:
        return [tuple(t for i, t in enumerate(order) if mask >> i & 1) for mask in range(1, 2 ** len(order))]
    out: list[tuple[str, ...]] = [order[: i + 1] for i in range(len(order))]
    out += [(t,) for t in order[1:]]
    return out


def resident_bytes(manifest: Mapping[str, Any]) -> tuple[int, dict[str, int]]:
    """(dense bytes, bytes per tier) of the weights a checkpoint keeps resident, counted from
    the manifest's tensor listings (dtype x shape; no file headers): dense shards for the dense
    part, each tier's router and expert shards for that tier.  Not RSS: a number that does not
    depend on what else the process holds."""
    import torch

    def nbytes(info: Mapping[str, Any]) -> int:
        dtype = getattr(torch, str(info.get("dtype", "float32")))
        return math.prod(int(s) for s in info.get("shape", ())) * torch.empty((), dtype=dtype).element_size()

    dense, tiers = 0, {}
    for shard in manifest["shards"]:
        size = sum(nbytes(info) for info in shard["tensors"].values() if isinstance(info, Mapping))
        if shard["tier"] == "dense":
            dense += size
        else:
            tiers[shard["tier"]] = tiers.get(shard["tier"], 0) + size
    return dense, tiers


# -------------------------------------------------------------------------------- budgets
def check_budgets(latency_ms: float | None, memory_bytes: int | None) -> None:
    """Refuse a negative or non-finite budget (None means no limit)."""
    if latency_ms is not None and (not math.isfinite(latency_ms) or latency_ms < 0):
        raise NoTierSetFits(f"the latency budget must be a finite number of ms/token >= 0, got {latency_ms}")
    if memory_bytes is not None and memory_bytes < 0:
        raise NoTierSetFits(f"the memory budget must be >= 0 bytes, got {memory_bytes}")


def fits(p: TierSetProfile, latency_ms: float | None, memory_bytes: int | None) -> bool:
    return (latency_ms is None or p.latency_ms_per_token <= latency_ms) and (memory_bytes is None or p.memory_bytes <= memory_bytes)


def _mask(tiers: Iterable[str], order: Sequence[str]) -> int:
    index = {t: i for i, t in enumerate(order)}
    return sum(1 << index.get(t, len(index)) for t in tiers)


def _rank(p: TierSetProfile, order: Sequence[str]) -> tuple[float, float, int, int]:
    """Best first: highest utility, then lowest latency, then least memory, then the TierSet of
    fewest and earliest tiers (so equal figures always give the same answer)."""
    return (-p.utility, p.latency_ms_per_token, p.memory_bytes, _mask(p.tiers, order))


def _budget_text(latency_ms: float | None, memory_bytes: int | None) -> str:
    from ..store import format_bytes

    parts = ([f"latency {latency_ms:.3g} ms/token"] if latency_ms is not None else []) + (
        [f"memory {format_bytes(memory_bytes)}"] if memory_bytes is not None else []
    )
    return " and ".join(parts)


def no_fit_message(candidates: Sequence[TierSetProfile], order: Sequence[str], latency_ms: float | None, memory_bytes: int | None) -> str:
    """One sentence: the budgets asked for, and the smallest budgets that some TierSet meets —
    the candidate needing the least uniform relaxation of both budgets (its largest ratio of
    need to budget), so the advice changes as little as possible."""
    from ..store import format_bytes

    def ratio(need: float, budget: float | None, unit: float) -> float:
        # a zero budget counts as one unit (1e-3 ms, 1 byte): every need is then a finite
        # multiple of it, so the smallest need still wins instead of ties broken by the other budget
        if budget is None:
            return 0.0
        return need / max(budget, unit)

    def key(p: TierSetProfile) -> tuple[float, float, float, int]:
        r = (ratio(p.latency_ms_per_token, latency_ms, 1e-3), ratio(p.memory_bytes, memory_bytes, 1.0))
        return (max(r), sum(r), p.latency_ms_per_token, p.memory_bytes)

    best = min(candidates, key=key)
    # rounded up, and the bytes exact, so that the advice retyped is met (1.02 MB was 1,022,808 bytes)
    latency = math.ceil(best.latency_ms_per_token * 1000) / 1000
    return (
        f"no TierSet fits {_budget_text(latency_ms, memory_bytes)}; the nearest, {tierset_label(best.tiers, order)}, needs "
        f"{latency:g} ms/token and {format_bytes(best.memory_bytes)} ({best.memory_bytes} bytes): raise the budgets to at least that"
    )


def choose(table: TierSetTable, latency_ms: float | None = None, memory_bytes: int | None = None) -> TierSetProfile:
    """The highest-utility TierSet of ``table`` whose latency per token is at most
    ``latency_ms`` and whose resident bytes are at most ``memory_bytes`` (None: no limit).

    Exact over the measured profiles: a profile that breaks a budget is never returned.  For a
    model with more tiers than a profile enumerates, the best of every subset under the fitted
    additive model (:func:`select`) competes too, returned with ``measured=False`` (its memory
    is exact; its latency and utility are the model's).  Raises :class:`NoTierSetFits`, one
    sentence naming the smallest budgets that would work, when none fits.
    """
    check_budgets(latency_ms, memory_bytes)
    if not table.profiles:
        raise NoTierSetFits("the TierSet profile is empty; run `lite-llm tiers profile` again")
    order = table.tier_order or tuple(dict.fromkeys(t for p in table.profiles for t in p.tiers))
    candidates = [p for p in table.profiles if p.measured]
    if not table.all_subsets_measured and len(order) > 1 and table.tier_bytes:
        costs = fit_tier_costs(table)
        pick = select(costs, latency_ms, memory_bytes)
        if pick is not None and frozenset(pick.tiers) not in {frozenset(p.tiers) for p in candidates}:
            candidates.append(TierSetProfile(pick.tiers, pick.latency_ms, pick.memory_bytes, pick.utility, measured=False))
    fitting = [p for p in candidates if fits(p, latency_ms, memory_bytes)]
    if not fitting:
        raise NoTierSetFits(no_fit_message(candidates, order, latency_ms, memory_bytes))
    return min(fitting, key=lambda p: _rank(p, order))


# ----------------------------------------------------------------- the additive cost model
@dataclass(frozen=True)
class TierCosts:
    """An additive model of TierSets: a TierSet S costs ``base_latency_ms + sum(latency_ms[t])``
    per token and ``base_memory + sum(memory[t])`` bytes, and scores ``base_utility +
    sum(utility[t])``, summed in tier order.

    Assumptions (stated because the DP is exact only for the model, not for the machine):

    * memory is additive exactly (a tier's router heads and experts are separate shards);
    * latency is additive when every tier of the set runs for every token (``k_tier >= |S|``);
      with ``k_tier < |S|`` a token runs only some of the set's tiers, so the sum over-estimates
      — it errs towards keeping the budget;
    * utility gains are independent per tier (no interaction terms), fitted by least squares.

    Per-tier costs must be >= 0 (adding a tier never makes a token cheaper), which is what
    lets the DP drop a partial set already over budget.
    """

    tiers: tuple[str, ...]
    latency_ms: tuple[float, ...]
    memory: tuple[int, ...]
    utility: tuple[float, ...]
    base_latency_ms: float = 0.0
    base_memory: int = 0
    base_utility: float = 0.0

    def __post_init__(self) -> None:
        n = len(self.tiers)
        if not (len(self.latency_ms) == len(self.memory) == len(self.utility) == n):
            raise ValueError(f"TierCosts needs one latency, memory and utility per tier ({n}), got {len(self.latency_ms)}, {len(self.memory)}, {len(self.utility)}")
        if any(x < 0 for x in self.latency_ms) or any(m < 0 for m in self.memory):
            raise ValueError("TierCosts latencies and memories must be >= 0 per tier; a tier never makes a token cheaper")

    def totals(self, mask: int) -> tuple[float, int, float]:
        """(latency, memory, utility) of the subset ``mask`` (bit i = tier i), summed in tier order."""
        lat, mem, util = self.base_latency_ms, self.base_memory, self.base_utility
        for i in range(len(self.tiers)):
            if mask >> i & 1:
                lat, mem, util = lat + self.latency_ms[i], mem + self.memory[i], util + self.utility[i]
        return lat, mem, util


@dataclass(frozen=True)
class Choice:
    """A subset picked by :func:`select`, with its modelled figures."""

    tiers: tuple[str, ...]
    mask: int
    latency_ms: float
    memory_bytes: int
    utility: float


def _better(a: tuple[float, int, float, int], b: tuple[float, int, float, int]) -> bool:
    """State a = (lat, mem, util, mask) ranks before b: utility, then latency, memory, mask."""
    return (-a[2], a[0], a[1], a[3]) < (-b[2], b[0], b[1], b[3])


def _within(lat: float, mem: int, latency_ms: float | None, memory_bytes: int | None) -> bool:
    return (latency_ms is None or lat <= latency_ms) and (memory_bytes is None or mem <= memory_bytes)


def _choice(costs: TierCosts, state: tuple[float, int, float, int]) -> Choice:
    lat, mem, util, mask = state
    return Choice(tuple(t for i, t in enumerate(costs.tiers) if mask >> i & 1), mask, lat, mem, util)


def select_exhaustive(costs: TierCosts, latency_ms: float | None = None, memory_bytes: int | None = None) -> Choice | None:
    """The best non-empty subset within both budgets by trying all 2**T - 1 (None if none fits)."""
    best = None
    for mask in range(1, 2 ** len(costs.tiers)):
        lat, mem, util = costs.totals(mask)
        state = (lat, mem, util, mask)
        if _within(lat, mem, latency_ms, memory_bytes) and (best is None or _better(state, best)):
            best = state
    return None if best is None else _choice(costs, best)


def _pareto(states: list[tuple[float, int, float, int]]) -> list[tuple[float, int, float, int]]:
    """Drop every state some other non-empty state dominates: no more latency, no more memory,
    no less utility and a smaller mask.  Whatever tiers are added later, the dominating state
    plus them ranks strictly before the dominated one plus them (float addition of the same
    number is monotone, the masks add without carries), so the optimum is never dropped.
    Sorted by (latency, memory, -utility, mask), every dominator precedes what it dominates."""
    states = sorted(set(states), key=lambda s: (s[0], s[1], -s[2], s[3]))
    kept: list[tuple[float, int, float, int]] = []
    for s in states:
        if not any(k[3] and k[1] <= s[1] and k[2] >= s[2] and k[3] < s[3] for k in kept):
            kept.append(s)
    return kept


def select_dp(costs: TierCosts, latency_ms: float | None = None, memory_bytes: int | None = None) -> Choice | None:
    """The same answer as :func:`select_exhaustive`, by dynamic programming over the tiers:
    after tier i the states are the Pareto-optimal subsets of the first i tiers (latency,
    memory, utility), each extended by tier i+1 or not.  Partial sets over a budget are dropped
    (per-tier costs are >= 0).  Exact: sums are taken in the same order as the exhaustive
    search's, and ties break the same way."""
    states: list[tuple[float, int, float, int]] = [(costs.base_latency_ms, costs.base_memory, costs.base_utility, 0)]
    for i in range(len(costs.tiers)):
        grown = [(s[0] + costs.latency_ms[i], s[1] + costs.memory[i], s[2] + costs.utility[i], s[3] | 1 << i) for s in states]
        states = _pareto([s for s in states + grown if _within(s[0], s[1], latency_ms, memory_bytes)])
    best = None
    for s in states:
        if s[3] and (best is None or _better(s, best)):
            best = s
    return None if best is None else _choice(costs, best)


def select(costs: TierCosts, latency_ms: float | None = None, memory_bytes: int | None = None) -> Choice | None:
    """Exhaustive search for small tier counts, the DP beyond :data:`EXHAUSTIVE_UP_TO` tiers."""
    check_budgets(latency_ms, memory_bytes)
    if len(costs.tiers) <= EXHAUSTIVE_UP_TO:
        return select_exhaustive(costs, latency_ms, memory_bytes)
    return select_dp(costs, latency_ms, memory_bytes)


def _lstsq_nonneg(x: np.ndarray, y: np.ndarray, free: Sequence[int] = (0,)) -> np.ndarray:
    """Least squares with every coefficient outside ``free`` held >= 0 (a small active-set
    loop: drop the most negative and refit), so fitted per-tier costs are never negative."""
    active = list(range(x.shape[1]))
    while True:
        coef = np.zeros(x.shape[1])
        if active:
            coef[active] = np.linalg.lstsq(x[:, active], y, rcond=None)[0]
        negative = [j for j in active if j not in free and coef[j] < 0]
        if not negative:
            return coef
        active.remove(min(negative, key=lambda j: coef[j]))


def fit_tier_costs(table: TierSetTable) -> TierCosts:
    """The additive model of ``table``: memory from the counted bytes (exact), latency from the
    fitted :class:`LatencyModel` with every tier of a set running (see :class:`TierCosts`), and
    utility as a least-squares fit of ``u0 + sum g_t`` to the measured profiles."""
    order = table.tier_order
    measured = [p for p in table.profiles if p.measured]
    model = LatencyModel.fit([(latency_features(p), p.latency_ms_per_token) for p in measured])
    per_tier_lat = tuple(max(0.0, model.coef[1] * table.tier_active_bytes.get(t, 0.0) / 1e6 + model.coef[2]) for t in order)
    x = np.array([[1.0] + [1.0 if t in p.tiers else 0.0 for t in order] for p in measured])
    u = np.linalg.lstsq(x, np.array([p.utility for p in measured]), rcond=None)[0]
    return TierCosts(
        order, per_tier_lat, tuple(table.tier_bytes.get(t, 0) for t in order), tuple(float(g) for g in u[1:]),
        float(model.coef[0]), table.dense_bytes, float(u[0]),
    )


# --------------------------------------------------------------------------- latency model
def latency_features(p: TierSetProfile) -> tuple[float, float, float]:
    """(1, MB of expert weights a token reads, tiers gated over): what a decode step costs
    beyond attention and the head — the experts run memory-bound on one token, and each tier
    in the set adds its router heads."""
    return (1.0, p.active_expert_bytes / 1e6, float(len(p.tiers)))


@dataclass(frozen=True)
class LatencyModel:
    """``latency_ms = c0 + c1 * expert_MB_per_token + c2 * tiers`` — a fixed cost (attention,
    norms, the LM head, Python), a cost per megabyte of expert weights read (decoding one token
    is bandwidth-bound), and a cost per tier gated over.  Fitted by least squares with c1, c2
    held >= 0; it predicts a TierSet from its measured parts without timing it."""

    coef: tuple[float, float, float]

    @classmethod
    def fit(cls, samples: Sequence[tuple[Sequence[float], float]]) -> "LatencyModel":
        if not samples:
            raise ValueError("the latency model needs at least one measurement")
        x = np.array([list(f) for f, _ in samples], dtype=float)
        y = np.array([v for _, v in samples], dtype=float)
        c = _lstsq_nonneg(x, y)
        return cls((float(c[0]), float(c[1]), float(c[2])))

    def predict(self, features: Sequence[float]) -> float:
        return float(sum(c * f for c, f in zip(self.coef, features)))

    def mape(self, samples: Sequence[tuple[Sequence[float], float]]) -> float:
        """Mean absolute percentage error (as a fraction) on ``samples``."""
        return float(np.mean([abs(self.predict(f) - y) / y for f, y in samples])) if samples else math.nan


# ----------------------------------------------------------------------------- storage
def save_profile(checkpoint_dir: str | Path, table: TierSetTable) -> str:
    """Store ``table`` in the checkpoint (listed in its manifest, written crash-safely); returns
    the file's path inside the checkpoint.  The checkpoint still verifies afterwards."""
    from ..checkpoint import write_extra_file

    return write_extra_file(checkpoint_dir, PROFILE_NAME, table.to_json().encode("utf-8"), folder=PROFILE_FOLDER)


def load_profile(checkpoint_dir: str | Path) -> TierSetTable | None:
    """The checkpoint's TierSet profile (hash-checked), or None when it has none."""
    from ..checkpoint import read_extra_file

    data = read_extra_file(checkpoint_dir, PROFILE_NAME)
    return None if data is None else TierSetTable.from_json(data)
