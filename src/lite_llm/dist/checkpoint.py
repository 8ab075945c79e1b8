"""Sharded training checkpoints with ``torch.distributed.checkpoint`` (DCP), and their
consolidation into the ordinary manifest checkpoint.

A sharded checkpoint is ``RUN/sharded/step-00000020/``: every rank's shards of the weights and
of the optimizer moments (DTensors keep their global shape and offsets, so a checkpoint saved
at one world size and set of degrees loads at another, one process included), written by
DCP's safetensors writer — tensors in safetensors, their offsets in JSON headers, nothing
pickled — plus ``lite_llm.json`` (model and training config, step, tokens, progressive state)
and ``tokenizer/``.  Everything is written under ``.step-00000020.partial`` and renamed into
place by rank 0 once every rank has finished, so a directory without the ``.partial`` suffix
is complete; an interrupted save is never picked by :func:`latest_sharded`.

The data position and the random state need nothing more: batches are a pure function of
(seed, step, micro-batch) and routing noise of the step (``train/trainer.py``), so the step
number is the whole position.
"""

from __future__ import annotations

import json
import math
import os
import re
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors import SafetensorError
from torch.distributed.checkpoint import HuggingFaceStorageReader, HuggingFaceStorageWriter
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from ..checkpoint import CheckpointManager, TrainingState, save_checkpoint
from ..checkpoint.atomic import fsync_tree, remove_dir
from ..checkpoint.manifest import sha256_file
from ..config import ModelConfig
from ..data.tokenizer import load_tokenizer
from ..errors import CheckpointError
from ..model import build_model

SHARDED_DIR = "sharded"
META_FILE = "lite_llm.json"
_STEP = re.compile(r"^step-(\d{8})$")
MODEL, OPTIM = "model/", "optim/"
SHA256_KEY = "file_sha256"  # in lite_llm.json: each shard file's sha256, written by rank 0 once every rank has written


def sharded_path(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / SHARDED_DIR / f"step-{step:08d}"


def list_sharded(run_dir: Path) -> list[Path]:
    """Complete sharded checkpoints of a run, oldest first."""
    root = Path(run_dir) / SHARDED_DIR
    if not root.is_dir():
        return []
    done = [p for p in root.iterdir() if _STEP.match(p.name) and (p / META_FILE).is_file()]
    return sorted(done, key=lambda p: p.name)


def latest_sharded(run_dir: Path) -> Path | None:
    found = list_sharded(run_dir)
    return found[-1] if found else None


def latest_sound_sharded(
    run_dir: Path, say: Callable[[str], None] = lambda message: None, *, skip: Sequence[Path] = (), hashes: bool = True
) -> Path | None:
    """The newest sharded checkpoint of the run, but for ``skip``, that :func:`check_sharded`
    passes (with ``hashes=False``: its metadata and shard headers read, the files' sha256 left
    for a later collective check); a corrupt newer one is said so (``say``) and passed over."""
    for path in reversed(list_sharded(run_dir)):
        if path in skip:
            continue
        try:
            check_sharded(path, hashes=hashes)
        except CheckpointError as err:
            say(passed_over_notice(path, err))
            continue
        return path
    return None


def passed_over_notice(path: Path, err: Exception) -> str:
    """What a resume says of a sharded checkpoint it passes over for the previous one."""
    return f"cannot resume from {Path(path).name} ({err}); resuming from the previous complete sharded checkpoint instead"


_CHECKED: set[tuple] = set()  # sharded checkpoints (path, each file's size and mtime) this process has hashed: picked, then loaded, once


def check_sharded(path: Path, *, hashes: bool = True, collective: bool = True) -> None:
    """Raise :class:`CheckpointError` when the sharded checkpoint's metadata or a shard file's
    header does not read, a tensor's chunks do not cover it (a file cut short or missing), or
    (``hashes``) a file does not match the sha256 its metadata records.  With ``collective`` and a
    process group up, every rank must call it: the files are hashed once in all, shared out
    among the ranks (:func:`sha256_shared`), and every rank reaches the same verdict."""
    meta = read_meta(path)
    key = _checked_key(path)
    if key in _CHECKED:
        return
    _read_stored(path)
    if not hashes:
        return
    recorded = meta.get(SHA256_KEY) or {}  # older checkpoints have none
    found = sha256_shared([Path(path) / name for name in sorted(recorded)], collective=collective)
    for name in sorted(recorded):
        if found[name] is None:
            raise CheckpointError(f"{path} has lost its file {name}; restore it, or use an earlier sharded checkpoint of the run")
        if found[name] != recorded[name]:
            raise CheckpointError(f"{Path(path) / name} does not match its sha256 in {META_FILE} (it changed after it was written); use an earlier sharded checkpoint of the run")
    _CHECKED.add(key)


def _checked_key(path: Path) -> tuple:
    return (str(Path(path).resolve()), *((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(Path(path).iterdir()) if p.is_file()))


def sha256_shared(files: list[Path], *, collective: bool = True) -> dict[str, str | None]:
    """Each file's sha256 by name (None for a missing one).  With ``collective`` and a process
    group of several ranks, each rank hashes its share (:func:`hashing_shares`) and the digests
    are gathered: a checkpoint is read once in all, not once per rank, and saving or resuming
    does not wait on one rank reading every shard.  Every rank gets the whole answer."""
    world = dist.get_world_size() if collective and dist.is_initialized() else 1
    rank = dist.get_rank() if world > 1 else 0
    sizes = [f.stat().st_size if f.is_file() else 0 for f in files]
    mine = {f.name: (sha256_file(f) if f.is_file() else None) for f in hashing_shares(files, sizes, world)[rank]}
    if world == 1:
        return mine
    gathered: list[dict[str, str | None] | None] = [None] * world
    dist.all_gather_object(gathered, mine)
    return {name: digest for part in gathered for name, digest in (part or {}).items()}


def hashing_shares(files: list[Path], sizes: list[int], world: int) -> list[list[Path]]:
    """``files`` shared out among ``world`` ranks by bytes: largest first, each to the rank
    with the fewest bytes so far (the lowest such rank on a tie), so every rank computes the
    same shares from the same sizes."""
    shares: list[list[Path]] = [[] for _ in range(world)]
    load = [0] * world
    for size, file in sorted(zip(sizes, files), key=lambda pair: (-pair[0], pair[1].name)):
        rank = min(range(world), key=lambda r: (load[r], r))
        shares[rank].append(file)
        load[rank] += size
    return shares


def ordinary_newer_than(run_dir: Path, sharded: Path) -> Path | None:
    """The run's newest ordinary checkpoint when it is at a later step than the sharded one
    (the run went on in one process after it), else None.  Both are named step-N."""
    manager = CheckpointManager(run_dir)
    ordinary = manager.latest()
    if ordinary is not None and (manager.step_of(ordinary) or -1) > (manager.step_of(sharded) or -1):
        return ordinary
    return None


def clean_partial_sharded(run_dir: Path) -> list[Path]:
    """Remove the ``sharded/.step-N.partial`` folders a killed run left (a save is renamed into
    place only when complete); call it on rank 0 only, holding the run's lock."""
    root = Path(run_dir) / SHARDED_DIR
    leftovers = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(".step-") and p.name.endswith(".partial")] if root.is_dir() else []
    for p in leftovers:
        remove_dir(p)
    return leftovers


def is_sharded_checkpoint(path: Path) -> bool:
    return (Path(path) / META_FILE).is_file()


# ------------------------------------------------------------------------------------ state
def model_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """``model/<name>`` for every weight and persistent buffer (the router's logit biases), as
    the model's state dict names them; the tensors themselves (DTensors where the run shards
    them), so DCP saves from and loads into them in place."""
    return {MODEL + name: t.detach() for name, t in model.state_dict(keep_vars=True).items()}


def training_tensors(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """What a sharded checkpoint holds: :func:`model_tensors` and ``optim/<name>/<slot>``
    tensors, by parameter name, as the ordinary checkpoint does."""
    names = {id(p): n for n, p in model.named_parameters()}
    state = model_tensors(model)
    for p, slots in optimizer.state.items():
        for slot, value in slots.items():
            state[f"{OPTIM}{names[id(p)]}/{slot}"] = value if torch.is_tensor(value) else torch.tensor(value)
    return state


def save_sharded(run_dir: Path, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer, meta: dict[str, Any],
                 tokenizer: Any, keep_last: int) -> Path:
    """Every rank writes its shards; rank 0 adds the metadata and renames the directory into
    place once all have finished, then keeps the ``keep_last`` newest.  Collective."""
    final = sharded_path(run_dir, step)
    partial = final.with_name(f".{final.name}.partial")
    main = not dist.is_initialized() or dist.get_rank() == 0
    if main:
        if partial.exists():
            remove_dir(partial)
        partial.mkdir(parents=True)
    _barrier()
    dcp.save(training_tensors(model, optimizer), storage_writer=HuggingFaceStorageWriter(str(partial), save_distributed=True),
             no_dist=not dist.is_initialized())
    _barrier()
    # every file's sha256, as an ordinary checkpoint's manifest has them: a flipped byte in a
    # shard is found on resume and consolidation instead of being trained on (or re-hashed as
    # good); every rank hashes its share of the files every rank has written
    hashes = sha256_shared(sorted(p for p in partial.iterdir() if p.is_file()))
    if main:
        (partial / META_FILE).write_text(json.dumps({**meta, SHA256_KEY: hashes}, indent=1, sort_keys=True), encoding="utf-8")
        if tokenizer is not None:
            tokenizer.save(partial / "tokenizer")
        fsync_tree(partial)
        if final.exists():
            remove_dir(final)
        os.replace(partial, final)
        for old in list_sharded(run_dir)[:-keep_last]:
            if old != final:  # the one just written is kept, as CheckpointManager keeps it (a run resumed behind newer ones)
                remove_dir(old)
    _barrier()
    _CHECKED.add(_checked_key(final))  # just hashed: consolidating or resuming it in this process needs no second reading
    return final


def read_meta(path: Path) -> dict[str, Any]:
    meta_file = Path(path) / META_FILE
    if not meta_file.is_file():
        raise CheckpointError(f"{path} is not a complete sharded checkpoint (it has no {META_FILE}); resume from another one")
    try:
        return json.loads(meta_file.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise CheckpointError(f"{meta_file} is corrupt; resume from an earlier sharded checkpoint") from exc


def load_sharded(path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> dict[str, Any]:
    """Fill ``model`` (and ``optimizer``'s moments) in place from a sharded checkpoint, whatever
    the world size and degrees it was saved at; returns its metadata.  Collective when a
    process group is up."""
    check_sharded(path)  # its files' hashes: a chosen --resume-from is checked as the newest one is
    meta = read_meta(path)
    reader, stored = _read_stored(path)
    targets = model_tensors(model)
    # a pipeline stage holds only its own blocks, so tensors of the other stages are expected
    _check_model(path, stored, targets, "it was saved from another model — resume with the model it was trained with", whole=False)
    moments: dict[str, tuple[torch.nn.Parameter, str]] = {}
    if optimizer is not None:
        for n, p in model.named_parameters():
            for key in stored:
                if key.startswith(f"{OPTIM}{n}/") and "/" not in key[len(OPTIM) + len(n) + 1 :]:
                    slot = key.rsplit("/", 1)[1]
                    targets[key] = torch.zeros_like(p.detach()) if slot != "step" else torch.zeros((), dtype=torch.float32)
                    moments[key] = (p, slot)
    _load(targets, reader, alone=not dist.is_initialized())
    if optimizer is not None:
        optimizer.state.clear()
        for key, (p, slot) in moments.items():
            optimizer.state[p][slot] = targets[key]
    return meta


def consolidate(path: Path, output: Path) -> Path:
    """The ordinary manifest checkpoint (weights, optimizer moments, training metadata) of a
    sharded one: what growth, add-tier, eval and export read, and what a new run starts from.
    Reads in this process alone (no process group needed)."""
    check_sharded(path, collective=False)  # hashes too (consolidation must not give corrupt bytes fresh ones); rank 0 alone may call it
    meta = read_meta(path)
    config = ModelConfig.from_dict(meta["model_config"])
    model = build_model(config, seed=0)
    reader, stored = _read_stored(path)
    targets = model_tensors(model)
    _check_model(path, stored, targets, f"its {META_FILE} describes another model than its shards hold — restore that file, or consolidate another sharded checkpoint")
    optim: dict[str, torch.Tensor] = {}
    for key, info in stored.items():
        if key.startswith(OPTIM):
            optim[key] = torch.zeros(tuple(info.size), dtype=info.properties.dtype)
    _load({**targets, **optim}, reader, alone=True)
    tensors = {"optimizer/" + key[len(OPTIM) :]: value for key, value in optim.items()}
    tokenizer_dir = Path(path) / "tokenizer"
    tokenizer = load_tokenizer(tokenizer_dir) if tokenizer_dir.is_dir() else None
    training = TrainingState(tensors=tensors, meta=meta["trainer"])
    return save_checkpoint(output, model, tokenizer=tokenizer, progressive=meta.get("progressive") or {}, training=training)


def _load(state: dict[str, Any], reader: HuggingFaceStorageReader, *, alone: bool) -> None:
    """``dcp.load`` into ``state``: collectively by every rank, or (``alone``) in this process
    only — a run continued in one process, or ``consolidate``, which the main rank runs by itself
    even inside a process group.  Alone, torch warns that it "assumes the intent is to load in a
    single process", which is exactly the intent and which users read as something gone wrong."""
    if not alone:
        dcp.load(state, storage_reader=reader)
        return
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        dcp.load(state, storage_reader=reader, no_dist=True)


def _read_stored(path: Path) -> tuple[HuggingFaceStorageReader, dict[str, Any]]:
    """DCP's reader of a sharded checkpoint and what its shard files hold, every tensor whole.

    DCP reads whatever shard files it finds: a missing one leaves its chunks out of the
    metadata, and loading would keep the model's own values there without a word, so a
    tensor whose chunks do not cover it is refused here, as is a file cut short."""
    reader = HuggingFaceStorageReader(str(path))
    try:
        stored = reader.read_metadata().state_dict_metadata
    except (SafetensorError, OSError, ValueError) as exc:
        detail = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(
            f"a shard file of {path} is cut short or corrupt ({detail}); use an earlier sharded checkpoint of the run"
        ) from None
    for key, info in stored.items():
        if isinstance(info, TensorStorageMetadata) and sum(math.prod(c.sizes) for c in info.chunks) < math.prod(info.size):
            raise CheckpointError(
                f"{path} holds only part of {key}: one of its shard files is missing; restore it, or use an earlier sharded checkpoint of the run"
            )
    return reader, stored


def _check_model(path: Path, stored: dict[str, Any], targets: dict[str, torch.Tensor], remedy: str, *, whole: bool = True) -> None:
    """Every weight of the model is stored with its shape, and (``whole``: the model is the
    whole model, not one pipeline stage) nothing else of a model is: DCP would stop at a
    missing one with a traceback and silently drop an extra one."""
    missing = [k for k in targets if k not in stored]
    if missing:
        raise CheckpointError(f"{path} has no {missing[0][len(MODEL):]}; {remedy}")
    extra = [k for k in stored if k.startswith(MODEL) and k not in targets] if whole else []
    if extra:
        raise CheckpointError(f"{path} holds {extra[0][len(MODEL):]}, which the model lacks; {remedy}")
    for key, tensor in targets.items():
        info = stored[key]
        if isinstance(info, TensorStorageMetadata) and tuple(info.size) != tuple(tensor.shape):
            raise CheckpointError(
                f"{path} holds {key[len(MODEL):]} of shape {tuple(info.size)}, not the model's {tuple(tensor.shape)}; {remedy}"
            )


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()
