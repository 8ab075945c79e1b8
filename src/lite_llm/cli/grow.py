"""`lite-llm expand`, `validate`, `plan`, `add-tier`: growing checkpoints and checking them."""

from __future__ import annotations

import functools
import json
import math
import warnings
from pathlib import Path
from typing import Any, Callable, Optional

import typer
from rich.markup import escape
from rich.table import Table

from ..errors import ConfigError
from .app import app, console, device_option, err_console, friendly_errors, overwrite_option, plain_warnings, check_report_path, write_report


def _parse_set(items: list[str]) -> dict[str, Any]:
    """``KEY=VALUE`` pairs, values read as YAML (numbers, lists, booleans)."""
    import yaml

    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set expects KEY=VALUE, got {item!r}")
        out[key.strip().replace("-", "_")] = yaml.safe_load(value)
    return out


def _warnings_plain(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Run a command under :func:`plain_warnings`: a warning raised anywhere in it (an advisory
    tier budget a config exceeds, from the config's own check) reaches the user as one
    ``warning: ...`` line, not as Python's ``<string>:20: UserWarning`` naming no place of theirs."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with plain_warnings():
            return fn(*args, **kwargs)

    return wrapper


def _agreeing_path(given: Optional[Path], in_recipe: Any, flag: str, key: str, recipe: Optional[Path]) -> Optional[Path]:
    """The one path that the command line (``flag``) and the recipe's ``key:`` name: either
    alone, or both when they resolve to the same place.  Two different ones are refused — taking
    either silently grows (or writes) what the other one's author did not mean."""
    if in_recipe is None:
        return given
    if given is None:
        return Path(in_recipe)
    if given.resolve() != Path(in_recipe).resolve():
        raise ConfigError(
            f"{flag} {given} and the {key}: {in_recipe} of recipe {recipe} name different paths; give the same one in both, or leave one out"
        )
    return given


def _print_records(records: list[dict[str, Any]]) -> None:
    from ..config import format_size

    table = Table("step", "method", "params", "exact", "max |Δlogit| / max |logit|", "max |Δlogit|", "loss jump", title="growth (logits in float64; an inexact depth step in float32 unless --validate always)")
    for i, r in enumerate(records, 1):
        p = r["preservation"]
        shown = {k: v for k, v in r["params"].items() if k != "importance"}
        table.add_row(
            str(i),
            r["method"],
            f"{format_size(r['params_before'])} → {format_size(r['params_after'])}  {json.dumps(shown)}",
            "yes" if r["exact"] else "no",
            ("0, proved (no sample needed)" if p.get("proved") else f"{p['max_rel']:.2e}") if p else "not measured",
            f"{p['max_abs']:.2e}" if p else "-",
            ("0 (same function)" if p.get("proved") else f"{p['loss_jump']:+.4f}") if p else "-",
        )
    console.print(table)
    for i, r in enumerate(records, 1):
        dead = r.get("gradient_flow_dead") or []
        if dead:  # recorded, and what `lite-llm validate` fails on: say it here too
            err_console.print(
                f"warning: step {i} ({r['method']}): no gradient reached {len(dead)} new parameter(s) on the check's sample "
                f"({', '.join(dead[:3])}); an expert no sample token routes to stays untrained until tokens reach it",
                highlight=False,
            )


@app.command()
@friendly_errors
@_warnings_plain
def expand(
    checkpoint: Optional[Path] = typer.Argument(None, help="Source: a checkpoint or a Hugging Face model folder (or `source:` in the recipe)."),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="New checkpoint directory (or `output:` in the recipe)."),
    output_format: Optional[str] = typer.Option(
        None, "--format", help="Write the result as a Lite LLM `checkpoint` or as an `hf` (transformers) folder [default: checkpoint, or the recipe's format:]."
    ),
    recipe: Optional[Path] = typer.Option(None, "--recipe", help="YAML/JSON recipe with a list of growth steps."),
    method: Optional[str] = typer.Option(None, "--method", help="One growth method (see --list)."),
    target_layers: Optional[int] = typer.Option(None, "--target-layers", help="Depth methods: layers after growth.", min=1),
    set_: list[str] = typer.Option([], "--set", help="Method parameter KEY=VALUE (repeatable), e.g. --set d_model=512."),
    validate: str = typer.Option(
        "auto",
        help="auto: check every step (streamed, any size), proving a step that is the identity by construction (llama_pro) instead of "
        "evaluating it and measuring a depth step not meant to be exact (solar, stack) in float32; always: evaluate the float64 sample for every "
        "step; never: skip the check.",
    ),
    tolerance: Optional[float] = typer.Option(
        None, "--tolerance", help="Largest relative logit change (max|Δ| / max|logit|, float64) an exact step may make [default: 1e-05, or the recipe's]."
    ),
    list_methods: bool = typer.Option(False, "--list", help="List the growth methods and exit."),
    overwrite: bool = overwrite_option(),
) -> None:
    """Grow a checkpoint into a bigger one that computes the same function.

    Examples:

      lite-llm expand ckpt --method llama_pro --target-layers 40 -o grown

      lite-llm expand ckpt --method width --set d_model=512 -o wider

      lite-llm expand hf/llama --method solar --target-layers 24 -o hf/grown --format hf

      lite-llm expand --recipe grow.yaml
    """
    from ..grow import available_ops
    from ..interop.hf_stream import expand_model
    from ..grow.recipe import Recipe, parse_step
    from ..grow.validate import check_tolerance

    if list_methods:
        table = Table("method", "family", "parameters", "what it does", title="growth methods")
        for name, op in available_ops().items():
            table.add_row(name, op.family, ", ".join(op.parameters()), op.summary)
        console.print(table)
        return
    if (recipe is None) == (method is None):
        raise ConfigError("give exactly one of --recipe FILE or --method NAME (see lite-llm expand --list)")
    if recipe is not None:
        plan = Recipe.from_file(recipe)
        if target_layers is not None or set_:
            raise ConfigError("--target-layers and --set apply to --method; put parameters in the recipe's steps")
    else:
        params = _parse_set(set_)
        if target_layers is not None:
            params["target_layers"] = target_layers
        plan = Recipe([parse_step({"method": method, **params}, "--method")])
    source = _agreeing_path(checkpoint, plan.source, "the checkpoint", "source", recipe)
    out = _agreeing_path(output, plan.output, "-o", "output", recipe)
    if source is None or out is None:
        raise ConfigError("name the source checkpoint and the output (-o), on the command line or as source:/output: in the recipe")
    mode = validate if recipe is None or validate != "auto" else plan.validate
    if tolerance is not None:
        check_tolerance(tolerance, "--tolerance")
    # A step's own tolerance wins, then --tolerance, then the recipe's, then the default.
    tol = tolerance if tolerance is not None else plan.tolerance
    with console.status("growing…"):
        result = expand_model(source, out, plan.steps, output_format=output_format or plan.format, validate=mode, tolerance=tol, overwrite=overwrite)
    _print_records(result.records)
    console.print(f"wrote {result.path} ({result.config.num_params():,} parameters)")


@app.command("validate")
@friendly_errors
@_warnings_plain
def validate_command(
    original: Path = typer.Argument(..., help="The checkpoint before growth."),
    grown: Path = typer.Argument(..., help="The grown checkpoint."),
    tolerance: float = typer.Option(1e-5, help="Largest relative logit change (max|Δ| / max|logit|, float64) allowed for exact growth."),
    tokens: int = typer.Option(128, help="Sample tokens to compare on.", min=1),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the report as JSON here (a new file unless --overwrite)."),
    device: str = device_option(),
    overwrite: bool = overwrite_option(),
) -> None:
    """Check a grown model against its original: logits, gradient flow, parameter count, loss jump.

    Both are read block by block (never two whole models in memory) and compared in float64,
    on --device (a GPU computes float64 to the same rules; the figures agree to ~1e-16).
    Exits non-zero when an exact growth changed the logits beyond the tolerance, a new
    parameter gets no gradient, the parameter count disagrees with the config, or GROWN was
    not grown from ORIGINAL.

    Examples:

      lite-llm validate runs/small/checkpoints/step-00000300 runs/grown

      lite-llm validate runs/small/checkpoints/step-00000300 runs/grown --device cpu
    """
    from ..checkpoint.lazy import open_checkpoint
    from ..checkpoint.derived import source_tokenizer
    from ..grow.validate import check_growth, check_sample, check_tolerance
    from ..runtime.device import resolve_device

    run_device = resolve_device(device)
    check_report_path(json_out, overwrite=overwrite)

    check_tolerance(tolerance, "--tolerance")
    if tokens < 2:
        raise ConfigError(f"--tokens must be at least 2, got {tokens}")
    a, b = open_checkpoint(original), open_checkpoint(grown)
    records = _records_since(a, b)
    exact = all(r.get("exact") for r in records)
    ids = check_sample([a.config, b.config], source_tokenizer(a), tokens)
    report = check_growth(a.config, a.tensors, b.config, b.tensors, ids, exact_expected=exact, tolerance=tolerance, device=run_device)
    table = Table("check", "value", "result", title=f"{original} → {grown}")
    ok, bad = "[green]ok[/green]", "[bold red]FAIL[/bold red]"
    verdict = (ok if report.preserved else bad) if exact else "not exact by design"
    table.add_row("max |Δlogit| / max |logit| (float64)", f"{report.max_rel:.3e} (tolerance {tolerance:g})", verdict)
    table.add_row("max |Δlogit|", f"{report.max_abs:.3e} (logits up to {report.logits_scale:.3g})", "")
    table.add_row("MSE of logits", f"{report.mse:.3e}", "")
    table.add_row("loss jump", f"{report.loss_jump:+.5f} ({report.loss_original:.4f} → {report.loss_grown:.4f})", "")
    table.add_row("parameters", f"{report.params_original:,} → {report.params_grown:,} (config: {report.params_analytic:,})", ok if report.count_ok else bad)
    table.add_row(
        f"new parameters with gradient ({_checked_blocks(report.new_params)})",
        f"{len(report.new_params) - len(report.dead_params)}/{len(report.new_params)}",
        ok if not report.dead_params else bad,
    )
    console.print(table)
    for name in report.dead_params[:10]:
        err_console.print(f"no gradient reaches {name}", highlight=False)
    if json_out:
        write_report(json_out, report.to_dict())
    if not report.passed:
        raise typer.Exit(1)


def _checked_blocks(new_params: list[str]) -> str:
    """Which blocks the gradient check looked at, from the names of the parameters it checked:
    only the first and the last grown block are (every growth builds its blocks alike), so a
    bare ``N/N`` would read as every new parameter of the model."""
    blocks = sorted({int(parts[1]) for parts in (name.split(".") for name in new_params) if parts[0] == "layers" and parts[1:2] and parts[1].isdigit()})
    if not blocks:
        return "no grown block to check"
    if len(blocks) == 1:
        return f"block {blocks[0]} checked"
    return f"blocks {', '.join(map(str, blocks[:-1]))} and {blocks[-1]} checked"


def _records_since(original: Any, grown: Any) -> list[dict[str, Any]]:
    """The expansion records of ``grown`` from the one whose source is ``original`` on; a
    checkpoint not grown from ``original`` is refused (there is nothing to validate)."""
    from ..grow.validate import ValidationError

    if original.config.vocab_size != grown.config.vocab_size:
        raise ValidationError(
            f"{grown.path} has a vocabulary of {grown.config.vocab_size} tokens and {original.path} one of {original.config.vocab_size}, "
            "so it was not grown from it; validate compares a grown checkpoint with the one it was grown from"
        )
    records = grown.progressive.get("expansions") or []
    digest = original.manifest_sha256()
    for k, record in enumerate(records):
        if record.get("source_manifest_sha256") == digest:
            return records[k:]
    raise ValidationError(
        f"{grown.path} was not grown from {original.path} (no expansion record in its progressive.json names that checkpoint as its source); "
        "validate compares a grown checkpoint with the one it was grown from"
    )


@app.command()
@friendly_errors
@_warnings_plain
def plan(
    from_: Path = typer.Option(..., "--from", help="Checkpoint, config file or preset name to grow from."),
    to: str = typer.Option(..., "--to", help="Target size (7B, 350M) or a config file / preset whose size to reach."),
    strategy: str = typer.Option("all", help="depth_first, width_first, balanced, moe, or all."),
    tolerance: float = typer.Option(0.1, help="How far (a fraction) the plan's final size may be from the target."),
    tokens_per_param: float = typer.Option(20.0, help="Continued-training tokens per added parameter (cost model)."),
    write_recipe: Optional[Path] = typer.Option(None, "--write-recipe", help="Write the (single) strategy's plan as a recipe YAML (a new file unless --overwrite)."),
    raise_budgets: bool = typer.Option(
        False, "--raise-budgets", help="Let a plan start with budget steps raising each strict tier budget its final model exceeds to exactly what it needs."
    ),
    overwrite: bool = overwrite_option(),
) -> None:
    """Propose growth steps to a target size, with parameter counts and training FLOPs.

    Every proposed plan has been run through the growth operations' own checks (tier
    budgets, head groups, routing limits) and ends within --tolerance of the target; when no
    plan of sane steps fits, one line says so with the closest size that does.

    A strict tier budget is honoured unless --raise-budgets says the growth is on purpose:
    the plan then starts with a budget step (exact, no weight changes) per tier it takes past
    its strict budget, and the recipe written runs through expand as it is.

    Examples:

      lite-llm plan --from runs/small/checkpoints/step-00000300 --to 1B

      lite-llm plan --from small --to 350M --strategy moe --write-recipe grow.yaml

      lite-llm plan --from small --to 350M --strategy balanced --raise-budgets
    """
    from ..config import format_size, parse_size
    from ..grow.planner import STRATEGIES

    if not math.isfinite(tokens_per_param) or tokens_per_param <= 0:  # else the FLOPs shown are negative or nan
        raise ConfigError(f"--tokens-per-param must be a positive number (tokens of continued training per added parameter), got {tokens_per_param}")
    check_report_path(write_recipe, "--write-recipe", overwrite, example="grow.yaml")
    source = _config_of(from_, "--from")
    try:
        target = parse_size(to)
    except ConfigError:
        target = _config_of(Path(to), "--to", "a size (e.g. 350M, 7B), ").num_params()
    strategies = list(STRATEGIES) if strategy == "all" else [strategy]
    if write_recipe and len(strategies) != 1:
        raise ConfigError("--write-recipe needs one --strategy")
    with warnings.catch_warnings():  # the search builds many candidate configs: only the plans shown may warn (below)
        warnings.simplefilter("ignore")
        plans = _plans(source, target, strategies, tokens_per_param=tokens_per_param, tolerance=tolerance, raise_budgets=raise_budgets)
    for p in plans:
        final = p.final.num_params()
        title = f"{p.strategy}: {format_size(source.num_params())} → {format_size(final)} ({p.error:+.1%} of {format_size(target)})"
        table = Table("step", "method", "parameters", "total", "active", "tokens", "FLOPs", title=title)
        for i, s in enumerate(p.steps, 1):
            table.add_row(str(i), s.step.method, json.dumps(s.step.params), format_size(s.params), format_size(s.active_params), format_size(s.tokens), f"{s.flops:.2e}")
        console.print(table)
        console.print(f"  growth path {p.growth_flops:.3e} FLOPs vs from scratch {p.scratch_flops:.3e} ({p.growth_flops / p.scratch_flops:.0%})")
        _warn_final(p)
        if write_recipe:
            import yaml

            from ..checkpoint.atomic import replace_file

            replace_file(write_recipe, yaml.safe_dump(p.recipe(), sort_keys=False).encode("utf-8"))
            console.print(f"wrote {write_recipe}")


def _plans(source: Any, target: int, strategies: list[str], **options: Any) -> list[Any]:
    """The plan of each of ``strategies``; with several, one without a plan says why on stderr
    and the others are still shown (none at all is an error)."""
    from ..config import format_size
    from ..grow.planner import PlanError, plan_growth

    if len(strategies) == 1:
        return [plan_growth(source, target, strategies[0], **options)]
    plans = []
    for name in strategies:
        try:
            plans.append(plan_growth(source, target, name, **options))
        except PlanError as exc:
            err_console.print(f"[yellow]{name}:[/yellow] {escape(str(exc))}", highlight=False)
    if not plans:
        raise PlanError(f"no strategy has a plan from {format_size(source.num_params())} to {format_size(target)} within {options['tolerance']:.0%}; see the reasons above")
    return plans


def _warn_final(p: Any) -> None:
    """Warn of what the config check of plan ``p``'s final model warns of (an advisory tier
    budget it exceeds), naming the plan: the warning is about the model the plan makes, not the
    candidates its search tried and dropped (whose warnings are not shown)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        p.final.replace()  # a validated copy: the config's checks run again
    for w in caught:
        warnings.warn(f"the {p.strategy} plan's final model: {w.message}", stacklevel=2)


def _config_of(spec: Path, option: str | None = None, also: str = ""):
    """A model config from a checkpoint directory, a config file or a preset name; with
    ``option``, a name that is none of these is refused as what it is (``unknown preset``
    alone misleads whoever meant a path or, with ``also``, a size)."""
    from ..checkpoint import read_manifest
    from ..config import PRESETS, ModelConfig

    if spec.is_dir():
        return ModelConfig.from_dict(read_manifest(spec)["model_config"], allow_unknown=True)
    if spec.is_file():
        return ModelConfig.from_file(spec)
    if option is not None and str(spec) not in PRESETS:
        raise ConfigError(
            f"{option} {str(spec)!r} is not {also}a checkpoint directory, a config file or a preset ({', '.join(sorted(PRESETS))}); check the spelling or the path"
        )
    return ModelConfig.from_preset(str(spec))


@app.command("add-tier")
@friendly_errors
@_warnings_plain
def add_tier_command(
    checkpoint: Path = typer.Argument(..., help="Source checkpoint (a tiered MoE model)."),
    output: Path = typer.Option(..., "-o", "--output", help="New checkpoint directory."),
    tier: str = typer.Option(..., "--tier", help="The new tier's name (its permanent id), e.g. tier_10b."),
    groups: Optional[int] = typer.Option(None, "--groups", min=1, help="Expert groups in the new tier (default: the source tier's)."),
    experts_per_group: Optional[int] = typer.Option(None, "--experts-per-group", min=1, help="Experts in each group (default: the source tier's)."),
    expert_hidden: Optional[int] = typer.Option(None, "--expert-hidden", min=1, help="Hidden width of each expert (default: the source tier's)."),
    budget: Optional[str] = typer.Option(None, "--budget", help="The tier's parameter budget (10B, 250M)."),
    budget_mode: str = typer.Option("strict", "--budget-mode", help="strict (over budget is an error) or advisory (a warning)."),
    placement: str = typer.Option("warm", "--placement", help="hot, warm, cold or archive."),
    init: str = typer.Option("random", "--init", help="random, copy (a source tier's experts) or upcycle (their mean)."),
    source_tier: Optional[str] = typer.Option(None, "--source-tier", help="Tier to copy/upcycle from (default: the first)."),
    k_group: Optional[int] = typer.Option(None, "--k-group", help="Groups per token in this tier (default: the routing's).", min=1),
    k_expert: Optional[int] = typer.Option(None, "--k-expert", help="Experts per group per token in this tier (default: the routing's).", min=1),
    k_tier: Optional[int] = typer.Option(None, "--k-tier", help="Tiers per token from now on (default: unchanged); a change needs --change-routing.", min=1),
    change_routing: bool = typer.Option(
        False, "--change-routing", help="Accept that a new --k-tier changes which tiers every token uses: recorded as not exact, with its loss jump."
    ),
    seed: int = typer.Option(0, "--seed", help="Seed of the new router gates and random experts.", min=0),
    overwrite: bool = overwrite_option(),
) -> None:
    """Add a tier of experts that no token reaches yet: the model computes exactly what it did.

    Every existing tensor is kept bitwise (checked by hash) and the logits are checked bitwise
    on sample tokens; the manifest's model_version gets a minor bump.  A --k-tier that changes
    how many tiers a token mixes cannot keep the output: it needs --change-routing, and the
    change of the logits and the loss is measured and recorded instead.

    The group shape and the expert width default to the source tier's (--source-tier, else the
    first tier).

    Examples:

      lite-llm add-tier ckpt --tier tier_10b -o grown

      lite-llm add-tier ckpt --tier tier_10b --groups 8 --experts-per-group 8 --expert-hidden 2048 --budget 10B -o grown
    """
    from ..checkpoint import read_manifest
    from ..config import format_size
    from ..grow.tiers import add_tier_checkpoint

    groups, experts_per_group, expert_hidden = _tier_shape(checkpoint, source_tier, groups, experts_per_group, expert_hidden)

    params = {
        "tier": tier,
        "num_groups": groups,
        "experts_per_group": experts_per_group,
        "expert_hidden": expert_hidden,
        "budget": budget,
        "budget_mode": budget_mode,
        "placement": placement,
        "init": init,
        "source_tier": source_tier,
        "k_group": k_group,
        "k_expert": k_expert,
        "k_tier": k_tier,
        "seed": seed,
    }
    if change_routing:
        params["change_routing"] = True
    with console.status("adding the tier…"):
        path = add_tier_checkpoint(checkpoint, output, overwrite=overwrite, **params)
    manifest = read_manifest(path)
    meta = manifest["tiers"][tier]
    table = Table("tier", "experts", "params", "budget", "placement", "model_version", title="new tier")
    table.add_row(
        tier,
        f"{groups}×{experts_per_group} (hidden {expert_hidden})",
        format_size(meta["num_params"]),
        format_size(meta["budget"]) if meta["budget"] else "-",
        meta["placement"],
        manifest["model_version"],
    )
    console.print(table)
    if change_routing:
        p = _load_progressive(path, manifest)["expansions"][-1]["preservation"]
        change = f"max |Δlogit| {p['max_abs']:.3g}, loss jump {p['loss_jump']:+.4f} on {p['tokens']} sample tokens" if p else "not measured"
        console.print(f"k_tier is now {manifest['model_config']['routing']['k_tier']}: the output changed ({change}); recorded as not exact")
    console.print(f"wrote {path} ({manifest['num_params']:,} parameters; the new tier is unroutable until ramped in)")


def _tier_shape(
    checkpoint: Path, source_tier: Optional[str], groups: Optional[int], experts_per_group: Optional[int], expert_hidden: Optional[int]
) -> tuple[int, int, int]:
    """The new tier's (groups, experts per group, expert width): what was given, the rest from
    the source tier of ``checkpoint`` (``source_tier``, else its first tier)."""
    if groups is not None and experts_per_group is not None and expert_hidden is not None:
        return groups, experts_per_group, expert_hidden
    config = _config_of(checkpoint)
    if not config.tiers:
        raise ConfigError(f"{checkpoint} is a dense model with no tier to take a shape from; give --groups, --experts-per-group and --expert-hidden")
    by_name = {t.name: t for t in config.tiers}
    if source_tier is not None and source_tier not in by_name:
        raise ConfigError(f"--source-tier {source_tier!r} is not a tier of {checkpoint}; its tiers are {', '.join(by_name)}")
    src = by_name[source_tier] if source_tier is not None else config.tiers[0]
    return (
        groups if groups is not None else src.num_groups,
        experts_per_group if experts_per_group is not None else src.experts_per_group,
        expert_hidden if expert_hidden is not None else src.expert_hidden,
    )


@app.command("quantize")
@friendly_errors
@_warnings_plain
def quantize_command(
    checkpoint: Path = typer.Argument(..., help="Source checkpoint."),
    tier: str = typer.Option(..., "--tier", help="The tier whose experts to quantize."),
    to: str = typer.Option(..., "--to", help="int8 or int4 (group-wise symmetric, scales in the checkpoint)."),
    output: Path = typer.Option(..., "-o", "--output", help="New checkpoint directory."),
    verify: bool = typer.Option(True, "--verify/--no-verify", help="Check the source's hashes before committing."),
    overwrite: bool = overwrite_option(),
) -> None:
    """Store a tier's experts as int8 or int4: a new checkpoint, a fraction of the bytes.

    Router gates, dense weights and embeddings are kept as they are.  The relative weight
    error of every expert bank is measured and recorded in progressive.json; loading
    dequantizes (the expert store does so when an expert is promoted to the compute device).

    Examples:

      lite-llm quantize ckpt --tier tier_10b --to int8 -o ckpt-int8

      lite-llm quantize ckpt --tier tier_1b --to int4 -o ckpt-int4
    """
    from ..grow.quantize import quantize_checkpoint

    path = quantize_checkpoint(checkpoint, output, tier=tier, to=to, verify=verify, overwrite=overwrite)
    record = _load_progressive(path)["expansions"][-1]
    console.print(
        f"wrote {path}: tier {tier} as {to}, relative weight error max {record['preservation']['relative_weight_error_max']:.2e}, "
        f"mean {record['preservation']['relative_weight_error_mean']:.2e}"
    )


def _load_progressive(path: Path, manifest: dict[str, Any] | None = None) -> dict[str, Any]:
    """The ``progressive.json`` of the checkpoint just written at ``path`` (whose ``manifest``
    the caller may have read already), through the checkpoint layer's one reader: its error for
    a damaged file, not a JSON traceback."""
    from ..checkpoint import read_manifest
    from ..checkpoint.load import read_progressive

    manifest = manifest if manifest is not None else read_manifest(path)
    return read_progressive(path, manifest, verify=False)  # the writer verified what it wrote
