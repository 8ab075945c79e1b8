"""Depth growth: more blocks.

Every depth method is a *layer plan* — for each output block, which source block it copies and
whether the copy is silenced (its residual-writing projections zeroed, so the block is the
identity in a pre-norm residual stack, as LLaMA-Pro does) — applied by :func:`apply_layer_plan`.

* ``llama_pro``: insert silenced copies after chosen blocks.  Exact, bitwise.
* ``solar``: SOLAR depth up-scaling, ``[0, n-m) + [m, n)`` of two copies.  Not exact.
* ``stack``: the whole stack repeated.  Not exact.
* ``interpolate``: every block repeated in place; exact only with ``identity=True``.
"""

from __future__ import annotations

import math
import re

from ..config import ModelConfig, is_int
from ..errors import ConfigError
from .common import check_room, replace_within_budgets
from .registry import register
from .tensors import LazyTensors, Tensors, Zeros, layer_prefix, ref

# Tensors that write into the residual stream: zero them and the block adds nothing.
_RESIDUAL_WRITERS = re.compile(r"^(attn\.o_proj\.weight|ffn\.down_proj\.weight|ffn\.experts\.[a-z][a-z0-9_]*\.down_proj)$")
LayerPlan = list[tuple[int, bool]]  # (source block, silenced?)


def apply_layer_plan(config: ModelConfig, tensors: Tensors, plan: LayerPlan) -> tuple[ModelConfig, LazyTensors]:
    """The model whose block ``j`` is a copy of source block ``plan[j][0]`` (silenced when
    ``plan[j][1]``); embeddings, final norm and head unchanged."""
    n = config.n_layers
    bad = sorted({src for src, _ in plan if not 0 <= src < n})
    if bad:
        raise ConfigError(f"layer indices {bad} are out of range for a model with {n} layers (valid: 0..{n - 1})")
    if not plan:
        raise ConfigError("a growth cannot leave the model with no layers")
    moe = None
    if config.moe_layers is not None:
        moe = [j for j, (src, _) in enumerate(plan) if src in set(config.moe_layers)]
    new_config = replace_within_budgets(config, f"a depth growth to {len(plan)} layers", n_layers=len(plan), moe_layers=moe)

    producers = {}
    per_layer: dict[int, list[str]] = {}
    for name in tensors:
        match = re.match(r"^layers\.(\d+)\.(.+)$", name)
        if match:
            per_layer.setdefault(int(match.group(1)), []).append(match.group(2))
        else:
            producers[name] = ref(tensors, name)
    body = {}
    for j, (src, silenced) in enumerate(plan):
        for rest in per_layer.get(src, []):
            source_name = layer_prefix(src) + rest
            if silenced and _RESIDUAL_WRITERS.match(rest):
                body[layer_prefix(j) + rest] = Zeros(tensors, source_name)
            else:
                body[layer_prefix(j) + rest] = ref(tensors, source_name)
    # Keep the stored order: embedding, blocks, then final norm and head.
    head = {k: v for k, v in producers.items() if k.startswith("embed.")}
    tail = {k: v for k, v in producers.items() if k not in head}
    return new_config, LazyTensors({**head, **body, **tail})


def uniform_positions(n_layers: int, new_blocks: int) -> list[int]:
    """LLaMA-Pro's placement: split the stack into ``new_blocks`` equal groups (as equal as
    integers allow) and insert after the last block of each.

    With ``new_blocks > n_layers`` every block gets ``new_blocks // n_layers`` copies after it
    and the remaining ``new_blocks % n_layers`` are placed as above, so the new blocks stay
    spread evenly however many there are (``n -> 3n``: two after each block)."""
    full, rest = divmod(new_blocks, n_layers)
    extra = [round((k + 1) * n_layers / rest) - 1 for k in range(rest)]  # each >= 0: n/rest > 1
    return sorted([i for i in range(n_layers) for _ in range(full)] + extra)


def most_important(importance: list[float], count: int) -> list[int]:
    """The ``count`` blocks with the highest importance score (ties to the earlier block).

    More than one per block (``count > len(importance)``): every block gets
    ``count // n`` copies and the ``count % n`` most important one more."""
    n = len(importance)
    full, rest = divmod(count, n)
    order = sorted(range(n), key=lambda i: (-importance[i], i))
    return sorted([i for i in range(n) for _ in range(full)] + order[:rest])


def _check_importance(importance: object, n: int) -> None:
    """One finite score per layer (a string or a bool would be ranked by Python's rules, or fail there)."""
    if not isinstance(importance, list) or not all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in importance):
        raise ConfigError(f"importance must be a list of {n} numbers (one score per layer) or 'measured', got {importance!r}")
    if len(importance) != n:
        raise ConfigError(f"importance has {len(importance)} scores but the model has {n} layers")


def _target(config: ModelConfig, target_layers: int | None, what: str) -> int:
    if target_layers is None:
        raise ConfigError(f"{what} needs target_layers (the number of layers after growth)")
    if not isinstance(target_layers, int) or target_layers <= config.n_layers:
        raise ConfigError(f"target_layers must be an integer larger than the current {config.n_layers} layers, got {target_layers!r}")
    return target_layers


@register("llama_pro", family="depth", exact=True)
def llama_pro(
    config: ModelConfig,
    tensors: Tensors,
    *,
    target_layers: int | None = None,
    positions: list[int] | None = None,
    importance: list[float] | None = None,
) -> tuple[ModelConfig, LazyTensors]:
    """Insert identity blocks (copies with o_proj and down_proj zeroed) — exact.

    Where: after each of ``positions`` (source block indices, repeats allowed); else after the
    ``target_layers - n`` blocks with the highest ``importance`` score; else after every group
    of ``n / (target_layers - n)`` blocks, as in LLaMA-Pro.  Growing to twice the depth or more
    puts several copies after a block (spread evenly, or the extra ones by importance).
    """
    n = config.n_layers
    if positions is None:
        new_blocks = _target(config, target_layers, "llama_pro") - n
        check_room(config, n + new_blocks, f"llama_pro to {n + new_blocks} layers")
        if importance is not None:
            _check_importance(importance, n)
            positions = most_important(list(importance), new_blocks)
        else:
            positions = uniform_positions(n, new_blocks)
    else:
        # A list of block indices, each an int: int() would read 0.5 as 0 and "1" as 1 and
        # record what was not done; an empty list would write a copy and call it a growth.
        if not isinstance(positions, list) or not positions or not all(is_int(p) for p in positions):
            raise ConfigError(
                f"positions must be a non-empty list of layer indices (integers 0..{n - 1}) to insert an identity block after, got {positions!r}"
            )
        if target_layers is not None and target_layers != n + len(positions):
            raise ConfigError(f"target_layers={target_layers} does not match {n} layers plus {len(positions)} positions")
    bad = sorted({p for p in positions if not 0 <= p < n})
    if bad:
        raise ConfigError(f"layer indices {bad} are out of range for a model with {n} layers (valid: 0..{n - 1})")
    plan: LayerPlan = []
    for i in range(n):
        plan.append((i, False))
        plan.extend((i, True) for _ in range(positions.count(i)))
    return apply_layer_plan(config, tensors, plan)


@register("solar", family="depth", exact=False)
def solar(
    config: ModelConfig, tensors: Tensors, *, drop: int | None = None, target_layers: int | None = None
) -> tuple[ModelConfig, LazyTensors]:
    """SOLAR depth up-scaling: blocks ``[0, n-m)`` then ``[m, n)``; ``2(n-m)`` layers.

    Not function-preserving: the seam needs continued pretraining (the loss jump is measured
    and recorded).  Give ``drop`` (m) or ``target_layers``.
    """
    n = config.n_layers
    # drop m gives 2(n - m) layers, more than n only while m < n/2: m = n/2 gives back the
    # original block for block (a copy), a larger m shrinks it — either recorded as a growth.
    most = 2 * (n - 1)
    if n < 3:
        raise ConfigError(f"solar cannot deepen a {n}-layer model (2*(n - drop) layers is at most {n}); use llama_pro or stack")
    if drop is None:
        target = _target(config, target_layers, "solar (or drop)")
        if target % 2:
            raise ConfigError(f"solar makes an even number of layers 2*(n - drop); {target} is odd")
        if target > most:
            raise ConfigError(f"solar reaches at most {most} layers from {n} (drop 1); target_layers={target} needs stack or llama_pro")
        drop = (2 * n - target) // 2
    elif target_layers is not None and (not is_int(drop) or target_layers != 2 * (n - drop)):
        raise ConfigError(f"solar's drop={drop!r} makes 2*(n - drop) layers, not target_layers={target_layers!r}; give one of them")
    if not is_int(drop) or not 1 <= drop <= (n - 1) // 2:
        raise ConfigError(
            f"solar's drop must be between 1 and {(n - 1) // 2} for a {n}-layer model (a larger one leaves {n} layers or fewer), got {drop!r}"
        )
    plan = [(i, False) for i in range(n - drop)] + [(i, False) for i in range(drop, n)]
    return apply_layer_plan(config, tensors, plan)


@register("stack", family="depth", exact=False)
def stack(config: ModelConfig, tensors: Tensors, *, times: int = 2) -> tuple[ModelConfig, LazyTensors]:
    """The whole stack repeated ``times`` times (progressive stacking).  Not exact."""
    if not isinstance(times, int) or times < 2:
        raise ConfigError(f"stack's times must be an integer >= 2, got {times!r}")
    check_room(config, config.n_layers * times, f"stack times {times}")
    plan = [(i, False) for _ in range(times) for i in range(config.n_layers)]
    return apply_layer_plan(config, tensors, plan)


@register("interpolate", family="depth", exact=lambda params: bool(params.get("identity", False)))
def interpolate(config: ModelConfig, tensors: Tensors, *, times: int = 2, identity: bool = False) -> tuple[ModelConfig, LazyTensors]:
    """Every block repeated ``times`` times in place (``0,0,1,1,...``).

    Not exact, unless ``identity`` silences the copies (then it is LLaMA-Pro after every block).
    """
    if not isinstance(times, int) or times < 2:
        raise ConfigError(f"interpolate's times must be an integer >= 2, got {times!r}")
    check_room(config, config.n_layers * times, f"interpolate times {times}")
    plan = [(i, identity and c > 0) for i in range(config.n_layers) for c in range(times)]
    return apply_layer_plan(config, tensors, plan)
