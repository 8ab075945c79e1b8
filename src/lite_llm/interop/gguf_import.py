"""A llama.cpp GGUF file (Llama architecture) -> a Lite LLM checkpoint, one tensor at a time.

The ``gguf`` package memory-maps the file; each tensor is dequantised to float32 when the
checkpoint writer asks for it, renamed, and dropped, so conversion needs the memory of one
dequantised tensor.  The config comes from the ``llama.*`` metadata, the vocabulary size from
the embedding (cross-checked with the token list) and tying from the absence of ``output``.

llama.cpp's converter permutes the rows of the Q and K projections of every head so that its
rotary kernel can rotate interleaved pairs (x0, x1), (x2, x3), ...; Hugging Face and Lite LLM
rotate the halves (x_i, x_{i + d/2}).  :func:`unpermute_rotary` undoes that permutation.

Mixtral-style files (``llama.expert_count`` > 0, merged ``ffn_*_exps`` banks) import as one
tier of one expert group.  The tokenizer is rebuilt with transformers' GGUF converter when
transformers is installed, and skipped with a warning otherwise.
"""

from __future__ import annotations

import os
import re
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch

from ..checkpoint.manifest import one_line
from ..checkpoint.save import write_checkpoint
from ..checkpoint.stream import TensorSpec
from ..config import ModelConfig, RoutingConfig, TierConfig
from ..data.tokenizer import BPETokenizer
from ..errors import CheckpointError, ConfigError
from ..grow.tensors import LazyTensors, Producer, expected_specs
from .hf_import import HFTokenizerFiles, read_hf_tokenizer, turn_end_ids
from .hf_mapping import ROUTER_ONLY_STATE

SUPPORTED_ARCHITECTURES = ("llama",)
_TOKENS = "tokenizer.ggml.tokens"
_EOS = "tokenizer.ggml.eos_token_id"
_EOT = "tokenizer.ggml.eot_token_id"
_CHAT_TEMPLATE = "tokenizer.chat_template"
_TIER = "tier_0"


def import_gguf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike, *, dtype: torch.dtype = torch.float32) -> Path:
    """Convert the Llama-architecture GGUF file ``gguf_path`` into a Lite LLM checkpoint at ``out_dir``.

    Quantised tensors are dequantised with the ``gguf`` package and stored as ``dtype``; Q and
    K are un-permuted back to Hugging Face's rotary layout.  The tokenizer is converted when
    transformers is importable (a warning says when it is not).  Raises :class:`ConfigError`
    for another architecture or unsupported features (RoPE scaling, partial rotary) and
    :class:`CheckpointError` for an unreadable or incomplete file, in one sentence each;
    nothing is left at ``out_dir`` then.  Returns the checkpoint's path.
    """
    path = Path(gguf_path)
    if not dtype.is_floating_point:
        raise ConfigError(f"dtype {dtype} is not a floating-point type; import as torch.float32, torch.bfloat16 or torch.float16")
    reader = open_gguf(path)
    metadata = read_metadata(reader)
    tensors = {t.name: t for t in reader.tensors}
    config = config_from_gguf(metadata, {name: _shape(t) for name, t in tensors.items()}, path)
    specs = expected_specs(config, dtype)
    producers = plan_gguf(config, tensors, specs, path)
    tokenizer = gguf_tokenizer(path, metadata) if _TOKENS in metadata else None
    return write_checkpoint(out_dir, config, LazyTensors(producers), specs=specs, tokenizer=tokenizer)


# ------------------------------------------------------------------------------- reading
GGUF_MAGIC = b"GGUF"


def _starts_with_magic(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(len(GGUF_MAGIC)) == GGUF_MAGIC


def is_gguf(source: Path) -> bool:
    """A GGUF file by its name or, renamed or downloaded without the suffix, by its magic bytes
    (else it would be taken for a Hugging Face folder and refused as a folder that does not exist)."""
    if source.suffix.lower() == ".gguf":
        return True
    return source.is_file() and _starts_with_magic(source)


def open_gguf(path: Path) -> Any:
    """A ``gguf.GGUFReader`` over ``path`` (memory-mapped: nothing is read yet)."""
    try:
        import gguf
    except ImportError:
        raise ConfigError("importing GGUF files needs the gguf package; install it with `pip install gguf`") from None
    if not path.is_file():
        raise CheckpointError(f"GGUF file {path} does not exist; check the path")
    try:
        return gguf.GGUFReader(path)
    except Exception as exc:  # noqa: BLE001 - the reader raises ValueError, struct.error, IndexError ... on a bad file
        magic = _starts_with_magic(path)
        # the reader's own words (numpy reshape and dtype errors) do not say what is wrong with the file
        why = "it is truncated or corrupt" if magic else "it does not start with the GGUF magic bytes"
        raise CheckpointError(f"{path} cannot be read as a GGUF file: {why} ({type(exc).__name__}: {one_line(exc)}); download it again") from None


def _field_value(field: Any) -> Any:
    """A metadata value: scalars and strings as Python values, arrays as their length (only
    the token list's length is needed, and decoding 50k strings would be wasted)."""
    from gguf import GGUFValueType

    kind = field.types[0]
    if kind == GGUFValueType.ARRAY:
        return len(field.data)
    part = field.parts[field.data[0]]
    if kind == GGUFValueType.STRING:
        return bytes(part).decode("utf-8", errors="replace")
    return part[0].item()


def read_metadata(reader: Any) -> dict[str, Any]:
    """The file's key/value metadata (arrays as lengths)."""
    return {key: _field_value(field) for key, field in reader.fields.items() if field.data}


def _shape(tensor: Any) -> tuple[int, ...]:
    """A GGUF tensor's shape in PyTorch order (ggml lists the fastest-varying dimension first)."""
    return tuple(int(n) for n in reversed(tensor.shape))


def dequantize(tensor: Any) -> torch.Tensor:
    """A GGUF tensor as a fresh float32 torch tensor of its PyTorch shape."""
    from gguf.quants import dequantize as gguf_dequantize

    try:
        data = gguf_dequantize(tensor.data, tensor.tensor_type)
    except NotImplementedError:
        raise ConfigError(f"tensor {tensor.name} uses quantisation {tensor.tensor_type.name}, which the installed gguf package cannot dequantise; upgrade gguf") from None
    if data.dtype != np.float32 or not data.flags.writeable:  # F32 comes back as a read-only view of the map
        data = data.astype(np.float32)
    return torch.from_numpy(data.reshape(_shape(tensor)))


# ------------------------------------------------------------------------------- config
def _require(metadata: dict[str, Any], key: str, path: Path) -> Any:
    if key not in metadata:
        raise CheckpointError(f"{path} lacks the metadata key {key} that a llama model needs; re-convert it with a recent llama.cpp")
    return metadata[key]


def config_from_gguf(metadata: dict[str, Any], shapes: dict[str, tuple[int, ...]], path: Path) -> ModelConfig:
    """A Lite LLM config from a GGUF file's ``llama.*`` metadata and tensor shapes."""
    arch = metadata.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ConfigError(f"cannot import GGUF architecture {arch!r} from {path}; supported architectures are {', '.join(SUPPORTED_ARCHITECTURES)}")
    key = lambda name: f"{arch}.{name}"  # noqa: E731
    d = int(_require(metadata, key("embedding_length"), path))
    n_heads = int(_require(metadata, key("attention.head_count"), path))
    head_dim = int(metadata.get(key("attention.key_length"), d // n_heads))
    _check_rope(metadata, shapes, head_dim, key, path)
    if "token_embd.weight" not in shapes:
        raise CheckpointError(f"{path} lacks the token embedding token_embd.weight; re-convert it with a recent llama.cpp")
    vocab = shapes["token_embd.weight"][0]
    for source in (key("vocab_size"), _TOKENS):
        if metadata.get(source, vocab) != vocab:
            raise CheckpointError(f"{path} says {source} is {metadata[source]} but its embedding has {vocab} rows; re-convert it with a recent llama.cpp")
    ff = int(_require(metadata, key("feed_forward_length"), path))
    fields: dict[str, Any] = dict(
        name=f"gguf-{arch}",
        vocab_size=vocab,
        d_model=d,
        n_layers=int(_require(metadata, key("block_count"), path)),
        n_heads=n_heads,
        n_kv_heads=int(metadata.get(key("attention.head_count_kv"), n_heads)),
        head_dim=head_dim,
        intermediate_size=ff,
        rope_theta=float(metadata.get(key("rope.freq_base"), 10000.0)),
        norm_eps=float(metadata.get(key("attention.layer_norm_rms_epsilon"), 1e-5)),
        max_seq_len=int(metadata.get(key("context_length"), 2048)),
        tie_embeddings="output.weight" not in shapes,
    )
    experts = int(metadata.get(key("expert_count"), 0) or 0)
    if experts:
        used = int(_require(metadata, key("expert_used_count"), path))
        fields["tiers"] = [TierConfig(_TIER, num_groups=1, experts_per_group=experts, expert_hidden=ff)]
        fields["routing"] = RoutingConfig(k_tier=1, k_group=1, k_expert=used)
    return ModelConfig(**fields)


def _check_rope(metadata: dict[str, Any], shapes: dict[str, tuple[int, ...]], head_dim: int, key: Callable[[str], str], path: Path) -> None:
    """Lite LLM implements plain RoPE over the whole head; refuse anything else."""
    scaling = metadata.get(key("rope.scaling.type"), "none")
    if scaling not in ("none", None) or "rope_freqs.weight" in shapes:
        kind = scaling if scaling not in ("none", None) else "rope_freqs (Llama 3 style)"
        raise ConfigError(f"{path} uses RoPE scaling {kind!r}, which Lite LLM does not implement yet; only plain RoPE models can be imported")
    rotary = int(metadata.get(key("rope.dimension_count"), head_dim))
    if rotary != head_dim:
        raise ConfigError(f"{path} rotates {rotary} of each head's {head_dim} dimensions, but Lite LLM rotates whole heads; this model cannot be imported")


# ------------------------------------------------------------------------------- tensors
def unpermute_rotary(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undo llama.cpp's rotary permutation of a Q or K projection (or bias) with ``n_heads`` heads.

    llama.cpp writes the rows of each head as ``reshape(n_heads, 2, hd/2).swapaxes(1, 2)`` of
    Hugging Face's, interleaving the two halves; this reads them back in halves.
    """
    head_dim = weight.shape[0] // n_heads
    return weight.reshape(n_heads, head_dim // 2, 2, *weight.shape[1:]).transpose(1, 2).reshape(weight.shape)


_Source = tuple[list[str], Callable[..., torch.Tensor]]


def _same(t: torch.Tensor) -> torch.Tensor:
    return t


def _gguf_sources(name: str, config: ModelConfig) -> _Source | None:
    """The GGUF tensor(s) a Lite LLM tensor is made of, and how (None when there are none)."""
    fixed = {"embed.weight": "token_embd.weight", "norm.weight": "output_norm.weight", "lm_head.weight": "output.weight"}
    if name in fixed:
        return [fixed[name]], _same
    match = re.match(r"^layers\.(\d+)\.(.+)$", name)
    if not match:
        return None
    blk, part = f"blk.{match[1]}.", match[2]
    per_layer: dict[str, _Source] = {
        "attn_norm.weight": (["attn_norm.weight"], _same),
        "ffn_norm.weight": (["ffn_norm.weight"], _same),
        "attn.q_proj.weight": (["attn_q.weight"], lambda w: unpermute_rotary(w, config.n_heads)),
        "attn.k_proj.weight": (["attn_k.weight"], lambda w: unpermute_rotary(w, config.n_kv_heads)),
        "attn.v_proj.weight": (["attn_v.weight"], _same),
        "attn.o_proj.weight": (["attn_output.weight"], _same),
        "ffn.gate_proj.weight": (["ffn_gate.weight"], _same),
        "ffn.up_proj.weight": (["ffn_up.weight"], _same),
        "ffn.down_proj.weight": (["ffn_down.weight"], _same),
        f"ffn.router.heads.{_TIER}.expert_gate": (["ffn_gate_inp.weight"], _same),
        f"ffn.experts.{_TIER}.gate_up_proj": (["ffn_gate_exps.weight", "ffn_up_exps.weight"], lambda g, u: torch.cat([g, u], dim=1)),
        f"ffn.experts.{_TIER}.down_proj": (["ffn_down_exps.weight"], _same),
    }
    if part not in per_layer:
        return None
    names, combine = per_layer[part]
    return [blk + n for n in names], combine


def _source_shape(names: list[str], shapes: dict[str, tuple[int, ...]]) -> tuple[int, ...]:
    """The shape the combined sources will have (banks are concatenated along dim 1)."""
    first = shapes[names[0]]
    if len(names) == 1:
        return first
    return (first[0], sum(shapes[n][1] for n in names), *first[2:])


def _producer(tensors: dict[str, Any], names: list[str], combine: Callable[..., torch.Tensor], dtype: torch.dtype) -> Producer:
    return lambda: combine(*(dequantize(tensors[n]) for n in names)).to(dtype)


def plan_gguf(config: ModelConfig, tensors: dict[str, Any], specs: dict[str, TensorSpec], path: Path) -> dict[str, Producer]:
    """name -> producer for every tensor the checkpoint stores, checked against the file's
    tensor names and shapes before anything is dequantised."""
    shapes = {name: _shape(t) for name, t in tensors.items()}
    producers: dict[str, Producer] = {}
    used: set[str] = set()
    for name, spec in specs.items():
        source = _gguf_sources(name, config)
        if source is None and ROUTER_ONLY_STATE.match(name):
            producers[name] = lambda spec=spec: torch.zeros(spec.shape, dtype=spec.dtype)
            continue
        if source is None:
            raise CheckpointError(f"{path} has no counterpart of tensor {name}; this is a bug in the GGUF importer")
        names, combine = source
        missing = [n for n in names if n not in shapes]
        if missing:
            raise CheckpointError(f"{path} lacks tensor {missing[0]} that the model needs; re-convert it with a recent llama.cpp")
        if _source_shape(names, shapes) != spec.shape:
            raise CheckpointError(
                f"tensor {names[0]} in {path} has shape {shapes[names[0]]}, which does not fit the {spec.shape} its metadata implies; re-convert it with a recent llama.cpp"
            )
        producers[name] = _producer(tensors, names, combine, spec.dtype)
        used.update(names)
    extra = sorted(set(tensors) - used)
    if extra:
        raise ConfigError(f"{path} holds tensor(s) {', '.join(extra[:3])} that a plain llama model does not have; this variant cannot be imported yet")
    return producers


# ------------------------------------------------------------------------------- tokenizer
def gguf_tokenizer(path: Path, metadata: Mapping[str, Any] | None = None) -> HFTokenizerFiles | None:
    """The file's tokenizer, rebuilt by transformers' GGUF converter (None, with a warning,
    when transformers is missing or cannot convert it), with the file's chat template and
    every id that ends a generation (see :func:`gguf_eos_ids`)."""
    files = _converted_tokenizer(path)
    if files is not None and metadata is not None:
        template = metadata.get(_CHAT_TEMPLATE)
        if isinstance(template, str) and template:
            files.tokenizer.chat_template = template
        files.tokenizer.eos_ids = gguf_eos_ids(metadata, files.tokenizer) or files.tokenizer.eos_ids
        bos_id = metadata.get("tokenizer.ggml.bos_token_id")
        if isinstance(bos_id, int) and not isinstance(bos_id, bool):
            files.tokenizer.bos_token = files.tokenizer.backend.id_to_token(bos_id)
    return files


def gguf_eos_ids(metadata: Mapping[str, Any], tokenizer: BPETokenizer) -> list[int]:
    """``tokenizer.ggml.eos_token_id``, then ``eot_token_id`` when present, then ``<|im_end|>``
    when the chat template ends turns with it: generation must stop on each of them."""
    ids = [metadata[key] for key in (_EOS, _EOT) if isinstance(metadata.get(key), int)]
    return [int(i) for i in ids] + turn_end_ids(tokenizer)


def _converted_tokenizer(path: Path) -> HFTokenizerFiles | None:
    try:
        import transformers  # noqa: F401
    except ImportError:
        warnings.warn(f"the tokenizer of {path} is not imported: converting GGUF tokenizers needs transformers (`pip install transformers`)", stacklevel=4)
        return None
    try:
        hf_tokenizer = _convert_tokenizer(path)
        with tempfile.TemporaryDirectory() as tmp:
            hf_tokenizer.save_pretrained(tmp)
            return read_hf_tokenizer(tmp)
    except Exception as exc:  # noqa: BLE001 - any converter failure only costs the tokenizer
        warnings.warn(f"the tokenizer of {path} is not imported: transformers could not convert it ({type(exc).__name__}: {one_line(exc)})", stacklevel=4)
        return None


def _convert_tokenizer(path: Path) -> Any:
    """A transformers tokenizer for the GGUF file.

    transformers 5's GGUF module converts from the metadata alone in seconds; the public
    ``AutoTokenizer.from_pretrained(..., gguf_file=...)`` parses the whole file twice with the
    gguf reader first (about 4x slower on SmolLM2) and is the fallback for versions without it.
    """
    try:
        from transformers import PreTrainedTokenizerFast
        from transformers.integrations.gguf import convert_gguf_tokenizer, get_gguf_tokenizer

        architecture, tokenizer_dict, tokenizer_config = get_gguf_tokenizer(str(path))
        backend, extra = convert_gguf_tokenizer(architecture, tokenizer_dict)
        return PreTrainedTokenizerFast(tokenizer_object=backend, **{**tokenizer_config, **extra})
    except Exception:  # noqa: BLE001 - an internal API of another version: use the public route
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


__all__ = ["config_from_gguf", "dequantize", "gguf_eos_ids", "gguf_tokenizer", "import_gguf", "open_gguf", "plan_gguf", "read_metadata", "unpermute_rotary"]
