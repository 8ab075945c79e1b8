"""Where a run executes: choosing the device, and whether it computes bfloat16 natively.

``resolve_device`` turns what a user types (``auto``, ``cpu``, ``cuda``, ``cuda:N``) into a
``torch.device`` or one sentence saying why it cannot be had; ``auto`` takes the GPU when
there is one, because a user with a GPU who did not say otherwise wants it used.

``bf16_support`` says how bf16 mixed precision would run there, detected rather than assumed:
on CUDA from the device's compute capability (torch's own test); on a CPU from the instruction
set extensions the processor reports (torch's cpuinfo probe and ``/proc/cpuinfo``), since a
CPU without AMX or AVX512-BF16 still runs bf16 autocast, but by converting every element in
software, which is several times slower than fp32 — a user should hear that, not discover it.
"""

from __future__ import annotations

import platform
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import ConfigError

DEVICE_CHOICES = "auto, cpu, cuda or cuda:N"
_CUDA = re.compile(r"^cuda(?::(\d+))?$")

AMX = "bf16 via AMX"
AVX512_BF16 = "bf16 via AVX512-BF16"
ARM_BF16 = "bf16 via Arm BF16"
CUDA_NATIVE = "bf16 native on the GPU"
EMULATED = "no native bf16: emulated, slow"


def resolve_device(spec: str | torch.device | None = "auto") -> torch.device:
    """The ``torch.device`` that ``spec`` names, with an explicit CUDA index.

    ``auto`` (or None) is the current CUDA device when CUDA is available, else the CPU.
    Raises :class:`ConfigError` (one sentence) for CUDA asked for where there is none, a
    CUDA index past the last GPU, or anything that is not auto, cpu, cuda or cuda:N.
    """
    if isinstance(spec, torch.device):
        spec = "cpu" if spec.type == "cpu" else str(spec)
    text = "auto" if spec is None else str(spec).strip().lower()
    if text == "auto":
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    if text == "cpu":
        return torch.device("cpu")
    match = _CUDA.match(text)
    if match is None:
        raise ConfigError(f"unknown device {spec!r}; choose {DEVICE_CHOICES}")
    if not torch.cuda.is_available():
        why = "this torch was built without CUDA" if torch.version.cuda is None and torch.version.hip is None else "no CUDA GPU is visible"
        raise ConfigError(f"device {spec!r} asked for CUDA but {why} (torch.cuda.is_available() is False); use --device cpu or auto")
    count = torch.cuda.device_count()
    index = int(match.group(1)) if match.group(1) is not None else torch.cuda.current_device()
    if index >= count:
        raise ConfigError(f"device {spec!r} does not exist: this machine has {count} CUDA GPU(s), cuda:0 to cuda:{count - 1}")
    return torch.device("cuda", index)


@dataclass(frozen=True)
class Bf16Support:
    """How bf16 mixed precision runs on a device: ``native`` hardware or not, and ``how`` in
    words for the run header (one of the module's constants)."""

    native: bool
    how: str
    usable: bool = True  # False: autocast would refuse bf16 here (a GPU that cannot hold it)


def cpu_bf16_path(flags: set[str], machine: str | None = None) -> str:
    """Which bf16 path a CPU with these feature ``flags`` gets (the names ``/proc/cpuinfo`` and
    ``torch.cpu.get_capabilities()`` use).  AMX needs both its bf16 and its tile unit; oneDNN
    picks AMX over AVX512-BF16 when both exist, so that is the order here."""
    machine = (machine or platform.machine()).lower()
    if {"amx_bf16", "amx_tile"} <= flags:
        return AMX
    if "avx512_bf16" in flags:
        return AVX512_BF16
    if machine in ("aarch64", "arm64") and ("bf16" in flags or "sve_bf16" in flags):
        return ARM_BF16
    return EMULATED


def cpu_flags() -> set[str]:
    """The CPU's feature flags: torch's cpuinfo probe (the processor's own CPUID answer) and the
    kernel's ``/proc/cpuinfo`` line, together (either may be absent)."""
    flags: set[str] = set()
    capabilities = getattr(torch.cpu, "get_capabilities", None)
    if capabilities is not None:
        try:
            flags |= {name for name, value in capabilities().items() if value is True}
        except (RuntimeError, AttributeError):  # an old or unusual build: the kernel's list still counts
            pass
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return flags
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):  # x86 / Arm
            flags |= set(value.split())
            break
    return flags


def bf16_support(device: torch.device | str) -> Bf16Support:
    """How bf16 autocast runs on ``device`` (see :class:`Bf16Support`)."""
    device = torch.device(device)
    if device.type == "cuda":
        with torch.cuda.device(device):
            if torch.cuda.is_bf16_supported(including_emulation=False):
                return Bf16Support(True, CUDA_NATIVE)
            major, minor = torch.cuda.get_device_capability(device)
            if torch.cuda.is_bf16_supported(including_emulation=True):
                return Bf16Support(False, f"{EMULATED} (compute capability {major}.{minor} has no bf16 units)")
            return Bf16Support(False, f"bf16 unsupported on this GPU (compute capability {major}.{minor})", usable=False)
    if device.type == "cpu":
        how = cpu_bf16_path(cpu_flags())
        return Bf16Support(how != EMULATED, how)
    return Bf16Support(False, EMULATED)


def describe_device(device: torch.device | str) -> str:
    """The device in a few words for a run header, e.g. ``cuda:0 (NVIDIA H200)`` or ``cpu``."""
    device = torch.device(device)
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return str(device)


def module_device(module: torch.nn.Module) -> torch.device:
    """Where ``module``'s parameters live (the CPU for a module without any)."""
    first = next(module.parameters(), None)
    return first.device if first is not None else torch.device("cpu")
