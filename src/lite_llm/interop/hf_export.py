"""A Lite LLM checkpoint -> a Hugging Face model folder, one tensor at a time.

Dense models become Llama folders (Qwen2 when they have q/k/v biases, which Llama lacks;
Mistral when their hidden size is not a multiple of the heads, which Llama's config refuses);
models with one tier of one expert group in every layer become Mixtral folders, in the classic
per-expert layout (``block_sparse_moe.experts.{j}.w1/w2/w3``) that transformers'
``save_pretrained`` writes, ``from_pretrained`` of transformers 4 and 5 loads, and older tools
(llama.cpp's converter among them) read.  Anything else has no Hugging Face architecture that
computes the same function, and is refused with the reason.

The folder is built under a temporary name next to the target and renamed into place when
complete, so a failed export leaves nothing behind.
"""

from __future__ import annotations

import json
import os
import warnings
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Callable

import torch

from ..checkpoint import atomic
from ..checkpoint.derived import check_new_output
from ..checkpoint.lazy import CheckpointTensors, open_checkpoint
from ..checkpoint.stream import TensorSpec
from ..config import ModelConfig
from ..data.tokenizer import EOS_TOKEN, HF_TOKENIZER_FILE, load_tokenizer
from ..errors import CheckpointError, ConfigError, LiteLLMError
from ..grow.tensors import Producer, stored_names
from .hf_import import HF_CONFIG_FILE, HF_TOKENIZER_EXTRAS
from .hf_weights import json_bytes, write_json, write_weights
from .hf_mapping import MIXTRAL_FUSED_EXPERTS, hf_config_dict, lite_names_to_hf, mixtral_block_to_classic, mixtral_classic_expert

GENERATION_CONFIG_FILE = "generation_config.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3
_AddTensor = Callable[[str, tuple[int, ...], torch.dtype, Producer], None]
_SUPPORTED = "export supports dense (Llama) and single-tier single-group MoE (Mixtral) models"


def export_hf(
    ckpt_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    overwrite: bool = False,
) -> Path:
    """Write the Lite LLM checkpoint ``ckpt_dir`` as a Hugging Face model folder at ``out_dir``.

    Writes ``config.json``, ``generation_config.json``, the weights (``model.safetensors``, or
    ``model-0000i-of-0000n.safetensors`` shards of at most ``max_shard_bytes`` plus
    ``model.safetensors.index.json``) and, when the checkpoint has a Hugging Face
    ``tokenizer.json``, the tokenizer files; ``AutoModelForCausalLM.from_pretrained(out_dir)``
    then computes the same logits.  ``dtype`` casts the weights (default: as stored).  Tensors
    are streamed one at a time (a Mixtral layer's expert bank is read once and split).
    ``out_dir`` must not exist or be empty, unless ``overwrite`` and it is a Hugging Face model
    folder (it is replaced once the new one is complete).  Raises :class:`ConfigError` with one sentence for
    a model no Hugging Face architecture represents; nothing is left at ``out_dir`` on failure.
    Returns ``out_dir``.
    """
    target = Path(out_dir)
    check_hf_target(target, overwrite)
    # a folder written inside the checkpoint would change it (an unlisted tokenizer/x makes it unloadable)
    check_new_output(target, Path(ckpt_dir), "the Hugging Face folder", overwrite=overwrite)
    if max_shard_bytes <= 0:
        raise ConfigError(f"max_shard_bytes must be positive, got {max_shard_bytes}; pass a size in bytes such as 5 * 1024**3")
    if dtype is not None and not dtype.is_floating_point:
        raise ConfigError(f"dtype {dtype} is not a floating-point type; export as torch.float32, torch.bfloat16 or torch.float16")
    ckpt = open_checkpoint(ckpt_dir)
    check_exportable(ckpt)
    specs, producers = plan_export(ckpt, dtype)
    tokenizer = tokenizer_files(ckpt)
    special = special_token_ids(tokenizer)
    model_dtype = specs["model.embed_tokens.weight"].dtype
    hf_config = {**hf_config_dict(ckpt.config), **dtype_fields(model_dtype), **special}
    with atomic.building_dir(target, HF_CONFIG_FILE) as tmp:
        write_weights(tmp, specs, {}, lambda name: producers[name](), max_shard_bytes)
        write_json(tmp / HF_CONFIG_FILE, hf_config)
        write_json(tmp / GENERATION_CONFIG_FILE, generation_config(ckpt, special))
        for name, data in tokenizer.items():
            atomic.write_bytes_durable(tmp / name, data)
    return target


# ------------------------------------------------------------------------------- checks
def check_hf_target(target: Path, overwrite: bool = False) -> None:
    """Refuse a Hugging Face folder's target that exists and is not empty, unless ``overwrite``
    and it is itself a Hugging Face model folder (a ``config.json``): --overwrite replaces a
    model, never some other folder a mistyped path points to."""
    if not target.exists() or (target.is_dir() and not any(target.iterdir())):
        return
    if not target.is_dir():
        raise CheckpointError(f"refusing to overwrite {target}, which is a file; choose a folder path")
    if not overwrite:
        raise CheckpointError(f"output {target} already exists and is not empty; pass --overwrite to replace it, or choose a new directory")
    if not (target / HF_CONFIG_FILE).is_file():
        raise CheckpointError(f"refusing to overwrite {target}, which is not a Hugging Face model folder (no {HF_CONFIG_FILE}); choose another path")


def check_exportable(ckpt: CheckpointTensors) -> None:
    """Refuse, with the reason, a model that no Hugging Face architecture computes exactly."""
    config = ckpt.config
    quantized = [t.name for t in config.tiers if t.quantization]
    if quantized:
        raise ConfigError(f"tier(s) {', '.join(quantized)} of this checkpoint are quantized, which the export does not write; export the unquantized checkpoint")
    if len(config.tiers) > 1:
        raise ConfigError(
            f"{_SUPPORTED}; this model has tiers {', '.join(t.name for t in config.tiers)}, which no Hugging Face architecture represents, so keep it in the Lite LLM format"
        )
    if not config.is_moe:
        return
    tier = config.tiers[0]
    if tier.num_groups != 1:
        raise ConfigError(
            f"{_SUPPORTED}; tier {tier.name} has {tier.num_groups} expert groups, which Mixtral's single router cannot represent, so keep it in the Lite LLM format"
        )
    if len(config.moe_layer_indices) != config.n_layers:
        layers = ", ".join(str(i) for i in config.moe_layer_indices)
        raise ConfigError(
            f"{_SUPPORTED}; this model has experts in layer(s) {layers} only and dense FFNs elsewhere, which Mixtral cannot represent, so keep it in the Lite LLM format"
        )
    if config.attention_bias:
        raise ConfigError(f"{_SUPPORTED} without attention biases; this MoE model has q/k/v biases, which Mixtral lacks, so keep it in the Lite LLM format")
    if not config.routing.renormalize:
        raise ConfigError(
            "this model's router does not renormalise its top-k expert weights (routing.renormalize is false) but Mixtral's does, so a Mixtral export would compute something else; keep it in the Lite LLM format"
        )
    for i in config.moe_layer_indices:
        name = f"layers.{i}.ffn.router.heads.{tier.name}.expert_bias"
        if name in ckpt.tensors and ckpt.tensors[name].any():
            raise ConfigError(
                f"layer {i}'s router has a non-zero expert_bias (a curriculum still ramping experts in), which Mixtral's router has no place for; finish the curriculum so the biases are zero, then export"
            )


# ------------------------------------------------------------------------------- weights
class _RecentReads:
    """Lookups of a lazy mapping that remember the last ``keep`` tensors, so that splitting an
    expert bank into per-expert matrices reads the bank once rather than once per expert."""

    def __init__(self, tensors: Mapping[str, torch.Tensor], keep: int = 2) -> None:
        self._tensors = tensors
        self._keep = keep
        self._recent: OrderedDict[str, torch.Tensor] = OrderedDict()

    def __call__(self, name: str) -> torch.Tensor:
        if name in self._recent:
            self._recent.move_to_end(name)
        else:
            self._recent[name] = self._tensors[name]
            while len(self._recent) > self._keep:
                self._recent.popitem(last=False)
        return self._recent[name]


def _piece(read: _RecentReads, name: str, index: tuple[Any, ...], dtype: torch.dtype, scale: float = 1.0) -> Producer:
    def produce() -> torch.Tensor:
        t = read(name)[index].to(dtype)
        return t / scale if scale != 1.0 else t

    return produce


def plan_export(ckpt: CheckpointTensors, dtype: torch.dtype | None = None) -> tuple[dict[str, TensorSpec], dict[str, Producer]]:
    """Hugging Face name -> (spec, producer) for every tensor of the exported folder, in
    writing order (the model's own order, experts split per expert for Mixtral)."""
    config = ckpt.config
    read = _RecentReads(ckpt.tensors)
    hf_name_of = lite_names_to_hf(stored_names(config), config)
    specs: dict[str, TensorSpec] = {}
    producers: dict[str, Producer] = {}

    def add(theirs: str, shape: tuple[int, ...], src_dtype: torch.dtype, produce_with: Producer) -> None:
        specs[theirs] = TensorSpec(dtype or src_dtype, shape)
        producers[theirs] = produce_with

    for ours, theirs in hf_name_of.items():
        spec = ckpt.tensors.spec(ours)
        out_dtype = dtype or spec.dtype
        fused = MIXTRAL_FUSED_EXPERTS.match(theirs) if config.is_moe else None
        if fused:
            _add_classic_experts(add, read, ours, fused["i"], fused["kind"], spec, out_dtype)
        elif config.is_moe and theirs.endswith(".mlp.gate.weight"):
            # Mixtral's router has no temperature: dividing the gate by it is the same logits.
            temperature = config.routing.expert_temperature
            add(mixtral_block_to_classic(theirs), spec.shape, spec.dtype, _piece(read, ours, (), out_dtype, temperature))
        else:
            add(theirs, spec.shape, spec.dtype, _piece(read, ours, (), out_dtype))
    return specs, producers


def _add_classic_experts(add: _AddTensor, read: _RecentReads, ours: str, layer: str, kind: str, spec: TensorSpec, dtype: torch.dtype) -> None:
    """Split a fused bank into Mixtral's classic per-expert matrices (w1 = gate, w3 = up, w2 = down)."""
    n_experts = spec.shape[0]
    if kind == "gate_up_proj":
        _, two_h, d = spec.shape
        h = two_h // 2
        for j in range(n_experts):
            add(mixtral_classic_expert(layer, j, "w1"), (h, d), spec.dtype, _piece(read, ours, (j, slice(0, h)), dtype))
            add(mixtral_classic_expert(layer, j, "w3"), (h, d), spec.dtype, _piece(read, ours, (j, slice(h, None)), dtype))
    else:
        for j in range(n_experts):
            add(mixtral_classic_expert(layer, j, "w2"), spec.shape[1:], spec.dtype, _piece(read, ours, (j,), dtype))


# ------------------------------------------------------------------------------- config and tokenizer
def dtype_fields(dtype: torch.dtype) -> dict[str, str]:
    name = str(dtype).removeprefix("torch.")
    return {"torch_dtype": name, "dtype": name}  # transformers 4 reads the first, 5 the second


def tokenizer_files(ckpt: CheckpointTensors) -> dict[str, bytes]:
    """File name -> bytes of the tokenizer files to export (empty when there is none to give).

    A checkpoint imported from Hugging Face carries its ``tokenizer_config.json`` (special
    tokens, chat template); one trained here gets a minimal one naming the fast tokenizer.
    """
    folder = ckpt.tokenizer_dir
    if folder is None:
        return {}
    if not (folder / HF_TOKENIZER_FILE).is_file():
        warnings.warn(
            f"the tokenizer of {ckpt.path} is not exported: it has no Hugging Face {HF_TOKENIZER_FILE} (a byte tokenizer has no Hugging Face equivalent)",
            stacklevel=3,
        )
        return {}
    files = {name: (folder / name).read_bytes() for name in (HF_TOKENIZER_FILE, *HF_TOKENIZER_EXTRAS) if (folder / name).is_file()}
    if TOKENIZER_CONFIG_FILE not in files:
        try:
            tokenizer = load_tokenizer(folder)
        except LiteLLMError:
            tokenizer = None
        files[TOKENIZER_CONFIG_FILE] = _minimal_tokenizer_config(
            folder / HF_TOKENIZER_FILE, ckpt.config, tokenizer, template_file=any(n.startswith("chat_template.") for n in files)
        )
    return files


def _minimal_tokenizer_config(tokenizer_json: Path, config: ModelConfig, tokenizer: Any = None, *, template_file: bool = False) -> bytes:
    """A ``tokenizer_config.json`` for a tokenizer folder that has none (one trained here, or a
    checkpoint written before the side files were kept): what our tokenizer records — its first
    end-of-sequence id (a chat model's ``<|im_end|>``; else ``<|endoftext|>``), the token its
    chat template's ``{{ bos_token }}`` renders, and the chat template itself unless a
    ``chat_template.*`` file carries it — so transformers stops and chats as we do."""
    from tokenizers import Tokenizer

    backend = Tokenizer.from_file(str(tokenizer_json))
    data: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": config.max_seq_len, "clean_up_tokenization_spaces": False}
    eos_ids = list(getattr(tokenizer, "eos_ids", ()) or ())
    eos = backend.id_to_token(eos_ids[0]) if eos_ids else EOS_TOKEN
    if eos is not None and backend.token_to_id(eos) is not None:
        data["eos_token"] = eos
    bos_token = getattr(tokenizer, "bos_token", None)
    if bos_token is not None and backend.token_to_id(bos_token) is not None:
        data["bos_token"] = bos_token  # what the chat template's {{ bos_token }} renders
    template = getattr(tokenizer, "chat_template", None)
    if template and not template_file:
        data["chat_template"] = template
    return json_bytes(data)


def generation_config(ckpt: CheckpointTensors, special: Mapping[str, int]) -> dict[str, Any]:
    """``generation_config.json`` for a folder made from our checkpoint ``ckpt`` (by ``export``
    or by a growth written as a Hugging Face folder): ``special`` (:func:`special_token_ids`)
    with ``eos_token_id`` widened to every id the tokenizer stops on.  One function for both
    writers, so that neither can again drop a chat model's turn end (``<|im_end|>``)."""
    return {"_from_model_config": True, **special, **_generation_eos(ckpt)}


def _generation_eos(ckpt: CheckpointTensors) -> dict[str, Any]:
    """``eos_token_id`` for generation_config.json: every id our tokenizer stops on (a list
    when there are several, as transformers accepts), so ``generate`` ends a chat turn at
    ``<|im_end|>`` as ``lite-llm generate`` does.  Empty when the tokenizer records none."""
    folder = ckpt.tokenizer_dir
    if folder is None or not (folder / HF_TOKENIZER_FILE).is_file():
        return {}
    try:
        tok = load_tokenizer(folder)
    except LiteLLMError:
        return {}
    ids = list(tok.eos_ids)
    if not ids:
        return {}
    return {"eos_token_id": ids[0] if len(ids) == 1 else ids}


def special_token_ids(files: Mapping[str, bytes]) -> dict[str, int]:
    """``bos_token_id`` / ``eos_token_id`` for config.json and generation_config.json, from the
    tokenizer's own config (generation stops at eos only when it is given)."""
    if HF_TOKENIZER_FILE not in files or TOKENIZER_CONFIG_FILE not in files:
        return {}
    from tokenizers import Tokenizer

    backend = Tokenizer.from_str(files[HF_TOKENIZER_FILE].decode("utf-8"))
    try:
        tok_config = json.loads(files[TOKENIZER_CONFIG_FILE])
    except ValueError:
        return {}
    out: dict[str, int] = {}
    for key in ("bos_token", "eos_token"):
        token = tok_config.get(key)
        token = token.get("content") if isinstance(token, dict) else token
        token_id = backend.token_to_id(token) if isinstance(token, str) else None
        if token_id is not None:
            out[f"{key}_id"] = token_id
    return out


__all__ = ["check_exportable", "export_hf", "generation_config", "plan_export"]
