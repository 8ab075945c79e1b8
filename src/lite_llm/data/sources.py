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
    corpus does not change its split.  Empty files are dropped: they carry no tokens.  Every file
    a folder or glob leaves out (binary, UTF-16, empty) is named in one warning, with why.
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
        skipped: list[tuple[str, str]] = []
        docs = _read_folder(path, skipped)
        if not docs:
            raise DataError(f"source folder {path} holds no UTF-8 text files{_skipped_note(skipped)}")
        _warn_skipped(f"source folder {path}", skipped)
        return docs
    if glob.has_magic(spec_str):
        return _read_glob(spec_str)
    builtins = ", ".join(BUILTIN_SOURCES)
    raise DataError(f"no file, folder or built-in source named {spec_str!r}; built-in sources are {builtins}")


def _read_folder(folder: Path, skipped: list[tuple[str, str]], prefix: str = "") -> list[Document]:
    """The folder's usable documents; each file left out is added to ``skipped`` as (key, why)."""
    docs = []
    for path in _walk(folder, _FOLDER_SKIP_DIRS, skip_hidden=True):
        key = prefix + path.relative_to(folder).as_posix()
        text, why = _judge_text(path)
        if text:
            docs.append(Document(key, text))
        else:
            skipped.append((key, why or "empty"))
    return docs


def _read_glob(pattern: str) -> list[Document]:
    pattern = os.path.expanduser(pattern)
    # Keys are relative to the pattern's fixed prefix ("/data/books" in "/data/books/**/*.txt").
    base = glob_base(pattern)
    matches = sorted(glob.glob(pattern, recursive=True))
    docs: list[Document] = []
    skipped: list[tuple[str, str]] = []
    for match in matches:
        path = Path(match)
        key = Path(os.path.relpath(path, base)).as_posix()
        if path.is_dir():
            docs.extend(_read_folder(path, skipped, prefix=f"{key}/"))
        elif path.is_file():
            text, why = _judge_text(path)
            if text:
                docs.append(Document(key, text))
            else:
                skipped.append((key, why or "empty"))
    docs.sort(key=lambda d: d.key)
    if not docs:
        what = "no files" if not matches else f"no UTF-8 text files{_skipped_note(skipped)}"
        raise DataError(f"pattern {pattern!r} matches {what}")
    _warn_skipped(f"pattern {pattern!r}", skipped, stacklevel=4)
    return docs


def glob_base(pattern: str) -> Path:
    """The part of a glob before its first wildcard ("/data/books" of "/data/books/**/*.txt")."""
    fixed = []
    for part in Path(pattern).parts:
        if glob.has_magic(part):
            break
        fixed.append(part)
    return Path(*fixed) if fixed else Path(".")


_SKIPPED_SHOWN = 5  # files named in a skip warning; past this, a count of the rest


def _skipped_note(skipped: list[tuple[str, str]]) -> str:
    """`` (a.txt is UTF-16 text, b.bin is binary, and 3 more)`` for an error, or nothing."""
    return f" ({_skipped_list(skipped)})" if skipped else ""


def _skipped_list(skipped: list[tuple[str, str]]) -> str:
    shown = [f"{key} is {why}" for key, why in skipped[:_SKIPPED_SHOWN]]
    rest = len(skipped) - len(shown)
    return ", ".join(shown) + (f" and {rest} more" if rest else "")


def _warn_skipped(where: str, skipped: list[tuple[str, str]], *, stacklevel: int = 3) -> None:
    """Name the files a folder or glob left out and why, as the Latin-1 warning names its file:
    a file named alone that is not text is an error, so one inside a folder must not vanish."""
    if skipped:
        n = len(skipped)
        warnings.warn(
            f"{where}: left out {n} file{'s' if n > 1 else ''} that {'are' if n > 1 else 'is'} not usable text "
            f"({_skipped_list(skipped)}); convert text files to UTF-8 to include them",
            stacklevel=stacklevel,
        )


def _walk(root: Path, skip_dirs: frozenset[str], *, skip_hidden: bool) -> list[Path]:
    """Files under ``root`` sorted by relative path, pruning skipped directories before
    descending (the stdlib's site-packages can hold far more files than the stdlib itself)."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in skip_dirs and not (skip_hidden and d.startswith("."))]
        found.extend(Path(dirpath, n) for n in filenames if not (skip_hidden and n.startswith(".")))
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def _read_text(path: Path, *, trust_suffix: bool = True) -> str | None:
    """The file's text, or ``None`` if it is binary (see :func:`_judge_text`)."""
    return _judge_text(path, trust_suffix=trust_suffix)[0]


def _judge_text(path: Path, *, trust_suffix: bool = True) -> tuple[str | None, str | None]:
    """The file's text and, when it is ``None``, why it is not text (for the skip warning).

    Text that is not UTF-8 (a Latin-1 file beside UTF-8 ones, common in older corpora) is read
    as Latin-1 — every byte is a Latin-1 character, so nothing is lost — and a warning names it,
    rather than the file being dropped without a word."""
    if trust_suffix and path.suffix.lower() in _BINARY_SUFFIXES:
        return None, "binary"
    try:
        data = path.read_bytes()
    except OSError as exc:
        return None, f"unreadable ({exc.strerror or exc})"
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        return None, "UTF-16 text"
    if b"\x00" in data[:_SNIFF_BYTES]:
        return None, "binary"
    try:
        return data.decode("utf-8"), None
    except UnicodeDecodeError:
        pass
    controls = sum(1 for b in data[:_SNIFF_BYTES] if b < 0x20 and b not in b"\t\n\r\f")
    if controls > len(data[:_SNIFF_BYTES]) // 100:  # control bytes: binary, not text in another encoding
        return None, "binary"
    warnings.warn(f"{path} is not UTF-8; read it as Latin-1 (convert it to UTF-8 to be sure of its characters)", stacklevel=2)
    return data.decode("latin-1"), None
