"""The main job in one call: built-in data -> a small two-tier model -> checkpoint, scores,
a sample and charts.  Needs no download and runs in minutes on 2 CPU cores."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

QUICKSTART_TRAIN = dict(
    batch_size=32,
    seq_len=128,
    lr=3e-3,
    warmup_steps=30,
    eval_every=100,
    eval_batches=8,
    eval_batch_size=16,
    domains={"code": 0.75, "prose": 0.25},
)


def run_quickstart(output: str | Path, *, steps: int = 250, seed: int = 0, console: Console | None = None) -> dict[str, Any]:
    """Run the quickstart into ``output``; returns the final validation scores and paths."""
    from .config import ModelConfig
    from .data import ByteTokenizer, TokenData, prepare_data
    from .generate import generate_text
    from .model import build_model
    from .plot import plot_run
    from .train import TrainConfig, Trainer

    console = console or Console()
    output = Path(output)
    started = time.perf_counter()

    data_dir = output / "data"
    if not (data_dir / "index.json").exists():
        console.print("[bold]1/4[/bold] preparing built-in corpora (Python stdlib code, pydoc prose)…")
        prepare_data({"code": "stdlib-code", "prose": "stdlib-docs"}, data_dir, ByteTokenizer(), seed=seed)
    data = TokenData(data_dir)

    cfg = ModelConfig.from_preset("small")
    console.print(
        f"[bold]2/4[/bold] training '{cfg.name}': {cfg.num_params():,} parameters in {len(cfg.tiers)} tiers, "
        f"{cfg.num_active_params():,} active per token, {steps} steps"
    )
    train_cfg = TrainConfig(steps=steps, seed=seed, **QUICKSTART_TRAIN)
    model = build_model(cfg, seed=seed)
    run_dir = output / "run"
    trainer = Trainer(model, data, train_cfg, run_dir=run_dir, tokenizer=data.tokenizer)
    result = trainer.train()

    console.print("[bold]3/4[/bold] validation")
    table = Table("domain", "loss (nats/token)", "bits per byte")
    for domain, score in result.final_eval.items():
        table.add_row(domain, f"{score['loss']:.4f}", f"{score['bpb']:.3f}")
    console.print(table)

    prompt = "def "
    sample = "".join(generate_text(model, data.tokenizer, prompt, 160, temperature=0.0))
    console.print("[bold]sample[/bold] (greedy, all tiers):")
    console.print(prompt + sample, markup=False, highlight=False)

    charts = plot_run(run_dir, output / "plots")
    console.print(f"[bold]4/4[/bold] charts: {', '.join(str(c) for c in charts)}")
    console.print(f"checkpoint: {result.checkpoint}")
    console.print(f"done in {time.perf_counter() - started:.0f} s")
    return {"scores": result.final_eval, "checkpoint": result.checkpoint, "charts": charts, "sample": sample}
