"""`lite-llm ewc`: estimate a domain's Fisher and store it with the checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from .app import THREADS_HELP, app, apply_threads, console, device_option, friendly_errors, overwrite_option


ewc_app = typer.Typer(help="Elastic weight consolidation: Fisher estimates stored in checkpoints.", no_args_is_help=True)
app.add_typer(ewc_app, name="ewc")


@ewc_app.command("estimate")
@friendly_errors
def estimate(
    checkpoint: Path = typer.Argument(..., help="The model whose knowledge of DOMAIN should be kept."),
    data: Path = typer.Option(..., help="Dataset directory from `lite-llm data prepare`."),
    domain: str = typer.Option(..., help="The domain to remember (e.g. prose)."),
    output: Path = typer.Option(..., "-o", "--output", help="New checkpoint: a copy of CHECKPOINT with ewc/."),
    samples: int = typer.Option(256, help="Sequences the Fisher is averaged over.", min=1),
    seq_len: int = typer.Option(128, help="Tokens per sequence (at least 2: one next-token prediction).", min=2),
    estimator: str = typer.Option("sample", help="'sample': one gradient per sequence; 'batch': per micro-batch (cheaper, biased up where gradients agree)."),
    batch_size: int = typer.Option(16, help="Sequences per micro-batch (estimator 'batch').", min=1),
    seed: int = typer.Option(0, help="Which sequences are drawn.", min=0),
    device: str = device_option(),
    threads: Optional[int] = typer.Option(None, "--threads", help=THREADS_HELP),
    overwrite: bool = overwrite_option(),
) -> None:
    """Estimate the diagonal empirical Fisher of DOMAIN and write CHECKPOINT with it in ewc/.

    Growth (`lite-llm expand`) carries the estimate to the grown model; train with it via
    `lite-llm train --ewc CKPT --ewc-weight LAMBDA`.

    Example:

      lite-llm ewc estimate ckpt/prose --data data/std --domain prose --samples 256 -o ckpt/prose-ewc
    """
    from ..checkpoint import load_checkpoint
    from ..checkpoint.derived import check_new_output
    from ..checkpoint.lazy import open_checkpoint
    from ..data import TokenData
    from ..runtime.device import resolve_device
    from ..train.ewc import EWC_FORMAT, check_values, estimate_fisher, save_ewc

    # refused before the estimate, which takes minutes, not after it
    check_new_output(output, open_checkpoint(checkpoint, verify=False).path, "the checkpoint with its EWC estimate", overwrite=overwrite)
    run_device = resolve_device(device)
    apply_threads(threads)
    model = load_checkpoint(checkpoint, device=run_device).model
    result = estimate_fisher(model, TokenData(data), domain, samples=samples, seq_len=seq_len, estimator=estimator, batch_size=batch_size, seed=seed)
    check_values(result, EWC_FORMAT)  # a diverged model's estimate is refused, not stored
    path = save_ewc(checkpoint, result, output, overwrite=overwrite)
    total = sum(float(f.sum()) for f in result.fisher.values())
    console.print(f"wrote {path}: Fisher of {domain!r} over {samples} sequences ({estimator} estimator), trace {total:.4g}")
