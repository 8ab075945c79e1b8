"""Parallel degrees (``dp=2,ep=2``) and the rule that fits them to a world size.

The rule (torchtitan's, where expert-parallel ranks are borrowed from the data-parallel ones):

    world size = dp x ep x tp x pp

* every one of the ``dp x ep`` *data ranks* reads its own rows of each global batch, and the
  dense weights are sharded over all of them (FSDP2);
* each tier's experts are split over the ``ep`` ranks of an expert-parallel group (one group per
  data-parallel replica), and each expert is held by ``dp`` ranks, one per replica;
* ``tp`` ranks split attention heads and the dense FFN inside each data rank: the ``tp`` ranks
  of one data rank read the same rows, and FSDP2 shards each one's slice over the data ranks;
* ``pp`` ranks hold consecutive blocks; each stage has its own ``dp x ep`` data ranks.

The mesh is ``(pp, dp, ep, tp)``, ``tp`` innermost, so the ranks of a ``tp`` group are
neighbours (on one machine, where their per-layer all-reduces belong).

So ``torchrun --nproc-per-node 4 ... --parallel dp=2,ep=2`` is four data ranks, each expert on
two of them.  Degrees left out are 1; ``dp`` left out is whatever the world size leaves over.
"""

from __future__ import annotations

import math

from dataclasses import dataclass

from ..errors import ConfigError

KEYS = ("dp", "ep", "tp", "pp")


@dataclass(frozen=True)
class ParallelDegrees:
    """How a run is split over its ranks (see the module docstring for the rule)."""

    dp: int = 1
    ep: int = 1
    tp: int = 1
    pp: int = 1

    @property
    def world_size(self) -> int:
        return self.dp * self.ep * self.tp * self.pp

    @property
    def data_ranks(self) -> int:
        """Ranks that read their own rows of each batch: data-parallel and expert-parallel ones."""
        return self.dp * self.ep

    def __str__(self) -> str:
        return ",".join(f"{k}={getattr(self, k)}" for k in KEYS)

    def to_dict(self) -> dict[str, int]:
        return {k: getattr(self, k) for k in KEYS}

    @classmethod
    def parse(cls, spec: str | dict | None, world_size: int) -> "ParallelDegrees":
        """Degrees from ``"dp=2,ep=2"`` (or a mapping, as the training YAML's ``parallel:``
        holds), checked against ``world_size``; ``dp`` defaults to what the others leave."""
        given = _parse_pairs(spec)
        rest = 1
        for key in ("ep", "tp", "pp"):
            rest *= given.get(key, 1)
        if "dp" not in given:
            if world_size % rest:
                raise ConfigError(
                    f"--parallel {_show(given)} needs a world size divisible by ep x tp x pp = {rest}, but torchrun started {world_size} "
                    f"processes; start a multiple of {rest} (world size = dp x ep x tp x pp)"
                )
            given["dp"] = world_size // rest
        degrees = cls(**given)
        if degrees.world_size != world_size:
            raise ConfigError(
                f"--parallel {degrees} needs dp x ep x tp x pp = {degrees.world_size} processes, but torchrun started {world_size}; "
                f"start {degrees.world_size} (--nproc-per-node) or change the degrees"
            )
        return degrees

    @staticmethod
    def processes_for(spec: str | dict | None) -> int:
        """How many processes ``spec`` asks for at the least (``dp`` left out counts 1): what a
        run started without torchrun is told to launch, and 1 when every degree is 1."""
        given = _parse_pairs(spec)
        return math.prod(given.get(key, 1) for key in KEYS)


def _parse_pairs(spec: str | dict | None) -> dict[str, int]:
    if spec is None or spec == "":
        return {}
    items = spec.items() if isinstance(spec, dict) else (_split_pair(part) for part in str(spec).split(","))
    out: dict[str, int] = {}
    for key, value in items:
        key = str(key).strip().lower()
        if key not in KEYS:
            raise ConfigError(f"unknown parallel degree {key!r} in --parallel; use dp, ep, tp and pp, e.g. dp=2,ep=2")
        if key in out:
            raise ConfigError(f"--parallel gives {key} twice; give each degree once, e.g. dp=2,ep=2")
        try:
            n = int(str(value).strip())
        except ValueError:
            n = 0
        if n < 1 or str(value).strip() != str(n):
            raise ConfigError(f"--parallel {key}={value} is not a whole number of at least 1; give e.g. {key}=2")
        out[key] = n
    return out


def _split_pair(part: str) -> tuple[str, str]:
    if "=" not in part:
        raise ConfigError(f"--parallel expects key=value pairs such as dp=2,ep=2, not {part.strip()!r}")
    key, value = part.split("=", 1)
    return key, value


def _show(given: dict[str, int]) -> str:
    return ",".join(f"{k}={v}" for k, v in given.items()) or "(none)"
