"""The checkpoint manifest: format version, validation, shard naming and hashing.

A checkpoint directory is described entirely by ``manifest.json``.  Everything here is pure
(no model, no tensors): reading and validating a manifest, comparing format versions, naming
and partitioning shards, hashing files.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path, PurePosixPath
from typing import Any

from ..errors import CheckpointError

FORMAT_NAME = "lite-llm-checkpoint"
FORMAT_VERSION = "1.0.0"
"""Semantic version of the on-disk format.

* patch: bug fixes, no change to what is written;
* minor: new optional fields, shard kinds or tiers that an older 1.x reader may ignore;
* major: a change an older reader cannot ignore (it refuses such checkpoints).
"""

MODEL_VERSION_DEFAULT = "1.0.0"
"""The model's own semantic version (manifest field ``model_version``), distinct from the
format's: a growth that keeps old readers working (a new tier they may skip) bumps its minor
version.  Checkpoints written before the field existed read as this default."""

MANIFEST = "manifest.json"
PROGRESSIVE = "progressive.json"
TOKENIZER_DIR = "tokenizer"
TRAINING_DIR = "training"
TRAINING_TENSORS = "training/state.safetensors"
TRAINING_META = "training/state.json"
EXTRA_TENSORS = "tensors.safetensors"

DENSE = "dense"
SHARD_KINDS = ("dense", "router", "experts")
REQUIRED_FIELDS = ("format", "format_version", "model_config", "shards")
REQUIRED_SHARD_FIELDS = ("path", "tier", "kind", "sha256", "tensors")

PROGRESSIVE_DEFAULTS: dict[str, Any] = {"training": {}, "expansions": [], "curriculum": None, "layer_importance": None}

_VERSION = re.compile(r"^(\d+)\.(\d+)\.(\d+)(?:[-+][0-9A-Za-z.+-]*)?$")
_ROUTER = re.compile(r"^layers\.\d+\.ffn\.router\.heads\.([a-z][a-z0-9_]*)\.")
_EXPERTS = re.compile(r"^layers\.\d+\.ffn\.experts\.([a-z][a-z0-9_]*)\.")


def one_line(exc: BaseException | str) -> str:
    """An exception's text folded onto one line, without a final full stop (for embedding in
    our one-sentence messages)."""
    return " ".join(str(exc).split()).rstrip(".")


# ------------------------------------------------------------------------------- versions
def parse_version(text: Any) -> tuple[int, int, int] | None:
    """``"1.2.3"`` -> ``(1, 2, 3)``; None when ``text`` is not a semantic version."""
    if not isinstance(text, str):
        return None
    match = _VERSION.match(text.strip())
    return (int(match.group(1)), int(match.group(2)), int(match.group(3))) if match else None


def reader_version() -> tuple[int, int, int]:
    """The format version this code reads and writes (looked up at call time)."""
    version = parse_version(FORMAT_VERSION)
    assert version is not None
    return version


def next_minor_version(version: str) -> str:
    """``"1.0.3"`` -> ``"1.1.0"``: the version of a model grown in a way old readers can ignore."""
    return _bump(version, minor=True)


def next_major_version(version: str) -> str:
    """``"1.2.0"`` -> ``"2.0.0"``: the version of a model whose existing tensors changed shape
    (depth, width, heads, upcycling), which a reader of the old model cannot use as it was."""
    return _bump(version, minor=False)


def _bump(version: str, *, minor: bool) -> str:
    parsed = parse_version(version)
    if parsed is None:
        raise CheckpointError(f"model_version {version!r} is not a major.minor.patch version; write one such as 1.1.0")
    return f"{parsed[0]}.{parsed[1] + 1}.0" if minor else f"{parsed[0] + 1}.0.0"


def is_newer_minor(manifest: dict[str, Any]) -> bool:
    """True when the manifest comes from a newer minor version of our major version."""
    written = parse_version(manifest.get("format_version"))
    return written is not None and written[:2] > reader_version()[:2]


# ------------------------------------------------------------------------------- shards
def shard_owner(name: str, tier_names: set[str] | list[str]) -> tuple[str, str]:
    """(tier, kind) of a state-dict tensor: ``("dense", "dense")`` unless a tier owns it."""
    for pattern, kind in ((_ROUTER, "router"), (_EXPERTS, "experts")):
        match = pattern.match(name)
        if match and match.group(1) in tier_names:
            return match.group(1), kind
    return DENSE, DENSE


def shard_stem(tier: str, kind: str) -> str:
    """File stem of a shard group: ``dense`` or ``tier-<name>-<kind>``."""
    return DENSE if tier == DENSE else f"tier-{tier}-{kind}"


def shard_file_names(stem: str, pieces: int) -> list[str]:
    """``dense.safetensors`` or ``dense-00001-of-00003.safetensors`` ... for ``pieces`` pieces."""
    if pieces == 1:
        return [f"{stem}.safetensors"]
    return [f"{stem}-{i:05d}-of-{pieces:05d}.safetensors" for i in range(1, pieces + 1)]


def split_by_bytes(sizes: list[tuple[str, int]], max_bytes: int) -> list[list[str]]:
    """Split named sizes, in order, into runs of at most ``max_bytes`` (whole tensors; a tensor
    larger than ``max_bytes`` gets a piece of its own)."""
    pieces: list[list[str]] = []
    current: list[str] = []
    total = 0
    for name, size in sizes:
        if current and total + size > max_bytes:
            pieces.append(current)
            current, total = [], 0
        current.append(name)
        total += size
    if current:
        pieces.append(current)
    return pieces


# ------------------------------------------------------------------------------- files
def sha256_file(path: Path) -> str:
    with open(path, "rb") as f:
        if hasattr(hashlib, "file_digest"):
            return hashlib.file_digest(f, "sha256").hexdigest()
        digest = hashlib.sha256()
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
        return digest.hexdigest()


def safe_member(root: Path, rel: Any, manifest_path: Path) -> Path:
    """``root / rel`` for a relative path inside the checkpoint; refuses anything that could
    escape the directory (absolute paths, ``..``)."""
    if not isinstance(rel, str) or not rel:
        raise CheckpointError(f"{manifest_path} lists a file with an invalid path {rel!r}; restore it from a backup or re-save the checkpoint")
    pure = PurePosixPath(rel)
    if pure.is_absolute() or ".." in pure.parts or "\\" in rel:
        raise CheckpointError(
            f"{manifest_path} lists a file outside the checkpoint ({rel!r}); refusing to read it, restore the manifest from a backup or re-save"
        )
    return root.joinpath(*pure.parts)


def check_file(path: Path, entry: dict[str, Any], what: str, *, verify: bool) -> str | None:
    """A one-sentence problem with a listed file (missing, truncated, wrong size, corrupt), or None."""
    if not path.is_file():
        return f"{what} {path} is missing; restore it from a backup or re-save the checkpoint"
    expected = entry.get("bytes")
    if isinstance(expected, int):
        actual = path.stat().st_size
        if actual < expected:
            return f"{what} {path} is truncated ({actual} of {expected} bytes); restore it from a backup or re-save the checkpoint"
        if actual != expected:
            return f"{what} {path} has {actual} bytes where the manifest says {expected}; restore it from a backup or re-save the checkpoint"
    if verify and entry.get("sha256") and sha256_file(path) != entry["sha256"]:
        return f"{what} {path} is corrupt (sha256 mismatch); restore it from a backup or re-save"
    return None


# ------------------------------------------------------------------------------- manifest
def manifest_in(path: str | Path) -> dict[str, Any]:
    """Read, validate and version-check ``<path>/manifest.json`` (this folder exactly: the
    loaders' :func:`~lite_llm.checkpoint.load.read_manifest` first finds a folder an interrupted
    swap left aside).

    Raises :class:`CheckpointError` for a missing directory or manifest, malformed JSON, a
    missing required field, or a newer major version.  Optional fields of an older writer are
    filled with defaults (``tiers``, ``num_params``, ``created_at``, ``lite_llm_version``,
    ``files``, ``model_version``); unknown fields of a newer minor version are kept and
    ignored by the loader.
    """
    root = Path(path)
    if not root.exists():
        raise CheckpointError(f"checkpoint directory {root} does not exist; check the path or save a checkpoint there first")
    if not root.is_dir():
        raise CheckpointError(f"{root} is a file, not a checkpoint directory; pass the directory that holds manifest.json")
    manifest_path = root / MANIFEST
    if not manifest_path.is_file():
        raise CheckpointError(
            f"{root} has no {MANIFEST}, so it is not a complete lite-llm checkpoint; point to a checkpoint directory or re-save it"
        )
    try:
        data = json.loads(manifest_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise CheckpointError(
            f"{manifest_path} is not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno}); restore it from a backup or re-save the checkpoint"
        ) from None
    except UnicodeDecodeError:
        raise CheckpointError(f"{manifest_path} is not UTF-8 text; restore it from a backup or re-save the checkpoint") from None
    return validate_manifest(data, manifest_path)


def validate_manifest(data: Any, manifest_path: Path | str) -> dict[str, Any]:
    """Check a parsed manifest (see :func:`manifest_in`) and fill the defaults of optional fields."""
    if not isinstance(data, dict):
        raise CheckpointError(f"{manifest_path} must hold a JSON object; restore it from a backup or re-save the checkpoint")
    if data.get("format") != FORMAT_NAME:
        raise CheckpointError(
            f"{manifest_path} is not a lite-llm checkpoint manifest (format is {data.get('format')!r}, expected {FORMAT_NAME!r}); point to a lite-llm checkpoint directory"
        )
    if "format_version" not in data:
        raise CheckpointError(f"{manifest_path} lacks required field format_version; restore it from a backup or re-save the checkpoint")
    written = parse_version(data["format_version"])
    if written is None:
        raise CheckpointError(
            f"{manifest_path} has format_version {data['format_version']!r}, which is not a major.minor.patch version; restore it from a backup or re-save the checkpoint"
        )
    ours = reader_version()
    if written[0] > ours[0]:
        raise CheckpointError(
            f"{manifest_path} was written by format {data['format_version']}; this lite-llm reads {ours[0]}.x; upgrade lite-llm"
        )
    if written[0] < ours[0]:
        raise CheckpointError(
            f"{manifest_path} was written by format {data['format_version']}, which predates {ours[0]}.x and cannot be read; convert it with an older lite-llm release"
        )
    missing = [f for f in REQUIRED_FIELDS if f not in data]
    if missing:
        raise CheckpointError(f"{manifest_path} lacks required field(s) {', '.join(missing)}; restore it from a backup or re-save the checkpoint")
    if not isinstance(data["model_config"], dict):
        raise CheckpointError(f"{manifest_path}: model_config must be a JSON object; restore it from a backup or re-save the checkpoint")
    tiers_cfg = data["model_config"].get("tiers", [])
    if not isinstance(tiers_cfg, list) or not all(isinstance(t, dict) and isinstance(t.get("name"), str) for t in tiers_cfg):
        raise CheckpointError(f"{manifest_path}: model_config.tiers must be a list of objects with a name; restore it from a backup or re-save the checkpoint")
    if not isinstance(data["shards"], list):
        raise CheckpointError(f"{manifest_path}: shards must be a list; restore it from a backup or re-save the checkpoint")
    newer_minor = written[:2] > ours[:2]
    tier_names = {t["name"] for t in tiers_cfg}
    for i, shard in enumerate(data["shards"]):
        if not isinstance(shard, dict):
            raise CheckpointError(f"{manifest_path}: shards[{i}] must be a JSON object; restore it from a backup or re-save the checkpoint")
        lacking = [f for f in REQUIRED_SHARD_FIELDS if f not in shard]
        if lacking:
            raise CheckpointError(
                f"{manifest_path}: shards[{i}] lacks required field(s) {', '.join(lacking)}; restore it from a backup or re-save the checkpoint"
            )
        if not isinstance(shard["tensors"], dict):
            raise CheckpointError(f"{manifest_path}: shards[{i}].tensors must be a JSON object; restore it from a backup or re-save the checkpoint")
        if not newer_minor:
            if shard["kind"] not in SHARD_KINDS:
                raise CheckpointError(
                    f"{manifest_path}: shards[{i}] has unknown kind {shard['kind']!r} for format {data['format_version']}; restore it from a backup or re-save the checkpoint"
                )
            if shard["tier"] != DENSE and shard["tier"] not in tier_names:
                raise CheckpointError(
                    f"{manifest_path}: shards[{i}] belongs to tier {shard['tier']!r}, which model_config does not have; restore it from a backup or re-save the checkpoint"
                )
    data.setdefault("model_version", MODEL_VERSION_DEFAULT)
    if parse_version(data["model_version"]) is None:
        raise CheckpointError(
            f"{manifest_path} has model_version {data['model_version']!r}, which is not a major.minor.patch version; restore it from a backup or re-save the checkpoint"
        )
    data.setdefault("created_at", None)
    data.setdefault("lite_llm_version", None)
    data.setdefault("files", [])
    if not isinstance(data["files"], list):
        data["files"] = []
    tiers = data.get("tiers")
    data["tiers"] = tiers if isinstance(tiers, dict) else {}
    for t in tiers_cfg:
        meta = data["tiers"].setdefault(t["name"], {})
        if isinstance(meta, dict):
            for key in ("budget", "placement", "k_group", "k_expert", "created_at"):
                meta.setdefault(key, t.get(key))
    data.setdefault("num_params", None)
    return data


def fill_progressive(data: Any) -> dict[str, Any]:
    """``progressive.json`` contents with the defaults of missing keys filled in."""
    out = {k: (v.copy() if isinstance(v, (dict, list)) else v) for k, v in PROGRESSIVE_DEFAULTS.items()}
    if data:
        out.update(data)
    return out
