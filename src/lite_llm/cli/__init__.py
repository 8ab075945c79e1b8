"""`lite-llm`: the command line.

One module per command family; :mod:`.app` holds the application, its consoles and the error
handling every command shares.  Every command prints one clear sentence and exits non-zero on
bad input; heavy imports happen inside commands so ``--help`` is instant.
"""

# Imported for their side effect, registering the commands, in the order `--help` lists them.
from . import quickstart, prepare, train, evaluate, generate, chat, grow, interop, ewc, tiers, checkpoints, serve  # noqa: F401,I001
import sys

from .app import app, plain_help, reflow_help, run_app

reflow_help(app)


def main() -> None:
    if not sys.stdout.isatty():
        plain_help(app)
    run_app(app)


__all__ = ["app", "main"]
