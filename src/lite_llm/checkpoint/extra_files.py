"""Adding a small named file (a JSON table, say) to an existing checkpoint, crash-safely.

A checkpoint is otherwise written whole (:func:`save_checkpoint`), but some facts about it are
measured later — the TierSet profile of :mod:`lite_llm.serve.selection` needs the finished
weights — and rewriting gigabytes of shards to add a few kilobytes would be absurd.

The file is stored under a name that carries its content hash
(``serve/tierset-profile.3f9a1c2b7d4e.json``) and listed in the manifest as
``{"kind": "extra_file", "name": ...}``.  The order of the steps keeps the checkpoint loadable
and verifiable at every instant: (1) the new file is written under a temporary name, fsynced and
renamed to its hashed name — nothing lists it yet; (2) the manifest is rewritten under a
temporary name, fsynced and renamed over ``manifest.json`` (one atomic step: readers see the old
or the new list, never half of one); (3) only then is the previous version of the file
removed.  A crash between any two steps leaves at most an unlisted stray file, never a listed
file that is missing or fails its hash.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

from ..errors import CheckpointError
from . import atomic
from .load import check_listed_file, read_manifest
from .manifest import MANIFEST, safe_member, sha256_file

EXTRA_FILE = "extra_file"
_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]*$")
_SUFFIX = re.compile(r"^\.[a-z0-9]+$")


def _check_name(name: str, folder: str, suffix: str) -> None:
    if not isinstance(name, str) or not _NAME.match(name):
        raise CheckpointError(f"extra file name {name!r} is not allowed; use lower-case letters, digits, '_' or '-'")
    if folder and not _NAME.match(folder):
        raise CheckpointError(f"extra file folder {folder!r} is not allowed; use lower-case letters, digits, '_' or '-'")
    if not _SUFFIX.match(suffix):
        raise CheckpointError(f"extra file suffix {suffix!r} is not allowed; use a dot and lower-case letters or digits, such as .json")


def write_extra_file(path: str | os.PathLike, name: str, data: bytes, *, folder: str = "", suffix: str = ".json") -> str:
    """Add (or replace) the extra file ``name`` of the checkpoint at ``path``; returns its
    path inside the checkpoint.  The checkpoint still verifies afterwards (see the module's
    docstring for why every intermediate state does too)."""
    _check_name(name, folder, suffix)
    root = atomic.resolve_dir(Path(path), MANIFEST)
    manifest = read_manifest(root)
    digest = hashlib.sha256(data).hexdigest()
    rel = f"{folder + '/' if folder else ''}{name}.{digest[:12]}{suffix}"
    target = root / rel
    target.parent.mkdir(parents=True, exist_ok=True)
    atomic.replace_file(target, data)

    old = [f for f in manifest["files"] if isinstance(f, dict) and f.get("kind") == EXTRA_FILE and f.get("name") == name]
    files = [f for f in manifest["files"] if f not in old]
    files.append({"path": rel, "kind": EXTRA_FILE, "name": name, "bytes": len(data), "sha256": sha256_file(target)})
    manifest["files"] = files
    atomic.replace_file(root / MANIFEST, (json.dumps(manifest, indent=2, allow_nan=False) + "\n").encode("utf-8"))
    for entry in old:
        if entry.get("path") != rel and isinstance(entry.get("path"), str):
            stale = check_path(root, entry["path"])
            if stale is not None:
                stale.unlink(missing_ok=True)
    return rel


def check_path(root: Path, rel: str) -> Path | None:
    """``root / rel`` when ``rel`` stays inside the checkpoint, else None (never delete outside it)."""
    try:
        return safe_member(root, rel, root / MANIFEST)
    except CheckpointError:
        return None


def read_extra_file(path: str | os.PathLike, name: str, *, verify: bool = True) -> bytes | None:
    """The bytes of the extra file ``name`` (checked against its size and sha256), or None when
    the checkpoint has none."""
    root = atomic.resolve_dir(Path(path), MANIFEST)
    manifest = read_manifest(root)
    entries = [f for f in manifest["files"] if isinstance(f, dict) and f.get("kind") == EXTRA_FILE and f.get("name") == name]
    if not entries:
        return None
    rel = entries[-1].get("path")
    file_path = check_listed_file(root, manifest, rel, f"extra file {name!r}", verify)
    if not file_path.is_file():
        raise CheckpointError(f"extra file {file_path} is missing; run the command that wrote it again")
    return file_path.read_bytes()
