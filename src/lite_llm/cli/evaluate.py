"""`lite-llm eval`, `inspect`, `plot`: reading checkpoints and runs."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from ..errors import LiteLLMError
from .app import THREADS_HELP, app, apply_threads, check_report_path, console, device_option, err_console, friendly_errors, overwrite_option, plain_warnings, print_scores, write_report
from .store_options import (
    cache_policy_option, checkpoint_location, dtype_option, hot_budget_option, load_for_inference, prefetch_option, print_store_stats, stats_option, warm_budget_option,
)


# ------------------------------------------------------------------------------------ eval
@app.command("eval")
@friendly_errors
def eval_command(
    checkpoints: list[str] = typer.Argument(..., help="Checkpoint directories (one or more; with --hot-budget also URLs: file://, https://, s3://)."),
    data: Path = typer.Option(..., help="Dataset directory from `lite-llm data prepare`."),
    domains: Optional[str] = typer.Option(None, help="Comma-separated domains (default: all)."),
    against: Optional[str] = typer.Option(None, "--against", help="Base checkpoint: report each model's change against it (retention)."),
    report: Path = typer.Option(Path("retention"), "--report", help="With --against: where retention.json/.md/.png go."),
    tiers: str = typer.Option("all", help="TierSet to evaluate with."),
    batches: int = typer.Option(16, help="Validation batches per domain.", min=1),
    batch_size: int = typer.Option(16, help="Sequences per batch.", min=1),
    seq_len: int = typer.Option(128, help="Tokens per sequence (at least 2: one token predicted from another).", min=2),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the scores here (a new file unless --overwrite)."),
    overwrite: bool = overwrite_option(),
    device: str = device_option(),
    threads: Optional[int] = typer.Option(None, "--threads", help=THREADS_HELP),
    dtype: Optional[str] = dtype_option(),
    hot_budget: Optional[str] = hot_budget_option(),
    warm_budget: Optional[str] = warm_budget_option(),
    cache_policy: Optional[str] = cache_policy_option(),
    prefetch: bool = prefetch_option(),
    stats: bool = stats_option(),
) -> None:
    """Validation loss and bits per byte per domain; with --against, a retention report.

    Examples:

      lite-llm eval runs/small/checkpoints/step-00000300 --data data/std --domains code,prose

      lite-llm eval runs/ewc/checkpoints/step-00000200 runs/replay/checkpoints/step-00000200 --against ckpt/base --data data/std --domains prose,code --report reports/retention

      lite-llm eval runs/gpu/checkpoints/step-00000200 --data data/std --device cuda:1

      lite-llm eval big --data data/std --hot-budget 1GB --stats
    """
    from ..data import TokenData
    from ..eval import RetentionReport, evaluate
    from ..data.compat import check_data_tokenizer
    from ..runtime.device import resolve_device

    run_device = resolve_device(device)
    check_report_path(json_out, overwrite=overwrite)
    if against is not None and Path(report).exists() and not Path(report).is_dir():
        raise LiteLLMError(f"--report {report} is a file; give a folder for retention.json, .md and .png (it is created if missing)")
    locations = [checkpoint_location(c) for c in ([against, *checkpoints] if against is not None else checkpoints)]
    labels = _labels(locations)

    apply_threads(threads)
    dataset = TokenData(data)
    names = list(dict.fromkeys(d.strip() for d in domains.split(",") if d.strip())) if domains is not None else dataset.domains
    if not names:
        raise LiteLLMError(f"--domains {domains!r} names no domain; give a comma-separated list such as {','.join(dataset.domains)}, or leave it out for all")
    unknown = [d for d in names if d not in dataset.domains]
    if unknown:
        raise LiteLLMError(f"unknown domain(s) {', '.join(unknown)}; the data has {', '.join(dataset.domains)}")
    results: dict[str, dict[str, dict[str, float]]] = {}
    for label, path in labels.items():
        loaded = load_for_inference(
            path, tiers=tiers, device=run_device, hot_budget=hot_budget, warm_budget=warm_budget, policy=cache_policy, prefetch=prefetch, stats=stats,
            dtype=dtype,
        )
        config = loaded.model.config
        check_data_tokenizer(dataset.tokenizer, data, loaded.tokenizer, config.vocab_size, path)
        if seq_len > config.max_seq_len:
            raise LiteLLMError(f"--seq-len {seq_len} is longer than checkpoint {path}'s context of {config.max_seq_len} tokens; give --seq-len {config.max_seq_len} or less")
        scores = evaluate(loaded.model, dataset, names, batch_size=batch_size, seq_len=seq_len, max_batches=batches, tierset=tiers)
        if stats and loaded.store is not None:
            print_store_stats(loaded)
        results[label] = {d: s.to_dict() for d, s in scores.items()}
        if against is None:
            print_scores(results[label], title=f"{path} ({tiers})")
    if against is not None:
        base = next(iter(labels))
        retention = RetentionReport(base, names, {m: {d: s["bpb"] for d, s in r.items()} for m, r in results.items()})
        table = Table("model", *(f"{d} bpb" for d in names), *(f"{d} vs base" for d in names), title=f"retention against {base} (bits per byte; lower is better)")
        for model in retention.scores:
            changes = ["base" if model == base else f"{retention.change(model, d):+.2%}" for d in names]
            table.add_row(model, *(f"{retention.scores[model][d]:.4f}" for d in names), *changes)
        console.print(table)
        earlier = [name for name in ("retention.json", "retention.md", "retention.png") if (Path(report) / name).is_file()]
        written = retention.write(report)
        console.print("wrote " + ", ".join(str(w) for w in written) + (f" (replacing the earlier {', '.join(earlier)})" if earlier else ""))
    if json_out:
        write_report(json_out, results if len(results) > 1 else next(iter(results.values())))


def _labels(paths: list[Path | str]) -> dict[str, Path | str]:
    """Short unique names for checkpoints: the directory name, or more of the path when two
    share one (``runs/a/final`` and ``runs/b/final`` become ``a/final`` and ``b/final``).
    The same checkpoint twice (also as --against) is refused: it would be scored once and
    its label would grow into the whole path."""
    parts = [tuple(p.rstrip("/").split("/")) if isinstance(p, str) else p.resolve().parts for p in paths]
    seen: dict[tuple[str, ...], Path | str] = {}
    for path, key in zip(paths, parts):
        if key in seen:
            also = f" (as {seen[key]} and {path})" if str(seen[key]) != str(path) else ""
            raise LiteLLMError(f"checkpoint {path} is given twice{also}; name each checkpoint once, and --against's base not among the others")
        seen[key] = path
    depth = 1
    while True:
        labels = ["/".join(p[-depth:]) for p in parts]
        if len(set(labels)) == len(labels) or depth >= max(len(p) for p in parts):
            return dict(zip(labels if len(set(labels)) == len(labels) else [str(p) for p in paths], paths))
        depth += 1


# ------------------------------------------------------------------------------------ inspect
@app.command()
@friendly_errors
def inspect(
    checkpoint: Path = typer.Argument(..., help="Checkpoint directory."),
    verify: bool = typer.Option(True, "--verify/--no-verify", help="Check every shard's sha256."),
) -> None:
    """Show a checkpoint's manifest, tiers and parameter counts; verify its hashes.

    Exits non-zero when a shard is missing, truncated or fails its hash.

    Example:

      lite-llm inspect runs/small/checkpoints/step-00000300
    """
    from ..checkpoint import read_manifest, verify_checkpoint
    from ..config import ModelConfig, TierSet, format_size

    manifest = read_manifest(checkpoint)
    with plain_warnings():  # an advisory budget the model exceeds: one "warning:" line
        cfg = ModelConfig.from_dict(manifest["model_config"], allow_unknown=True)
    console.print(f"[bold]{checkpoint}[/bold]  format {manifest['format_version']}  model '{cfg.name}'")
    console.print(
        f"d_model {cfg.d_model}, layers {cfg.n_layers}, heads {cfg.n_heads}/{cfg.n_kv_heads} (q/kv), head_dim {cfg.head_dim}, vocab {cfg.vocab_size}"
        + (", tied embeddings" if cfg.tie_embeddings else "")
    )
    if cfg.tiers:
        from ..store import format_bytes

        on_disk = {t.name: sum(s["bytes"] for s in manifest["shards"] if s["tier"] == t.name) for t in cfg.tiers}
        table = Table(
            "tier", "groups x experts", "expert hidden", "k (group, expert)", "params", "budget", "placement", "on disk", "quantization", title="tiers"
        )
        for t in cfg.tiers:
            table.add_row(
                t.name, f"{t.num_groups} x {t.experts_per_group}", str(t.expert_hidden),
                f"{cfg.k_group_of(t)}, {cfg.k_expert_of(t)}", format_size(cfg.tier_params(t)),
                format_size(t.budget) if t.budget else "-", t.placement, format_bytes(on_disk[t.name]), t.quantization or "none",
            )
        console.print(table)
    counts = Table("TierSet", "total parameters", "active per token", title="parameters")
    counts.add_row("(model)", f"{cfg.num_params():,}", f"{cfg.num_active_params():,}")
    for t in cfg.tiers:
        ts = TierSet.up_to(t.name)
        counts.add_row(str(ts), "", f"{cfg.num_active_params(ts):,}")
    console.print(counts)
    shards = Table("shard", "tier", "kind", "bytes", "sha256", title="shards")
    for s in manifest["shards"]:
        shards.add_row(s["path"], s["tier"], s.get("kind", ""), f"{s['bytes']:,}", s["sha256"][:16] + "…")
    console.print(shards)
    extra = [f for f in manifest.get("files", []) if isinstance(f, dict) and f.get("kind") == "extra_file"]
    for f in extra:  # files measured after the weights (a TierSet profile), verified with them
        console.print(f"extra file {f.get('name')}: {f.get('path')} ({f.get('bytes', 0):,} bytes)", highlight=False)
    if verify:
        problems = verify_checkpoint(checkpoint)
        if problems:
            for p in problems:
                err_console.print(f"[bold red]FAIL[/bold red] {p}", highlight=False)
            raise typer.Exit(1)
        also = f" and {len(extra)} extra file(s)" if extra else ""
        console.print(f"[green]verified[/green] {len(manifest['shards'])} shard(s){also}")


# ------------------------------------------------------------------------------------ plot
@app.command()
@friendly_errors
def plot(
    run: Path = typer.Argument(..., help="Run directory (with metrics.jsonl)."),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="Folder for the PNGs (default RUN/plots)."),
) -> None:
    """Draw a run's charts: loss per domain, bits per byte, tier shares, expert utilisation.

    Example:

      lite-llm plot runs/small
    """
    from ..plot import plot_run

    for path in plot_run(run, output):
        console.print(f"wrote {path}")
