"""Rolling a tier back by hand: the weights from before integration, the tiers from before
the tier was added.

A curriculum run keeps its ``pre-integration`` checkpoint and records its path in
``progressive.json`` (``curriculum.pre_integration``).  Isolation froze everything but the
new tier, so that checkpoint's old tiers and dense weights are the pre-expansion model's,
bitwise; loading it with the previous TierSet (every tier but the new one) gives a model that
computes exactly what the model computed before ``add_tier``.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..checkpoint import load_checkpoint, read_manifest, save_checkpoint
from ..checkpoint.load import load_json
from ..checkpoint.manifest import PROGRESSIVE
from ..errors import CheckpointError


def rollback_checkpoint(checkpoint: str | os.PathLike, output: str | os.PathLike) -> tuple[Path, list[str]]:
    """Write the rolled-back model of the curriculum run that produced ``checkpoint``."""
    root = Path(checkpoint)
    read_manifest(root)  # a clear error for a path that is not a checkpoint
    progressive = load_json(root / PROGRESSIVE, "file") if (root / PROGRESSIVE).exists() else {}
    state = (progressive or {}).get("curriculum") or {}
    pre = state.get("pre_integration") or {}
    if not pre.get("path"):
        raise CheckpointError(
            f"checkpoint {root} records no pre-integration checkpoint; roll back from a checkpoint of a curriculum run whose integration phase has begun (with rollback enabled)"
        )
    source = Path(pre["path"])
    if not source.is_absolute() and not source.exists():
        source = root.parent / source
    tier = state["tier"]
    tiers = [t["name"] for t in read_manifest(source)["model_config"]["tiers"] if t["name"] != tier]
    loaded = load_checkpoint(source, tierset=tiers)
    record = {"rolled_back_tier": tier, "from": str(root), "pre_integration": str(source), "tiers": tiers}
    progressive_out = dict(loaded.progressive)
    progressive_out["curriculum"] = None
    progressive_out["expansions"] = list(progressive_out.get("expansions") or []) + [{"method": "rollback", "params": record}]
    path = save_checkpoint(output, loaded.model, tokenizer=loaded.tokenizer, progressive=progressive_out)
    return path, tiers
