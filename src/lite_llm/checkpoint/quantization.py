"""Quantized expert tiers on disk: group-wise symmetric int8 and int4, scales beside them.

A tier whose ``TierConfig.quantization`` is ``int8`` or ``int4`` stores each expert bank
``P`` (``gate_up_proj`` (E, 2H, d), ``down_proj`` (E, d, H)) as two tensors:

* ``P.qweight`` — int8 (E, rows, cols), or for int4 uint8 (E, rows, cols / 2) with two
  values per byte (low nibble the even column, offset by 8 so -8..7 maps to 0..15);
* ``P.qscale`` — float32 (E, rows, cols / g): one scale per ``g`` consecutive weights of a row
  (``g`` = 64, or the largest of 32, 16 that divides ``cols``, else the whole row).

``w ~ scale * q`` with ``scale = max |w| / qmax`` over the group (qmax 127 for int8, 7 for
int4), ``q = round(w / scale)``.  Expert ``e``'s bytes stay one contiguous run in each tensor,
so the store reads one expert of a quantized tier as it reads an unquantized one, and
dequantizes it on its way to the compute device.  A resident load dequantizes every bank into
float32 (:func:`dequantize_state`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import MutableMapping

import torch

from ..config import ModelConfig, TierConfig
from ..errors import CheckpointError

QUANTIZATIONS = ("int8", "int4")
QMAX = {"int8": 127, "int4": 7}
BANKS = ("gate_up_proj", "down_proj")


def group_size(cols: int) -> int:
    """Weights per scale along a row of ``cols``."""
    for g in (64, 32, 16):
        if cols % g == 0:
            return g
    return cols


def bank_shapes(tier: TierConfig, d_model: int) -> dict[str, tuple[int, int, int]]:
    """(E, rows, cols) of each bank of ``tier``."""
    e, h = tier.num_experts, tier.expert_hidden
    return {"gate_up_proj": (e, 2 * h, d_model), "down_proj": (e, d_model, h)}


def stored_specs(tier: TierConfig, d_model: int) -> dict[str, tuple[torch.dtype, tuple[int, ...]]]:
    """suffix (``gate_up_proj.qweight`` ...) -> (dtype, shape) a quantized tier stores per layer."""
    out: dict[str, tuple[torch.dtype, tuple[int, ...]]] = {}
    for bank, (e, rows, cols) in bank_shapes(tier, d_model).items():
        packed = cols // 2 if tier.quantization == "int4" else cols
        out[f"{bank}.qweight"] = (torch.uint8 if tier.quantization == "int4" else torch.int8, (e, rows, packed))
        out[f"{bank}.qscale"] = (torch.float32, (e, rows, cols // group_size(cols)))
    return out


def quantize(weight: torch.Tensor, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``weight`` (..., cols) -> (qweight, qscale) as the module docstring lays them out."""
    if kind not in QMAX:
        raise CheckpointError(f"unknown quantization {kind!r}; choose one of {', '.join(QUANTIZATIONS)}")
    cols = weight.shape[-1]
    if kind == "int4" and cols % 2:
        raise CheckpointError(f"int4 packs two weights per byte, so rows need an even length; this bank's rows have {cols}")
    g = group_size(cols)
    w = weight.float().reshape(*weight.shape[:-1], cols // g, g)
    scale = w.abs().amax(-1) / QMAX[kind]
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero group: any scale
    q = torch.round(w / scale[..., None]).clamp(-QMAX[kind], QMAX[kind]).to(torch.int8).reshape(weight.shape)
    if kind == "int4":
        u = (q + 8).to(torch.uint8)
        q = u[..., 0::2] | (u[..., 1::2] << 4)
    return q.contiguous(), scale.contiguous()


def dequantize(qweight: torch.Tensor, qscale: torch.Tensor, kind: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The float weights of ``(qweight, qscale)``."""
    if kind == "int4":
        lo = (qweight & 0x0F).to(torch.int8) - 8
        hi = (qweight >> 4).to(torch.int8) - 8
        q = torch.stack([lo, hi], dim=-1).reshape(*qweight.shape[:-1], qweight.shape[-1] * 2)
    else:
        q = qweight
    cols = q.shape[-1]
    g = cols // qscale.shape[-1]
    w = q.float().reshape(*q.shape[:-1], cols // g, g) * qscale[..., None]
    return w.reshape(q.shape).to(dtype)


def dequantize_state(config: ModelConfig, state: MutableMapping[str, torch.Tensor], dtype: torch.dtype | None = None) -> None:
    """Replace, in place, every quantized bank's ``qweight``/``qscale`` pair in ``state`` by
    the float bank (what a model holding every expert needs), in ``dtype`` (default: the
    embedding's)."""
    if dtype is None:
        dtype = state["embed.weight"].dtype if "embed.weight" in state else torch.float32
    for tier in config.tiers:
        if not tier.quantization:
            continue
        for layer in config.moe_layer_indices:
            for bank in BANKS:
                name = f"layers.{layer}.ffn.experts.{tier.name}.{bank}"
                if f"{name}.qweight" in state and f"{name}.qscale" in state:
                    state[name] = dequantize(state.pop(f"{name}.qweight"), state.pop(f"{name}.qscale"), tier.quantization, dtype)


def float_banks_config(config: ModelConfig) -> ModelConfig:
    """``config`` with no tier quantized: what a model built from a quantized checkpoint holds
    (:func:`dequantize_state` gave it float banks, which training then moves), so what saving
    it writes.  A saved config that still said int8 over float banks would send the expert
    store looking for ``qweight``/``qscale`` tensors that are not there."""
    if not any(t.quantization for t in config.tiers):
        return config
    return config.replace(tiers=[dataclasses.replace(t, quantization=None) for t in config.tiers])
