"""`lite-llm`: the command line.

Every command prints one clear sentence and exits non-zero on bad input; no stack traces for
errors a user can fix.  Heavy imports happen inside commands so ``--help`` is instant.
"""

from __future__ import annotations

import functools
import json
import sys
from pathlib import Path
from typing import Any, Callable, List, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .errors import LiteLLMError
from .quickstart import QUICKSTART_STEPS

app = typer.Typer(
    name="lite-llm",
    help="Language models that grow: train a small tiered model, then grow it without starting over.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
data_app = typer.Typer(help="Prepare corpora into token shards.", no_args_is_help=True)
tokenizer_app = typer.Typer(help="Train and inspect tokenizers.", no_args_is_help=True)
app.add_typer(data_app, name="data")
app.add_typer(tokenizer_app, name="tokenizer")

console = Console(soft_wrap=not sys.stdout.isatty())  # plain, unwrapped lines in logs and pipes
err_console = Console(stderr=True, soft_wrap=True)


def friendly_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn user-facing errors into one line on stderr and exit code 1."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except LiteLLMError as exc:
            err_console.print(f"[bold red]error:[/bold red] {escape(str(exc))}", highlight=False)
            raise typer.Exit(1) from None
        except (FileNotFoundError, NotADirectoryError, PermissionError) as exc:
            err_console.print(f"[bold red]error:[/bold red] {exc.strerror or exc}: {exc.filename}", highlight=False)
            raise typer.Exit(1) from None
        except ValueError as exc:
            err_console.print(f"[bold red]error:[/bold red] {escape(str(exc))}", highlight=False)
            raise typer.Exit(1) from None

    return wrapper


def _model_config(preset: Optional[str], config: Optional[Path]):
    from .config import ModelConfig

    if config is not None:
        return ModelConfig.from_file(config)
    return ModelConfig.from_preset(preset or "tiny")


# ------------------------------------------------------------------------------------ init
@app.command()
@friendly_errors
def init(
    output: Path = typer.Option(..., "-o", "--output", help="Checkpoint directory to create."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace OUTPUT if it already exists."),
    preset: Optional[str] = typer.Option(None, help="Named model config: tiny, tiny-dense, small, smollm2-135m."),
    config: Optional[Path] = typer.Option(None, help="Model config file (YAML or JSON; may say `preset: NAME` and override fields)."),
    tokenizer: str = typer.Option("byte", help="'byte' or a folder/tokenizer.json made by `lite-llm tokenizer train`."),
    seed: int = typer.Option(0, help="Initialisation seed."),
) -> None:
    """Create a freshly initialised model checkpoint.

    Examples:

      lite-llm init --preset tiny -o ckpt/tiny

      lite-llm init --config model.yaml --tokenizer tok/ -o ckpt/mine
    """
    from .checkpoint.atomic import refuse_existing

    refuse_existing(output, overwrite, "checkpoint")
    from .checkpoint import save_checkpoint
    from .data import get_tokenizer
    from .model import build_model

    cfg = _model_config(preset, config)
    tok = get_tokenizer(tokenizer)
    if tok.vocab_size > cfg.vocab_size:
        raise LiteLLMError(f"the tokenizer has {tok.vocab_size} tokens but the model's vocab_size is {cfg.vocab_size}; raise vocab_size")
    model = build_model(cfg, seed=seed)
    path = save_checkpoint(output, model, tokenizer=tok)
    console.print(f"wrote {path}: {cfg.num_params():,} parameters, {cfg.num_active_params():,} active per token")


# ------------------------------------------------------------------------------------ data
@data_app.command("prepare")
@friendly_errors
def data_prepare(
    sources: list[str] = typer.Argument(..., help="DOMAIN=SPEC or SPEC; SPEC is stdlib-code, stdlib-docs, a file, a folder or a glob."),
    output: Path = typer.Option(..., "-o", "--output", help="Dataset directory to create."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace OUTPUT if it already exists."),
    tokenizer: str = typer.Option("byte", help="'byte' or a trained tokenizer folder/file."),
    val_fraction: float = typer.Option(0.05, help="Share of documents held out for validation."),
    max_mb: Optional[float] = typer.Option(None, help="Cap each domain at this many MB (quick runs)."),
    seed: int = typer.Option(0, help="Seed of the train/validation split."),
) -> None:
    """Turn text into memory-mapped token shards, one named domain per source.

    Examples:

      lite-llm data prepare code=stdlib-code prose=stdlib-docs -o data/std

      lite-llm data prepare notes=~/notes/ 'papers=docs/*.md' -o data/mine --val-fraction 0.1
    """
    from .checkpoint.atomic import refuse_existing

    refuse_existing(output, overwrite, "dataset")
    from .data import get_tokenizer, prepare_data

    mapping: dict[str, str] = {}
    for spec in sources:
        domain, _, target = spec.partition("=") if "=" in spec else (spec, "", spec)
        if not domain.strip() or not target.strip():
            raise LiteLLMError(f"source {spec!r} has an empty {'domain name' if not domain.strip() else 'path'}; write DOMAIN=SPEC, e.g. code=stdlib-code or notes=~/notes/")
        if domain in mapping:
            raise LiteLLMError(f"domain {domain!r} is given twice; give each source its own name as DOMAIN=SPEC")
        mapping[domain] = target
    index = prepare_data(
        mapping,
        output,
        get_tokenizer(tokenizer),
        val_fraction=val_fraction,
        seed=seed,
        max_bytes_per_domain=int(max_mb * 1e6) if max_mb else None,
    )
    table = Table("domain", "source", "train tokens", "val tokens")
    for name, info in index["domains"].items():
        table.add_row(name, str(info.get("source")), f"{info['train']['tokens']:,}", f"{info['val']['tokens']:,}")
    console.print(table)
    console.print(f"wrote {output}")


# ------------------------------------------------------------------------------------ tokenizer
@tokenizer_app.command("train")
@friendly_errors
def tokenizer_train(
    sources: list[str] = typer.Argument(..., help="SPECs to train on: stdlib-code, stdlib-docs, files, folders or globs."),
    output: Path = typer.Option(..., "-o", "--output", help="Folder for tokenizer.json."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace OUTPUT if it already exists."),
    vocab_size: int = typer.Option(4096, help="Vocabulary size, including the 256 byte tokens."),
    min_frequency: int = typer.Option(2, help="Minimum pair frequency for a merge."),
) -> None:
    """Train a byte-level BPE tokenizer offline (Hugging Face tokenizer.json format).

    Example:

      lite-llm tokenizer train stdlib-code stdlib-docs --vocab-size 8192 -o tok/
    """
    from .checkpoint.atomic import refuse_existing

    refuse_existing(output, overwrite, "tokenizer")
    from .data import BPETokenizer, resolve_source

    texts = (text for spec in sources for _, text in resolve_source(spec))
    tok = BPETokenizer.train(texts=texts, vocab_size=vocab_size, min_frequency=min_frequency)
    tok.save(output)
    console.print(f"wrote {output} ({tok.vocab_size} tokens)")


# ------------------------------------------------------------------------------------ train
@app.command()
@friendly_errors
def train(
    data: Path = typer.Option(..., help="Dataset directory from `lite-llm data prepare`."),
    output: Path = typer.Option(..., "-o", "--output", help="Run directory (checkpoints, metrics.jsonl, plots)."),
    init_from: Optional[Path] = typer.Option(None, "--init", help="Start from this checkpoint."),
    preset: Optional[str] = typer.Option(None, help="Start from a fresh model of this preset."),
    model_config: Optional[Path] = typer.Option(None, "--model-config", help="Start from a fresh model of this config file."),
    config: Optional[Path] = typer.Option(None, "--config", help="Training config (YAML/JSON); flags below override it."),
    resume: bool = typer.Option(False, help="Continue the run in OUTPUT from its latest good checkpoint, with its saved settings (--steps larger extends it)."),
    resume_from: Optional[Path] = typer.Option(None, "--resume-from", help="Continue the run in OUTPUT from this checkpoint of it (implies --resume)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing run in OUTPUT (its checkpoints and metrics are deleted)."),
    steps: Optional[int] = typer.Option(None, help="Total optimizer steps."),
    batch_size: Optional[int] = typer.Option(None, help="Sequences per micro-batch."),
    seq_len: Optional[int] = typer.Option(None, help="Tokens per sequence."),
    grad_accum: Optional[int] = typer.Option(None, help="Micro-batches per step."),
    lr: Optional[float] = typer.Option(None, help="Peak learning rate."),
    warmup_steps: Optional[int] = typer.Option(None, help="Linear warm-up steps."),
    domains: Optional[str] = typer.Option(None, help="Mixture weights, e.g. 'code=0.7,prose=0.3'."),
    tiers: Optional[str] = typer.Option(None, help="TierSet to train: all, tier_1b, upto:tier_1b, only:tier_10b."),
    seed: Optional[int] = typer.Option(None, help="Seed of data order and routing noise."),
    bf16: Optional[bool] = typer.Option(None, "--bf16/--no-bf16", help="bfloat16 autocast."),
    eval_every: Optional[int] = typer.Option(None, help="Validate every N steps (0: only at the end)."),
    save_every: Optional[int] = typer.Option(None, help="Checkpoint every N steps (0: only at the end)."),
    curriculum: Optional[Path] = typer.Option(None, "--curriculum", help="Tier curriculum YAML (preparation, isolation, integration, joint)."),
    replay: Optional[str] = typer.Option(None, help="Old domains to replay, e.g. 'prose=1' (with --replay-share)."),
    replay_share: Optional[float] = typer.Option(None, help="Share of each batch's rows drawn from the --replay domains."),
    freeze: Optional[list[str]] = typer.Option(None, help="Freeze parameters matching PATTERN until a step: 'layers.[0-3].*@500' (no @: never thaw). Repeatable."),
    ewc: Optional[Path] = typer.Option(None, "--ewc", help="Checkpoint holding an EWC estimate (`lite-llm ewc estimate`)."),
    ewc_weight: Optional[float] = typer.Option(None, help="EWC penalty weight lambda."),
    distill_from: Optional[Path] = typer.Option(None, help="Teacher checkpoint for distillation."),
    distill_weight: Optional[float] = typer.Option(None, help="Distillation loss weight."),
    distill_temperature: Optional[float] = typer.Option(None, help="Distillation temperature."),
    distill_domains: Optional[str] = typer.Option(None, help="Distil only rows of these domains, e.g. 'prose'."),
    quiet: bool = typer.Option(False, help="No progress bar."),
) -> None:
    """Train a model on a prepared dataset, with validation per domain and checkpoints.

    Examples:

      lite-llm train --data data/std --preset small --steps 300 -o runs/small

      lite-llm train --data data/std --init ckpt/tiny --config train.yaml -o runs/a

      lite-llm train --data data/std -o runs/a --resume

      lite-llm train --data data/code --init grown --curriculum curriculum.yaml -o runs/tier2

      lite-llm train --data data/std --init grown --domains code=1 --replay prose=1 --replay-share 0.25 \\
          --ewc grown --ewc-weight 100 --freeze 'layers.[0134].*@400' -o runs/code
    """
    from .checkpoint import CheckpointManager, load_checkpoint
    from .data import TokenData
    from .model import build_model
    from .train import TrainConfig, Trainer
    from .train.curriculum import Curriculum, CurriculumConfig

    from .checkpoint.run_lock import RunLock

    resume = resume or resume_from is not None
    plan = CurriculumConfig.from_file(curriculum) if curriculum else None
    if plan is not None and steps is None:
        steps = plan.total_steps
    given = dict(
        steps=steps, batch_size=batch_size, seq_len=seq_len, grad_accum=grad_accum, lr=lr,
        warmup_steps=warmup_steps, tierset=tiers, seed=seed, bf16=bf16, eval_every=eval_every, save_every=save_every,
    )
    given = {k: v for k, v in given.items() if v is not None}
    if domains:
        given["domains"] = _parse_weights(domains)
    given.update(_protection_fields(replay, replay_share, freeze, ewc, ewc_weight, distill_from, distill_weight, distill_temperature, distill_domains))
    with RunLock(output, say=lambda message: console.print(f"[yellow]{message}[/yellow]")):
        manager = CheckpointManager(output)
        for leftover in manager.clean_interrupted():
            console.print(f"removed {leftover.name}, left by an interrupted run")
        if resume:
            latest, saved = _resumable_checkpoint(manager, output, resume_from)
            file_fields = TrainConfig.from_file(config).to_dict() if config else {}
            cfg = TrainConfig.from_dict(_resume_fields(saved, {**_explicit(file_fields), **given}))
        else:
            _refuse_existing_run(output, overwrite)
            latest = None
            fields = (TrainConfig.from_file(config) if config else TrainConfig()).to_dict()
            cfg = TrainConfig.from_dict({**fields, **given})
        dataset = TokenData(data)
        if latest is not None or init_from is not None:
            loaded = load_checkpoint(latest or init_from)
            model = loaded.model
            if latest is not None and (preset or model_config) and _model_config(preset, model_config).to_dict() != model.config.to_dict():
                raise LiteLLMError(f"cannot resume with a different model: {latest} holds another configuration than --preset/--model-config give; drop them to continue the run")
        else:
            model = build_model(_model_config(preset, model_config), seed=cfg.seed)
        _check_vocab(model.config.vocab_size, dataset.tokenizer.vocab_size)
        callbacks = [Curriculum(plan)] if plan is not None else []
        trainer = Trainer(model, dataset, cfg, run_dir=output, show_progress=not quiet, tokenizer=dataset.tokenizer, callbacks=callbacks)
        if latest is None and init_from is not None:
            trainer.inherit(loaded.progressive)  # expansion history, EWC metadata, ancestors' compute
        if latest is not None:
            trainer.resume(latest)
            if trainer.step >= cfg.steps:
                console.print(f"the run in {output} is finished at step {trainer.step}; pass --steps N (N > {trainer.step}) to extend it")
                console.print(f"checkpoint: {latest}")
                return
            console.print(f"resumed from {latest} at step {trainer.step} of {cfg.steps}")
        result = trainer.train()
    _print_scores(result.final_eval)
    if result.skipped_steps:
        console.print(f"[yellow]skipped {len(result.skipped_steps)} step(s) with a non-finite loss: {result.skipped_steps[:10]}[/yellow]")
    if result.stopped_early:
        console.print(f"[yellow]{result.stopped_early}[/yellow]")
    console.print(f"checkpoint: {result.checkpoint}")


# Settings a resumed run may change: how long it runs and how often it reports and saves.
# Everything else would make the resumed steps differ from the run that was started.
RESUMABLE_CHANGES = ("steps", "eval_every", "save_every", "log_every", "keep_last")


def _explicit(file_fields: dict[str, Any]) -> dict[str, Any]:
    """The fields of a training config file that differ from TrainConfig's defaults."""
    from .train import TrainConfig

    defaults = TrainConfig().to_dict()
    return {k: v for k, v in file_fields.items() if defaults.get(k) != v}


def _resume_fields(saved: dict[str, Any], given: dict[str, Any]) -> dict[str, Any]:
    """The saved run's training settings with the changes ``given`` applies: only those in
    :data:`RESUMABLE_CHANGES` may differ; any other is one sentence naming its flag."""
    fields = dict(saved)
    for key, value in given.items():
        if key in RESUMABLE_CHANGES:
            fields[key] = value
        elif key in saved and saved[key] != value:
            flag = "--tiers" if key == "tierset" else "--" + key.replace("_", "-")
            raise LiteLLMError(
                f"cannot resume with {flag} {value!r}: the run was trained with {saved[key]!r}, and only --steps, --eval-every"
                f" and --save-every can change when resuming; drop {flag}, or start a new run in another -o directory"
            )
    return fields


def _resumable_checkpoint(manager: Any, output: Path, chosen: Optional[Path]) -> tuple[Path, dict[str, Any]]:
    """The checkpoint to resume from and its saved training settings: ``chosen``, or the
    newest checkpoint of the run whose weights and training state load and verify — a
    corrupt newest one is said so and the previous complete one taken."""
    from .checkpoint import load_training_state, verify_checkpoint
    from .errors import CheckpointError

    candidates = [chosen] if chosen is not None else list(reversed(manager.list()))
    if not candidates:
        raise LiteLLMError(f"nothing to resume in {output}: it has no checkpoint; drop --resume to start a new run")
    for path in candidates:
        try:
            problems = verify_checkpoint(path)
            if problems:
                raise CheckpointError(problems[0])
            state = load_training_state(path)
        except (CheckpointError, OSError) as err:
            if chosen is not None:
                raise
            console.print(f"[yellow]cannot resume from {path.name} ({err}); resuming from the previous complete checkpoint instead[/yellow]")
            continue
        if state is None:
            raise LiteLLMError(f"checkpoint {path} has no training state; start a new run from it with --init instead of resuming")
        return path, dict(state.meta.get("train_config") or {})
    raise LiteLLMError(f"no checkpoint in {output} is intact enough to resume from; start a new run with --overwrite")


def _refuse_existing_run(output: Path, overwrite: bool) -> None:
    """A fresh run never mixes into an old one: refuse unless ``overwrite``, then clear it."""
    from .checkpoint.atomic import remove_dir
    from .checkpoint.run_lock import LOCK_NAME

    existing = [p for p in output.iterdir() if p.name != LOCK_NAME] if output.is_dir() else []
    if not existing:
        return
    if not overwrite:
        raise LiteLLMError(
            f"{output} already holds a run; pass --resume to continue it, --overwrite to replace it, or choose another -o directory"
        )
    for p in existing:
        if p.is_dir():
            remove_dir(p)
        else:
            p.unlink()


# ------------------------------------------------------------------------------------ rollback
@app.command()
@friendly_errors
def rollback(
    checkpoint: Path = typer.Argument(..., help="A checkpoint of a curriculum run (after its integration began)."),
    output: Path = typer.Option(..., "-o", "--output", help="Where to write the rolled-back checkpoint."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace OUTPUT if it already exists."),
) -> None:
    """Undo a tier's integration: the pre-integration weights with the previous TierSet.

    The result computes exactly what the model computed before the tier was added.

    Example:

      lite-llm rollback runs/tier2/checkpoints/step-00000400 -o ckpt/before-tier2
    """
    from .checkpoint.atomic import refuse_existing

    refuse_existing(output, overwrite, "checkpoint")
    from .train.rollback import rollback_checkpoint

    path, tiers = rollback_checkpoint(checkpoint, output)
    console.print(f"wrote {path} with tiers {', '.join(tiers)}")


def _protection_fields(
    replay: Optional[str],
    replay_share: Optional[float],
    freeze: Optional[list[str]],
    ewc: Optional[Path],
    ewc_weight: Optional[float],
    distill_from: Optional[Path],
    distill_weight: Optional[float],
    distill_temperature: Optional[float],
    distill_domains: Optional[str],
) -> dict[str, Any]:
    """TrainConfig fields for the forgetting-prevention flags that were given."""
    fields: dict[str, Any] = {}
    if replay:
        fields["replay"] = _parse_weights(replay)
    if freeze:
        rules = []
        for item in freeze:
            pattern, sep, thaw = item.rpartition("@") if "@" in item else (item, "", "")
            if sep and not thaw.isdigit():
                raise LiteLLMError(f"cannot read --freeze {item!r}; write PATTERN or PATTERN@STEP, e.g. 'layers.0.*@200'")
            rules.append({"patterns": [pattern], "thaw_at": int(thaw) if sep else None})
        fields["freeze"] = rules
    optional = dict(
        replay_share=replay_share, ewc_from=str(ewc) if ewc else None, ewc_weight=ewc_weight, distill_from=str(distill_from) if distill_from else None,
        distill_weight=distill_weight, distill_temperature=distill_temperature,
        distill_domains=[d.strip() for d in distill_domains.split(",")] if distill_domains else None,
    )
    fields.update({k: v for k, v in optional.items() if v is not None})
    return fields


def _parse_weights(text: str) -> dict[str, float]:
    weights = {}
    for part in text.split(","):
        name, sep, value = part.partition("=")
        if not sep:
            raise LiteLLMError(f"cannot read mixture weight {part!r}; write DOMAIN=WEIGHT, e.g. code=0.7,prose=0.3")
        weights[name.strip()] = float(value)
    return weights


def _check_vocab(model_vocab: int, tokenizer_vocab: int) -> None:
    if tokenizer_vocab > model_vocab:
        raise LiteLLMError(
            f"the dataset's tokenizer has {tokenizer_vocab} tokens but the model only {model_vocab}; prepare the data with the model's tokenizer"
        )


def _print_scores(scores: dict[str, dict[str, float]], title: str = "validation") -> None:
    if not scores:
        return
    table = Table("domain", "loss (nats/token)", "bits per byte", title=title)
    for domain, s in scores.items():
        table.add_row(domain, f"{s['loss']:.4f}", f"{s['bpb']:.4f}")
    console.print(table)


# ------------------------------------------------------------------------------------ eval
@app.command("eval")
@friendly_errors
def eval_command(
    checkpoints: list[Path] = typer.Argument(..., help="Checkpoint directories (one or more)."),
    data: Path = typer.Option(..., help="Dataset directory from `lite-llm data prepare`."),
    domains: Optional[str] = typer.Option(None, help="Comma-separated domains (default: all)."),
    against: Optional[Path] = typer.Option(None, "--against", help="Base checkpoint: report each model's change against it (retention)."),
    report: Path = typer.Option(Path("retention"), "--report", help="With --against: where retention.json/.md/.png go."),
    tiers: str = typer.Option("all", help="TierSet to evaluate with."),
    batches: int = typer.Option(16, help="Validation batches per domain."),
    batch_size: int = typer.Option(16, help="Sequences per batch."),
    seq_len: int = typer.Option(128, help="Tokens per sequence."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the scores here."),
) -> None:
    """Validation loss and bits per byte per domain; with --against, a retention report.

    Examples:

      lite-llm eval runs/small/checkpoints/step-00000300 --data data/std --domains code,prose

      lite-llm eval runs/ewc/final runs/replay/final --against ckpt/base --data data/std --domains prose,code --report reports/retention
    """
    from .checkpoint import load_checkpoint
    from .data import TokenData
    from .eval import RetentionReport, evaluate

    dataset = TokenData(data)
    names = [d.strip() for d in domains.split(",")] if domains else dataset.domains
    unknown = [d for d in names if d not in dataset.domains]
    if unknown:
        raise LiteLLMError(f"unknown domain(s) {', '.join(unknown)}; the data has {', '.join(dataset.domains)}")
    labels = _labels([against, *checkpoints] if against is not None else checkpoints)
    results: dict[str, dict[str, dict[str, float]]] = {}
    for label, path in labels.items():
        loaded = load_checkpoint(path, tierset=None if tiers == "all" else tiers)
        scores = evaluate(loaded.model, dataset, names, batch_size=batch_size, seq_len=seq_len, max_batches=batches, tierset=tiers)
        results[label] = {d: s.to_dict() for d, s in scores.items()}
        if against is None:
            _print_scores(results[label], title=f"{path} ({tiers})")
    if against is not None:
        base = next(iter(labels))
        retention = RetentionReport(base, names, {m: {d: s["bpb"] for d, s in r.items()} for m, r in results.items()})
        table = Table("model", *(f"{d} bpb" for d in names), *(f"{d} vs base" for d in names), title=f"retention against {base} (bits per byte; lower is better)")
        for model in retention.scores:
            changes = ["base" if model == base else f"{retention.change(model, d):+.2%}" for d in names]
            table.add_row(model, *(f"{retention.scores[model][d]:.4f}" for d in names), *changes)
        console.print(table)
        written = retention.write(report)
        console.print("wrote " + ", ".join(str(w) for w in written))
    if json_out:
        json_out.write_text(json.dumps(results if len(results) > 1 else next(iter(results.values())), indent=2))


def _labels(paths: list[Path]) -> dict[str, Path]:
    """Short unique names for checkpoints: the directory name, or more of the path when two
    share one (``runs/a/final`` and ``runs/b/final`` become ``a/final`` and ``b/final``)."""
    depth = 1
    while True:
        labels = ["/".join(p.resolve().parts[-depth:]) for p in paths]
        if len(set(labels)) == len(labels) or depth > 8:
            return dict(zip(labels, paths))
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
    from .checkpoint import read_manifest, verify_checkpoint
    from .config import ModelConfig, TierSet, format_size

    manifest = read_manifest(checkpoint)
    cfg = ModelConfig.from_dict(manifest["model_config"], allow_unknown=True)
    console.print(f"[bold]{checkpoint}[/bold]  format {manifest['format_version']}  model '{cfg.name}'")
    console.print(
        f"d_model {cfg.d_model}, layers {cfg.n_layers}, heads {cfg.n_heads}/{cfg.n_kv_heads} (q/kv), head_dim {cfg.head_dim}, vocab {cfg.vocab_size}"
        + (", tied embeddings" if cfg.tie_embeddings else "")
    )
    if cfg.tiers:
        table = Table("tier", "groups x experts", "expert hidden", "k (group, expert)", "params", "budget", "placement", title="tiers")
        for t in cfg.tiers:
            table.add_row(
                t.name, f"{t.num_groups} x {t.experts_per_group}", str(t.expert_hidden),
                f"{cfg.k_group_of(t)}, {cfg.k_expert_of(t)}", format_size(cfg.tier_params(t)),
                format_size(t.budget) if t.budget else "-", t.placement,
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
    if verify:
        problems = verify_checkpoint(checkpoint)
        if problems:
            for p in problems:
                err_console.print(f"[bold red]FAIL[/bold red] {p}", highlight=False)
            raise typer.Exit(1)
        console.print(f"[green]verified[/green] {len(manifest['shards'])} shard(s)")


# ------------------------------------------------------------------------------------ generate
@app.command()
@friendly_errors
def generate(
    checkpoint: Path = typer.Argument(..., help="Checkpoint directory."),
    prompt: str = typer.Option("", help="Text to continue (with --chat: the user's message)."),
    max_new_tokens: int = typer.Option(200, help="Tokens to generate (at least 1)."),
    temperature: float = typer.Option(0.8, help="Sampling temperature; 0 is greedy."),
    top_k: Optional[int] = typer.Option(None, help="Keep the k most likely tokens."),
    top_p: Optional[float] = typer.Option(None, help="Keep the smallest set of tokens with this much probability."),
    seed: int = typer.Option(0, help="Sampling seed."),
    tiers: str = typer.Option("all", help="TierSet: all, tier_1b, upto:tier_1b, only:tier_10b."),
    chat: bool = typer.Option(False, "--chat", help="Wrap PROMPT in the model's chat template as one user turn and print only the reply."),
    stop: Optional[List[str]] = typer.Option(None, "--stop", help="Stop before this text (repeatable)."),
    repetition_penalty: float = typer.Option(1.0, help="Divide (multiply, when negative) the logits of tokens already seen by this; 1 is off."),
) -> None:
    """Stream a continuation of PROMPT to the terminal.

    Generation ends at any end-of-sequence token the model lists (a chat model's <|im_end|>
    included), at a --stop string, or after --max-new-tokens.

    Examples:

      lite-llm generate ckpt --prompt 'def main(' --max-new-tokens 120 --temperature 0

      lite-llm generate ckpt --prompt 'The' --tiers upto:tier_1b --top-p 0.9 --seed 3

      lite-llm generate ckpt --chat --prompt 'What is the capital of France?' --temperature 0
    """
    from .checkpoint import load_checkpoint
    from .data.tokenizer import render_chat
    from .generate import generate_text

    if max_new_tokens < 1:
        raise LiteLLMError(f"--max-new-tokens must be at least 1, got {max_new_tokens}; pass how many tokens to generate, e.g. --max-new-tokens 200")
    if temperature < 0:
        raise LiteLLMError(f"--temperature must be 0 (greedy) or more, got {temperature}")
    if repetition_penalty <= 0:
        raise LiteLLMError(f"--repetition-penalty must be positive (1 is off, 1.1-1.3 discourages repeats), got {repetition_penalty}")
    loaded = load_checkpoint(checkpoint, tierset=None if tiers == "all" else tiers)
    if loaded.tokenizer is None:
        raise LiteLLMError(f"checkpoint {checkpoint} has no tokenizer/ folder; re-save it with its tokenizer")
    prompt_ids = None
    if chat:
        if not getattr(loaded.tokenizer, "chat_template", None):
            raise LiteLLMError(f"checkpoint {checkpoint} has no chat template in its tokenizer; generate without --chat, or import the model again from a file that has one")
        prompt_ids = loaded.tokenizer.encode(render_chat(loaded.tokenizer, [{"role": "user", "content": prompt}]))
    else:
        sys.stdout.write(prompt)
    for piece in generate_text(
        loaded.model,
        loaded.tokenizer,
        prompt,
        max_new_tokens,
        prompt_ids=prompt_ids,
        stop=stop or (),
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        seed=seed,
        tierset=tiers,
        repetition_penalty=repetition_penalty,
    ):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")


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
    from .plot import plot_run

    for path in plot_run(run, output):
        console.print(f"wrote {path}")


# ------------------------------------------------------------------------------------ quickstart
@app.command()
@friendly_errors
def quickstart(
    output: Path = typer.Option(Path("runs/quickstart"), "-o", "--output", help="Where data, run and charts go."),
    steps: int = typer.Option(QUICKSTART_STEPS, min=1, help="Training steps."),
    seed: int = typer.Option(0, help="Seed."),
) -> None:
    """Prepare the built-in corpora, train a small two-tier model, evaluate, sample, chart.

    Runs in a few minutes on 2 CPU cores, with no download.

    Example:

      lite-llm quickstart -o runs/quickstart
    """
    from .quickstart import run_quickstart

    run_quickstart(output, steps=steps, seed=seed, console=console)


from . import cli_ewc, cli_growth  # noqa: E402,F401  (register ewc; expand, validate, plan, import, export)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
