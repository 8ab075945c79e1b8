"""One pipeline for every checkpoint made from another: grown (expand), a new tier (add-tier),
a copy with an EWC estimate, a quantized tier.  (A distributed run's consolidation writes an
ordinary checkpoint from its shards through ``save_checkpoint`` instead: it has no source
checkpoint to derive from.)

Each step of a derivation is the same whatever it computes:

1. refuse an output that is the source or a non-empty path (:func:`check_new_output`): a
   derived checkpoint always goes to a new directory, so nothing the user had is lost;
2. check the source's integrity in a background thread while the output is computed and
   streamed out, so one sequential read of the source overlaps the writing;
3. commit the output only when that check and the operation's own pre-commit checks pass —
   and when something fails, report the source's corruption first, since it explains any
   later failure best;
4. record what was done in ``progressive.json`` (:func:`derivation_record`).
"""

from __future__ import annotations

import os
import shutil
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, TypeVar

from ..config import ModelConfig
from ..errors import CheckpointError

T = TypeVar("T")


def check_new_output(out: Path, source: Path, what: str = "the grown model", *, overwrite: bool = False) -> None:
    """Refuse to write ``what`` over its own source or into an existing non-empty path (with
    ``overwrite``, an existing directory is allowed: the writers build the new one beside it and
    swap it in only when complete, so the old one survives a failure)."""
    if out.resolve() == source.resolve():
        raise CheckpointError(f"output {out} is the source checkpoint; write {what} to a new directory")
    if out.resolve().is_relative_to(source.resolve()) or source.resolve().is_relative_to(out.resolve()):
        raise CheckpointError(f"output {out} and the source {source} are nested in each other; write {what} to a directory outside the source")
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"output {out} is a file; {what} is a directory, so choose another path")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise CheckpointError(f"output {out} already exists and is not empty; pass --overwrite to replace it, or choose a new directory")


def derive(
    source: Path,
    output: Path,
    write: Callable[[Future | None], T],
    *,
    check_source: Callable[[], Any] | None,
    what: str = "the grown model",
    overwrite: bool = False,
) -> T:
    """Run ``write(verified)`` while ``check_source`` runs beside it.

    ``write`` computes and streams the output and must wait for ``verified.result()`` (the
    check's value, or its exception) before it commits; ``verified`` is None when there is no
    check.  When ``write`` fails and the source check failed too, the source's error is raised.
    """
    check_new_output(output, source, what, overwrite=overwrite)
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="verify-source") as pool:
        verified = pool.submit(check_source) if check_source is not None else None
        try:
            return write(verified)
        except Exception:
            if verified is not None and verified.exception() is not None:
                raise verified.exception() from None
            raise


class CopiedTokenizer:
    """Copies a checkpoint's tokenizer directory into the new checkpoint unchanged.  Given the
    ``tokenizer`` loaded from it, it also stands in for that tokenizer (its ids, kind, eos and
    template answer from it), so a trainer may use it as its tokenizer and still save the
    folder's every file."""

    def __init__(self, directory: Path, tokenizer: Any = None) -> None:
        self.directory = directory
        self._tokenizer = tokenizer

    def __getattr__(self, name: str) -> Any:  # only for what this class does not define
        tokenizer = self.__dict__.get("_tokenizer")
        if tokenizer is None:
            raise AttributeError(name)
        return getattr(tokenizer, name)

    def save(self, target: str | os.PathLike) -> None:
        for p in sorted(self.directory.rglob("*")):
            if p.is_file():
                dest = Path(target) / p.relative_to(self.directory)
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(p, dest)


def kept_tokenizer(loaded: Any) -> Any:
    """What a checkpoint written from the loaded checkpoint ``loaded`` saves as its tokenizer:
    ``loaded``'s folder copied as it is (standing in for its tokenizer), so the side files a
    re-saved tokenizer would drop (``tokenizer_config.json``, ``chat_template.jinja``) reach
    `export`; the loaded tokenizer itself when there is no folder."""
    from .manifest import TOKENIZER_DIR

    folder = Path(loaded.path) / TOKENIZER_DIR
    return CopiedTokenizer(folder, loaded.tokenizer) if folder.is_dir() and loaded.tokenizer is not None else loaded.tokenizer


def copied_tokenizer(src: Any) -> CopiedTokenizer | None:
    """What ``write_checkpoint`` needs to copy ``src``'s tokenizer (None when it has none)."""
    return CopiedTokenizer(src.tokenizer_dir) if src.tokenizer_dir else None


def source_tokenizer(src: Any) -> Any:
    """The source's tokenizer for sample tokens, or None (random ids then serve as well)."""
    if src.tokenizer_dir is None:
        return None
    try:
        from ..data import load_tokenizer

        return load_tokenizer(src.tokenizer_dir)
    except Exception:  # noqa: BLE001 - a sample tokenizer is a nicety; random ids work too
        return None


def utc_now() -> str:
    """The record's timestamp: UTC, to the second, ``Z``-suffixed."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def derivation_record(
    src: Any,
    method: str,
    params: dict[str, Any],
    exact: bool,
    before: ModelConfig,
    after: ModelConfig,
    *,
    preservation: dict[str, Any] | None,
    dead_params: Any = None,
    note: str | None = None,
) -> dict[str, Any]:
    """One ``progressive.json`` ``expansions`` entry: what was done to which source, the
    configs and parameter counts before and after, and what the check measured."""
    return {
        "method": method,
        "params": dict(params),
        "exact": exact,
        "source": str(src.path),
        "source_manifest_sha256": src.manifest_sha256(),
        "source_config": before.to_dict(),
        "target_config": after.to_dict(),
        "params_before": before.num_params(),
        "params_after": after.num_params(),
        "timestamp": utc_now(),
        "preservation": preservation,
        "gradient_flow_dead": dead_params,
        "note": note,
    }


def with_record(progressive: dict[str, Any], *records: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``progressive`` whose ``expansions`` end with ``records``."""
    out = dict(progressive)
    out["expansions"] = list(out.get("expansions") or []) + list(records)
    return out
