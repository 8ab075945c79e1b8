"""Shared data fixtures: a small corpus on disk and a prepared two-domain dataset."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from lite_llm.data import ByteTokenizer, prepare_data

WORDS = "alpha beta gamma delta naïve café 東京 emoji 🎉 tab\tend quote's line".split(" ")


def make_text(i: int, n_lines: int) -> str:
    """Deterministic, varied, non-ASCII text; document ``i`` differs from every other."""
    return "".join(f"doc {i} line {j}: {' '.join(WORDS[(i + j + k) % len(WORDS)] for k in range(6))}\n" for j in range(n_lines))


def assert_one_sentence(message: str) -> None:
    """User-facing errors are one sentence: no newline, no second sentence."""
    assert message and "\n" not in message, message
    assert not re.search(r"[.!?]\s+[A-Z]", message), message


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    """A folder of 12 text files in nested folders, plus a binary file and a hidden folder
    that must both be ignored."""
    root = tmp_path_factory.mktemp("corpus")
    for i in range(12):
        sub = root / ("nested/deeper" if i % 3 == 0 else "nested" if i % 3 == 1 else ".")
        sub.mkdir(parents=True, exist_ok=True)
        (sub / f"doc{i:02d}.{['txt', 'md', 'rst', 'py'][i % 4]}").write_text(make_text(i, 5 + 7 * i), encoding="utf-8")
    (root / "image.dat").write_bytes(bytes(range(256)) * 4)
    (root / ".git").mkdir()
    (root / ".git" / "config").write_text("[core]\n", encoding="utf-8")
    (root / "empty.txt").write_text("", encoding="utf-8")
    return root


@pytest.fixture(scope="session")
def single_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("single") / "book.txt"
    path.write_text(make_text(99, 400), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def std_data(tmp_path_factory) -> Path:
    """Both built-in corpora, cut to 300 kB each so the suite stays fast."""
    out = tmp_path_factory.mktemp("std") / "data"
    prepare_data(
        {"code": "stdlib-code", "prose": "stdlib-docs"},
        out,
        ByteTokenizer(),
        val_fraction=0.1,
        max_bytes_per_domain=300_000,
    )
    return out
