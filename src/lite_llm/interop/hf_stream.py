"""One-pass growth of Hugging Face folders: read the safetensors lazily, write a transformers folder.

Growing a Hugging Face model used to take three passes (import, expand, export), each reading
and writing the whole model.  Here :func:`expand_model` runs the ordinary growth
(:func:`lite_llm.grow.expand.expand_checkpoint`, same steps, same validation, same record)
over a Hugging Face folder opened in place (:func:`open_hf_folder`: names mapped through the
tables of :mod:`.hf_mapping`, nothing read until a tensor is asked for) and/or writes the
grown model as a Hugging Face folder (:func:`write_grown_hf`): ``config.json``, safetensors
shards with an index when there are several, the tokenizer and generation files of the
source, and ``progressive.json`` with the growth record beside them.

Speed comes from not touching what does not change: a tensor the growth passes through
unchanged (every tensor of a SOLAR or stacked depth growth, the embeddings of any depth
growth) is found by :func:`lite_llm.grow.tensors.origin`, and its bytes are copied from the
source file by the kernel (``copy_file_range``) with no decoding, no Python buffer and no
resident copy.  The disk starts on every 64 MB as soon as it is written
(:class:`~lite_llm.checkpoint.atomic.EarlyWriteback`), and shards are fsynced in the
background while the next one is written; the folder is built under a temporary name and
renamed into place, so a failure leaves nothing.
"""

from __future__ import annotations

import functools
import hashlib
import os
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Sequence

import torch

from ..checkpoint import atomic
from ..checkpoint.lazy import LazyMapping
from ..checkpoint.load import read_progressive
from ..checkpoint.manifest import MANIFEST, MODEL_VERSION_DEFAULT, PROGRESSIVE
from ..checkpoint.stream import RowChunks, TensorSpec
from ..config import ModelConfig
from ..data.tokenizer import HF_TOKENIZER_FILE
from ..errors import CheckpointError, ConfigError
from ..grow.expand import ExpandResult, GrownModel, expand_checkpoint, write_grown_checkpoint
from ..grow.recipe import OUTPUT_FORMATS, GrowthStep
from ..grow.tensors import Producer, Tensors, expected_specs, origin, row_chunks, stored_names
from .hf_export import (
    GENERATION_CONFIG_FILE,
    check_exportable,
    check_hf_target,
    dtype_fields,
    generation_config,
    plan_export,
    special_token_ids,
    tokenizer_files,
)
from .hf_weights import RawSource, json_bytes, write_json, write_weights
from .hf_import import HF_CONFIG_FILE, HF_TOKENIZER_EXTRAS, HFWeights, lite_config, plan_import, read_hf_config, read_hf_tokenizer
from .hf_mapping import hf_config_dict, lite_names_to_hf, mixtral_block_to_classic

# Files of a Hugging Face folder that describe its tokenizer and generation defaults: a grown
# folder gets them unchanged (the vocabulary does not change with growth).
HF_SIDE_FILES = (HF_TOKENIZER_FILE, *HF_TOKENIZER_EXTRAS, "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json", GENERATION_CONFIG_FILE)
MODEL_VERSION_KEY = "model_version"  # in a grown folder's progressive.json (there is no manifest)


# ------------------------------------------------------------------------------- the entry point
def expand_model(
    source: str | os.PathLike,
    output: str | os.PathLike,
    steps: Sequence[GrowthStep],
    *,
    output_format: str = "checkpoint",
    **options: Any,
) -> ExpandResult:
    """Grow ``source`` (a Lite LLM checkpoint or a Hugging Face folder) by ``steps`` into
    ``output``, written as a Lite LLM checkpoint (``output_format="checkpoint"``) or a Hugging
    Face folder (``"hf"``), in one pass.  ``options`` are those of ``expand_checkpoint``
    (``validate``, ``tolerance``, ``max_shard_bytes`` ...)."""
    if output_format not in OUTPUT_FORMATS:
        raise ConfigError(f"output format must be one of {', '.join(OUTPUT_FORMATS)}, got {output_format!r}")
    src = Path(source)
    hf_source = is_hf_folder(src)
    if src.is_dir() and not hf_source and not (src / MANIFEST).is_file():
        raise CheckpointError(
            f"{src} is neither a lite-llm checkpoint (no {MANIFEST}) nor a Hugging Face model folder (no {HF_CONFIG_FILE}); point to one of those"
        )
    if output_format == "hf":
        check_hf_target(Path(output), options.get("overwrite", False))  # before any work: --overwrite replaces only a model folder
        writer: Callable[..., Path] | None = write_grown_hf
    elif hf_source:
        writer = functools.partial(write_grown_checkpoint, tokenizer=read_hf_tokenizer(src))
    else:
        writer = None
    return expand_checkpoint(src, output, steps, open_source=open_hf_folder if hf_source else None, write_output=writer, **options)


def is_hf_folder(path: Path) -> bool:
    """A folder with a ``config.json`` and no ``manifest.json``: a Hugging Face model folder."""
    return path.is_dir() and (path / HF_CONFIG_FILE).is_file() and not (path / MANIFEST).is_file()


# ------------------------------------------------------------------------------- the source
class HFTensors(LazyMapping):
    """Our name -> tensor over a Hugging Face folder, read when looked up.

    ``direct`` names map one to one onto a stored tensor of the same dtype and shape: those
    are read as they are and report their file location, so a writer may copy their bytes.
    The rest (cast dtypes, fused Mixtral banks, router state Hugging Face lacks) come from
    the importer's producers.
    """

    def __init__(self, weights: HFWeights, specs: dict[str, TensorSpec], producers: dict[str, Producer], direct: dict[str, str]) -> None:
        self._weights = weights
        self._specs = self._names = specs
        self._producers = producers
        self._direct = direct

    def __getitem__(self, name: str) -> torch.Tensor:
        theirs = self._direct.get(name)
        return self._weights[theirs] if theirs is not None else self._producers[name]()

    def spec(self, name: str) -> TensorSpec:
        return self._specs[name]

    def location(self, name: str) -> tuple[Path, int, int] | None:
        theirs = self._direct.get(name)
        return self._weights.location(theirs) if theirs is not None else None


@dataclass
class HFFolder:
    """A Hugging Face folder opened for growth: what ``expand_checkpoint`` reads from a
    :class:`~lite_llm.checkpoint.lazy.CheckpointTensors`, plus the folder's own ``config.json``."""

    path: Path
    config: ModelConfig
    hf_config: dict[str, Any]
    manifest: dict[str, Any]
    progressive: dict[str, Any]
    tensors: HFTensors

    @property
    def tokenizer_dir(self) -> Path | None:
        return self.path if (self.path / HF_TOKENIZER_FILE).is_file() else None

    @property
    def dtype(self) -> torch.dtype:
        return self.tensors.spec("embed.weight").dtype

    def manifest_sha256(self) -> str:
        """A Hugging Face folder has no manifest: the sha256 of its ``config.json`` stands in."""
        return hashlib.sha256((self.path / HF_CONFIG_FILE).read_bytes()).hexdigest()


def open_hf_folder(path: Path) -> tuple[HFFolder, None]:
    """Open a Hugging Face Llama/Mistral/Qwen2/Mixtral folder for growth, checking its names and
    header shapes against ``config.json`` before anything is read.  There are no hashes to
    check beside the growth (hence the None)."""
    hf_config = read_hf_config(path)
    config = lite_config(hf_config, path)
    weights = HFWeights(path)
    embed = "model.embed_tokens.weight"
    dtype = weights.spec(embed).dtype if embed in weights else torch.float32
    if not dtype.is_floating_point:
        raise ConfigError(f"{path} stores its embedding as {dtype}, not a floating-point type; grow a float32, bfloat16 or float16 model")
    specs = expected_specs(config, dtype)
    producers = plan_import(config, weights, specs, path)
    direct = {}
    for ours, theirs in lite_names_to_hf(specs, config).items():
        for candidate in (theirs, mixtral_block_to_classic(theirs)) if config.is_moe else (theirs,):
            if candidate in weights and weights.spec(candidate) == specs[ours]:
                direct[ours] = candidate
                break
    progressive = read_progressive(path, None, verify=False)  # a grown folder has no manifest to hash against
    manifest = {"model_version": progressive.pop(MODEL_VERSION_KEY, MODEL_VERSION_DEFAULT), "files": []}
    return HFFolder(path, config, hf_config, manifest, progressive, HFTensors(weights, specs, producers, direct)), None


# ------------------------------------------------------------------------------- the output
class _Specced(LazyMapping):
    """Lazy tensors with the specs they will have (what ``plan_export`` asks of a checkpoint)."""

    def __init__(self, tensors: Tensors, specs: dict[str, TensorSpec]) -> None:
        self._tensors, self._specs = tensors, specs
        self._names = specs

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._tensors[name]

    def spec(self, name: str) -> TensorSpec:
        return self._specs[name]




def write_grown_hf(out: Path, grown: GrownModel, *, max_shard_bytes: int, before_commit: Callable[[], None] | None) -> Path:
    """Write ``grown`` as a Hugging Face folder at ``out``, atomically (an ``OutputWriter``).

    Refuses, with the reason, a model no Hugging Face architecture computes (several tiers,
    several expert groups, dense and MoE layers mixed).  The source's EWC estimate and SI
    importance have no place in a Hugging Face folder and are not carried (a warning says so).
    """
    view = SimpleNamespace(config=grown.config, tensors=_Specced(grown.tensors, expected_specs(grown.config, grown.dtype)), path=grown.source.path)
    check_exportable(view)
    specs, producers = plan_export(view, grown.dtype)
    direct = _direct_names(grown.config)
    raw = _raw_sources(grown, specs, direct)
    side_files = _side_files(grown)
    hf_config = _hf_config(grown, side_files)
    extras = {f.get("name") for f in grown.source.manifest.get("files", []) if isinstance(f, dict) and f.get("kind") == "extra"}
    for name, what in (("ewc", "EWC estimate"), ("si", "SI importance")):
        if name in extras:
            warnings.warn(f"the {what} of {grown.source.path} is not carried into the Hugging Face folder {out}, which has no place for it", stacklevel=3)

    def produce(theirs: str) -> torch.Tensor | RowChunks:
        ours = direct.get(theirs)
        chunks = row_chunks(grown.tensors, ours, specs[theirs].dtype, grown.stop_if_refused) if ours is not None else None
        return chunks if chunks is not None else producers[theirs]()

    with atomic.building_dir(out, HF_CONFIG_FILE, before_commit) as tmp:
        write_weights(tmp, specs, raw, produce, max_shard_bytes, before_copy=grown.stop_if_refused)
        progressive = {**grown.finish_progressive(), MODEL_VERSION_KEY: grown.model_version}  # waits for the checks
        write_json(tmp / HF_CONFIG_FILE, hf_config)
        for name, data in side_files.items():
            (tmp / name).write_bytes(data)
        write_json(tmp / PROGRESSIVE, progressive)
    return out


def _direct_names(config: ModelConfig) -> dict[str, str]:
    """Hugging Face name -> our name, for the output tensors that are ours renamed and nothing
    else (a Mixtral gate divided by its temperature, or experts split, are not)."""
    return {theirs: ours for ours, theirs in lite_names_to_hf(stored_names(config), config).items()}


def _raw_sources(grown: GrownModel, specs: dict[str, TensorSpec], ours_of: Mapping[str, str]) -> dict[str, RawSource]:
    """Hugging Face name -> where in a source file its bytes already lie, for every output
    tensor that is an unchanged copy of a stored tensor of the same dtype and shape
    (``ours_of``: :func:`_direct_names`)."""
    raw = {}
    for theirs, spec in specs.items():
        ours = ours_of.get(theirs)
        if ours is None:
            continue  # renamed with a change (a Mixtral gate divided by its temperature) or split
        mapping, name = origin(grown.tensors, ours)
        location, spec_of = getattr(mapping, "location", None), getattr(mapping, "spec", None)
        if location is None or spec_of is None or spec_of(name) != spec:
            continue
        where = location(name)
        if where is not None:
            raw[theirs] = where
    return raw


def _side_files(grown: GrownModel) -> dict[str, bytes]:
    """File name -> bytes of the tokenizer and generation files the grown folder gets."""
    src = grown.source
    if isinstance(src, HFFolder):
        return {name: (src.path / name).read_bytes() for name in HF_SIDE_FILES if (src.path / name).is_file()}
    files = tokenizer_files(src)
    files[GENERATION_CONFIG_FILE] = json_bytes(generation_config(src, special_token_ids(files)))  # what export writes
    return files


def _hf_config(grown: GrownModel, side_files: Mapping[str, bytes]) -> dict[str, Any]:
    """``config.json``: a Hugging Face source's own, with the fields the growth changed; else
    the one ``export`` writes."""
    new = hf_config_dict(grown.config)
    src = grown.source
    if isinstance(src, HFFolder):
        old = hf_config_dict(src.config)
        if new["model_type"] == old["model_type"]:
            base = {**src.hf_config, **{k: v for k, v in new.items() if old.get(k) != v}}
        else:  # dense -> MoE: a new architecture; keep only the token ids
            base = {**new, **{k: src.hf_config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in src.hf_config}}
    else:
        base = {**new, **special_token_ids(side_files)}
    return {**base, **dtype_fields(grown.dtype)}


__all__ = ["HFFolder", "HFTensors", "OUTPUT_FORMATS", "expand_model", "is_hf_folder", "open_hf_folder", "write_grown_hf"]
