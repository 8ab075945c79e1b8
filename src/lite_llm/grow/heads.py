"""Head growth: more attention heads, head_dim fixed.

head_dim stays as it is because RoPE's frequencies and the 1/sqrt(head_dim) attention scale
depend on it; d_model stays as it is too, so only q_proj and o_proj (and k/v_proj when KV
groups are added) grow.  Every method is a *head plan* (:class:`HeadPlan`): for each new query
head the head it copies and the share of that head's ``o_proj`` columns it gets, and for each
new KV head the KV head it copies.  A copied query head that reads a copy of its source's KV
head computes exactly its source's attention output; since the shares of a head's ``o_proj``
columns sum to one over the head and its copies, ``o_proj`` sums to the same output.

Under grouped-query attention query head h reads KV head h // (H / KV), so a copy is only
exact when it sits in a group whose KV head copies its source's KV head:

* ``split``: whole KV groups are duplicated (KV head and its query heads); the o_proj columns
  of a head and its copies are split unequally (``split``, ``split`` of the rest, ...).
* ``copy``: the same topology, but the copies' o_proj columns are zero: silent new heads.
* ``gqa``: the KV heads stay; query heads are added inside each group, copying that group's
  heads cyclically, o_proj columns split as in ``split``.  Old head j of group g moves from
  index g*q + j to g*q' + j (q, q' = query heads per group before and after).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from ..config import ModelConfig
from ..errors import ConfigError
from .common import check_room
from .registry import register
from .tensors import LazyTensors, Producer, Tensors, ref
from .width import check_split, copy_ranks, lazy_in_order, split_shares, work_dtype

HEAD_METHODS: tuple[str, ...] = ("split", "copy", "gqa")
_QUERY = re.compile(r"layers\.\d+\.attn\.q_proj\.(weight|bias)")
_KEY_VALUE = re.compile(r"layers\.\d+\.attn\.[kv]_proj\.(weight|bias)")
_OUTPUT = re.compile(r"layers\.\d+\.attn\.o_proj\.weight")


@dataclass(frozen=True)
class HeadPlan:
    """Where every head of the grown attention comes from.

    ``head_source[h]``: the old query head new head h copies; ``o_share[h]``: the fraction of
    that head's o_proj columns it gets (the shares of one source sum to one); ``kv_source[g]``:
    the old KV head new KV head g copies.
    """

    head_source: list[int]
    o_share: list[float]
    kv_source: list[int]

    @property
    def n_heads(self) -> int:
        return len(self.head_source)

    @property
    def n_kv_heads(self) -> int:
        return len(self.kv_source)

    def check_groups(self, old_per_group: int) -> None:
        """Every new query head must read a copy of the KV head its source read (else the
        copy attends over other keys and values, and the function changes)."""
        per_group = self.n_heads // self.n_kv_heads
        for h, src in enumerate(self.head_source):
            if self.kv_source[h // per_group] != src // old_per_group:
                raise RuntimeError(f"head plan bug: new head {h} copies head {src} but reads a copy of another KV head")


def _shares(source: list[int], method: str, split: float) -> list[float]:
    """o_proj shares: unequal split among a head and its copies, or all to the original (copy)."""
    if method == "copy":
        ranks, _ = copy_ranks(source)
        return [1.0 if rank == 0 else 0.0 for rank in ranks]
    return split_shares(source, split)


def group_copy_plan(config: ModelConfig, n_heads: int, method: str, split: float) -> HeadPlan:
    """Methods ``split``/``copy``: add whole KV groups; new group g copies group g mod KV.

    With q query heads per group new head h copies head h mod H (the same position in the
    copied group), and new KV head g copies KV head g mod KV.
    """
    H, KV, q = config.n_heads, config.n_kv_heads, config.kv_groups
    if n_heads % q:
        bigger = (n_heads // q + 1) * q
        raise ConfigError(
            f"n_heads={n_heads} would break groups: mode {method!r} copies whole KV groups of {q} query heads, so n_heads must be "
            f"a multiple of {q} (e.g. {bigger}); use mode 'gqa' to add query heads inside the existing groups"
        )
    source = [h % H for h in range(n_heads)]
    return HeadPlan(source, _shares(source, method, split), [g % KV for g in range(n_heads // q)])


def gqa_plan(config: ModelConfig, n_heads: int, split: float) -> HeadPlan:
    """Method ``gqa``: KV heads unchanged; group g's q' query heads copy its q heads cyclically.

    New head g*q' + j copies old head g*q + (j mod q), which reads KV head g like the copy.
    """
    KV, q = config.n_kv_heads, config.kv_groups
    if n_heads % KV:
        bigger = (n_heads // KV + 1) * KV
        raise ConfigError(
            f"n_heads={n_heads} is a GQA growth that would break groups: mode 'gqa' keeps the {KV} KV heads, so n_heads must be "
            f"a multiple of {KV} (e.g. {bigger}); use mode 'split' to add whole groups"
        )
    new_q = n_heads // KV
    source = [g * q + j % q for g in range(KV) for j in range(new_q)]
    return HeadPlan(source, split_shares(source, split), list(range(KV)))


def head_plan(config: ModelConfig, n_heads: int, method: str, split: float) -> HeadPlan:
    """The checked plan of ``method`` growing ``config`` to ``n_heads`` query heads."""
    if method not in HEAD_METHODS:
        raise ConfigError(f"unknown heads growth mode {method!r}; choose one of {', '.join(HEAD_METHODS)}")
    if not isinstance(n_heads, int) or isinstance(n_heads, bool) or n_heads <= config.n_heads:
        raise ConfigError(f"n_heads must be an integer larger than the current {config.n_heads} (heads growth only adds heads), got {n_heads!r}")
    check_split(split)
    if n_heads % (config.n_kv_heads if method == "gqa" else config.kv_groups) == 0:  # else the plan says why it cannot be
        kv = config.n_kv_heads if method == "gqa" else n_heads // config.kv_groups
        check_room(config.replace(n_heads=n_heads, n_kv_heads=kv), what=f"heads growth to n_heads={n_heads}")  # before a plan of that many heads
    plan = gqa_plan(config, n_heads, split) if method == "gqa" else group_copy_plan(config, n_heads, method, split)
    plan.check_groups(config.kv_groups)
    return plan


def head_rows(heads: list[int], head_dim: int) -> torch.Tensor:
    """The row indices (in a (heads*head_dim, ...) projection) of ``heads``, in order."""
    return (torch.tensor(heads)[:, None] * head_dim + torch.arange(head_dim)[None, :]).flatten()


def grow_output(o_proj: torch.Tensor, plan: HeadPlan, head_dim: int) -> torch.Tensor:
    """o_proj (d, H*hd) -> (d, H'*hd): each new head's columns are its source's times its share."""
    cols = o_proj.to(work_dtype(o_proj)).index_select(1, head_rows(plan.head_source, head_dim))
    shares = torch.tensor(plan.o_share, dtype=cols.dtype).repeat_interleave(head_dim)
    return (cols * shares).to(o_proj.dtype)


def _head_producer(tensors: Tensors, name: str, plan: HeadPlan, head_dim: int) -> Producer:
    """Query rows follow ``head_source``, key/value rows ``kv_source``; biases follow their rows."""
    if _QUERY.fullmatch(name):
        rows = head_rows(plan.head_source, head_dim)
        return lambda: tensors[name].index_select(0, rows)
    if _KEY_VALUE.fullmatch(name):
        rows = head_rows(plan.kv_source, head_dim)
        return lambda: tensors[name].index_select(0, rows)
    if _OUTPUT.fullmatch(name):
        return lambda: grow_output(tensors[name], plan, head_dim)
    return ref(tensors, name)


@register("heads", family="heads", exact=True)
def add_heads(config: ModelConfig, tensors: Tensors, *, n_heads: int, mode: str = "split", split: float = 0.6) -> tuple[ModelConfig, LazyTensors]:
    """Grow to ``n_heads`` query heads with head_dim and d_model fixed — exact.

    ``mode``: ``split`` duplicates whole KV groups and splits the o_proj columns of each head
    and its copies as ``split``, ``split`` of the rest, ...; ``copy`` duplicates whole groups
    with silent copies (o_proj columns zero); ``gqa`` adds query heads inside the existing
    groups (n_kv_heads unchanged), o_proj split as in ``split``.
    """
    plan = head_plan(config, n_heads, mode, split)
    new_config = config.replace(n_heads=plan.n_heads, n_kv_heads=plan.n_kv_heads)
    producers = {name: _head_producer(tensors, name, plan, config.head_dim) for name in tensors}
    return new_config, lazy_in_order(producers)
