"""Quantize a tier's experts (int8 / int4, group-wise symmetric; see
:mod:`lite_llm.checkpoint.quantization`) into a new checkpoint, through the same derived
checkpoint pipeline as growth: lazy source, background source verification, streamed write,
a record in ``progressive.json``.

Quantizing is not exact, so the pre-commit check measures instead of refusing: the relative
error ``||W - deq(q(W))|| / ||W||`` of every bank, recorded (largest and mean) with the
operation.  Only expert banks are quantized; router gates, dense weights and embeddings stay
as they are (they are small, and every token reads them).
"""

from __future__ import annotations

import dataclasses
import os
from concurrent.futures import Future
from pathlib import Path

import torch

from ..checkpoint.derived import check_new_output, copied_tokenizer, derivation_record, derive, with_record
from ..checkpoint.lazy import CheckpointTensors, check_sound, open_checkpoint
from ..checkpoint.quantization import BANKS, QUANTIZATIONS, dequantize, quantize
from ..checkpoint.manifest import next_minor_version
from ..checkpoint.save import write_checkpoint
from ..checkpoint.stream import TensorSpec
from ..config import ModelConfig
from ..errors import ConfigError
from .tensors import LazyTensors, Producer, Tensors, ref


def quantize_tier(config: ModelConfig, tensors: Tensors, *, tier: str, to: str) -> tuple[ModelConfig, LazyTensors]:
    """``(config, tensors)`` with ``tier``'s expert banks stored as ``to`` (a pure function:
    each quantized tensor is computed when it is looked up)."""
    if to not in QUANTIZATIONS:
        raise ConfigError(f"cannot quantize to {to!r}; choose one of {', '.join(QUANTIZATIONS)}")
    if not config.tiers:  # "unknown tier; this model has tiers (none)" would send the user looking for a name
        raise ConfigError("this model is dense: it has no tier of experts to quantize (only expert banks are quantized); quantize a tiered checkpoint")
    old = config.tier(tier)
    if old.quantization:
        raise ConfigError(f"tier {tier} is already {old.quantization}; quantize from the unquantized checkpoint it came from")
    if to == "int4" and (old.expert_hidden % 2 or config.d_model % 2):
        raise ConfigError(f"int4 packs two weights per byte, so d_model and the expert hidden size must be even (tier {tier}: {config.d_model}, {old.expert_hidden})")
    new_config = config.replace(tiers=[dataclasses.replace(t, quantization=to) if t.name == tier else t for t in config.tiers])
    producers: dict[str, Producer] = {}
    last: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # a writer asks for qweight, then qscale

    def part(name: str, i: int) -> torch.Tensor:
        pair = last.pop(name, None) if i == 1 else None
        if pair is None:
            pair = quantize(tensors[name], to)
            last.clear()
            last[name] = pair
        return pair[i]

    for name in tensors:
        if _bank_of(name, tier) is None:
            producers[name] = ref(tensors, name)
            continue
        producers[f"{name}.qweight"] = lambda name=name: part(name, 0)
        producers[f"{name}.qscale"] = lambda name=name: part(name, 1)
    return new_config, LazyTensors(producers)


def _bank_of(name: str, tier: str) -> str | None:
    parts = name.split(".")
    if len(parts) == 6 and parts[0] == "layers" and parts[2:5] == ["ffn", "experts", tier] and parts[5] in BANKS:
        return parts[5]
    return None


def quantize_checkpoint(
    source: str | os.PathLike, output: str | os.PathLike, *, tier: str, to: str, verify: bool = True, overwrite: bool = False
) -> Path:
    """Write ``source`` with ``tier`` quantized to ``to`` as a new checkpoint at ``output``
    (``overwrite``: replacing one there, once the new one is complete)."""
    out = Path(output)
    src = open_checkpoint(source, verify=False)
    check_new_output(out, src.path, "the quantized model", overwrite=overwrite)
    config, tensors = quantize_tier(src.config, src.tensors, tier=tier, to=to)
    return derive(
        src.path, out, lambda verified: _write(src, out, config, tensors, verified, tier, to),
        check_source=(lambda: check_sound(src.path)) if verify else None, what="the quantized model", overwrite=overwrite,
    )


def _write(src: CheckpointTensors, out: Path, config: ModelConfig, tensors: LazyTensors, verified: Future | None, tier: str, to: str) -> Path:
    errors = _errors(src, tier, to)
    record = derivation_record(
        src, "quantize", {"tier": tier, "to": to}, False, src.config, config,
        preservation={"relative_weight_error_max": max(errors), "relative_weight_error_mean": sum(errors) / len(errors)},
        note=f"expert banks of {tier} stored as group-wise symmetric {to}",
    )
    return write_checkpoint(
        out, config, tensors, specs=_specs(src, config, tensors), tokenizer=copied_tokenizer(src),
        progressive=with_record(src.progressive, record),
        before_commit=(lambda: verified.result()) if verified is not None else None,
        model_version=next_minor_version(src.manifest["model_version"]),
    )


def _specs(src: CheckpointTensors, config: ModelConfig, tensors: LazyTensors) -> dict[str, TensorSpec]:
    from ..checkpoint.quantization import stored_specs

    specs: dict[str, TensorSpec] = {}
    quantized = {t.name: stored_specs(t, config.d_model) for t in config.tiers if t.quantization}
    for name in tensors:
        parts = name.split(".")
        if len(parts) == 7 and parts[4] in quantized:
            dtype, shape = quantized[parts[4]][f"{parts[5]}.{parts[6]}"]
            specs[name] = TensorSpec(dtype, shape)
        else:
            specs[name] = src.tensors.spec(name)
    return specs


def _errors(src: CheckpointTensors, tier: str, to: str) -> list[float]:
    """Relative Frobenius error of every bank of ``tier`` after a round trip through ``to``."""
    out = []
    for name in src.tensors:
        if _bank_of(name, tier) is None:
            continue
        w = src.tensors[name].float()
        back = dequantize(*quantize(w, to), to)
        out.append(float(torch.linalg.vector_norm(w - back) / torch.linalg.vector_norm(w).clamp_min(1e-30)))
    return out or [0.0]
