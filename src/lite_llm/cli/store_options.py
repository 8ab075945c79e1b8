"""The expert-store options `generate` and `eval` share, and loading a checkpoint with them."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Union

import typer

from ..errors import LiteLLMError
from .app import err_console

if TYPE_CHECKING:
    from ..store import InferenceModel


def checkpoint_location(text: str) -> Union[Path, str]:
    """A checkpoint argument as given: a URL stays a string (``Path`` folds ``file:///x`` and
    ``https://host/x`` into ``file:/x`` and ``https:/host/x``, which no longer read as URLs, so
    the archive level would never be reached), anything else is a local path."""
    from ..store.archive import is_url

    return text if is_url(text) else Path(text)


def hot_budget_option() -> Any:
    return typer.Option(
        None, "--hot-budget", help="Serve experts from disk, keeping at most this much of them on the compute device (e.g. 512MB, 2GiB)."
    )


def warm_budget_option() -> Any:
    return typer.Option(None, "--warm-budget", help="With --hot-budget: CPU RAM for experts between disk and device (default 0).")


def cache_policy_option() -> Any:
    # no default value: a policy given without --hot-budget is refused, not silently unused
    return typer.Option(None, "--cache-policy", help="With --hot-budget: which expert to evict: layer-cycle (the default) or lru.")


def prefetch_option() -> Any:
    return typer.Option(
        False, "--prefetch/--no-prefetch",
        help="With --warm-budget: read each layer's likely experts into RAM one layer early (pre-gating); off by default: it measured slower on 2 cores.",
    )


def dtype_option() -> Any:
    return typer.Option(
        None, "--dtype", help="Compute in this dtype: float32, bfloat16 or float16 (default: the checkpoint's own; bfloat16 halves the weights' memory)."
    )


def stats_option() -> Any:
    return typer.Option(False, "--stats", help="With --hot-budget: print the store's hits, misses, bytes moved and evictions (stderr).")


def check_store_options(
    checkpoint: Union[Path, str], *, hot_budget: Optional[str], warm_budget: Optional[str], policy: Optional[str] = None,
    prefetch: bool = False, stats: bool = False,
) -> None:
    """Refuse store options that would do nothing without the ones they depend on: a user who
    asked for --stats or --prefetch should hear why there is none, not get silence."""
    from ..store.archive import is_url

    if hot_budget is None:  # --warm-budget alone is refused by the loader (store.load_for_inference)
        if policy is not None:
            raise LiteLLMError(f"--cache-policy {policy} chooses what the expert store evicts, which only --hot-budget uses; add --hot-budget (e.g. 512MB) or leave it out")
        if stats:
            raise LiteLLMError("--stats reports the expert store, which only --hot-budget uses; add --hot-budget (e.g. 512MB) or leave --stats out")
        if prefetch:
            raise LiteLLMError("--prefetch needs --hot-budget and --warm-budget (it reads experts into the warm level); give both, or leave --prefetch out")
        if is_url(checkpoint):
            raise LiteLLMError(f"a checkpoint at a URL ({checkpoint}) is read through the expert store; add --hot-budget (e.g. --hot-budget 512MB)")
    elif prefetch and warm_budget is None:
        raise LiteLLMError("--prefetch reads experts into the warm level, which --warm-budget sizes; add --warm-budget (e.g. 1GB) or leave --prefetch out")


def load_for_inference(
    checkpoint: Union[Path, str], *, tiers: str, device: Any, hot_budget: Optional[str], warm_budget: Optional[str],
    policy: Optional[str] = None, prefetch: bool = False, stats: bool = False, dtype: Optional[str] = None,
) -> InferenceModel:
    """The checkpoint whole in memory, or with its experts in a store when a budget is given
    (``checkpoint`` may then be a URL: see :func:`checkpoint_location`), after refusing store
    options that would do nothing."""
    from ..store import load_for_inference as load
    from .app import parse_dtype

    torch_dtype = parse_dtype(dtype)
    check_store_options(checkpoint, hot_budget=hot_budget, warm_budget=warm_budget, policy=policy, prefetch=prefetch, stats=stats)
    return load(
        checkpoint, tierset=None if tiers == "all" else tiers, device=device, hot_budget=hot_budget, warm_budget=warm_budget,
        policy=policy or "layer-cycle", prefetch=prefetch, dtype=torch_dtype,
    )


def print_store_stats(loaded: InferenceModel) -> None:
    from ..store import format_bytes

    if loaded.prefetcher is not None:
        loaded.prefetcher.wait()
    s = loaded.store.stats()
    warm = (f"warm {s.warm.hits} hits / {s.warm.misses} misses, {s.warm.evictions} evictions" if loaded.store.warm.budget
            else "no warm level (--warm-budget 0)")
    err_console.print(
        f"expert store: hot {s.hot.hits} hits / {s.hot.misses} misses ({s.hot.hit_rate:.1%}), {s.hot.evictions} evictions, "
        f"peak {format_bytes(s.hot.peak_bytes)}; {warm}; "
        f"read from disk {s.cold_reads} experts, {format_bytes(s.cold_bytes)}",
        highlight=False,
    )
    if loaded.prefetcher is not None:
        p = loaded.prefetcher.stats
        err_console.print(
            f"prefetch: recall {p.recall:.1%}, precision {p.precision:.1%}, {format_bytes(p.wasted_bytes)} read for experts not used", highlight=False
        )
