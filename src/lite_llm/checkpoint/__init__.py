"""The progressive checkpoint format: a manifest plus tier-indexed, hashed safetensors shards.

A checkpoint is a directory::

    manifest.json                       format version, model config, tier metadata, one entry
                                        per shard (path, tier, kind, dtype, bytes, sha256, tensors)
                                        and per auxiliary file (path, bytes, sha256)
    dense.safetensors                   every tensor no tier owns (tied lm_head stored once)
    tier-<name>-router.safetensors      that tier's router heads in every layer
    tier-<name>-experts.safetensors     that tier's expert banks in every layer
                                        (any of these split as <stem>-00001-of-00003.safetensors)
    progressive.json                    expansion history, training progress, curriculum, layer importance
    tokenizer/                          tokenizer.save(dir)
    training/state.safetensors|.json    optimizer / scheduler / RNG state (no pickle)
    <extra>/tensors.safetensors         e.g. ewc/
    <folder>/<name>.<sha12>.json        small files added later (write_extra_file), e.g.
                                        serve/tierset-profile.*.json

Written atomically (temporary directory, fsync, rename); read with hash verification, per
TierSet, tolerant of newer minor versions and refusing newer major ones.  Nothing executable
is ever read: JSON and safetensors only.
"""

from .extra_files import read_extra_file, write_extra_file
from .load import LoadedCheckpoint, load_checkpoint, load_extra, load_training_state, read_manifest, verify_checkpoint
from .manager import CheckpointManager
from .manifest import FORMAT_NAME, FORMAT_VERSION
from .save import save_checkpoint
from .training import TrainingState

__all__ = [
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "CheckpointManager",
    "LoadedCheckpoint",
    "TrainingState",
    "load_checkpoint",
    "load_extra",
    "load_training_state",
    "read_extra_file",
    "read_manifest",
    "save_checkpoint",
    "verify_checkpoint",
    "write_extra_file",
]
