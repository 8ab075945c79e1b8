"""Atomic directory writes: build a directory under a temporary name, then swap it into place.

The temporary directory sits next to the target (same filesystem, so the rename is atomic).
Replacing an existing directory uses Linux's ``renameat2(RENAME_EXCHANGE)`` where available —
one atomic step, after which the old contents sit under the temporary name and are deleted.
Elsewhere the old directory is first renamed aside (``.<name>.old-…``), the new one renamed
in, and the old one deleted; if a crash hits between the two renames, :func:`resolve_dir`
finds the complete old checkpoint under its aside name, so at every instant either the old or
the new checkpoint is loadable.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator

from ..errors import CheckpointError

_RENAME_EXCHANGE = 2
_AT_FDCWD = -100
USE_EXCHANGE = True  # tests switch this off to exercise the two-rename fallback


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    """Make a directory's entries (new files, renames) durable.  A no-op where directories
    cannot be opened (Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every file, then every directory (deepest first) under ``root``, ``root`` last."""
    dirs = []
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            fsync_file(Path(dirpath) / name)
        dirs.append(Path(dirpath))
    for d in reversed(dirs):
        fsync_dir(d)


_SYNC_FILE_RANGE_WRITE = 1 << 1
_sync_file_range: Any = None


def _libc_function(name: str, argtypes: list[Any]) -> Any:
    """libc's ``name`` (returning int, setting errno), or False where there is none (macOS,
    Windows, an old glibc)."""
    try:
        fn = getattr(ctypes.CDLL(None, use_errno=True), name)
    except Exception:  # noqa: BLE001 - no libc, or no such symbol
        return False
    fn.argtypes, fn.restype = argtypes, ctypes.c_int
    return fn


def _load_sync_file_range() -> Any:
    global _sync_file_range
    if _sync_file_range is None:
        _sync_file_range = _libc_function("sync_file_range", [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint])
    return _sync_file_range


class EarlyWriteback:
    """Start the disk writing a file while it is still being written, so the fsync at its end
    waits for the last few megabytes instead of the whole file.

    Left alone, the kernel keeps a new file's pages dirty until their total passes a fraction
    of memory (``vm.dirty_background_ratio``) and then throttles the writer.  Handing each
    64 MB to the disk as soon as it is written (``sync_file_range(SYNC_FILE_RANGE_WRITE)``,
    which starts the writeback of a range and returns without waiting) made writing and
    fsyncing 2.4 GB 1.36x faster (median; ``benchmarks/writeback.py``).  A hint only: where
    the call is missing or refused (not Linux, a filesystem that cannot), nothing changes but
    the speed.  Durability is still the caller's fsync."""

    def __init__(self, fd: int, every: int = 64 * 1024**2) -> None:
        self.fd, self.every, self.flushed, self.written = fd, every, 0, 0
        self._call = _load_sync_file_range()

    def wrote(self, nbytes: int) -> None:
        """Count ``nbytes`` more written; once ``every`` bytes are pending, start their writeback."""
        self.written += nbytes
        if self._call and self.written - self.flushed >= self.every:
            if self._call(self.fd, self.flushed, self.written - self.flushed, _SYNC_FILE_RANGE_WRITE) != 0:
                self._call = False  # refused here (e.g. not a regular file): stop asking
            self.flushed = self.written


def write_bytes_durable(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def replace_file(target: Path, data: bytes) -> None:
    """Make ``target`` hold ``data``, whole or not at all: a durable temporary sibling renamed
    over it, then the folder synced.  A failure leaves ``target`` as it was and no sibling."""
    tmp = temp_sibling(target, "tmp")
    try:
        write_bytes_durable(tmp, data)
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(target.parent)


def temp_sibling(target: Path, tag: str) -> Path:
    """A hidden, unique path next to ``target``: ``.<name>.<tag>-<pid>-<random>``."""
    return target.parent / f".{target.name}.{tag}-{os.getpid()}-{uuid.uuid4().hex[:8]}"


def siblings(target: Path, tag: str) -> list[Path]:
    if not target.parent.is_dir():
        return []
    prefix = f".{target.name}.{tag}-"
    return sorted(p for p in target.parent.iterdir() if p.name.startswith(prefix))


_renameat2: Any = None


def _load_renameat2() -> Any:
    global _renameat2
    if _renameat2 is None:
        _renameat2 = _libc_function("renameat2", [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint])
    return _renameat2


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths; False when the platform or filesystem cannot."""
    renameat2 = _load_renameat2() if USE_EXCHANGE else False
    if not renameat2:
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EPERM):
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


def swap_into_place(tmp: Path, target: Path) -> None:
    """Make the complete directory ``tmp`` appear at ``target``, replacing what is there.

    On return ``tmp`` no longer exists.  If this raises, ``target`` still holds the previous
    directory (or nothing, if there was none) and ``tmp`` is left for the caller to remove.
    """
    parent = target.parent
    if not target.exists():
        os.replace(tmp, target)
        fsync_dir(parent)
        return
    if _exchange(tmp, target):
        fsync_dir(parent)
        shutil.rmtree(tmp, ignore_errors=True)  # now holds the old contents
        return
    aside = temp_sibling(target, "old")
    os.replace(target, aside)
    try:
        os.replace(tmp, target)
    except BaseException:
        os.replace(aside, target)  # put the old checkpoint back
        raise
    fsync_dir(parent)
    shutil.rmtree(aside, ignore_errors=True)


@contextlib.contextmanager
def building_dir(target: Path, marker: str, before_commit: Callable[[], None] | None = None) -> Iterator[Path]:
    """Build a directory to appear at ``target`` whole or not at all: the ``with`` body fills the
    yielded temporary sibling; on leaving it, everything is fsynced, ``before_commit`` (if any)
    runs, and the directory is swapped into place.

    The one copy of the sequence every directory writer needs (checkpoints, Hugging Face
    folders): an interrupted earlier swap is first restored (``marker`` names the file that
    makes a directory complete), and any exception, from the body, the fsync, ``before_commit``
    or the swap, removes the temporary and leaves ``target`` as it was.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    recover(target, marker)
    tmp = temp_sibling(target, "tmp")
    tmp.mkdir()
    try:
        yield tmp
        fsync_tree(tmp)
        if before_commit is not None:
            before_commit()
        swap_into_place(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def resolve_dir(target: Path, marker: str) -> Path:
    """``target``, or — when a swap was interrupted between its two renames — the complete old
    directory left aside next to it (the one holding ``marker``)."""
    if target.exists():
        return target
    for aside in reversed(siblings(target, "old")):
        if (aside / marker).is_file():
            return aside
    return target


def recover(target: Path, marker: str) -> None:
    """Before writing ``target``: restore an interrupted swap and remove stale temporaries."""
    if not target.exists():
        found = resolve_dir(target, marker)
        if found != target:
            os.replace(found, target)
            fsync_dir(target.parent)
    for stale in siblings(target, "tmp") + siblings(target, "old") + siblings(target, "deleting"):
        shutil.rmtree(stale, ignore_errors=True)


def remove_dir(path: Path) -> None:
    """Delete a directory so that a crash midway never leaves a half-deleted one under its name."""
    doomed = temp_sibling(path, "deleting")
    os.replace(path, doomed)
    fsync_dir(path.parent)
    shutil.rmtree(doomed, ignore_errors=True)


def refuse_existing(path: Path, overwrite: bool, what: str, markers: tuple[str, ...] = ()) -> None:
    """Refuse to replace an existing non-empty ``path`` unless ``overwrite``: nothing a user made
    is replaced by a mistyped command.  (With ``overwrite`` the writers here still build the new
    one beside it and swap it in only when complete, so the old one survives a failure.)  Given
    ``markers``, a folder is replaced only when it holds one of them: --overwrite replaces a
    ``what``, not some other folder."""
    path = Path(path)
    if not path.exists() or (path.is_dir() and not any(path.iterdir())):
        return
    if not overwrite:
        raise CheckpointError(f"{path} already exists; pass --overwrite to replace it with the new {what}, or choose another output")
    if markers and not (path.is_dir() and any((path / m).is_file() for m in markers)):
        raise CheckpointError(f"refusing to overwrite {path}, which is not a {what} folder (no {' or '.join(markers)}); choose another path")
