"""A Hugging Face model folder -> a Lite LLM checkpoint, one tensor at a time.

Llama, Mistral, Qwen2 and Mixtral folders (``config.json`` plus ``model.safetensors`` or a
sharded ``model.safetensors.index.json``) are read lazily with :class:`SafetensorsReader` and
renamed through the name table of :mod:`.hf_mapping`; ``write_checkpoint`` with specs then asks
for one tensor at a time, so a model larger than memory converts in the memory of its largest
tensor (for Mixtral's per-expert files, one layer's expert bank).  Everything is checked from
names and headers before the first byte is written, and the checkpoint is written atomically,
so a failed import leaves nothing behind.
"""

from __future__ import annotations

import json
import os
import warnings
from collections import defaultdict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..checkpoint.manifest import one_line
from ..checkpoint.save import write_checkpoint
from ..checkpoint.lazy import LazyTensorFiles
from ..checkpoint.stream import TensorSpec
from ..config import ModelConfig
from ..data.tokenizer import HF_TOKENIZER_FILE, BPETokenizer
from ..errors import CheckpointError, ConfigError
from ..grow.tensors import LazyTensors, Producer, expected_specs
from .hf_mapping import MIXTRAL_CLASSIC_EXPERT, ROUTER_ONLY_STATE, config_from_hf, hf_names_to_lite, lite_names_to_hf, mixtral_block_to_fused

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "mixtral")
HF_CONFIG_FILE = "config.json"
HF_WEIGHTS_FILE = "model.safetensors"
HF_INDEX_FILE = "model.safetensors.index.json"
HF_GENERATION_CONFIG_FILE = "generation_config.json"
IM_END_TOKEN = "<|im_end|>"
# Tokenizer side files worth carrying along: special tokens and the chat template.  Lite LLM
# reads only tokenizer.json; these ride in the checkpoint's tokenizer/ folder so that an
# export gives them back to Hugging Face tools.
HF_TOKENIZER_EXTRAS = ("tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja", "chat_template.json")



class HFTokenizerFiles:
    """A BPE tokenizer plus the Hugging Face side files (``tokenizer_config.json`` ...) that
    describe its special tokens and chat template, saved together into a checkpoint."""

    def __init__(self, tokenizer: BPETokenizer, extras: Mapping[str, bytes]) -> None:
        self.tokenizer = tokenizer
        self.extras = dict(extras)

    def save(self, directory: str | os.PathLike) -> None:
        directory = Path(directory)
        self.tokenizer.save(directory)
        for name, data in self.extras.items():
            (directory / name).write_bytes(data)


def read_hf_tokenizer(folder: str | os.PathLike) -> HFTokenizerFiles | None:
    """The tokenizer of a Hugging Face folder (None when it has no ``tokenizer.json``)."""
    folder = Path(folder)
    if not (folder / HF_TOKENIZER_FILE).is_file():
        return None
    tokenizer = BPETokenizer.from_file(folder / HF_TOKENIZER_FILE)
    extras = {name: (folder / name).read_bytes() for name in HF_TOKENIZER_EXTRAS if (folder / name).is_file()}
    tok_config = _json_or_empty(folder / "tokenizer_config.json")
    tokenizer.chat_template = _chat_template(folder, tok_config)
    eos_ids = _id_list(_json_or_empty(folder / HF_GENERATION_CONFIG_FILE).get("eos_token_id"))
    eos_ids = eos_ids or _id_list(_json_or_empty(folder / HF_CONFIG_FILE).get("eos_token_id"))
    eos_token = tok_config.get("eos_token")
    eos_token = eos_token.get("content") if isinstance(eos_token, dict) else eos_token
    if not eos_ids and isinstance(eos_token, str) and tokenizer.backend.token_to_id(eos_token) is not None:
        eos_ids = [tokenizer.backend.token_to_id(eos_token)]
    tokenizer.eos_ids = [*(eos_ids or tokenizer.eos_ids), *turn_end_ids(tokenizer)]
    bos_token = tok_config.get("bos_token")
    bos_token = bos_token.get("content") if isinstance(bos_token, dict) else bos_token
    tokenizer.bos_token = bos_token if isinstance(bos_token, str) and bos_token else None
    return HFTokenizerFiles(tokenizer, extras)


def turn_end_ids(tokenizer: BPETokenizer) -> list[int]:
    """``<|im_end|>`` when the chat template ends each turn with it (ChatML models such as
    SmolLM2 and Qwen2): a reply is over there, whatever the file names as its eos."""
    template = tokenizer.chat_template or ""
    token_id = tokenizer.backend.token_to_id(IM_END_TOKEN)
    return [token_id] if IM_END_TOKEN in template and token_id is not None else []


def _json_or_empty(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _id_list(value: Any) -> list[int]:
    """An ``eos_token_id`` field (an int, a list of ints or null) as a list."""
    values = value if isinstance(value, list) else [value]
    return [int(v) for v in values if isinstance(v, int) and not isinstance(v, bool)]


def _chat_template(folder: Path, tok_config: dict) -> str | None:
    """The chat template: ``chat_template.jinja`` (transformers >= 4.43 saves it there),
    else ``chat_template.json``, else the ``chat_template`` field of tokenizer_config.json."""
    if (folder / "chat_template.jinja").is_file():
        return (folder / "chat_template.jinja").read_text(encoding="utf-8")
    template = _json_or_empty(folder / "chat_template.json").get("chat_template", tok_config.get("chat_template"))
    if isinstance(template, list):  # several named templates: the default one
        template = next((t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"), None)
    return template if isinstance(template, str) and template else None


def import_hf(src_dir: str | os.PathLike, out_dir: str | os.PathLike, *, dtype: torch.dtype | None = None) -> Path:
    """Convert the Hugging Face model folder ``src_dir`` into a Lite LLM checkpoint at ``out_dir``.

    Supports the llama, mistral, qwen2 and mixtral families (Mixtral in the classic per-expert
    layout or transformers 5's fused one), tied or untied embeddings, and copies the tokenizer
    when the folder has a ``tokenizer.json``.  ``dtype`` is the stored dtype (default: the
    embedding's dtype in the source).  Tensors are streamed: at most one (or one layer's
    Mixtral expert bank) is in memory at a time.  Raises :class:`ConfigError` or
    :class:`CheckpointError` with one sentence when the folder cannot be converted; nothing is
    left at ``out_dir`` then.  Returns the checkpoint's path.
    """
    src = Path(src_dir)
    hf_config = read_hf_config(src)
    config = lite_config(hf_config, src)
    source = HFWeights(src)
    if dtype is None:
        dtype = source.spec("model.embed_tokens.weight").dtype if "model.embed_tokens.weight" in source else torch.float32
    if not dtype.is_floating_point:
        raise ConfigError(f"dtype {dtype} is not a floating-point type; import as torch.float32, torch.bfloat16 or torch.float16")
    specs = expected_specs(config, dtype)
    producers = plan_import(config, source, specs, src)
    tokenizer = read_hf_tokenizer(src)
    return write_checkpoint(out_dir, config, LazyTensors(producers), specs=specs, tokenizer=tokenizer)


# ------------------------------------------------------------------------------- config
def read_hf_config(src: Path) -> dict[str, Any]:
    """``config.json`` of a Hugging Face folder as a dict, with its model_type checked."""
    if src.is_file():
        raise ConfigError(f"{src} is a file, not a Hugging Face model folder; pass the folder holding config.json and model.safetensors (or a GGUF file)")
    if not src.is_dir():
        raise ConfigError(f"Hugging Face model folder {src} does not exist; pass a folder holding config.json and model.safetensors")
    path = src / HF_CONFIG_FILE
    if not path.is_file():
        raise ConfigError(f"{src} has no {HF_CONFIG_FILE}; pass a Hugging Face model folder (config.json plus model.safetensors)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path} is not valid JSON ({one_line(exc)}); download the model folder again") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} does not hold a JSON object; download the model folder again")
    model_type = data.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ConfigError(
            f"cannot import Hugging Face architecture {model_type!r} from {src}; supported model types are {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    return data


def lite_config(hf_config: dict[str, Any], src: Path) -> ModelConfig:
    """The Lite LLM config, its context clamped to a sliding attention window if there is one.

    Lite LLM attends over the whole context; a model trained with a window of W tokens is
    computed exactly by full attention over at most W tokens, so that is the context it gets.
    """
    config = config_from_hf(hf_config)
    window = _sliding_window(hf_config)
    if window is not None and window < config.max_seq_len:
        warnings.warn(
            f"{src} uses sliding-window attention over {window} tokens, which Lite LLM does not implement; "
            f"max_seq_len is set to {window} so that the imported model computes exactly what the original does",
            stacklevel=3,
        )
        config = config.replace(max_seq_len=window)
    return config


def _sliding_window(hf_config: Mapping[str, Any]) -> int | None:
    window = hf_config.get("sliding_window")
    if hf_config.get("model_type") == "qwen2" and not hf_config.get("use_sliding_window", False):
        return None
    return int(window) if isinstance(window, int) and window > 0 else None


# ------------------------------------------------------------------------------- weights
class HFWeights(LazyTensorFiles):
    """name -> tensor over a Hugging Face folder's safetensors files, read on lookup."""

    def __init__(self, src: Path) -> None:
        super().__init__(_weight_files(src), fix="download the model folder again")


def _weight_files(src: Path) -> list[Path]:
    """The safetensors files of a folder: the index's shards, ``model.safetensors``, or failing
    both every ``*.safetensors`` file."""
    index = src / HF_INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            names = sorted(set(weight_map.values()))
        except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError):
            raise CheckpointError(f"{index} is not a valid safetensors index (no weight_map); download the model folder again") from None
        files = [src / n for n in names]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{src} lacks weight shard(s) {', '.join(missing[:3])} named in {HF_INDEX_FILE}; download the missing files")
        return files
    if (src / HF_WEIGHTS_FILE).is_file():
        return [src / HF_WEIGHTS_FILE]
    files = sorted(src.glob("*.safetensors"))
    if files:
        return files
    bins = sorted(p.name for p in src.glob("*.bin"))
    hint = f" (it has {bins[0]}: pickled weights are not read; convert them to safetensors first)" if bins else ""
    raise CheckpointError(f"{src} has no {HF_WEIGHTS_FILE} or {HF_INDEX_FILE}{hint}; download the model's safetensors weights")


class _SourceView:
    """The source in transformers 5's names: classic Mixtral expert files fused into banks.

    ``producers`` maps each name to a function reading (and for fused banks, stacking) it;
    ``shapes`` gives every tensor's shape from the headers alone.
    """

    def __init__(self) -> None:
        self.producers: dict[str, Producer] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}

    def add(self, name: str, shape: tuple[int, ...], produce: Producer) -> None:
        self.producers[name] = produce
        self.shapes[name] = tuple(shape)


def _source_view(source: HFWeights, config: ModelConfig, src: Path) -> _SourceView:
    view = _SourceView()
    classic: dict[str, dict[str, dict[int, str]]] = defaultdict(lambda: defaultdict(dict))  # layer -> w -> expert -> name
    for name in source:
        if name.endswith("rotary_emb.inv_freq"):
            continue  # a cache some old transformers saved; recomputed from rope_theta
        match = MIXTRAL_CLASSIC_EXPERT.match(name) if config.is_moe else None
        if match:
            classic[match["i"]][match["w"]][int(match["j"])] = name
            continue
        view.add(mixtral_block_to_fused(name), source.spec(name).shape, _reader(source, name))
    for layer, by_w in classic.items():
        _fuse_classic_layer(view, source, config, layer, by_w, src)
    if config.tie_embeddings:
        view.producers.pop("lm_head.weight", None)  # some tied checkpoints store the copy too
        view.shapes.pop("lm_head.weight", None)
    return view


def _fuse_classic_layer(
    view: _SourceView, source: HFWeights, config: ModelConfig, layer: str, by_w: dict[str, dict[int, str]], src: Path
) -> None:
    """Expose one layer's per-expert w1/w3/w2 matrices as the fused gate_up_proj and down_proj."""
    n_experts = config.tiers[0].num_experts
    names: dict[str, list[str]] = {}
    for w in ("w1", "w2", "w3"):
        have = by_w.get(w, {})
        if sorted(have) != list(range(n_experts)):
            raise CheckpointError(
                f"{src} has Mixtral layer {layer} {w} matrices for {len(have)} experts but config.json says num_local_experts={n_experts}; download the complete model folder"
            )
        names[w] = [have[j] for j in range(n_experts)]
    h, d = source.spec(names["w1"][0]).shape
    wanted = {"w1": (h, d), "w3": (h, d), "w2": (d, h)}
    for w, shape in wanted.items():
        bad = [n for n in names[w] if source.spec(n).shape != shape]
        if bad:
            raise CheckpointError(f"{src} has {bad[0]} of shape {source.spec(bad[0]).shape} where {shape} was expected; check that config.json belongs to these weights")
    prefix = f"model.layers.{layer}.mlp.experts."
    view.add(prefix + "gate_up_proj", (n_experts, 2 * h, d), _stacked(source, names["w1"], names["w3"]))
    view.add(prefix + "down_proj", (n_experts, d, h), _stacked(source, names["w2"]))


def _stacked(source: Mapping[str, torch.Tensor], *per_expert: list[str]) -> Producer:
    """A producer of the bank ``stack_j(cat(a_j, b_j, ...))`` over experts j: the fused
    layout's gate half first, as in ``MixtralExperts.gate_up_proj``."""
    return lambda: torch.stack([torch.cat([source[n] for n in names]) for names in zip(*per_expert, strict=True)])


def _reader(source: Mapping[str, torch.Tensor], name: str) -> Producer:
    return lambda: source[name]


def _cast(produce: Producer, dtype: torch.dtype) -> Producer:
    return lambda: produce().to(dtype)


def _zeros(spec: TensorSpec) -> Producer:
    return lambda: torch.zeros(spec.shape, dtype=spec.dtype)


def plan_import(config: ModelConfig, source: HFWeights, specs: Mapping[str, TensorSpec], src: Path) -> dict[str, Producer]:
    """name -> producer for every tensor the checkpoint stores, checked against the source's
    names and header shapes before anything is read."""
    view = _source_view(source, config, src)
    ours_to_theirs, unmapped = hf_names_to_lite(view.shapes, config)
    if unmapped:
        raise ConfigError(
            f"{src} holds tensor(s) {', '.join(sorted(unmapped)[:3])} that a {config.name.removeprefix('hf-')} model of this config.json does not have; check that config.json belongs to these weights"
        )
    extra = sorted(set(ours_to_theirs) - set(specs))
    if extra:
        raise ConfigError(f"{src} holds tensor {ours_to_theirs[extra[0]]}, which its config.json does not describe; check that config.json belongs to these weights")
    producers: dict[str, Producer] = {}
    hf_name_of = lite_names_to_hf(specs, config)
    for name, spec in specs.items():
        theirs = ours_to_theirs.get(name)
        if theirs is not None:
            if view.shapes[theirs] != spec.shape:
                raise ConfigError(
                    f"tensor {theirs} in {src} has shape {view.shapes[theirs]} but config.json implies {spec.shape}; check that config.json belongs to these weights"
                )
            producers[name] = _cast(view.producers[theirs], spec.dtype)
        elif ROUTER_ONLY_STATE.match(name):
            producers[name] = _zeros(spec)
        else:
            raise CheckpointError(f"{src} lacks tensor {hf_name_of.get(name, name)} that the model needs; download the complete model folder")
    return producers


__all__ = ["HFTokenizerFiles", "HFWeights", "import_hf", "plan_import", "read_hf_config", "read_hf_tokenizer"]
