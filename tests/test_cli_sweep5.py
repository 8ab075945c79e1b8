"""Defects found by the fifth sweep of the command line, each with its command and its result."""

from __future__ import annotations

import subprocess
import sys

CLI = [sys.executable, "-c", "from lite_llm.cli import main; main()"]


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(CLI + list(args), capture_output=True, text=True, timeout=60)


def test_piped_help_is_plain_lines_with_nothing_cut():
    """Was: help piped to a file came in boxes padded to 80 columns, option names cut with an
    ellipsis (--no-keep-memo…) and examples broken mid-command."""
    done = _run("train", "--help")
    assert done.returncode == 0
    lines = done.stdout.splitlines()
    assert not any(ch in done.stdout for ch in "╭│╰…")
    assert "--keep-memory / --no-keep-memory" in done.stdout
    first = next(i for i, line in enumerate(lines) if line.rstrip().endswith("--replay-share 0.25 \\"))
    assert lines[first + 1].strip().startswith("--ewc grown --ewc-weight 100")  # the continued example stays two lines
    steps = next(line for line in lines if line.strip().startswith("--steps "))
    assert "Total optimizer steps. Default: 200." in steps and "(200)" not in steps


def test_a_mistyped_option_is_one_line():
    """Was: click's usage block and rich's error box, seven lines for one mistake."""
    done = _run("generate", "ckpt", "--max-tokens", "4")
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.strip().splitlines() == [
        "error: No such option: --max-tokens (Possible options: --max-new-tokens); see `lite-llm generate --help`"
    ]
    done = _run("inspect")
    assert done.stderr.strip() == "error: Missing argument 'checkpoint'; see `lite-llm inspect --help`"


def test_a_group_without_its_command_prints_its_help():
    done = _run("data")
    assert done.returncode == 2 and done.stdout.startswith("Usage: lite-llm data [OPTIONS] COMMAND") and "prepare" in done.stdout
