"""`lite-llm quickstart`: the main job, end to end."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .app import THREADS_HELP, app, apply_threads, console, friendly_errors
from ..quickstart import QUICKSTART_STEPS


# ------------------------------------------------------------------------------------ quickstart
@app.command()
@friendly_errors
def quickstart(
    output: Path = typer.Option(Path("runs/quickstart"), "-o", "--output", help="Where data, run and charts go."),
    steps: int = typer.Option(QUICKSTART_STEPS, min=1, help="Training steps."),
    seed: int = typer.Option(0, help="Seed.", min=0),
    threads: Optional[int] = typer.Option(None, "--threads", help=THREADS_HELP),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an earlier quickstart's run and charts in OUTPUT (its prepared data is reused)."),
) -> None:
    """Prepare the built-in corpora, train a small two-tier model, evaluate, sample, chart.

    Runs in a few minutes on 2 CPU cores, with no download.

    Example:

      lite-llm quickstart -o runs/quickstart
    """
    from ..quickstart import run_quickstart

    apply_threads(threads)
    run_quickstart(output, steps=steps, seed=seed, console=console, overwrite=overwrite)
