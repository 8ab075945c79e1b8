"""Where text comes from: built-in corpora that are on every machine, or the user's files.

There is no network at run time, so the built-ins are the Python standard library's own
source (a real, varied code corpus of about 12 MB) and the English reference text that ships
with ``pydoc``.  Every source becomes a sorted list of :class:`Document`; the order and the
keys are the same on every machine with the same Python, which is what makes the train/val
split and the prepared ``.bin`` files reproducible.
"""

from __future__ import annotations

import glob
import os
import sysconfig
import warnings
from pathlib import Path
from typing import Callable, Iterator, NamedTuple

from ..errors import DataError


class Document(NamedTuple):
    """One unit of text.  ``key`` is stable and machine-independent (a relative path or a
    topic name): the train/val split hashes it, so it must not contain absolute paths."""

    key: str
    text: str


# Directory names never descended into: test suites would leak near-duplicate code into both
# splits and skew a "stdlib" corpus, installed packages are not the stdlib, and caches and
# hidden folders (.git) are not text anyone meant to train on.
_STDLIB_SKIP_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"})
_FOLDER_SKIP_DIRS = frozenset({"__pycache__", "node_modules"})
# Extensions that are never text; skipping them saves reading large binaries just to reject them.
_BINARY_SUFFIXES = frozenset(
    ".pyc .pyo .so .dll .dylib .exe .o .a .bin .npy .npz .pt .pth .safetensors .gguf .zip .gz .bz2 .xz "
    ".zst .tar .7z .png .jpg .jpeg .gif .bmp .ico .webp .pdf .mp3 .mp4 .wav .ogg .sqlite .db .whl".split()
)
_SNIFF_BYTES = 8192


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def iter_stdlib_code() -> Iterator[Document]:
    """The standard library's ``.py`` files, minus test suites and installed packages."""
    root = stdlib_root()
    for path in _walk(root, _STDLIB_SKIP_DIRS, skip_hidden=False):
        if path.suffix == ".py":
            text = _read_text(path)
            if text:
                yield Document(path.relative_to(root).as_posix(), text)


def iter_stdlib_docs() -> Iterator[Document]:
    """English prose: the reference topics ``help()`` shows, one document per topic."""
    from pydoc_data.topics import topics

    for name in sorted(topics):
        if topics[name].strip():
            yield Document(name, topics[name])


BUILTIN_SOURCES: dict[str, str] = {
    "stdlib-code": "Python standard library source (.py files, test suites excluded), about 12 MB of code",
    "stdlib-docs": "English reference text of the Python documentation (pydoc topics), about 0.5 MB of prose",
}

_BUILTIN_READERS: dict[str, Callable[[], Iterator[Document]]] = {
    "stdlib-code": iter_stdlib_code,
    "stdlib-docs": iter_stdlib_docs,
}


def resolve_source(spec: str | os.PathLike) -> list[Document]:
    """Turn a source spec into documents: a built-in name, a file, a folder or a glob.

    A folder is read recursively, keeping every file that is UTF-8 text (any extension) and
    skipping binaries, hidden entries and ``__pycache__``.  Keys are paths relative to the
    folder (or the file's name, or the path relative to the glob's fixed prefix), so moving a
    corpus does not change its split.  Empty files are dropped: they carry no tokens.
    """
    spec_str = os.fspath(spec)
    if spec_str in _BUILTIN_READERS:
        return list(_BUILTIN_READERS[spec_str]())

    path = Path(spec_str).expanduser()
    if path.is_file():
        text = _read_text(path, trust_suffix=False)  # named explicitly: judge by content alone
        if text is None:
            raise DataError(f"source file {path} is not UTF-8 text")
        return [Document(path.name, text)] if text else []
    if path.is_dir():
        docs = _read_folder(path)
        if not docs:
            raise DataError(f"source folder {path} holds no UTF-8 text files")
        return docs
    if glob.has_magic(spec_str):
        return _read_glob(spec_str)
    builtins = ", ".join(BUILTIN_SOURCES)
    raise DataError(f"no file, folder or built-in source named {spec_str!r}; built-in sources are {builtins}")


def _read_folder(folder: Path) -> list[Document]:
    docs = []
    for path in _walk(folder, _FOLDER_SKIP_DIRS, skip_hidden=True):
        text = _read_text(path)
        if text:
            docs.append(Document(path.relative_to(folder).as_posix(), text))
    return docs


def _read_glob(pattern: str) -> list[Document]:
    pattern = os.path.expanduser(pattern)
    # Keys are relative to the pattern's fixed prefix ("/data/books" in "/data/books/**/*.txt").
    fixed = []
    for part in Path(pattern).parts:
        if glob.has_magic(part):
            break
        fixed.append(part)
    base = Path(*fixed) if fixed else Path(".")
    matches = sorted(glob.glob(pattern, recursive=True))
    docs: list[Document] = []
    for match in matches:
        path = Path(match)
        key = Path(os.path.relpath(path, base)).as_posix()
        if path.is_dir():
            docs.extend(Document(f"{key}/{d.key}", d.text) for d in _read_folder(path))
        elif path.is_file():
            text = _read_text(path)
            if text:
                docs.append(Document(key, text))
    docs.sort(key=lambda d: d.key)
    if not docs:
        what = "no files" if not matches else "no UTF-8 text files"
        raise DataError(f"pattern {pattern!r} matches {what}")
    return docs


def _walk(root: Path, skip_dirs: frozenset[str], *, skip_hidden: bool) -> list[Path]:
    """Files under ``root`` sorted by relative path, pruning skipped directories before
    descending (the stdlib's site-packages can hold far more files than the stdlib itself)."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in skip_dirs and not (skip_hidden and d.startswith("."))]
        found.extend(Path(dirpath, n) for n in filenames if not (skip_hidden and n.startswith(".")))
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def _read_text(path: Path, *, trust_suffix: bool = True) -> str | None:
    """The file's text, or ``None`` if it is binary.

    Text that is not UTF-8 (a Latin-1 file beside UTF-8 ones, common in older corpora) is read
    as Latin-1 — every byte is a Latin-1 character, so nothing is lost — and a warning names it,
    rather than the file being dropped without a word."""
    if trust_suffix and path.suffix.lower() in _BINARY_SUFFIXES:
        return None
    try:
        data = path.read_bytes()
    except OSError:
        return None
    if b"\x00" in data[:_SNIFF_BYTES]:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        pass
    controls = sum(1 for b in data[:_SNIFF_BYTES] if b < 0x20 and b not in b"\t\n\r\f")
    if controls > len(data[:_SNIFF_BYTES]) // 100:  # control bytes: binary, not text in another encoding
        return None
    warnings.warn(f"{path} is not UTF-8; read it as Latin-1 (convert it to UTF-8 to be sure of its characters)", stacklevel=2)
    return data.decode("latin-1")
