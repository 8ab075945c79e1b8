"""`lite-llm train` and `rollback`: runs, their resumption and their protections."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import inspect
import re
from pathlib import Path
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any, Optional

import typer

if TYPE_CHECKING:
    import torch

from ..errors import CheckpointError, ConfigError, LiteLLMError
from ..train.config import TrainConfig
from .app import THREADS_HELP, app, apply_threads, console, device_option, friendly_errors, model_config_from, overwrite_option, print_scores
from .train_options import flag_of, train_config_fields, train_config_parameters


# ------------------------------------------------------------------------------------ train
def _train(
    data: Path = typer.Option(..., help="Dataset directory from `lite-llm data prepare`."),
    output: Path = typer.Option(..., "-o", "--output", help="Run directory (checkpoints, metrics.jsonl, plots)."),
    init_from: Optional[Path] = typer.Option(None, "--init", help="Start from this checkpoint."),
    preset: Optional[str] = typer.Option(None, help="Start from a fresh model of this preset."),
    model_config: Optional[Path] = typer.Option(None, "--model-config", help="Start from a fresh model of this config file."),
    config: Optional[Path] = typer.Option(None, "--config", help="Training config (YAML/JSON); the training flags override it."),
    resume: bool = typer.Option(False, help="Continue the run in OUTPUT from its latest good checkpoint, with its saved settings (--steps larger extends it)."),
    resume_from: Optional[Path] = typer.Option(None, "--resume-from", help="Continue the run in OUTPUT from this checkpoint of it (implies --resume)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing run in OUTPUT (its checkpoints and metrics are deleted)."),
    curriculum: Optional[Path] = typer.Option(None, "--curriculum", help="Tier curriculum YAML (preparation, isolation, integration, joint)."),
    quiet: bool = typer.Option(False, help="No progress bar."),
    device: str = device_option(),
    threads: Optional[int] = typer.Option(None, "--threads", help=THREADS_HELP),
    **settings: Any,  # one option per TrainConfig field (see train_options)
) -> None:
    """Train a model on a prepared dataset, with validation per domain and checkpoints.

    Examples:

      lite-llm train --data data/std --preset small --steps 300 -o runs/small

      lite-llm train --data data/std --init ckpt/tiny --config train.yaml -o runs/a

      lite-llm train --data data/std -o runs/a --resume

      lite-llm train --data data/std --preset quickstart --device cuda --bf16 -o runs/gpu

      lite-llm train --data data/code --init grown --curriculum curriculum.yaml -o runs/tier2

      lite-llm train --data data/std --init grown --domains code=1 --replay prose=1 --replay-share 0.25 \\
          --ewc grown --ewc-weight 100 --freeze 'layers.[0134].*@400' -o runs/code

      lite-llm train --data data/std --preset tiny --domains prose=1 --si-strength 1 -o runs/prose

      lite-llm train --data data/std --init runs/prose/checkpoints/step-00000200 --domains code=1 \\
          --si-from runs/prose/checkpoints/step-00000200 --si-strength 1 -o runs/code

      torchrun --nproc-per-node 4 $(which lite-llm) train --data data/std --preset small -o runs/dist --parallel dp=2,ep=2
    """
    from ..checkpoint import CheckpointManager, load_checkpoint
    from ..data import TokenData
    from ..data.compat import check_data_tokenizer
    from ..model import build_model
    from ..train import Trainer
    from ..train.curriculum import Curriculum, CurriculumConfig

    from ..checkpoint.run_lock import RunLock
    from ..runtime.device import resolve_device

    run_device = resolve_device(device)  # a device that is not there fails before anything is touched
    if _is_rank_zero():  # under torchrun every rank applies it, rank 0 says it
        apply_threads(threads)
    else:
        from ..runtime.threads import apply_thread_policy

        apply_thread_policy(threads)
    resume = resume or resume_from is not None
    check_starting_point(init_from, preset, model_config, resume)
    if resume_from is not None:
        check_in_run(resume_from, output)
    plan = CurriculumConfig.from_file(curriculum) if curriculum else None
    if plan is not None and settings.get("steps") is None:
        settings["steps"] = plan.total_steps
    given = train_config_fields(settings)
    from ..dist.launch import launched_by_torchrun

    if launched_by_torchrun():
        if plan is not None:  # every rank refuses alike, before the process group forms
            raise LiteLLMError(
                "--curriculum runs in one process only for now (its pre-integration checkpoint and rollback are ordinary "
                "checkpoints, which a distributed run does not write); train without torchrun"
            )
        return train_distributed(
            data=data, output=output, init_from=init_from, preset=preset, model_config=model_config, config=config, resume=resume,
            resume_from=resume_from, overwrite=overwrite, quiet=quiet, device=run_device, given=given,
        )
    if given.get("parallel"):
        from ..dist.degrees import ParallelDegrees

        needed = ParallelDegrees.processes_for(given["parallel"])  # all degrees 1 is one process: this one
        if needed > 1:
            raise LiteLLMError(
                f"--parallel {given['parallel']} needs {needed} processes (dp x ep x tp x pp) but this is one; launch with torchrun, "
                f"e.g. torchrun --nproc-per-node {needed} $(which lite-llm) train ... --parallel {given['parallel']}"
            )
    with RunLock(output, say=_warn):
        manager = CheckpointManager(output)
        from ..dist.checkpoint import clean_partial_sharded

        for leftover in [*manager.clean_interrupted(), *clean_partial_sharded(output)]:
            console.print(f"removed {leftover.name}, left by an interrupted run")
        from ..dist.checkpoint import is_sharded_checkpoint

        if resume_from is not None and is_sharded_checkpoint(resume_from):
            sharded: Optional[Path] = resume_from  # one of a distributed run's sharded checkpoints, continued in one process
        else:
            sharded = _newer_sharded_checkpoint(manager, output) if resume and resume_from is None else None
        if sharded is not None:  # a distributed run continued in one process
            from ..dist.checkpoint import read_meta

            latest, saved = None, dict(read_meta(sharded)["trainer"].get("train_config") or {})
            cfg = resumed_config(saved, config, given)
        elif resume:
            latest, meta = _resumable_checkpoint(manager, output, resume_from)
            saved = dict(meta.get("train_config") or {})
            plan = plan or _saved_curriculum(meta)
            cfg = resumed_config(saved, config, given)
        else:
            latest = None
            cfg = fresh_config(config, given)
            refuse_existing_run(output, overwrite, reads=run_inputs(cfg, data=data, init_from=init_from, config=config, model_config=model_config, curriculum=curriculum))
        dataset = TokenData(data)
        if sharded is not None:
            from ..dist.checkpoint import read_meta
            from ..config import ModelConfig

            model = build_model(ModelConfig.from_dict(read_meta(sharded)["model_config"]), seed=cfg.seed)
        elif latest is not None or init_from is not None:
            loaded = load_checkpoint(latest or init_from, device=run_device)
            model = loaded.model
            if latest is not None and (preset or model_config) and model_config_from(preset, model_config).to_dict() != model.config.to_dict():
                raise LiteLLMError(f"cannot resume with a different model: {latest} holds another configuration than --preset/--model-config give; drop them to continue the run")
        else:
            model = build_model(model_config_from(preset, model_config), seed=cfg.seed)
        run_tokenizer = dataset.tokenizer
        if latest is not None or init_from is not None:
            check_data_tokenizer(dataset.tokenizer, data, loaded.tokenizer, model.config.vocab_size, latest or init_from)
            from ..checkpoint.derived import kept_tokenizer

            run_tokenizer = kept_tokenizer(loaded) or dataset.tokenizer
        callbacks = [Curriculum(plan)] if plan is not None else []
        trainer = Trainer.from_config(
            model, dataset, cfg, run_dir=output, show_progress=not quiet, tokenizer=run_tokenizer, callbacks=callbacks, device=run_device
        )
        if latest is None and init_from is not None:
            trainer.inherit(loaded.progressive)  # expansion history, EWC metadata, ancestors' compute
        if sharded is not None:
            from ..dist.trainer import resume_sharded

            resume_sharded(trainer, sharded)
            if trainer.step >= cfg.steps:
                return _say_finished(output, trainer.step, sharded)
            console.print(f"resumed from {sharded} at step {trainer.step} of {cfg.steps} (in one process)")
        if latest is not None:
            trainer.resume(latest)
            if trainer.step >= cfg.steps:
                return _say_finished(output, trainer.step, latest)
            console.print(f"resumed from {latest} at step {trainer.step} of {cfg.steps}")
        if resume_from is not None:
            drop_abandoned(output, trainer.step)
        console.print(f"device: {trainer.runtime_summary()}")
        with _stopped_by_signal(trainer, manager, data, output):
            result = trainer.train()
    print_scores(result.final_eval)
    if result.skipped_steps:
        console.print(f"[yellow]skipped {len(result.skipped_steps)} step(s) with a non-finite loss: {result.skipped_steps[:10]}[/yellow]")
    if result.stopped_early:
        console.print(f"[yellow]{result.stopped_early}[/yellow]")
    console.print(f"checkpoint: {result.checkpoint}")


@contextlib.contextmanager
def _stopped_by_signal(trainer: Any, manager: Any, data: Path, output: Path) -> Iterator[None]:
    """Ctrl-C or SIGTERM (a scheduler's stop) ends the run with one line saying where it
    stopped and what ``--resume`` continues from, and exit code 130; the run's lock is released
    on the way out, as on any other exit.  SIGTERM is handled only while the run trains."""
    import signal

    def stop(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    except KeyboardInterrupt:
        latest = manager.latest()
        where = f"interrupted at step {trainer.step}"
        if latest is None:
            _warn(f"{where}; no checkpoint was saved (--save-every N saves along the way), so the run starts again with --overwrite")
        else:
            _warn(f"{where}; the last checkpoint is {latest}: `lite-llm train --data {data} -o {output} --resume` continues from it")
        raise typer.Exit(130) from None
    finally:
        signal.signal(signal.SIGTERM, previous)


def _named_by_flags(fn: Any) -> Any:
    """``fn`` with the training config's keys in its error messages followed by their flags
    ("train.ewc_from (--ewc)"): the config's checks name its keys, as a YAML file writes them,
    and a user at the command line typed flags."""
    fields = {f.name for f in dataclasses.fields(TrainConfig)}

    def with_flags(message: str) -> str:
        named: set[str] = set()

        def name(match: re.Match) -> str:  # each key's flag once, where it first appears
            key = match.group(1)
            if key not in fields or key in named:
                return match.group(0)
            named.add(key)
            return f"{match.group(0)} ({flag_of(key)})"

        return re.sub(r"\btrain\.([a-z_0-9]+)\b", name, message)

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except ConfigError as exc:
            raise ConfigError(with_flags(str(exc))) from None

    return wrapper


train = friendly_errors(_named_by_flags(_train))
_signature = inspect.signature(_train)
train.__signature__ = _signature.replace(  # type: ignore[attr-defined]
    parameters=[p for p in _signature.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD] + train_config_parameters()
)
app.command("train")(train)


def check_starting_point(init_from: Optional[Path], preset: Optional[str], model_config: Optional[Path], resume: bool) -> None:
    """One sentence when the flags name more than one starting model (the others would be
    dropped without a word), or when a resumed run is given ``--init`` (it continues from its
    own checkpoint).  ``--preset``/``--model-config`` on a resume are checked against the run's
    model once it is loaded."""
    named = [flag for flag, value in (("--init", init_from), ("--preset", preset), ("--model-config", model_config)) if value is not None]
    if len(named) > 1:
        raise LiteLLMError(
            f"{' and '.join(named)} each choose the model to start from; give only one of --init, --preset and --model-config"
        )
    if resume and init_from is not None:
        raise LiteLLMError(
            f"cannot resume with --init {init_from}: a resumed run continues from its own latest checkpoint; drop --init, "
            "or start a new run from that checkpoint in another -o directory"
        )


# Settings a resumed run may change: how long it runs and how often it reports and saves.
# Everything else would make the resumed steps differ from the run that was started.
RESUMABLE_CHANGES = ("steps", "eval_every", "save_every", "log_every", "keep_last", "parallel", "pp_schedule")


def fresh_config(config: Optional[Path], given: dict[str, Any]) -> Any:
    """A new run's TrainConfig: the training config file's fields (or the defaults) with the flags (``given``) over them."""
    fields = (TrainConfig.from_file(config) if config else TrainConfig()).to_dict()
    return TrainConfig.from_dict({**fields, **given})


def resumed_config(saved: dict[str, Any], config: Optional[Path], given: dict[str, Any]) -> Any:
    """The resumed run's TrainConfig: its saved settings with the changes a training config
    file (``config``: its fields that differ from the defaults) and the flags (``given``) apply."""
    defaults = TrainConfig().to_dict()
    file_fields = TrainConfig.from_file(config).to_dict() if config else {}
    explicit = {k: v for k, v in file_fields.items() if defaults.get(k) != v}
    from_file = {k: config for k in explicit if k not in given}
    return TrainConfig.from_dict(resume_fields(saved, {**explicit, **given}, from_file))


def resume_fields(saved: dict[str, Any], given: dict[str, Any], from_file: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """The saved run's training settings with the changes ``given`` applies: only those in
    :data:`RESUMABLE_CHANGES` may differ; any other is one sentence naming its flag, or its key
    and the config file (``from_file``: key -> file) where the change came from there."""
    fields = dict(saved)
    for key, value in given.items():
        if key in RESUMABLE_CHANGES:
            fields[key] = value
        elif key in saved and saved[key] != value:
            source = f"{key}: {value!r} (from {from_file[key]})" if from_file and key in from_file else f"{flag_of(key)} {value!r}"
            drop = f"remove {key} from {from_file[key]}" if from_file and key in from_file else f"drop {flag_of(key)}"
            raise LiteLLMError(
                f"cannot resume with {source}: the run was trained with {saved[key]!r}, and only "
                f"{', '.join(flag_of(name) for name in RESUMABLE_CHANGES)} can change when resuming; {drop}, or start a new run in another -o directory"
            )
    return fields


def _resumable_checkpoint(manager: Any, output: Path, chosen: Optional[Path]) -> tuple[Path, dict[str, Any]]:
    """The checkpoint to resume from and its training metadata (settings, callbacks' state): ``chosen``, or the
    newest checkpoint of the run whose weights and training state load and verify — a
    corrupt newest one is said so and the previous complete one taken."""
    from ..checkpoint import load_training_state, verify_checkpoint
    from ..errors import CheckpointError

    candidates = [chosen] if chosen is not None else list(reversed(manager.list()))
    if not candidates:
        raise LiteLLMError(
            f"nothing to resume in {output}: it has no checkpoint; start the run again with --overwrite instead of --resume"
            if _holds_run(output) else f"nothing to resume in {output}: it has no checkpoint; drop --resume to start a new run"
        )
    for path in candidates:
        try:
            problems = verify_checkpoint(path)
            if problems:
                raise CheckpointError(problems[0])
            state = load_training_state(path)
        except (CheckpointError, OSError) as err:
            if chosen is not None:
                raise
            _warn(f"cannot resume from {path.name} ({err}); resuming from the previous complete checkpoint instead")
            continue
        if state is None:
            raise LiteLLMError(f"checkpoint {path} has no training state; start a new run from it with --init instead of resuming")
        return path, state.meta or {}
    raise LiteLLMError(f"no checkpoint in {output} is intact enough to resume from; start a new run with --overwrite")


def _saved_curriculum(meta: dict[str, Any]) -> Any:
    """The curriculum a run's checkpoint was trained with, from its training metadata ``meta``
    (None when it had none): resuming takes the run's saved settings, and a curriculum dropped
    on resume would silently train every weight with no ramp.  Read from the run's own training
    state, not progressive.json, which also carries the curriculum of the checkpoint a run was
    started from."""
    from ..train.curriculum import CurriculumConfig

    state = (meta.get("callbacks") or {}).get("curriculum") or {}
    if not state.get("schedule"):
        return None
    console.print(f"continuing the run's curriculum for tier {state['schedule']['tier']}")
    return CurriculumConfig.from_dict(state["schedule"])


def _newer_sharded_checkpoint(manager: Any, output: Path) -> Optional[Path]:
    """The newest sharded checkpoint of a distributed run, when it is newer than every
    ordinary checkpoint of the run (so continuing in one process starts from it)."""
    from ..dist.checkpoint import latest_sound_sharded

    sharded = latest_sound_sharded(output, say=_warn)
    if sharded is None:
        return None
    ordinary = manager.latest()
    newer = ordinary is None or (manager.step_of(sharded) or -1) > (manager.step_of(ordinary) or -1)
    return sharded if newer else None


def _hashes_hold(sharded: Path) -> bool:
    """Whether a sharded checkpoint's files match their recorded sha256, hashed by the ranks
    together (collective: every rank calls it and gets the same answer); a mismatch is said."""
    from ..dist.checkpoint import check_sharded, passed_over_notice

    try:
        check_sharded(sharded)
    except CheckpointError as err:
        if _is_rank_zero():
            _warn(passed_over_notice(sharded, err))
        return False
    return True


def drop_abandoned(output: Path, step: int) -> list[Path]:
    """``--resume-from`` an earlier checkpoint starts the run again from it: the run's
    checkpoints after that step, ordinary and sharded, are of the timeline it leaves, and a
    later ``--resume`` or ``checkpoint consolidate`` would pick them (a sharded step-20 of the old
    timeline beside the new ordinary step-20).  They are removed, each said so; protected ones
    (a curriculum's pre-integration checkpoint) are kept."""
    from ..checkpoint import CheckpointManager
    from ..checkpoint.atomic import remove_dir
    from ..dist.checkpoint import list_sharded

    manager = CheckpointManager(output)
    protected = manager.protected_names()
    later = [p for p in [*manager.list(), *list_sharded(output)] if (manager.step_of(p) or -1) > step and p.name not in protected]
    for path in later:
        remove_dir(path)
        _warn(f"removed {path}: it is of the run before --resume-from went back to step {step}")
    return later


def _say_finished(output: Path, step: int, checkpoint: Path) -> None:
    """What resuming a run that already reached its --steps prints (it trains nothing)."""
    console.print(f"the run in {output} is finished at step {step}; pass --steps N (N > {step}) to extend it")
    console.print(f"checkpoint: {checkpoint}")


def _sharded_to_resume(output: Path, resume_from: Optional[Path], passed_over: Sequence[Path] = ()) -> Path:
    """The sharded checkpoint a distributed run continues from: ``resume_from``, or the run's
    newest whose files read (their hashes are checked once the ranks can share the work:
    :func:`_hashes_hold`), but for ``passed_over`` — refused when the run went on in one
    process after it (its newer ordinary checkpoints would be silently trained over) or never
    was distributed.  Needs no process group: what it refuses, every rank refuses alike."""
    from ..checkpoint import CheckpointManager
    from ..dist.checkpoint import is_sharded_checkpoint, latest_sound_sharded, ordinary_newer_than

    if resume_from is not None:
        if not is_sharded_checkpoint(resume_from):
            raise LiteLLMError(
                f"--resume-from {resume_from} is not a sharded checkpoint; under torchrun give one of {output}/sharded/step-N, "
                "or continue from an ordinary checkpoint in one process (without torchrun)"
            )
        return resume_from
    latest = latest_sound_sharded(output, say=_warn if _is_rank_zero() else lambda message: None, skip=passed_over, hashes=False)
    if latest is None:
        ordinary = CheckpointManager(output).latest()
        if ordinary is not None:
            raise LiteLLMError(
                f"{output} holds checkpoints of a one-process run but no sharded checkpoint; continue it in one process (without torchrun), "
                f"or start a distributed run from it with --init {ordinary} -o another directory"
            )
        raise LiteLLMError(
            f"nothing to resume in {output}: it has no complete sharded checkpoint; start the run again with --overwrite instead of --resume"
        )
    ordinary = ordinary_newer_than(output, latest)
    if ordinary is not None:
        raise LiteLLMError(
            f"{ordinary} is newer than the run's last sharded checkpoint {latest.name}: the run went on in one process; continue it "
            f"in one process (without torchrun), or pass --resume-from {latest} to go back to step {CheckpointManager.step_of(latest)}"
        )
    return latest


# What a run directory holds at its top level (a run's checkpoints, sharded checkpoints, metrics,
# charts, a curriculum's pre-integration checkpoint and the lock): --overwrite clears only such
# a directory, never a dataset or some other folder a mistyped -o points to.
RUN_ENTRIES = ("checkpoints", "sharded", "metrics.jsonl", "plots", "pre-integration")


def _is_run_entry(name: str) -> bool:
    from ..checkpoint.run_lock import LOCK_NAME

    return name in RUN_ENTRIES or name.startswith(LOCK_NAME)


def _holds_run(output: Path) -> bool:
    """Whether ``output`` is a run directory with something of a run in it."""
    names = [p.name for p in output.iterdir()] if output.is_dir() else []
    return any(n in RUN_ENTRIES for n in names) and all(_is_run_entry(n) for n in names)


def _saved_anything(output: Path) -> bool:
    """Whether a run directory holds a checkpoint (ordinary or sharded) to resume from."""
    return any((output / entry).is_dir() and any((output / entry).iterdir()) for entry in ("checkpoints", "sharded"))


def _is_rank_zero() -> bool:
    """Rank 0 of a torchrun launch (or a process launched alone), before any process group forms."""
    import os

    return os.environ.get("RANK", "0") == "0"


def _warn(message: str) -> None:
    console.print(f"[yellow]{message}[/yellow]")


def check_in_run(checkpoint: Path, output: Path) -> None:
    """``--resume-from`` picks a checkpoint of the run in ``output``: one of another run would
    write that run's model and metrics into this one."""
    if not Path(checkpoint).resolve().is_relative_to(Path(output).resolve()):
        raise LiteLLMError(
            f"--resume-from {checkpoint} is not a checkpoint of the run in {output}; give one of {output}/checkpoints/step-N "
            f"(or {output}/sharded/step-N), or start a new run from it with --init {checkpoint}"
        )


def run_inputs(
    cfg: Any, *, data: Path, init_from: Optional[Path], config: Optional[Path], model_config: Optional[Path], curriculum: Optional[Path] = None
) -> dict[str, Path]:
    """What a run reads, by flag: the paths given and the checkpoints its training config names
    (teacher, EWC and SI sources)."""
    named = {"--data": data, "--init": init_from, "--config": config, "--model-config": model_config, "--curriculum": curriculum}
    named.update({flag_of(name): getattr(cfg, name) for name in ("distill_from", "ewc_from", "si_from")})
    return {flag: Path(value) for flag, value in named.items() if value}


def refuse_existing_run(output: Path, overwrite: bool, *, clear: bool = True, reads: Optional[dict[str, Path]] = None) -> None:
    """A fresh run never mixes into an old one: refuse unless ``overwrite``, then (``clear``)
    clear it — only when it is a run directory (:data:`RUN_ENTRIES`), and never when the new run
    reads something inside it (``reads``: a checkpoint of the old run as --init or teacher)."""
    from ..checkpoint.atomic import remove_dir
    from ..checkpoint.run_lock import LOCK_NAME

    existing = [p for p in output.iterdir() if p.name != LOCK_NAME] if output.is_dir() else []
    if not existing:
        return
    if not overwrite:
        if not _holds_run(output):
            raise LiteLLMError(f"{output} is not empty and is not a run directory; choose another -o directory")
        if not _saved_anything(output):
            raise LiteLLMError(
                f"{output} holds a run that stopped before its first checkpoint, so there is nothing to resume; pass --overwrite "
                "to start it again (and --save-every N to checkpoint along the way), or choose another -o directory"
            )
        raise LiteLLMError(f"{output} already holds a run; pass --resume to continue it, --overwrite to replace it, or choose another -o directory")
    foreign = sorted(p.name for p in existing if not _is_run_entry(p.name))
    if foreign:
        raise LiteLLMError(
            f"refusing to overwrite {output}: it holds {', '.join(foreign[:3])}, which is not part of a training run; choose another -o directory"
        )
    inside = [(flag, path) for flag, path in (reads or {}).items() if path.resolve().is_relative_to(output.resolve())]
    if inside:
        flag, path = inside[0]
        raise LiteLLMError(
            f"--overwrite would delete {path}, which {flag} reads: it lies inside the run {output}; copy it out first, or choose another -o directory"
        )
    if not clear:
        return
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
    overwrite: bool = overwrite_option(),
) -> None:
    """Undo a tier's integration: the pre-integration weights with the previous TierSet.

    The result computes exactly what the model computed before the tier was added.

    Example:

      lite-llm rollback runs/tier2/checkpoints/step-00000400 -o ckpt/before-tier2
    """
    from ..train.rollback import rollback_checkpoint

    path, tiers = rollback_checkpoint(checkpoint, output, overwrite=overwrite)
    console.print(f"wrote {path} with tiers {', '.join(tiers)}")


# ------------------------------------------------------------------------------ under torchrun
def train_distributed(
    *, data: Path, output: Path, init_from: Optional[Path], preset: Optional[str], model_config: Optional[Path], config: Optional[Path],
    resume: bool, resume_from: Optional[Path], overwrite: bool, quiet: bool, device: torch.device, given: dict[str, Any],
) -> None:
    """One rank's part of ``lite-llm train`` under torchrun.  Whatever can be refused from the
    command line and the files alone is refused on every rank alike, before any rank waits for
    another (a rank that stopped alone would leave the others to report a lost peer instead).
    Then the process group is joined, and the ranks hash the checkpoint to resume from
    together, each its share, instead of each reading all of it; if its files fail, the
    previous one is picked the same way."""
    import torch.distributed as dist

    from ..checkpoint import CheckpointManager, load_checkpoint
    from ..config import ModelConfig
    from ..data import TokenData
    from ..data.compat import check_data_tokenizer
    from ..dist.checkpoint import read_meta
    from ..dist.launch import describe_collective_failure, init_distributed, join_process_group, shutdown
    from ..dist.parallelize import parallelize
    from ..checkpoint.run_lock import RunLock, check_unlocked
    from ..dist.trainer import DistributedTrainer
    from ..model import build_model

    check_unlocked(output)  # every rank, before any of them waits for the others; rank 0 takes the lock below
    lock: Optional[RunLock] = None
    passed_over: list[Path] = []  # sharded checkpoints whose files failed their hashes
    try:
        while True:
            latest = _sharded_to_resume(output, resume_from, passed_over) if resume else None
            if latest is not None:
                meta = read_meta(latest)
                run_model = ModelConfig.from_dict(meta["model_config"])  # the run's own model: nothing to retype
                if (preset or model_config) and model_config_from(preset, model_config).to_dict() != run_model.to_dict():
                    raise LiteLLMError(f"cannot resume with a different model: {latest} holds another configuration than --preset/--model-config give; drop them to continue the run")
                saved = dict(meta["trainer"].get("train_config") or {})
                cfg = resumed_config(saved, config, given)
            else:
                cfg = fresh_config(config, given)
            if latest is None:
                reads = run_inputs(cfg, data=data, init_from=init_from, config=config, model_config=model_config)
                refuse_existing_run(output, overwrite, clear=False, reads=reads)  # every rank, before any of them waits for the others; rank 0 clears below
            device = join_process_group(device)
            # the files' hashes, checked by the ranks together (each its share) once they can talk;
            # a chosen --resume-from is checked as it loads, and refused if they fail
            if latest is None or resume_from is not None or _hashes_hold(latest):
                break
            passed_over.append(latest)
        ranks = init_distributed(cfg.parallel or None, device)
        lock = RunLock(output, say=_warn)
        if ranks.is_main:
            lock.acquire()
            from ..dist.checkpoint import clean_partial_sharded

            for leftover in clean_partial_sharded(output):
                console.print(f"removed {leftover.name}, left by an interrupted run")
        if latest is None:
            if ranks.is_main:
                refuse_existing_run(output, overwrite, reads=reads)
            dist.barrier()
        dataset = TokenData(data)
        if latest is not None:  # its weights come from the sharded checkpoint below
            model = build_model(run_model, seed=cfg.seed)
        elif init_from is not None:
            loaded = load_checkpoint(init_from, device="cpu")
            model = loaded.model
            check_data_tokenizer(dataset.tokenizer, data, loaded.tokenizer, model.config.vocab_size, init_from)
        else:
            model = build_model(model_config_from(preset, model_config), seed=cfg.seed)
        from ..checkpoint.derived import kept_tokenizer

        run_tokenizer = (kept_tokenizer(loaded) or dataset.tokenizer) if init_from is not None and latest is None else dataset.tokenizer
        model = parallelize(model.to(ranks.device), ranks)
        trainer = DistributedTrainer(model, dataset, cfg, ranks, run_dir=output, show_progress=not quiet, tokenizer=run_tokenizer)
        if init_from is not None and latest is None:
            trainer.inherit(loaded.progressive)
        if latest is not None:
            trainer.resume_sharded(latest)
            if trainer.step >= cfg.steps:  # every rank: nothing to train, nothing to write
                if ranks.is_main:
                    consolidated = CheckpointManager(output).path_for(trainer.step)
                    _say_finished(output, trainer.step, consolidated if consolidated.is_dir() else latest)
                return
            if ranks.is_main:
                console.print(f"resumed from {latest} at step {trainer.step} of {cfg.steps}")
                if resume_from is not None:
                    drop_abandoned(output, trainer.step)
        if ranks.is_main:
            pipeline = f" ({cfg.pp_schedule} schedule over {cfg.grad_accum} microbatches)" if ranks.degrees.pp > 1 else ""
            console.print(f"parallel: {ranks.degrees} on {ranks.degrees.world_size} ranks{pipeline}; device: {trainer.runtime_summary()}")
        result = trainer.train()
        if ranks.is_main:
            print_scores(result.final_eval)
            console.print(f"checkpoint: {result.checkpoint}")
    except (RuntimeError, ConnectionError) as exc:
        message = describe_collective_failure(exc)
        if message is None:
            raise
        raise LiteLLMError(message) from None
    finally:
        if lock is not None:
            lock.release()
        shutdown()
