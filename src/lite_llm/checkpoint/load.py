"""Reading and verifying checkpoint directories."""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import torch
from safetensors import SafetensorError, safe_open

from ..config import ModelConfig, TierSet
from ..errors import CheckpointError, ConfigError, LiteLLMError, TierSetError
from ..model import LiteLLM, build_model, load_stored
from ..model.shapes import tensor_shapes
from . import atomic
from .quantization import BANKS, dequantize_state, stored_specs
from .manifest import (
    DENSE,
    EXTRA_TENSORS,
    MANIFEST,
    PROGRESSIVE,
    SHARD_KINDS,
    TOKENIZER_DIR,
    TRAINING_META,
    TRAINING_TENSORS,
    check_file,
    fill_progressive,
    is_newer_minor,
    manifest_in,
    one_line,
    parse_version,
    reader_version,
    safe_member,
)
from .training import TrainingState



@dataclass
class LoadedCheckpoint:
    """What :func:`load_checkpoint` returns.

    ``config`` is the config the model was built with: the checkpoint's, restricted to the
    loaded tiers.  ``skipped_tiers`` are tiers left out because they need a newer reader
    (not those left out by the TierSet).  ``extra_dirs`` names the extra tensor directories
    present; read one with :meth:`load_extra`.
    """

    model: LiteLLM
    config: ModelConfig
    manifest: dict
    progressive: dict
    tokenizer: Any
    training: TrainingState | None
    path: Path
    skipped_tiers: list[str] = field(default_factory=list)
    tiers: list[str] = field(default_factory=list)
    extra_dirs: list[str] = field(default_factory=list)

    def load_extra(self, name: str, *, device: str | torch.device = "cpu", verify: bool = True) -> dict[str, torch.Tensor]:
        return load_extra(self.path, name, device=device, verify=verify, manifest=self.manifest)


def read_manifest(path: str | os.PathLike) -> dict:
    """The validated, version-checked manifest of the checkpoint at ``path`` (optional fields
    of older writers filled with defaults)."""
    return manifest_in(atomic.resolve_dir(Path(path), MANIFEST))


# ------------------------------------------------------------------------------- helpers
def config_from_manifest(manifest: dict, root: Path | str) -> tuple[dict, list[str]]:
    """The raw model_config with tiers needing a newer reader removed, and their names
    (``root``, a folder or a URL, only names the checkpoint in the warning)."""
    raw = dict(manifest["model_config"])
    ours = reader_version()
    kept, skipped = [], []
    for tier in raw.get("tiers", []):
        needed = tier.get("min_reader_version")
        version = parse_version(needed) if needed else None
        if needed and (version is None or version > ours):
            skipped.append(tier["name"])
        else:
            kept.append(tier)
    if skipped:
        warnings.warn(
            f"checkpoint {root} has tier(s) {', '.join(skipped)} that need a newer lite-llm reader; "
            f"loading without them (upgrade lite-llm to use them)",
            stacklevel=3,
        )
    raw["tiers"] = kept
    return raw, skipped


def build_config(raw: dict, manifest: dict, manifest_path: Path | str) -> ModelConfig:
    routing = dict(raw.get("routing") or {})
    n_tiers = len(raw.get("tiers", []))
    if n_tiers and isinstance(routing.get("k_tier"), int):
        routing["k_tier"] = min(routing["k_tier"], n_tiers)
    raw = {**raw, "routing": routing}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # advisory budget warnings were given when the model was made
            return ModelConfig.from_dict(raw, allow_unknown=is_newer_minor(manifest))
    except (ConfigError, TierSetError, TypeError) as exc:
        raise CheckpointError(f"{manifest_path} holds an invalid model_config ({one_line(exc)}); restore it from a backup or re-save the checkpoint") from None


def _select_tiers(config: ModelConfig, tierset: Any, skipped: list[str], root: Path) -> list[str]:
    if tierset is None:
        return [t.name for t in config.tiers]
    ts = TierSet.coerce(tierset)
    wanted_skipped = [n for n in ts.names if n in skipped]
    if wanted_skipped:
        raise CheckpointError(
            f"tier(s) {', '.join(wanted_skipped)} of checkpoint {root} need a newer lite-llm reader than format {'.'.join(map(str, reader_version()))}; upgrade lite-llm or choose other tiers"
        )
    return ts.resolve(config)


def expected_tensors(config: ModelConfig, model: LiteLLM | None = None) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor the checkpoint must supply (tied head excluded)."""
    if model is not None:
        expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    else:  # as stored: a quantized tier's banks are qweight/qscale pairs
        expected = tensor_shapes(config)
        for tier in config.tiers:
            if tier.quantization:
                for layer in config.moe_layer_indices:
                    prefix = f"layers.{layer}.ffn.experts.{tier.name}."
                    for bank in BANKS:
                        del expected[prefix + bank]
                    expected.update({prefix + suffix: shape for suffix, (_, shape) in stored_specs(tier, config.d_model).items()})
    if config.tie_embeddings:
        expected.pop("lm_head.weight", None)
    return expected


def load_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{what} {path} is not valid JSON ({one_line(exc)}); restore it from a backup or re-save the checkpoint") from None


def _file_entries(manifest: dict) -> dict[str, dict]:
    return {f["path"]: f for f in manifest.get("files", []) if isinstance(f, dict) and isinstance(f.get("path"), str)}


def check_listed_file(root: Path, manifest: dict, rel: str, what: str, verify: bool) -> Path:
    """Path of an auxiliary file, checked against its manifest entry when it has one."""
    path = safe_member(root, rel, root / MANIFEST)
    entry = _file_entries(manifest).get(rel)
    if entry is not None:
        problem = check_file(path, entry, what, verify=verify)
        if problem:
            raise CheckpointError(problem)
    return path


def read_progressive(root: Path, manifest: dict | None, verify: bool) -> dict[str, Any]:
    """The ``progressive.json`` of the checkpoint (or grown Hugging Face folder) at ``root``,
    with the defaults of missing keys filled in; the defaults alone when it has none.

    The one reader of that file, so a damaged one is refused with the same sentence wherever it
    is met (loading, lazy opening for growth, the CLI, ``verify_checkpoint``) rather than being
    refused by one reader and read as an empty history by another: a file that is not JSON, or
    JSON that is not an object, raises :class:`CheckpointError`.  Where ``manifest`` lists the
    file its presence and size are checked, and its sha256 too when ``verify``; ``manifest`` is
    None for a folder that has none (a grown Hugging Face folder)."""
    listed = manifest is not None and PROGRESSIVE in _file_entries(manifest)
    file = root / PROGRESSIVE
    if not (listed or file.exists()):
        return fill_progressive(None)
    if manifest is not None:
        file = check_listed_file(root, manifest, PROGRESSIVE, "file", verify)
    if not file.is_file():  # load_json would raise IsADirectoryError, a traceback
        raise CheckpointError(f"{file} is not a regular file; remove it or restore progressive.json from a backup")
    data = load_json(file, "file")
    if not isinstance(data, dict):
        raise CheckpointError(
            f"file {file} must hold a JSON object, not a {type(data).__name__}; restore it from a backup or re-save the checkpoint"
        )
    return fill_progressive(data)


def _aligned(t: torch.Tensor) -> torch.Tensor:
    """``t`` in memory from torch's allocator (64-byte aligned).  safetensors may hand back CPU
    tensors at 8-byte offsets, and CPU kernels (vectorised loads, BLAS) can round differently
    on differently aligned data, which would break bitwise resumption."""
    if t.device.type == "cpu" and t.numel() and t.data_ptr() % 64:
        return t.clone()
    return t


def _read_safetensors(path: Path, device: str, listed: dict[str, Any] | None, what: str) -> dict[str, torch.Tensor]:
    try:
        with safe_open(str(path), framework="pt", device=device) as f:
            names = list(f.keys())
            if listed is not None and set(names) != set(listed):
                missing = sorted(set(listed) - set(names))
                extra = sorted(set(names) - set(listed))
                detail = f"lacks {', '.join(missing[:3])}" if missing else f"has unlisted {', '.join(extra[:3])}"
                raise CheckpointError(f"{what} {path} does not match the manifest ({detail}); restore it from a backup or re-save the checkpoint")
            tensors = {name: _aligned(f.get_tensor(name)) for name in names}
    except SafetensorError as exc:
        raise CheckpointError(f"{what} {path} cannot be read as safetensors ({one_line(exc)}); restore it from a backup or re-save the checkpoint") from None
    for name, t in tensors.items():
        info = listed.get(name) if listed is not None else None
        if not isinstance(info, dict):
            continue
        dtype, shape = str(t.dtype).removeprefix("torch."), list(t.shape)
        if ("dtype" in info and info["dtype"] != dtype) or ("shape" in info and list(info["shape"]) != shape):
            raise CheckpointError(
                f"{what} {path} holds {name} as {dtype} {shape} but the manifest lists {info.get('dtype')} {info.get('shape')}; "
                "restore the checkpoint from a backup or re-save it"
            )
    return tensors


def load_tokenizer(directory: Path) -> Any:
    try:
        from ..data import load_tokenizer  # written by another layer; optional here
    except ImportError:
        warnings.warn(f"checkpoint tokenizer at {directory} not loaded: lite_llm.data is not available", stacklevel=3)
        return None
    try:
        return load_tokenizer(directory)
    except LiteLLMError:
        raise
    except Exception as exc:  # noqa: BLE001 - surface any tokenizer failure as one clear error
        raise CheckpointError(f"tokenizer {directory} cannot be loaded ({type(exc).__name__}: {one_line(exc)}); restore it from a backup or re-save the checkpoint") from None


# ------------------------------------------------------------------------------- load
def load_checkpoint(
    path: str | os.PathLike,
    *,
    tierset: TierSet | str | Iterable[str] | None = None,
    verify: bool = True,
    device: str | torch.device = "cpu",
    load_training: bool = False,
    dtype: torch.dtype | None = None,
) -> LoadedCheckpoint:
    """Load the checkpoint at ``path`` into a freshly built model.

    ``dtype`` casts the stored floating-point tensors as they are loaded (computing in
    bfloat16 from a float32 checkpoint, as transformers' ``torch_dtype``); the default keeps
    the stored dtypes, which a checkpoint stored in that dtype gives bitwise.

    ``tierset`` restricts loading to those tiers: only their shards (and the dense shard) are
    opened and hashed, and the model is built with just those tiers.  ``verify`` checks the
    sha256 of every file read.  Tiers that need a newer reader are skipped with a warning and
    listed in ``skipped_tiers``.  Raises :class:`CheckpointError` for anything missing,
    truncated, corrupt or of an unsupported version.
    """
    root = atomic.resolve_dir(Path(path), MANIFEST)
    manifest = manifest_in(root)
    manifest_path = root / MANIFEST
    device = str(torch.device(device))

    raw, skipped = config_from_manifest(manifest, root)
    full = build_config(raw, manifest, manifest_path)
    kept = _select_tiers(full, tierset, skipped, root)
    config = full
    if [t.name for t in full.tiers] != kept:
        raw = {**raw, "tiers": [t for t in raw["tiers"] if t["name"] in kept]}
        config = build_config(raw, manifest, manifest_path)

    # Progressive state first: it is small, and a problem with it should not wait for the weights.
    progressive = read_progressive(root, manifest, verify)
    state, origin = _read_shards(root, manifest, kept, device, verify)
    dequantize_state(config, state)  # a quantized tier's banks, as the model holds them
    model = build_model(config, device=device)
    _check_state(root, state, origin, expected_tensors(config, model))
    if dtype is not None:  # one tensor at a time: each original is freed as its cast replaces it
        for name, t in state.items():
            if t.is_floating_point():
                state[name] = t.to(dtype)
    load_stored(model, state)  # assigned: keeps the stored dtypes

    tokenizer = _read_tokenizer(root, manifest, verify)
    training = None
    if load_training and ((root / TRAINING_TENSORS).exists() or TRAINING_TENSORS in _file_entries(manifest)):
        training = _load_training(root, manifest, device, verify)
    extras = sorted(
        f["name"] for f in _file_entries(manifest).values() if f.get("kind") == "extra" and isinstance(f.get("name"), str)
    )
    return LoadedCheckpoint(
        model=model,
        config=config,
        manifest=manifest,
        progressive=progressive,
        tokenizer=tokenizer,
        training=training,
        path=root,
        skipped_tiers=skipped,
        tiers=kept,
        extra_dirs=extras,
    )


def _read_shards(
    root: Path, manifest: dict, kept: list[str], device: str, verify: bool
) -> tuple[dict[str, torch.Tensor], dict[str, Path]]:
    """The tensors of the dense shards and of the ``kept`` tiers' (unknown kinds and tiers are
    ignored), and the shard each came from.  Presence and sizes of all of them are checked
    before any is hashed or read, so a missing last shard is reported before minutes of hashing."""
    manifest_path = root / MANIFEST
    selected = [
        (shard, safe_member(root, shard["path"], manifest_path))
        for shard in manifest["shards"]
        if shard["kind"] in SHARD_KINDS and (shard["tier"] == DENSE or shard["tier"] in kept)
    ]
    for shard, shard_path in selected:
        problem = check_file(shard_path, shard, "shard", verify=False)
        if problem:
            raise CheckpointError(problem)
    state: dict[str, torch.Tensor] = {}
    origin: dict[str, Path] = {}
    for shard, shard_path in selected:
        problem = check_file(shard_path, shard, "shard", verify=verify) if verify else None
        if problem:
            raise CheckpointError(problem)
        tensors = _read_safetensors(shard_path, device, shard["tensors"], "shard")
        for name, tensor in tensors.items():
            if name in state:
                raise CheckpointError(f"tensor {name} appears in both {origin[name]} and {shard_path}; restore the checkpoint from a backup or re-save it")
            state[name], origin[name] = tensor, shard_path
    return state, origin


def _check_state(root: Path, state: dict[str, torch.Tensor], origin: dict[str, Path], expected: dict[str, tuple[int, ...]]) -> None:
    """Refuse shards that do not supply exactly the ``expected`` tensors and shapes, naming
    the first difference (``load_stored`` would otherwise fail with torch's own message)."""
    missing = [n for n in expected if n not in state]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise CheckpointError(
            f"checkpoint {root} lacks tensor(s) {', '.join(missing[:3])}{more} that the model needs; restore the missing shard from a backup or re-save the checkpoint"
        )
    unexpected = [n for n in state if n not in expected]
    if unexpected:
        raise CheckpointError(
            f"shard {origin[unexpected[0]]} holds tensor {unexpected[0]}, which a model of this config does not have; restore the checkpoint from a backup or re-save it"
        )
    for name, shape in expected.items():
        if tuple(state[name].shape) != shape:
            raise CheckpointError(
                f"tensor {name} in {origin[name]} has shape {tuple(state[name].shape)} but the config needs {shape}; restore the checkpoint from a backup or re-save it"
            )


def _read_tokenizer(root: Path, manifest: dict, verify: bool) -> Any:
    """The checkpoint's tokenizer (its listed files checked first), or None when it has none."""
    tok_dir = root / TOKENIZER_DIR
    tok_files = [rel for rel in _file_entries(manifest) if rel.startswith(TOKENIZER_DIR + "/")]
    if not (tok_dir.is_dir() or tok_files):
        return None
    for rel in tok_files:
        check_listed_file(root, manifest, rel, "tokenizer file", verify)
    return load_tokenizer(tok_dir)


def _load_training(root: Path, manifest: dict, device: str, verify: bool) -> TrainingState:
    entry = _file_entries(manifest).get(TRAINING_TENSORS, {})
    tensors_path = check_listed_file(root, manifest, TRAINING_TENSORS, "training state", verify)
    tensors = _read_safetensors(tensors_path, device, entry.get("tensors"), "training state")
    meta: dict = {}
    meta_path = root / TRAINING_META
    if meta_path.exists() or TRAINING_META in _file_entries(manifest):
        meta = load_json(check_listed_file(root, manifest, TRAINING_META, "training state", verify), "training state")
    return TrainingState(tensors=tensors, meta=meta)


def load_training_state(path: str | os.PathLike, *, device: str | torch.device = "cpu", verify: bool = True) -> TrainingState | None:
    """Only the training state of a checkpoint (None when it has none), without the model."""
    root = atomic.resolve_dir(Path(path), MANIFEST)
    manifest = manifest_in(root)
    if not ((root / TRAINING_TENSORS).exists() or TRAINING_TENSORS in _file_entries(manifest)):
        return None
    return _load_training(root, manifest, str(torch.device(device)), verify)


def load_extra(
    path: str | os.PathLike, name: str, *, device: str | torch.device = "cpu", verify: bool = True, manifest: dict | None = None
) -> dict[str, torch.Tensor]:
    """The tensors of the extra directory ``name`` (for example ``"ewc"``) of a checkpoint."""
    root = atomic.resolve_dir(Path(path), MANIFEST)
    manifest = manifest if manifest is not None else manifest_in(root)
    rel = f"{name}/{EXTRA_TENSORS}"
    entry = _file_entries(manifest).get(rel)
    if entry is None:
        raise CheckpointError(f"checkpoint {root} has no extra directory {name!r}; save it with extra_dirs={{{name!r}: ...}} first")
    file_path = check_listed_file(root, manifest, rel, "file", verify)
    return _read_safetensors(file_path, str(torch.device(device)), entry.get("tensors"), "file")


# ------------------------------------------------------------------------------- verify
def verify_checkpoint(path: str | os.PathLike) -> list[str]:
    """Every problem found in the checkpoint at ``path``, one sentence each (empty = sound).

    Checks the manifest, then every listed shard and file: present, of the recorded size,
    matching its sha256 and (for safetensors) holding exactly the listed tensors; that
    ``progressive.json`` is readable (:func:`read_progressive`: a checkpoint that passes here
    must not be refused by the loader); and that the shards together supply every tensor the
    model config needs.
    """
    root = atomic.resolve_dir(Path(path), MANIFEST)
    try:
        manifest = manifest_in(root)
    except CheckpointError as exc:
        return [str(exc)]
    problems: list[str] = []
    manifest_path = root / MANIFEST
    present: dict[str, tuple[int, ...]] = {}
    explained: set[str] = set()  # tensors of files already reported as bad
    listed = [(s, "shard") for s in manifest["shards"]] + [(f, "file") for f in _file_entries(manifest).values()]
    bad: set[str] = set()  # paths of files already reported
    for entry, what in listed:
        try:
            file_path = safe_member(root, entry["path"], manifest_path)
        except CheckpointError as exc:
            problems.append(str(exc))
            bad.add(entry["path"])
            continue
        problem = check_file(file_path, entry, what, verify=True)
        if problem:
            problems.append(problem)
            bad.add(entry["path"])
            if isinstance(entry.get("tensors"), dict):
                explained.update(entry["tensors"])
            continue
        if isinstance(entry.get("tensors"), dict):
            problems.extend(_check_header(file_path, entry["tensors"], what, present if what == "shard" else {}))
    if PROGRESSIVE not in bad:  # intact bytes can still be a file no reader accepts
        try:
            read_progressive(root, manifest, verify=False)  # hashed above
        except CheckpointError as exc:
            problems.append(str(exc))
    try:
        config = build_config(dict(manifest["model_config"]), manifest, manifest_path)
    except CheckpointError as exc:
        return problems + [str(exc)]
    for name, shape in expected_tensors(config).items():
        if name in explained:
            continue
        if name not in present:
            problems.append(f"checkpoint {root} lacks tensor {name} that the model needs; restore the missing shard from a backup or re-save the checkpoint")
        elif present[name] != shape:
            problems.append(f"tensor {name} of checkpoint {root} has shape {present[name]} but the config needs {shape}; re-save the checkpoint")
    return problems


# safetensors' dtype codes as the manifest writes them (torch's names).
_HEADER_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64", "I32": "int32",
                  "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}


def _check_header(file_path: Path, listed: dict, what: str, present: dict[str, tuple[int, ...]]) -> list[str]:
    """Problems between a safetensors header and its manifest listing (reads the header only)."""
    problems = []
    try:
        with safe_open(str(file_path), framework="pt", device="cpu") as f:
            names = list(f.keys())
            for name in names:
                view = f.get_slice(name)
                shape, dtype = tuple(view.get_shape()), _HEADER_DTYPES.get(view.get_dtype(), view.get_dtype())
                info = listed.get(name)
                if not isinstance(info, dict) or tuple(info.get("shape", ())) != shape:
                    problems.append(f"{what} {file_path} holds tensor {name} that its manifest entry does not list with that shape; re-save the checkpoint")
                elif "dtype" in info and info["dtype"] != dtype:
                    problems.append(f"{what} {file_path} holds tensor {name} as {dtype} but its manifest entry says {info['dtype']}; re-save the checkpoint")
                present[name] = shape
    except SafetensorError as exc:
        return [f"{what} {file_path} cannot be read as safetensors ({one_line(exc)}); restore it from a backup or re-save the checkpoint"]
    lacking = sorted(set(listed) - set(names))
    if lacking:
        problems.append(f"{what} {file_path} lacks listed tensor(s) {', '.join(lacking[:3])}; re-save the checkpoint")
    return problems
