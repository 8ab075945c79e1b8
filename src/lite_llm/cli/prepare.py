"""`lite-llm init`, `data prepare`, `tokenizer train`: what a run starts from."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from ..config.model import PRESETS
from ..errors import LiteLLMError
from .app import app, console, friendly_errors, model_config_from, overwrite_option, plain_warnings

data_app = typer.Typer(help="Prepare corpora into token shards.", no_args_is_help=True)
tokenizer_app = typer.Typer(help="Train a BPE tokenizer on corpora (a checkpoint or dataset then carries it).", no_args_is_help=True)
app.add_typer(data_app, name="data")
app.add_typer(tokenizer_app, name="tokenizer")


# ------------------------------------------------------------------------------------ init
@app.command()
@friendly_errors
def init(
    output: Path = typer.Option(..., "-o", "--output", help="Checkpoint directory to create."),
    overwrite: bool = overwrite_option(),
    preset: Optional[str] = typer.Option(None, help=f"Named model config: {', '.join(PRESETS)} (default: tiny)."),
    config: Optional[Path] = typer.Option(None, help="Model config file (YAML or JSON; may say `preset: NAME` and override fields)."),
    tokenizer: str = typer.Option("byte", help="'byte' or a folder/tokenizer.json made by `lite-llm tokenizer train`."),
    seed: int = typer.Option(0, help="Initialisation seed.", min=0),
) -> None:
    """Create a freshly initialised model checkpoint.

    Examples:

      lite-llm init --preset tiny -o ckpt/tiny

      lite-llm init --config model.yaml --tokenizer tok/ -o ckpt/mine
    """
    from ..checkpoint.atomic import refuse_existing

    if preset is not None and config is not None:  # one would be dropped without a word
        raise LiteLLMError(f"give only one of --preset and --config: a config file names its preset itself (`preset: {preset}`) and overrides fields of it")
    refuse_existing(output, overwrite, "checkpoint")
    from ..checkpoint import save_checkpoint
    from ..data import get_tokenizer
    from ..model import build_model

    cfg = model_config_from(preset, config)
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
    sources: list[str] = typer.Argument(..., help="DOMAIN=SPEC, or SPEC alone to name the domain after it (notes/ -> notes, book.txt -> book, 'docs/*.md' -> docs); SPEC is stdlib-code, stdlib-docs, a file, a folder or a glob."),
    output: Path = typer.Option(..., "-o", "--output", help="Dataset directory to create."),
    overwrite: bool = overwrite_option(),
    tokenizer: str = typer.Option("byte", help="'byte' or a trained tokenizer folder/file."),
    val_fraction: float = typer.Option(0.05, help="Share of documents held out for validation."),
    max_mb: Optional[float] = typer.Option(None, help="Cap each domain at this many MB (quick runs)."),
    seed: int = typer.Option(0, help="Seed of the train/validation split.", min=0),
) -> None:
    """Turn text into memory-mapped token shards, one named domain per source.

    Examples:

      lite-llm data prepare code=stdlib-code prose=stdlib-docs -o data/std

      lite-llm data prepare notes=~/notes/ 'papers=docs/*.md' -o data/mine --val-fraction 0.1
    """
    from ..checkpoint.atomic import refuse_existing

    if max_mb is not None and not 0 < max_mb < float("inf"):
        raise LiteLLMError(f"--max-mb must be a positive number of megabytes, got {max_mb}; leave it out to read every file")
    refuse_existing(output, overwrite, "dataset")
    from ..data import get_tokenizer, prepare_data

    mapping: dict[str, str] = {}
    seen: dict[str, str] = {}  # where each source really is -> the domain that reads it
    named_after: dict[str, str] = {}  # domain -> the bare SPEC its name was taken from
    for spec in sources:
        domain, _, target = spec.partition("=") if "=" in spec else (_domain_named_after(spec), "", spec)
        if not domain.strip() or not target.strip():
            raise LiteLLMError(f"source {spec!r} has an empty {'domain name' if not domain.strip() else 'path'}; write DOMAIN=SPEC, e.g. code=stdlib-code or notes=~/notes/")
        if domain in mapping:
            if domain in named_after or "=" not in spec:
                first = named_after.get(domain, mapping[domain])
                raise LiteLLMError(f"sources {first!r} and {spec!r} would both be domain {domain!r}; name them apart as DOMAIN=SPEC")
            raise LiteLLMError(f"domain {domain!r} is given twice; give each source its own name as DOMAIN=SPEC")
        if "=" not in spec:
            named_after[domain] = spec
        # the same text in two domains would be trained on twice and scored as if it were two
        where = target if not Path(target).expanduser().exists() else str(Path(target).expanduser().resolve())
        if where in seen:
            raise LiteLLMError(
                f"source {target!r} is given twice, for domains {seen[where]!r} and {domain!r}; give each domain its own source "
                "(weigh a domain with `lite-llm train --domains` instead)"
            )
        seen[where] = domain
        mapping[domain] = target
    with plain_warnings():  # Latin-1 or left-out files, a lopsided split: one plain warning line each
        index = prepare_data(
            mapping,
            output,
            get_tokenizer(tokenizer),
            val_fraction=val_fraction,
            seed=seed,
            max_bytes_per_domain=None if max_mb is None else max(1, int(max_mb * 1e6)),
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
    overwrite: bool = overwrite_option(),
    vocab_size: int = typer.Option(4096, help="Vocabulary size, including the 256 byte tokens.", min=1),
    min_frequency: int = typer.Option(2, help="Minimum pair frequency for a merge.", min=1),
) -> None:
    """Train a byte-level BPE tokenizer offline (Hugging Face tokenizer.json format).

    Example:

      lite-llm tokenizer train stdlib-code stdlib-docs --vocab-size 8192 -o tok/
    """
    from ..checkpoint.atomic import refuse_existing

    refuse_existing(output, overwrite, "tokenizer", markers=("tokenizer.json", "lite_tokenizer.json"))
    from ..data import BPETokenizer

    with plain_warnings():  # skipped and Latin-1 files, a vocabulary short of --vocab-size: one line each
        tok = BPETokenizer.train(texts=_training_texts(sources), vocab_size=vocab_size, min_frequency=min_frequency)
        if tok.vocab_size < vocab_size:
            warnings.warn(
                f"learned {tok.vocab_size} of the {vocab_size} tokens asked for: the corpus has too little text for more "
                f"merges (no other pair of tokens occurs {min_frequency}+ times); give it more text, or a smaller "
                "--vocab-size or --min-frequency"
            )
    tok.save(output)
    console.print(f"wrote {output} ({tok.vocab_size} tokens)")


def _domain_named_after(spec: str) -> str:
    """The domain a bare SPEC names: a built-in keeps its name, a file its name without the
    extension, a folder its name, a glob the folder before its first wildcard.  A name the
    dataset cannot use is refused here, saying it was taken from the SPEC."""
    import glob
    import os

    from ..data.prepare import DOMAIN_NAME_RULE, is_domain_name
    from ..data.sources import BUILTIN_SOURCES, glob_base

    if spec in BUILTIN_SOURCES:
        return spec
    if glob.has_magic(spec) and glob_base(spec) == Path("."):
        raise LiteLLMError(f"pattern {spec!r} has no folder before its wildcard to name its domain after; write DOMAIN=SPEC, e.g. mydata={spec}")
    path = os.path.abspath(os.path.expanduser(glob_base(spec) if glob.has_magic(spec) else spec))
    name = Path(path).stem if Path(path).is_file() else Path(path).name
    if not is_domain_name(name):
        raise LiteLLMError(
            f"source {spec!r} cannot name its domain, as {name!r} is not a domain name (use {DOMAIN_NAME_RULE}); "
            f"write DOMAIN=SPEC, e.g. mydata={spec}"
        )
    return name


def _training_texts(sources: list[str]) -> Iterator[str]:
    """Each source's texts in turn, read one source at a time (a corpus need not fit in memory
    twice); a source with no text at all is refused, as `data prepare` refuses it, rather than
    training a tokenizer of bytes alone."""
    from ..data import resolve_source
    from ..errors import DataError

    for spec in sources:
        docs = resolve_source(spec)
        if not any(text for _, text in docs):
            raise DataError(f"source {spec!r} holds no text to train a tokenizer on; give files with text in them")
        for _, text in docs:
            yield text
