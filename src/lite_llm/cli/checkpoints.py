"""`lite-llm checkpoint consolidate`: a distributed run's sharded state as an ordinary checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..errors import LiteLLMError
from .app import app, console, friendly_errors, overwrite_option

checkpoint_app = typer.Typer(help="Sharded checkpoints of distributed runs.", no_args_is_help=True)
app.add_typer(checkpoint_app, name="checkpoint")


@checkpoint_app.command("consolidate")
@friendly_errors
def consolidate_command(
    run: Path = typer.Argument(..., help="A distributed run directory, or one of its sharded checkpoints (RUN/sharded/step-N)."),
    output: Path = typer.Option(..., "-o", "--output", help="Where to write the ordinary checkpoint."),
    overwrite: bool = overwrite_option(),
    step: Optional[int] = typer.Option(None, help="Which sharded checkpoint of RUN (default: the latest complete one).", min=0),
) -> None:
    """Write the ordinary manifest checkpoint (weights, optimizer moments, progress) of a
    sharded one, in one process: what growth, add-tier, eval, export and a new run read.

    Example:

      lite-llm checkpoint consolidate runs/dist -o ckpt/dist
    """
    from ..checkpoint.atomic import refuse_existing
    from ..checkpoint import CheckpointManager
    from ..dist.checkpoint import consolidate, is_sharded_checkpoint, latest_sharded, ordinary_newer_than, sharded_path

    refuse_existing(output, overwrite, "checkpoint")
    if is_sharded_checkpoint(run):
        source = run
    elif step is not None:
        source = sharded_path(run, step)
        if not is_sharded_checkpoint(source):
            raise LiteLLMError(f"{run} has no complete sharded checkpoint at step {step}; list {run}/sharded for the steps it has")
    else:
        found = latest_sharded(run)
        if found is None:
            raise LiteLLMError(f"{run} holds no complete sharded checkpoint; pass a run trained with torchrun, or one of its sharded/step-N folders")
        ordinary = ordinary_newer_than(run, found)
        if ordinary is not None:
            raise LiteLLMError(
                f"{ordinary} is newer than the run's last sharded checkpoint {found.name} (the run went on in one process) and is "
                f"already an ordinary checkpoint: use it as it is, or pass --step {CheckpointManager.step_of(found)} to consolidate the older one"
            )
        source = found
    path = consolidate(source, output)
    console.print(f"wrote {path} from {source}")
