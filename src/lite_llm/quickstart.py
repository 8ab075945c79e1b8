"""The main job in one call: built-in data -> a BPE tokenizer -> a small two-tier model ->
checkpoint, scores, a sampled continuation and charts.  Needs no download and trains in
under four minutes on 2 idle CPU cores (BENCHMARKS.md, "Quickstart").

Why this recipe (measured on 2 cores, BENCHMARKS.md): a byte-level BPE of 4,096 tokens learned
from the corpora themselves carries ~3.4 bytes of code per token, so a step of the same cost
sees 3.4x the text of a byte model; at this compute the best bits per byte come from a
narrower model trained on more tokens with a higher learning rate; and the sequences are long
because attention costs little at this size.  The model stays a tiered mixture of experts
(two tiers), the product's shape, though a dense model of the same cost would score a little
better.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from .errors import DataError, LiteLLMError

QUICKSTART_PRESET = "quickstart"
QUICKSTART_SOURCES = {"code": "stdlib-code", "prose": "stdlib-docs"}
QUICKSTART_VAL_FRACTION = 0.05
QUICKSTART_STEPS = 300
QUICKSTART_TRAIN = dict(
    batch_size=16,
    seq_len=256,
    lr=3e-3,
    warmup_steps=30,
    eval_every=100,
    eval_batches=8,
    eval_batch_size=16,
    domains={"code": 0.75, "prose": 0.25},
)
# A sampled continuation, not greedy decoding: greedy text from a small model loops on its
# most likely phrase ("def the the the ...") while sampling shows what it has learned.
QUICKSTART_SAMPLE = dict(prompt="def ", max_new_tokens=120, temperature=0.8, top_p=0.95, seed=0)


def train_quickstart_tokenizer(vocab_size: int, *, seed: int = 0, max_bytes_per_domain: int | None = None):
    """A byte-level BPE learned from the *train* split of the built-in corpora only.

    The documents are split exactly as ``prepare_data`` will split them (same hash, same seed,
    same fraction), so no validation text shapes the vocabulary and the bits per byte measured
    on it stay honest.  ``tokenizers`` trains deterministically: the same corpora give the same
    ``tokenizer.json`` on every run.
    """
    from .data import BPETokenizer, resolve_source
    from .data.prepare import split_documents, truncate_documents

    texts: list[str] = []
    for spec in QUICKSTART_SOURCES.values():
        docs, _ = truncate_documents(resolve_source(spec), max_bytes_per_domain)
        splits, _ = split_documents(docs, QUICKSTART_VAL_FRACTION, seed)
        texts.extend(doc.text for doc in splits["train"])
    return BPETokenizer.train(texts=texts, vocab_size=vocab_size)


def _prepare(data_dir: Path, vocab_size: int, seed: int, max_bytes_per_domain: int | None, console: Console):
    """Train the tokenizer and tokenise the corpora into ``data_dir``, or reuse what an earlier
    quickstart left there (refusing data made with another tokenizer, which the model cannot read)."""
    from .data import TokenData, prepare_data

    if not (data_dir / "index.json").exists():
        console.print(f"[bold]1/5[/bold] training a {vocab_size:,}-token BPE tokenizer on the built-in corpora (Python stdlib code, pydoc prose)…")
        tok = train_quickstart_tokenizer(vocab_size, seed=seed, max_bytes_per_domain=max_bytes_per_domain)
        console.print("[bold]2/5[/bold] tokenising the corpora…")
        prepare_data(
            QUICKSTART_SOURCES, data_dir, tok, val_fraction=QUICKSTART_VAL_FRACTION, seed=seed, max_bytes_per_domain=max_bytes_per_domain
        )
    else:
        console.print(f"[bold]1-2/5[/bold] reusing the tokenizer and data in {data_dir}")
    data = TokenData(data_dir)
    if data.tokenizer.kind != "bpe" or data.tokenizer.vocab_size > vocab_size:
        raise DataError(
            f"{data_dir} holds data made with another tokenizer ({data.tokenizer.kind}, {data.tokenizer.vocab_size} tokens); "
            "remove that folder or give the quickstart another output folder"
        )
    return data


def _clear_previous_run(output: Path, overwrite: bool) -> None:
    """Refuse, or with ``overwrite`` delete, the run and charts an earlier quickstart left in
    ``output``: a new run beside them would append its metrics to the old ones (two runs in
    one chart) and leave the old run's later checkpoints as the newest.  The prepared data is
    kept either way (``_prepare`` reuses it)."""
    from .checkpoint.atomic import remove_dir

    if output.exists() and not output.is_dir():
        raise LiteLLMError(f"-o {output} is a file; give the quickstart a folder for its data, run and charts")
    leftovers = [p for p in (output / "run", output / "plots") if p.exists() and (not p.is_dir() or any(p.iterdir()))]
    if not leftovers:
        return
    if not overwrite:
        raise LiteLLMError(
            f"{output} already holds a quickstart run ({leftovers[0]}); pass --overwrite to replace it (the prepared data is reused), "
            "or choose another -o folder"
        )
    for path in leftovers:
        remove_dir(path) if path.is_dir() else path.unlink()


def run_quickstart(
    output: str | Path,
    *,
    steps: int = QUICKSTART_STEPS,
    seed: int = 0,
    console: Console | None = None,
    max_bytes_per_domain: int | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Run the quickstart into ``output``; returns the scores, paths, sample and timings.

    ``max_bytes_per_domain`` caps the corpora (tests use it for a run of seconds); the
    quickstart itself reads them whole.  An earlier quickstart's run in ``output`` is refused
    unless ``overwrite`` (its prepared data is reused either way).
    """
    from .config import ModelConfig
    from .generate import generate_text
    from .model import build_model
    from .plot import plot_run
    from .train import TrainConfig, Trainer

    console = console or Console()
    output = Path(output)
    _clear_previous_run(output, overwrite)
    started = time.perf_counter()

    cfg = ModelConfig.from_preset(QUICKSTART_PRESET)
    data = _prepare(output / "data", cfg.vocab_size, seed, max_bytes_per_domain, console)
    prepared = time.perf_counter()

    console.print(
        f"[bold]3/5[/bold] training '{cfg.name}': {cfg.num_params():,} parameters in {len(cfg.tiers)} tiers, "
        f"{cfg.num_active_params():,} active per token, {steps} steps of {QUICKSTART_TRAIN['batch_size']} x {QUICKSTART_TRAIN['seq_len']} tokens"
    )
    train_cfg = TrainConfig(steps=steps, seed=seed, **QUICKSTART_TRAIN)
    model = build_model(cfg, seed=seed)
    run_dir = output / "run"
    trainer = Trainer(model, data, train_cfg, run_dir=run_dir, tokenizer=data.tokenizer)
    result = trainer.train()
    trained = time.perf_counter()

    console.print("[bold]4/5[/bold] validation (bits per byte: per byte of UTF-8 text, whatever the tokenizer)")
    table = Table("domain", "loss (nats/token)", "bits per byte")
    for domain, score in result.final_eval.items():
        table.add_row(domain, f"{score['loss']:.4f}", f"{score['bpb']:.3f}")
    console.print(table)

    s = QUICKSTART_SAMPLE
    sample = "".join(
        generate_text(model, data.tokenizer, s["prompt"], s["max_new_tokens"], temperature=s["temperature"], top_p=s["top_p"], seed=s["seed"])
    )
    console.print(f"[bold]sample[/bold] (temperature {s['temperature']}, top-p {s['top_p']}, seed {s['seed']}, all tiers):")
    console.print(s["prompt"] + sample, markup=False, highlight=False)

    charts = plot_run(run_dir, output / "plots")
    console.print(f"[bold]5/5[/bold] charts: {', '.join(str(c) for c in charts)}")
    console.print(f"checkpoint: {result.checkpoint}")
    done = time.perf_counter()
    timings = {"prepare_s": prepared - started, "train_s": trained - prepared, "total_s": done - started}
    console.print(
        f"done in {timings['total_s']:.0f} s (data and tokenizer {timings['prepare_s']:.0f} s, training {timings['train_s']:.0f} s)"
    )
    return {"scores": result.final_eval, "checkpoint": result.checkpoint, "charts": charts, "sample": sample, "timings": timings}
