"""Rolling a tier back by hand: the weights from before integration, the tiers from before
the tier was added.

A curriculum run keeps its ``pre-integration`` checkpoint and records its path in
``progressive.json`` (``curriculum.pre_integration``).  Isolation froze everything but the
new tier, so that checkpoint's old tiers and dense weights are the pre-expansion model's,
bitwise; loading it with the previous TierSet (every tier but the new one) gives a model that
computes exactly what the model computed before ``add_tier``.

The recorded path is the one the run wrote, relative to where the run was started; the
checkpoint is looked for in its run directory first (``RUN/pre-integration`` beside
``RUN/checkpoints/step-N``), so a rollback works from any directory and after the run was
moved.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable

from ..checkpoint import load_checkpoint, read_manifest, save_checkpoint
from ..checkpoint.load import read_progressive
from ..checkpoint.derived import kept_tokenizer
from ..checkpoint.manifest import MANIFEST
from ..errors import CheckpointError


def find_pre_integration(recorded: str, runs: Iterable[Path], step: int | None = None) -> Path | None:
    """The pre-integration checkpoint recorded as ``recorded``: in one of the run directories
    ``runs`` under its own name (a run copied or moved keeps its snapshot beside its
    checkpoints), else at ``recorded`` itself; None when neither holds it.  With ``step``, a
    candidate must be the snapshot taken at that step (not another run's)."""
    given = Path(recorded)
    candidates = [Path(run) / given.name for run in runs] + [given]
    return next((c for c in candidates if (c / MANIFEST).is_file() and (step is None or _snapshot_step(c) == step)), None)


def _snapshot_step(checkpoint: Path) -> int | None:
    """The step a pre-integration checkpoint was taken at (None when it is not one)."""
    try:
        state = read_progressive(checkpoint, None, verify=False).get("curriculum") or {}
    except (CheckpointError, OSError):  # a damaged or unreadable file is no snapshot to take (the loader says why if it is chosen)
        return None
    pre = state.get("pre_integration") if isinstance(state, dict) else None
    return pre.get("step") if isinstance(pre, dict) else None


def _run_dirs(checkpoint: Path) -> list[Path]:
    """Where the run that saved ``checkpoint`` keeps its tagged checkpoints: RUN for
    RUN/checkpoints/step-N, the parent for a tagged one (RUN/pre-integration)."""
    parent = checkpoint.resolve().parent
    return [parent.parent, parent] if parent.name == "checkpoints" else [parent]


def _source(root: Path, state: dict[str, Any]) -> Path:
    """The pre-integration checkpoint ``root``'s curriculum state points to (``root`` itself
    when it is that checkpoint: it was saved before its own path was known)."""
    pre = state.get("pre_integration") or {}
    if not pre:
        raise CheckpointError(
            f"checkpoint {root} records no pre-integration checkpoint; roll back from a checkpoint of a curriculum run whose integration phase has begun (with rollback enabled)"
        )
    if not pre.get("path"):
        return root  # the snapshot itself
    found = find_pre_integration(pre["path"], _run_dirs(root), pre.get("step"))
    if found is None:
        raise CheckpointError(
            f"the pre-integration checkpoint of {root} (recorded as {pre['path']}) is neither in its run directory nor at that path; "
            "roll back from the run directory it was trained in, or restore its pre-integration folder"
        )
    return found


def _check_output(output: Path, root: Path, source: Path) -> None:
    """Refuse an output that would replace (or sit inside) the checkpoint rolled back or the
    one rolled back to: ``--overwrite`` is for an earlier result, not for the run's own files."""
    out = output.resolve()
    for what, path in (("the checkpoint rolled back", root), ("its pre-integration checkpoint", source)):
        p = path.resolve()
        if out == p or out.is_relative_to(p) or p.is_relative_to(out):
            raise CheckpointError(f"output {output} is, holds or lies inside {what} ({path}); write the rolled-back model to another directory")


def rollback_checkpoint(checkpoint: str | os.PathLike, output: str | os.PathLike, *, overwrite: bool = True) -> tuple[Path, list[str]]:
    """Write the rolled-back model of the curriculum run that produced ``checkpoint``
    (replacing an earlier result at ``output`` only with ``overwrite``)."""
    from ..checkpoint.atomic import refuse_existing
    root = Path(checkpoint)
    manifest = read_manifest(root)  # a clear error for a path that is not a checkpoint
    state = read_progressive(root, manifest, verify=True).get("curriculum") or {}
    source = _source(root, state)
    _check_output(Path(output), root, source)
    refuse_existing(Path(output), overwrite, "checkpoint")
    tier = state["tier"]
    names = [t["name"] for t in read_manifest(source)["model_config"]["tiers"]]
    if tier not in names:
        raise CheckpointError(f"the pre-integration checkpoint {source} has no tier {tier!r} to roll back; it is not the one this run saved")
    tiers = [name for name in names if name != tier]
    loaded = load_checkpoint(source, tierset=tiers)
    record = {"rolled_back_tier": tier, "from": str(root), "pre_integration": str(source), "tiers": tiers}
    progressive_out = dict(loaded.progressive)
    progressive_out["curriculum"] = None
    progressive_out["expansions"] = list(progressive_out.get("expansions") or []) + [{"method": "rollback", "params": record}]
    path = save_checkpoint(output, loaded.model, tokenizer=kept_tokenizer(loaded), progressive=progressive_out)
    return path, tiers
