"""Joining a ``torchrun`` launch: the process group, the device mesh, one sentence on failure.

``torchrun`` sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and the rendezvous address; a run
started without them is single-process and never touches ``torch.distributed``.  The backend
is nccl on CUDA and gloo on the CPU.  Every collective waits at most ``timeout_s``: a rank that
dies makes the others stop with :class:`RankLostError` instead of hanging.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from ..errors import LiteLLMError
from .degrees import ParallelDegrees

DEFAULT_TIMEOUT_S = 120.0


class RankLostError(LiteLLMError):
    """Another rank of a distributed run stopped answering (it died, or its network went)."""


def launched_by_torchrun() -> bool:
    """Whether this process is one rank of a ``torchrun`` launch with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


@dataclass
class Ranks:
    """This process's place in a distributed run."""

    degrees: ParallelDegrees
    mesh: DeviceMesh  # dims ("pp", "dp", "ep", "tp")
    device: torch.device
    data_mesh: DeviceMesh  # the dp x ep data ranks of this rank's tp index, as one dimension (dense weights are sharded over it)

    @property
    def rank(self) -> int:
        return dist.get_rank()

    @property
    def is_main(self) -> bool:
        """Rank 0: the one that prints progress and writes metrics."""
        return dist.get_rank() == 0

    @property
    def data_rank(self) -> int:
        """Which slice of each global batch this rank reads (the same on the ``tp`` ranks of one data rank)."""
        return self.data_mesh.get_local_rank()

    @property
    def data_group(self) -> dist.ProcessGroup:
        return self.data_mesh.get_group()


def init_distributed(degrees_spec: str | dict | None, device: torch.device, timeout_s: float = DEFAULT_TIMEOUT_S) -> Ranks:
    """Join the process group torchrun set up and build the device mesh for ``degrees_spec``.

    The degrees are checked against the world size before any collective runs, so a wrong
    ``--parallel`` ends every rank with the same sentence."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    degrees = ParallelDegrees.parse(degrees_spec, world)
    device = join_process_group(device, timeout_s)
    mesh = init_device_mesh(
        device.type, (degrees.pp, degrees.dp, degrees.ep, degrees.tp), mesh_dim_names=("pp", "dp", "ep", "tp")
    )
    data_mesh = mesh["dp", "ep"]._flatten("data")
    if degrees.tp > 1 and degrees.data_ranks > 1:
        # FSDP2 puts tensor-parallel weights on the 2-D (data, tp) mesh; with this flattened
        # twin a reduction over both (the gradient norm) is one all-reduce, not two in a row
        mesh["dp", "ep", "tp"]._flatten("data_tp")
    return Ranks(degrees, mesh, device, data_mesh)


def join_process_group(device: torch.device, timeout_s: float = DEFAULT_TIMEOUT_S) -> torch.device:
    """Join the process group torchrun set up (once; later calls change nothing) and return
    this rank's device: ``cuda:LOCAL_RANK`` on CUDA.  A run may join before it knows its
    degrees (a resumed run reads them from its checkpoint, which the ranks verify together)."""
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(seconds=timeout_s))
    return device


def describe_collective_failure(exc: BaseException) -> str | None:
    """One sentence for an error a collective raised because a peer went away, else None."""
    text = str(exc)
    lost = ("Connection closed by peer", "Connection reset by peer", "Timed out", "timed out", "Broken pipe", "NCCL", "Socket Timeout")
    if isinstance(exc, (RuntimeError, dist.DistBackendError, ConnectionError)) and any(s in text for s in lost):
        first = text.strip().splitlines()[0][:160] if text.strip() else type(exc).__name__
        rank = dist.get_rank() if dist.is_initialized() else "?"
        return (
            f"rank {rank} lost contact with another rank of the distributed run ({first}); the run stopped — "
            f"restart it with --resume to continue from the last complete sharded checkpoint"
        )
    return None


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
