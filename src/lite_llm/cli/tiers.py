"""`lite-llm tiers profile` and `lite-llm tiers choose`: TierSets under latency and memory budgets."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from ..errors import LiteLLMError
from .app import THREADS_HELP, app, apply_threads, console, device_option, err_console, friendly_errors
from .store_options import hot_budget_option, warm_budget_option

tiers_app = typer.Typer(help="Profile TierSets (latency, memory, quality) and choose one for a budget.", no_args_is_help=True)
app.add_typer(tiers_app, name="tiers")


def parse_data_pairs(pairs: list[str]) -> dict[str, Path]:
    """``["code=data/std", ...]`` -> ``{"code": Path("data/std")}``, refusing malformed pairs."""
    out: dict[str, Path] = {}
    for pair in pairs:
        domain, sep, path = pair.partition("=")
        if not sep or not domain.strip() or not path.strip():
            raise LiteLLMError(f"cannot read --data {pair!r}; write DOMAIN=PATH, e.g. --data code=data/std")
        if domain.strip() in out:
            raise LiteLLMError(f"--data names domain {domain.strip()!r} twice; give each domain once")
        out[domain.strip()] = Path(path.strip())
    return out


def local_checkpoint(spec: str, command: str) -> Path:
    """``spec`` as a checkpoint directory; a URL is refused in words (typer's Path would have
    turned ``file:///x`` into ``file:/x`` and reported a missing directory)."""
    from ..store.archive import is_url

    if is_url(spec):
        raise LiteLLMError(
            f"tiers {command} reads the TierSet profile stored in a local checkpoint directory, and {spec} is a URL; "
            "give the checkpoint's folder (a URL is served as it is by generate, eval and serve with --hot-budget)"
        )
    return Path(spec)


def check_profile_inputs(checkpoint: Path, seq_len: int) -> None:
    """Refuse, before anything is timed, a --seq-len beyond the model's context (data from
    another tokenizer is refused by ``profile_checkpoint`` itself, also before any timing)."""
    from ..checkpoint.lazy import open_checkpoint

    source = open_checkpoint(checkpoint, verify=False)
    if seq_len > source.config.max_seq_len:
        raise LiteLLMError(f"--seq-len {seq_len} is longer than checkpoint {checkpoint}'s context of {source.config.max_seq_len} tokens; give --seq-len {source.config.max_seq_len} or less")


def print_table(table, chosen=None, title: str = "TierSet profile") -> None:
    from ..store import format_bytes

    grid = Table("TierSet", "ms/token", "memory", "utility", *(f"{d} bpb" for d in table.domains), title=title)
    for p in sorted(table.profiles, key=lambda p: (p.latency_ms_per_token, p.memory_bytes)):
        mark = " *" if chosen is not None and p.tiers == chosen.tiers else ""
        grid.add_row(
            table.label(p.tiers) + mark, f"{p.latency_ms_per_token:.3f}", format_bytes(p.memory_bytes), f"{p.utility:.4f}",
            *(f"{p.bpb.get(d, float('nan')):.4f}" for d in table.domains),
        )
    console.print(grid)


@tiers_app.command("profile")
@friendly_errors
def profile_command(
    checkpoint: str = typer.Argument(..., help="Checkpoint directory."),
    data: list[str] = typer.Option(..., "--data", help="DOMAIN=PATH: a validation domain of a prepared dataset folder (repeat for more)."),
    tokens: int = typer.Option(32, "--tokens", help="Tokens decoded per timed run.", min=1),
    repeats: int = typer.Option(5, "--repeats", help="Timed runs per TierSet (the median is kept).", min=1),
    batches: int = typer.Option(4, "--batches", help="Validation batches per domain for bits per byte.", min=1),
    batch_size: int = typer.Option(4, "--batch-size", help="Sequences per validation batch.", min=1),
    seq_len: int = typer.Option(64, "--seq-len", help="Tokens per validation sequence.", min=2),
    device: str = device_option(),
    threads: Optional[int] = typer.Option(None, "--threads", help=THREADS_HELP),
    hot_budget: Optional[str] = hot_budget_option(),
    warm_budget: Optional[str] = warm_budget_option(),
) -> None:
    """Measure every candidate TierSet's latency per token, resident memory and bits per byte,
    and store the table in the checkpoint (listed in its manifest; it still verifies).

    Candidates: every non-empty subset of tiers for up to 4 tiers; beyond, the cumulative sets
    and each tier alone.  Latency is of KV-cached decoding on this device and budget.

    Examples:

      lite-llm tiers profile runs/small/checkpoints/step-00000300 --data code=data/std --data prose=data/std

      lite-llm tiers profile big --data code=data/std --hot-budget 512MB --warm-budget 2GB --tokens 64
    """
    from ..runtime.device import resolve_device
    from ..serve.profiling import profile_checkpoint
    from ..serve.selection import save_profile

    pairs = parse_data_pairs(data)
    run_device = resolve_device(device)
    ckpt = local_checkpoint(checkpoint, "profile")
    check_profile_inputs(ckpt, seq_len)
    apply_threads(threads)
    table = profile_checkpoint(
        ckpt, pairs, device=run_device, hot_budget=hot_budget, warm_budget=warm_budget, tokens=tokens, repeats=repeats,
        eval_batches=batches, batch_size=batch_size, seq_len=seq_len, progress=lambda m: err_console.print(m, highlight=False),
    )
    rel = save_profile(ckpt, table)
    print_table(table, title=f"{ckpt} on {table.device}")
    console.print(f"stored {rel} in {ckpt}")


@tiers_app.command("choose")
@friendly_errors
def choose_command(
    checkpoint: str = typer.Argument(..., help="Checkpoint directory with a TierSet profile."),
    latency_ms: Optional[float] = typer.Option(None, "--latency-ms", help="Most milliseconds per decoded token."),
    memory: Optional[str] = typer.Option(None, "--memory", help="Most bytes of resident weights (e.g. 512MB, 2GiB)."),
    show: bool = typer.Option(False, "--table", help="Also print the whole profile, the choice marked *."),
) -> None:
    """The best TierSet (lowest bits per byte) whose measured latency and memory meet the budgets.

    Examples:

      lite-llm tiers choose runs/small/checkpoints/step-00000300 --latency-ms 5 --memory 512MB

      lite-llm tiers choose runs/small/checkpoints/step-00000300 --memory 64MB --table
    """
    from ..serve.selection import choose, load_profile
    from ..store import format_bytes, parse_bytes

    ckpt = local_checkpoint(checkpoint, "choose")
    memory_bytes = parse_bytes(memory, "memory budget") if memory is not None else None
    table = load_profile(ckpt)
    if table is None:
        raise LiteLLMError(f"checkpoint {ckpt} has no TierSet profile; measure one with `lite-llm tiers profile {ckpt} --data DOMAIN=PATH`")
    pick = choose(table, latency_ms, memory_bytes)
    if show:
        print_table(table, pick)
    where = "measured" if pick.measured else "predicted by the fitted model"
    console.print(
        f"{table.label(pick.tiers)}: {pick.latency_ms_per_token:.3f} ms/token, {format_bytes(pick.memory_bytes)} ({pick.memory_bytes} bytes), "
        f"utility {pick.utility:.4f} ({where} on {table.device})",
        highlight=False,
    )
