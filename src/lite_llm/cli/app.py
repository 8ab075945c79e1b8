"""The `lite-llm` application object, its consoles and the one way errors reach the user.

Every command prints one clear sentence and exits non-zero on bad input; no stack traces for
errors a user can fix.  Heavy imports happen inside commands so ``--help`` is instant.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import inspect
import os
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Callable, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ..errors import ConfigError, LiteLLMError

app = typer.Typer(
    name="lite-llm",
    help="Language models that grow: train a small tiered model, then grow it without starting over.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

def _piped_width() -> int | None:
    """The console's width when stdout is not a terminal: wide enough for any table at its
    natural width (rich would fit it into 80 columns, wrapping and eliding its cells), unless
    ``$COLUMNS`` says otherwise; None on a terminal (rich asks it)."""
    if sys.stdout.isatty():
        return None
    columns = os.environ.get("COLUMNS", "")
    return int(columns) if columns.isdigit() and int(columns) > 0 else 1000


console = Console(soft_wrap=not sys.stdout.isatty(), width=_piped_width())  # plain, unwrapped lines in logs and pipes
err_console = Console(stderr=True, soft_wrap=True)


def option_flag(name: str) -> str:
    """The command-line flag typer makes of a parameter ``name`` (``top_p`` -> ``--top-p``), for
    messages that name a setting as the user typed it."""
    return "--" + name.replace("_", "-")


def reflow_help(application: typer.Typer) -> None:
    """Join the wrapped lines of every command's help paragraphs into one line each.

    Typer keeps a docstring's single line breaks after its first paragraph, so a paragraph
    wrapped at 90 columns in the source came out ragged in an 80-column terminal (and cut
    mid-phrase in a wide one).  Paragraphs with an indented line (examples, commands) keep
    their lines as written."""
    for info in application.registered_commands:
        text = info.help or (info.callback.__doc__ if info.callback else None)
        if text:
            info.help = "\n\n".join(_reflowed(p) for p in inspect.cleandoc(text).split("\n\n"))
    for group in application.registered_groups:
        if group.typer_instance is not None:
            reflow_help(group.typer_instance)


def _reflowed(paragraph: str) -> str:
    lines = paragraph.split("\n")
    if _verbatim(lines):
        return paragraph
    return " ".join(line.strip() for line in lines)


def _verbatim(lines: list[str]) -> bool:
    """A paragraph kept line for line: an example or a command (an indented line)."""
    return any(line.startswith((" ", "\t", "\b")) for line in lines)


def plain_help(application: typer.Typer) -> None:
    """Help as plain lines, for a stdout that is not a terminal (a pipe, a file, a log).

    Rich draws help in boxes padded to 80 columns there, and cuts long option names and
    examples with an ellipsis; click's own formatter, given a width of ``$COLUMNS`` or none at
    all, writes each paragraph and option on one line and nothing is cut.  Examples are marked
    for click to keep line for line (``\\b``), so a command continued with ``\\`` stays two lines."""
    width = _piped_width() or 1000
    application.info.context_settings = {**(application.info.context_settings or {}), "terminal_width": width, "max_content_width": width}
    _mark_verbatim(application)


def _mark_verbatim(application: typer.Typer) -> None:
    """Click's formatter for ``application`` and its groups, examples marked to keep their lines."""
    application.rich_markup_mode = None
    for info in application.registered_commands:
        if info.help:
            info.help = "\n\n".join(
                "\b\n" + p if _verbatim(p.split("\n")) and not p.startswith("\b") else p for p in info.help.split("\n\n")
            )
    for group in application.registered_groups:
        if group.typer_instance is not None:
            _mark_verbatim(group.typer_instance)


def run_app(application: typer.Typer) -> None:
    """Run the command line; a mistyped command or option is one line on stderr, as every
    other error is (click's usage block and rich's error box said the same in seven lines)."""
    try:
        code = application(prog_name="lite-llm", standalone_mode=False)
    except typer.TyperException as exc:  # click's exceptions (typer ships its own click)
        if type(exc).__name__ == "NoArgsIsHelpError":  # a group without its command: its help, on stdout
            help_text = exc.format_message()  # rich has printed it already; click's formatter returns it
            if help_text:
                print(help_text)
            sys.exit(2)
        ctx = getattr(exc, "ctx", None)
        hint = f"; see `{ctx.command_path} --help`" if ctx is not None else ""
        message = exc.format_message().rstrip(".") if hint else exc.format_message()
        err_console.print(f"[bold red]error:[/bold red] {escape(message)}{escape(hint)}", highlight=False)
        sys.exit(getattr(exc, "exit_code", 2))
    except typer.Abort:
        err_console.print("[bold red]error:[/bold red] aborted", highlight=False)
        sys.exit(1)
    sys.exit(code if isinstance(code, int) else 0)


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
        except OSError as exc:
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            # every writer builds its output under a temporary name and removes it on failure
            where = f" writing {exc.filename}" if exc.filename else ""
            err_console.print(
                f"[bold red]error:[/bold red] the disk is full{where}; nothing half-written was kept — free some space "
                "(or write to another disk) and run the command again",
                highlight=False,
            )
            raise typer.Exit(1) from None
        except ValueError as exc:
            err_console.print(f"[bold red]error:[/bold red] {escape(str(exc))}", highlight=False)
            raise typer.Exit(1) from None

    return wrapper


@contextlib.contextmanager
def plain_warnings() -> Iterator[None]:
    """Warnings raised inside as one plain ``warning: ...`` line on stderr each, instead of
    Python's ``file:line: UserWarning`` with a source line (which reads like a crash)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            yield
        finally:
            seen: set[str] = set()
            for w in caught:
                text = str(w.message)
                if text not in seen:
                    seen.add(text)
                    err_console.print(f"[yellow]warning:[/yellow] {escape(text)}", highlight=False)


DEVICE_ENV = "LITE_LLM_DEVICE"


def device_option() -> Any:
    """The ``--device`` option every computing command shares (declared once, here).  Its
    default ``auto`` takes a CUDA GPU when there is one; ``LITE_LLM_DEVICE`` sets another default
    (the test suite pins it to ``cpu`` so its bitwise checks mean the same on a GPU machine)."""
    return typer.Option(
        "auto", "--device", envvar=DEVICE_ENV, show_envvar=True,
        help="Where to compute: auto (a CUDA GPU when there is one, else the CPU), cpu, cuda or cuda:N.",
    )


def overwrite_option() -> Any:
    """The ``--overwrite`` option of every command that writes a checkpoint, dataset or folder:
    without it an existing one is refused; with it the new one is built beside it and swapped
    in only when complete, so a failure leaves the old one as it was."""
    return typer.Option(False, "--overwrite", help="Replace OUTPUT if it already exists (swapped in only once the new one is complete).")


def model_config_from(preset: Optional[str], config: Optional[Path]):
    from ..config import ModelConfig

    if config is not None:
        return ModelConfig.from_file(config)
    return ModelConfig.from_preset(preset or "tiny")


def check_report_path(path: Optional[Path], option: str = "--json", overwrite: bool = False, example: str = "report.json") -> None:
    """Refuse, before the work that fills it runs, a file path (``option`` names it) that cannot
    be written or where writing would destroy something: into a checkpoint folder, even with
    ``--overwrite`` (a manifest replaced by a report is a checkpoint lost, and a file added there
    is one the checkpoint never listed), or over an existing file without ``--overwrite``."""
    if path is None:
        return
    if path.is_dir():
        raise LiteLLMError(f"{option} {path} is a directory; give a file name such as {path / example}")
    if not path.parent.is_dir():
        raise LiteLLMError(f"{option} {path}: the folder {path.parent} does not exist; create it or give another path")
    inside = _checkpoint_holding(path)
    if inside is not None:
        raise LiteLLMError(f"{option} {path} is inside the checkpoint folder {inside}, which is never written into (not even with --overwrite); give a path outside it")
    if path.exists() and not overwrite:
        raise LiteLLMError(f"{option} {path} already exists; pass --overwrite to replace it, or give another file name")


def _checkpoint_holding(path: Path) -> Optional[Path]:
    """The checkpoint folder (one holding a manifest) that ``path`` would be written into, at
    any depth; None when it is outside every checkpoint."""
    from ..checkpoint.manifest import MANIFEST

    folder = path.resolve().parent
    return next((f for f in (folder, *folder.parents) if (f / MANIFEST).is_file()), None)


def write_report(path: Path, data: Any) -> None:
    """Write ``data`` as JSON to ``path`` whole or not at all."""
    import json

    from ..checkpoint.atomic import replace_file

    replace_file(path, (json.dumps(data, indent=2) + "\n").encode("utf-8"))


def print_scores(scores: dict[str, dict[str, float]], title: str = "validation") -> None:
    if not scores:
        return
    table = Table("domain", "loss (nats/token)", "bits per byte", title=title)
    for domain, s in scores.items():
        table.add_row(domain, f"{s['loss']:.4f}", f"{s['bpb']:.4f}")
    console.print(table)


def parse_dtype(name: Optional[str]):
    import torch

    if name is None:
        return None
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if name not in table:
        raise ConfigError(f"unknown dtype {name!r}; use float32, bfloat16 or float16")
    return table[name]


THREADS_HELP = (
    "CPU threads (default: OMP_NUM_THREADS, else every CPU this process may run on). "
    "Runs give bitwise-equal numbers only at equal counts."
)


def apply_threads(threads: Optional[int], *, header_to_stderr: bool = False) -> None:
    """Apply ``--threads`` before any heavy work and put what was chosen in the run's header
    (on stderr where stdout carries the command's output, as `generate`'s text does)."""
    from ..runtime.threads import apply_thread_policy

    policy = apply_thread_policy(threads)
    (err_console if header_to_stderr else console).print(policy.describe(), highlight=False)
