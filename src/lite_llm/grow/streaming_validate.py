"""The preservation check that streams: two models evaluated block by block, in float64,
from their lazy tensor mappings.

Why it is built this way (DESIGN.md, "Exactness, measured"):

* **float64.**  fp32 sums taken in another order differ by ~1e-6 relative per layer: a
  width-grown SmolLM2 (30 layers, logits near 37) differed from its source by 1.3e-4 in fp32
  although it is exact in real arithmetic.  Every stored weight converts to float64 exactly,
  so in float64 what remains is the rounding of the grown weights themselves.  A depth step
  not meant to be exact may be measured in float32 instead (``dtype``; ``validate: auto``
  does): re-ordering blocks changes the logits far beyond float32's rounding.
* **One block at a time.**  Materialising both models held two whole models (3.5 GiB and 9x
  the growth's time for SmolLM2 grown to 40 layers).  Here the sample's hidden states (128
  tokens by default, a few MB) go through one block at a time.  Within a block each projection
  gets its float64 weights only while it runs (:class:`_OnUse`): looked up in the lazy mapping,
  copied into a reused float64 buffer (fresh 100 MB allocations cost more in page faults than
  the copy), given back when it returns.  Memory: one matrix in float64 (and the pool's one
  buffer per matrix size), a block's norms and routers, the states, and the embedding-sized
  tensors at the two ends — small enough to run beside the writer (:mod:`.expand`).
* **Shared blocks are computed once.**  A grown block whose tensors are bitwise those of the
  original's next block, fed bitwise the states the original feeds it, gives bitwise the
  original's output.  So depth growth costs the original's forward plus its new blocks.  A
  tensor the growth passes on unchanged (:func:`~lite_llm.grow.tensors.origin`) is known to be
  the same without reading it twice; a growth's block that is not all passed on is computed
  as new; blocks of two checkpoints on disk are compared bitwise, one tensor pair at a time.
  A new block whose residual writers (``o_proj``, ``down_proj``) are all zeros, a LLaMA-Pro
  block as it is born, adds exactly zero on finite inputs: it is read and passed over
  (:meth:`_Model.writes_nothing`), not computed; writers made as
  :class:`~lite_llm.grow.tensors.Zeros` are not even read.
* **The head in slices.**  The final norm and the head are applied one slice of the
  vocabulary at a time, and the next-token losses come from the same slices (a running
  log-sum-exp).  A head that lies unchanged in a file is read slice by slice from it (a widened
  one made slice by slice from its source's), and of the embedding only the sample's rows are
  read (:func:`~.tensors.row_reader`).  When the
  grown head is the original's passed on unchanged, both models' states go through each slice;
  when it differs (width growth), the two heads go slice by slice together, and only when
  neither can be read by rows are the grown model's logits kept (tokens x vocabulary) while its
  head is dropped and the original's made, so at most one whole head is in memory.
* **Gradient flow where growth created something.**  The first and the last grown block that
  is not shared with the original (every growth builds its blocks alike, so not all of them)
  are loaded whole in float32, or bf16 for a dense block stored so (whether a gradient is all
  zero is structure, which these answer as float64 does, at a half or a quarter of the memory:
  :meth:`_Model.grad_dtype`), and run forward and backward on their first ``GRAD_TOKENS``
  tokens under a fixed random projection of the output (plus the routers' balance and
  z-losses).  A parameter with an all-zero gradient gets one plain SGD step of the whole block
  and a second chance (a LLaMA-Pro block's q/k/v sit behind its zeroed o_proj); a tier whose
  experts the sample never reaches is swept again under that tier alone (:func:`_tier_masks`).  The
  embedding, final norm and head are not checked: their gradients come straight from the loss
  and the residual stream.
* **On any device, still float64.**  The tensors are read on the CPU (the mappings are lazy
  files); the float64 buffers, the states and the arithmetic are on ``device``.  A GPU
  computes float64 to the same IEEE rules (the sums in another order: ~1e-16 relative), so the
  figures agree with the CPU's far below any tolerance.
"""

from __future__ import annotations

import math
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Iterator, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig, TierSet
from ..runtime.cpu_linear import faster_float32_linear
from ..runtime.cpu_memory import release_freed_memory
from ..model.layers import RMSNorm, rope_tables
from ..model.transformer import Block
from .tensors import LazyTensors, RowReader, StoredRows, Tensors, known_zeros, layer_names, layer_prefix, origin, row_reader, stored_names, stored_rows, stored_spec

FP64 = torch.float64
GRAD_DTYPE = torch.float32  # of the gradient-flow check, unless a bf16 dense block allows less (see grad_dtype)
GRAD_TOKENS = 8  # tokens of the gradient-flow check (whether a gradient exists needs few)
SGD_LR = 1e-2
HEAD_SLICE_BYTES = 8 * 1024**2  # bytes of one slice of the head's rows


@dataclass
class Comparison:
    """Raw figures of one streamed comparison of an original ``a`` and a grown ``b``."""

    max_abs: float  # max |a - b| over every logit of the sample
    scale: float  # max |a|
    sse: float  # sum of (a - b)^2
    logits: int  # how many logits were compared
    loss_a: float | None  # None when proved (no sample was evaluated)
    loss_b: float | None
    tokens: int
    params_a: int  # parameters the tensors hold (embedding counted once when tied)
    params_b: int
    new_params: list[str] = field(default_factory=list)  # grown parameters gradient-checked (first and last unshared block)
    dead_params: list[str] = field(default_factory=list)  # of those, the ones still without gradient
    shared_blocks: int = 0  # grown blocks computed once for both models
    silent_blocks: int = 0  # grown blocks proven to add nothing to the residual stream, not computed
    proved: bool = False  # the grown model is the original by construction (:func:`prove_unchanged`)


class Beside(Protocol):
    """The writer a check runs beside (``grow/expand.py``), as the check sees it."""

    def large(self) -> AbstractContextManager:
        """Held while the check holds more than a matrix (the embedding-sized tensors at the two
        ends, a gradient-checked block), so that the writer and the check take turns at holding
        large tensors and their peaks do not add."""
        ...

    def poll(self) -> None:
        """Raises when the check should stop (the writer has failed); called between blocks."""
        ...


class _Buffers:
    """Buffers of the check's dtype reused from matrix to matrix, pooled by size (a model's
    blocks share their shapes, and fresh 100 MB allocations cost more in page faults than the
    copy)."""

    def __init__(self, device: torch.device, dtype: torch.dtype = FP64) -> None:
        self._free: dict[int, list[torch.Tensor]] = {}
        self.device, self.dtype = device, dtype

    def take(self, t: torch.Tensor) -> torch.Tensor:
        return self._buffer(t.shape).copy_(t)

    def take_named(self, tensors: Tensors, name: str) -> torch.Tensor:
        """``take(tensors[name])``, read straight from its file into the buffer when it is stored
        and the buffer is on the CPU (:meth:`~.tensors.StoredRows.copy_into`)."""
        rows = stored_rows(tensors, name) if self.device.type == "cpu" else None
        return rows.copy_into(self._buffer(rows.shape)) if rows is not None else self.take(tensors[name])

    def _buffer(self, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
        pool = self._free.get(math.prod(shape))
        return pool.pop().view(shape) if pool else torch.empty(shape, dtype=self.dtype, device=self.device)

    def give(self, tensors) -> None:
        for t in tensors:
            self._free.setdefault(t.numel(), []).append(t.detach().reshape(-1))

    def clear(self) -> None:
        """Drop the pooled buffers (before something else needs the memory more)."""
        self._free.clear()


class _OnUse:
    """Forward hooks that give an ``nn.Linear`` its float64 weights only while it runs.

    A block's matrices are most of its bytes; held all at once in float64 a 45M-parameter
    block is 361 MB.  Filled from the lazy mapping the moment each projection runs and given
    back to the pool when it returns, the block's resident float64 is one matrix and the pool
    one buffer per matrix size — so the check can run beside the writer within the memory
    the growth promises.  Forward without autograd only (the gradient check loads its block
    whole)."""

    def __init__(self, module: nn.Linear, names: dict[str, str], model: "_Model", buffers: _Buffers) -> None:
        self.module, self.names, self.model, self.buffers = module, names, model, buffers
        self.handles = [module.register_forward_pre_hook(self.fill), module.register_forward_hook(self.empty)]

    def fill(self, module: nn.Module, args) -> None:
        for attr, name in self.names.items():
            module._parameters[attr] = nn.Parameter(self.buffers.take_named(self.model.tensors, name), requires_grad=False)

    def empty(self, module: nn.Module, args, output) -> None:
        for attr in self.names:
            weight = module._parameters[attr]
            self.buffers.give([weight])
            module._parameters[attr] = nn.Parameter(torch.empty(weight.shape, device="meta"), requires_grad=False)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def _block_key(config: ModelConfig, layer: int) -> tuple:
    """What, besides its tensors, a block's function depends on (MoE routing breaks ties by
    the layer index, so a MoE block is only shared at the same index)."""
    key = (config.d_model, config.n_heads, config.n_kv_heads, config.head_dim, config.norm_eps, config.rope_theta, config.attention_bias)
    if config.is_moe_layer(layer):
        return key + (layer, repr(config.tiers), repr(config.routing))
    return key


def _same_layer(ta: Tensors, i: int, tb: Tensors, j: int) -> bool:
    """Whether layer ``i`` of ``ta`` and layer ``j`` of ``tb`` hold bitwise the same tensors
    (read one pair at a time, stopping at the first difference)."""
    names = layer_names(list(ta), i)
    if sorted(names) != sorted(layer_names(list(tb), j)):
        return False
    for name in names:
        x, y = ta[layer_prefix(i) + name], tb[layer_prefix(j) + name]
        if x.dtype != y.dtype or not _equal(x, y):
            return False
    return True


def _one_origin(ta: Tensors, na: str, tb: Tensors, nb: str) -> bool:
    """Whether ``tb[nb]`` is ``ta[na]`` passed on unchanged (known without reading either)."""
    (ma, ka), (mb, kb) = origin(ta, na), origin(tb, nb)
    return ma is mb and ka == kb


def _layer_of_one_origin(ta: Tensors, i: int, tb: Tensors, j: int) -> bool:
    names_a, names_b = layer_names(list(ta), i), layer_names(list(tb), j)
    pa, pb = layer_prefix(i), layer_prefix(j)
    return sorted(names_a) == sorted(names_b) and all(_one_origin(ta, pa + n, tb, pb + n) for n in names_b)


def _allowed(config: ModelConfig) -> torch.Tensor | None:
    """The default TierSet's mask, as ``LiteLLM.allowed_tiers(None)`` gives it."""
    if not config.is_moe:
        return None
    names = set(TierSet.coerce(None).resolve(config))
    return torch.tensor([t.name in names for t in config.tiers], dtype=torch.bool)


class _Model:
    """One side of the comparison: its config, tensors, RoPE tables and tier mask."""

    def __init__(self, config: ModelConfig, tensors: Tensors, seq: int, device: torch.device, dtype: torch.dtype = FP64) -> None:
        expected, held = set(stored_names(config)), set(tensors)
        if expected != held:
            odd = sorted(expected ^ held)[0]
            raise ValueError(f"the tensors do not fit the config ({odd} is {'missing' if odd in expected else 'extra'})")
        self.config, self.tensors = config, tensors
        self.names = list(tensors)
        cos, sin = rope_tables(config.head_dim, config.rope_theta, torch.arange(seq))
        self.cos, self.sin = cos.to(device, dtype), sin.to(device, dtype)  # cast once, not in every block
        allowed = _allowed(config)
        self.allowed = allowed.to(device) if allowed is not None else None
        self.device, self.dtype = device, dtype
        self.params = 0
        self._param_shapes: dict[tuple, list[tuple[str, tuple[int, ...]]]] = {}

    def _new_block(self, layer: int) -> Block:
        if self.config.is_moe_layer(layer):
            # The router computes its routing tables (buffers no checkpoint holds) when built,
            # which the meta device cannot do; the expert banks start as (lazily paged) zeros.
            return Block(self.config, layer)
        with torch.device("meta"):  # no allocation and no random initialisation
            return Block(self.config, layer)

    def _load(self, block: Block, state: dict[str, torch.Tensor], layer: int, streamed: frozenset[str] = frozenset()) -> None:
        """Assign ``state`` to ``block``: every tensor the block has, except the ``streamed``
        ones, must be there, and nothing else."""
        try:
            result = block.load_state_dict(state, strict=False, assign=True)
        except RuntimeError as exc:
            raise ValueError(f"layer {layer}'s tensors do not fit the config ({' '.join(str(exc).split())[:200]})") from None
        missing = sorted(set(result.missing_keys) - streamed)
        if missing or result.unexpected_keys:
            odd = missing[0] if missing else result.unexpected_keys[0]
            raise ValueError(f"layer {layer}'s tensors do not fit the config ({layer_prefix(layer)}{odd} is {'missing' if missing else 'extra'})")
        for module in block.modules():  # what no checkpoint holds (the router's tables) to the device; the rest is there
            for name, buffer in module._buffers.items():
                if buffer is not None and not buffer.is_meta and buffer.device != self.device:
                    module._buffers[name] = buffer.to(self.device)

    def streamed_block(self, layer: int, buffers: _Buffers) -> tuple[Block, dict[str, torch.Tensor], list[_OnUse]]:
        """Block ``layer`` for a forward without autograd: its projections get their float64
        weights as they run (:class:`_OnUse`); the rest (norms, routers, expert banks) is read
        into float64 buffers now, one tensor at a time."""
        block = self._new_block(layer)
        prefix = layer_prefix(layer)
        names = layer_names(self.names, layer)
        on_use, streamed = [], set()
        for path, module in block.named_modules():
            if isinstance(module, nn.Linear):
                owned = {attr: prefix + f"{path}.{attr}" for attr, _ in module.named_parameters(recurse=False)}
                if all(n[len(prefix):] in names for n in owned.values()):
                    on_use.append(_OnUse(module, owned, self, buffers))
                    streamed.update(n[len(prefix):] for n in owned.values())
        state = {name: buffers.take(self.tensors[prefix + name]) for name in names if name not in streamed}
        self._load(block, state, layer, frozenset(streamed))
        return block.eval(), state, on_use

    def grad_dtype(self, layer: int) -> torch.dtype:
        """The dtype of block ``layer``'s gradient-flow check: whether a gradient is all zero
        is a question of structure, which float32 answers as float64 does at half the memory,
        and bfloat16 (float32's exponent range: nothing underflows that float32 keeps; CPU
        matmuls accumulate in float32) at a quarter — used for a dense block stored in bf16
        (a MoE block stays in float32, where its routing is the float32 model's)."""
        stored = self.tensors[layer_prefix(layer) + "attn.q_proj.weight"].dtype if not self.config.is_moe_layer(layer) else None
        return torch.bfloat16 if stored == torch.bfloat16 else GRAD_DTYPE

    def grad_block(self, layer: int, dtype: torch.dtype) -> Block:
        """Block ``layer`` whole, in ``dtype``, its parameters requiring gradients (for
        :func:`_dead_parameters`)."""
        block = self._new_block(layer)
        prefix = layer_prefix(layer)
        state = {name: self.tensors[prefix + name].to(self.device, dtype, copy=True) for name in layer_names(self.names, layer)}
        self._load(block, state, layer)  # copies: the SGD steps change them
        for p in block.parameters():
            p.requires_grad_(True)
        return block.to(dtype)

    def run(self, layer: int, x: torch.Tensor, buffers: _Buffers) -> tuple[torch.Tensor, int]:
        """Block ``layer``'s output on ``x`` and its parameter count (stored router biases
        are buffers, not parameters); float32 products on the CPU go to the faster of MKL
        and oneDNN here (:mod:`lite_llm.runtime.cpu_linear`)."""
        block, state, on_use = self.streamed_block(layer, buffers)
        count = sum(p.numel() for p in block.parameters())
        try:
            with torch.no_grad(), _kernels(self.dtype, self.device):
                y, _ = block(x, self.cos, self.sin, self.allowed, None, None)
        finally:
            for hooks in on_use:
                hooks.remove()
            del block
            buffers.give(state.values())
        return y, count

    def writes_nothing(self, layer: int, x: torch.Tensor) -> int | None:
        """Block ``layer``'s parameter count when it provably adds exactly zero to the residual
        stream on ``x`` (so its output is ``x``: a real forward's, up to the sign of zeros,
        ``-0.0 + 0.0`` being ``+0.0``, which no later operation tells apart), else None: ``x``
        finite and the block :meth:`zero_writers`."""
        if not bool(torch.isfinite(x).all()) or not self.zero_writers(layer):
            return None
        return self.stored_params(layer)

    def zero_writers(self, layer: int) -> bool:
        """Whether block ``layer`` adds exactly zero to any finite residual stream.

        The block computes ``h = x + o_proj(attn)`` and ``h + down_proj(ffn)`` (an MoE's
        output is a weighted sum of its experts' ``down_proj`` products).  When every one of
        those writers is all zeros and every other tensor of the block is finite, each product
        is a sum of ``0 * finite`` terms, exactly zero, and ``x + 0 = x`` (a LLaMA-Pro block is
        born so: its writers are :class:`~.tensors.Zeros`, known zero without reading them).
        Reading the rest of the block is cheap; its float64 forward is not."""
        names = layer_names(self.names, layer)
        writers = [n for n in names if _is_writer(n)]
        expected = 1 + (len(self.config.tiers) if self.config.is_moe_layer(layer) else 1)
        if len(writers) != expected:
            return False
        prefix = layer_prefix(layer)
        if any(not known_zeros(self.tensors, prefix + n) and _extremes(self.tensors[prefix + n]) != (0.0, 0.0) for n in writers):
            return False
        return all(all(map(math.isfinite, _extremes(self.tensors[prefix + n]))) for n in names if n not in writers)

    def stored_params(self, layer: int) -> int | None:
        """Parameters block ``layer``'s stored tensors hold (stored router biases are buffers),
        from their shapes; None when a shape is not the config's (then loading it says which)."""
        key = _block_key(self.config, layer) + (self.config.is_moe_layer(layer),)
        if key not in self._param_shapes:  # a meta block per layer kind, not per layer
            self._param_shapes[key] = [(name, tuple(p.shape)) for name, p in self._new_block(layer).named_parameters()]
        prefix, count = layer_prefix(layer), 0
        for name, shape in self._param_shapes[key]:
            if _shape(self.tensors, prefix + name) != shape:
                return None
            count += math.prod(shape)
        return count

    def gradient_check(self, layer: int, x: torch.Tensor, silent: bool) -> tuple[list[str], list[str]]:
        """Block ``layer``'s parameters, and those of them no gradient reaches from ``x``
        (``silent``: the block's residual writers are known to be all zero; only a dense
        block's first sweep is shortened by it — a router's balance and z-losses reach it past
        zero writers, and its first SGD step changes the second sweep's routing)."""
        prefix = layer_prefix(layer)
        dtype = self.grad_dtype(layer)
        block = self.grad_block(layer, dtype)
        silent = silent and not self.config.is_moe_layer(layer)
        return [prefix + n for n, _ in block.named_parameters()], [prefix + n for n in _dead_parameters(block, x, self, layer, dtype, silent)]


def _kernels(dtype: torch.dtype, device: torch.device) -> AbstractContextManager:
    """Where the products of a forward in ``dtype`` on ``device`` run: float32 on the CPU on the
    faster of MKL and oneDNN here (:mod:`lite_llm.runtime.cpu_linear`), else PyTorch's default."""
    return faster_float32_linear() if dtype == torch.float32 and device.type == "cpu" else nullcontext()


def _is_writer(name: str) -> bool:
    """Whether a block's tensor ``name`` (without the layer prefix) writes into the residual stream."""
    return name in ("attn.o_proj.weight", "ffn.down_proj.weight") or (name.startswith("ffn.experts.") and name.endswith(".down_proj"))


def _extremes(t: torch.Tensor) -> tuple[float, float]:
    """(min, max) of ``t``, NaN when it holds one: one pass without a temporary, 30x faster
    than ``isfinite(t).all()`` on a bf16 matrix; ``(0.0, 0.0)`` when empty or all zeros."""
    if t.numel() == 0:
        return 0.0, 0.0
    low, high = torch.aminmax(t)
    return float(low), float(high)


def _dead_parameters(block: Block, x: torch.Tensor, model: _Model, layer: int, dtype: torch.dtype, silent: bool = False) -> list[str]:
    """Parameters of ``block`` whose gradient stays all zero through two sweeps (``block``'s
    weights change: it is dropped after).

    Each sweep is one forward and one backward.  A parameter's gradient is looked at the moment
    autograd has finished it (a post-accumulate hook), which then takes its plain SGD step in
    place and drops the gradient: no whole block's gradients in float64 are ever held (that
    would double the check's peak memory), and every node that saved the parameter has already
    run when its gradient is complete, so the step changes nothing the backward still reads.
    The first sweep's gradients are those of the block as grown; the second sweep's are taken
    after the SGD step of all of them, so a parameter behind a zero-initialised writer (a
    LLaMA-Pro block's q/k/v behind its zeroed o_proj) sees that writer moved.  For a
    ``silent`` dense block (every writer all zeros) the first sweep's gradient of everything but the
    writers is exactly zero (each is a sum of ``0 * finite`` terms), so only the writers'
    are computed then: the same verdict from a first sweep that stops at the writers."""
    n = min(GRAD_TOKENS, x.shape[1])
    x = x[:1, :n].detach().to(dtype)
    cos, sin = model.cos[:n].to(dtype), model.sin[:n].to(dtype)
    direction = torch.randn(x.shape, generator=torch.Generator().manual_seed(layer), dtype=FP64).to(x.device, dtype)
    params = dict(block.named_parameters())
    moved: set[str] = set()

    def take_step(name: str, p: torch.Tensor) -> None:
        if _extremes(p.grad) != (0.0, 0.0):  # 8x faster than p.grad.any() on a bf16 matrix; a NaN counts as moved
            moved.add(name)
            with torch.no_grad():
                p.add_(p.grad, alpha=-SGD_LR)
        p.grad = None

    hooks = [p.register_post_accumulate_grad_hook(lambda p, name=name: take_step(name, p)) for name, p in params.items()]
    block.train()
    try:
        for allowed in _tier_masks(model, params, moved):
            for sweep in range(2):
                for name, p in params.items():  # the second sweep looks only at the still silent ones
                    p.requires_grad_(name not in moved and (sweep == 1 or not silent or _is_writer(name)))
                with torch.enable_grad():
                    out, routes = block(x, cos, sin, allowed, None, None)
                    loss = (out * direction).sum()
                    if routes is not None:
                        loss = loss + routes.balance_loss + routes.z_loss
                    if loss.requires_grad:
                        loss.backward()
                if len(moved) == len(params):
                    break
    finally:
        for hook in hooks:
            hook.remove()
    return [name for name in params if name not in moved]


def _tier_masks(model: _Model, params: dict[str, torch.Tensor], moved: set[str]) -> Iterator[torch.Tensor | None]:
    """The TierSets the gradient sweeps run under: the default one, then, for each tier whose
    experts are still without gradient, that tier alone (``only:TIER``).

    Why: which tier a token routes to is the router's choice, so a handful of sample tokens
    may reach no expert of a tier at all (the tiny preset's LLaMA-Pro block sends none of its
    first 8 tokens to tier_10b).  That says nothing about the parameters: a request for
    ``only:tier_10b`` sends every token there.  Under the tier alone, a parameter still
    without gradient is dead for every TierSet."""
    yield model.allowed
    if model.allowed is None:
        return
    for index, tier in enumerate(model.config.tiers):
        if any(f".{tier.name}." in f".{name}." and name not in moved for name in params):
            only = torch.zeros_like(model.allowed)
            only[index] = True
            yield only


def _embed(model: _Model, ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The sample's embeddings in the check's dtype, and the table's size: only the sample's rows
    are read (a few hundred rows of a 100 MB table) when the table lies unchanged in a file or
    is made row by row from one (a widened embedding: :func:`~.tensors.row_reader`)."""
    rows = row_reader(model.tensors, "embed.weight")
    if rows is None:
        table = model.tensors["embed.weight"]
        return table[ids.to(table.device)].to(model.device, model.dtype), table.numel()
    wanted = torch.unique(ids.cpu())  # sorted
    if wanted.numel() and int(wanted[-1]) >= rows.shape[0]:
        raise ValueError(f"token id {int(wanted[-1])} is outside the embedding of {rows.shape[0]} rows")
    table = torch.cat([rows(int(i), int(i) + 1) for i in wanted])
    return table[torch.searchsorted(wanted, ids.cpu())].to(model.device, model.dtype), math.prod(rows.shape)


def _equal(x: torch.Tensor, y: torch.Tensor) -> bool:
    return x is y or (x.shape == y.shape and torch.equal(x, y))


def _final_states(model: _Model, x: torch.Tensor, norm_weight: torch.Tensor) -> torch.Tensor:
    norm = RMSNorm(model.config.d_model, model.config.norm_eps)
    norm.weight = torch.nn.Parameter(norm_weight.to(x.device, x.dtype), requires_grad=False)
    with torch.no_grad():
        return norm(x).reshape(-1, x.shape[-1])


class _HeadStats:
    """Running figures over the vocabulary slices: logit differences and log-sum-exps (kept in
    float64 whatever the slices' dtype)."""

    def __init__(self, labels: torch.Tensor) -> None:
        self.labels = labels
        n = labels.numel()
        self.lse = [torch.full((n,), float("-inf"), dtype=FP64, device=labels.device) for _ in range(2)]
        self.target = [torch.zeros(n, dtype=FP64, device=labels.device) for _ in range(2)]
        self.max_abs, self.scale, self.sse, self.count = 0.0, 0.0, 0.0, 0

    def add_one(self, side: int, start: int, z: torch.Tensor) -> None:
        """One model's slice of logits: its log-sum-exp and its targets' logits."""
        inside = (self.labels >= start) & (self.labels < start + z.shape[1])
        self.lse[side] = torch.logaddexp(self.lse[side], torch.logsumexp(z, dim=-1).to(FP64))
        self.target[side][inside] = z[inside].gather(1, (self.labels[inside] - start)[:, None]).squeeze(1).to(FP64)

    def compare(self, a: torch.Tensor, b: torch.Tensor) -> None:
        self.scale = _nan_max(self.scale, float(a.abs().max()))
        if a is not b:
            diff = a - b
            self.max_abs = _nan_max(self.max_abs, float(diff.abs().max()))
            self.sse += float(diff.square().sum())
        self.count += a.numel()

    def loss(self, side: int) -> float:
        valid = self.labels >= 0
        return float((self.lse[side] - self.target[side])[valid].mean())


def _nan_max(current: float, new: float) -> float:
    """``max`` that keeps a NaN (Python's drops it: ``max(0.0, nan)`` is 0.0), so a NaN logit
    is a difference no tolerance accepts."""
    return new if math.isnan(new) or new > current else current


def _next_token_labels(ids: torch.Tensor) -> torch.Tensor:
    """Each position's next token (-1 at the end of a row), flattened like the states."""
    labels = torch.full_like(ids, -1)
    labels[:, :-1] = ids[:, 1:]
    return labels.reshape(-1)


def _head_name(config: ModelConfig) -> str:
    return "embed.weight" if config.tie_embeddings else "lm_head.weight"


class _Head:
    """A model's head for slicing: read slice by slice from its file when it lies there
    unchanged, or made slice by slice from its source's rows (a widened head), else produced
    whole once (:func:`~.tensors.row_reader`)."""

    def __init__(self, model: _Model, name: str, rows: StoredRows | RowReader | None = None) -> None:
        """``rows``: the head's :func:`~.tensors.row_reader`, when the caller has asked for it already."""
        self._rows = rows if rows is not None else row_reader(model.tensors, name)
        self._whole = model.tensors[name] if self._rows is None else None
        self.shape = tuple(self._whole.shape) if self._whole is not None else self._rows.shape
        self.numel = math.prod(self.shape)

    @property
    def whole(self) -> bool:
        """Whether the head is held whole (no row reader could make it slice by slice)."""
        return self._whole is not None

    def slices(self, rows: int, device: torch.device, dtype: torch.dtype):
        """(start, slice in ``dtype``), one slice of the vocabulary at a time in one buffer."""
        n = self.shape[0]
        buffer = torch.empty((min(rows, n), self.shape[1]), dtype=dtype, device=device)
        for start in range(0, n, rows):
            part = self._whole[start : start + rows] if self._whole is not None else self._rows(start, min(start + rows, n))
            yield start, buffer[: part.shape[0]].copy_(part)


def _heads(a: _Model, b: _Model, xa: torch.Tensor, xb: torch.Tensor, ids: torch.Tensor) -> _HeadStats:
    """Both models' final norm and head, slice by slice of the vocabulary."""
    norm_a, norm_b = a.tensors["norm.weight"], b.tensors["norm.weight"]
    ha = _final_states(a, xa, norm_a)
    same_norm = _equal(xa, xb) and a.config.norm_eps == b.config.norm_eps and _equal(norm_a, norm_b)
    hb = ha if same_norm else _final_states(b, xb, norm_b)
    name_a, name_b = _head_name(a.config), _head_name(b.config)
    one_head = _one_origin(a.tensors, name_a, b.tensors, name_b)
    a_head_numel = 0
    stats = _HeadStats(_next_token_labels(ids).to(a.device))
    rows = max(256, HEAD_SLICE_BYTES // (a.dtype.itemsize * max(a.config.d_model, b.config.d_model)))
    with torch.no_grad():
        if one_head:  # one head for both: the grown states go through the same slices
            head = _Head(a, name_a)
            a_head_numel = b_head_numel = head.numel
            for start, w in head.slices(rows, a.device, a.dtype):
                za = F.linear(ha, w)
                zb = za if hb is ha else F.linear(hb, w)
                stats.add_one(0, start, za)
                stats.add_one(1, start, zb)
                stats.compare(za, zb)
        else:
            head_b = _Head(b, name_b)  # the grown one first: making it whole is the growth's own peak
            b_head_numel = head_b.numel
            rows_a = row_reader(a.tensors, name_a)
            if head_b.whole and rows_a is None:
                # Two whole heads: one in memory at a time, the grown one's logits kept
                # (tokens x vocabulary) while the original's head is made.
                kept = []
                for start, w in head_b.slices(rows, b.device, b.dtype):
                    kept.append(F.linear(hb, w))
                    stats.add_one(1, start, kept[-1])
                del head_b
                head_a = _Head(a, name_a)
                a_head_numel = head_a.numel
                for (start, w), zb in zip(head_a.slices(rows, a.device, a.dtype), kept):
                    za = F.linear(ha, w)
                    stats.add_one(0, start, za)
                    stats.compare(za, zb)
            else:
                # At most one whole: both heads go slice by slice together and no logits are
                # kept (for SmolLM2's width growth those were 50 MB, the check's largest buffer).
                head_a = _Head(a, name_a, rows_a)
                a_head_numel = head_a.numel
                for (start, w), (_, wb) in zip(head_a.slices(rows, a.device, a.dtype), head_b.slices(rows, b.device, b.dtype)):
                    za, zb = F.linear(ha, w), F.linear(hb, wb)
                    stats.add_one(0, start, za)
                    stats.add_one(1, start, zb)
                    stats.compare(za, zb)
    a.params += norm_a.numel() + (0 if a.config.tie_embeddings else a_head_numel)
    b.params += norm_b.numel() + (0 if b.config.tie_embeddings else b_head_numel)
    return stats


def _gradient_checks(
    model: _Model, blocks: list[tuple[int, torch.Tensor, bool]], buffers: _Buffers, large: AbstractContextManager, *, trim: bool = True
) -> tuple[list[str], list[str]]:
    """The parameters of ``blocks`` ((layer, input, silent) triples: the first and the last a growth
    made, for every growth builds its blocks alike), and those no gradient reaches; each
    check holds ``large`` (its block is loaded whole).  ``trim``: the heap is trimmed before
    and after, after a forward — its freed matrices (up to 32 MiB each, heap-allocated) would
    otherwise stay resident under the whole block this loads, and its block under the next
    phase's buffers.  The proof has no forward, and a trim costs it a quarter of its time (the
    pages given back are faulted in again)."""
    new: list[str] = []
    dead: list[str] = []
    for layer, x, silent in blocks:
        with large:
            buffers.clear()  # the whole block needs the memory more than the pool does
            if trim:
                release_freed_memory()
            names, unreached = model.gradient_check(layer, x, silent)
        new += names
        dead += unreached
    if trim:
        release_freed_memory()
    return new, dead


def _shape(tensors: Tensors, name: str) -> tuple[int, ...]:
    """The shape of ``tensors[name]``, from its file's header when it is a stored tensor passed on
    unchanged (nothing read), else from the tensor."""
    spec = stored_spec(tensors, name)
    return spec.shape if spec is not None else tuple(tensors[name].shape)


def _same_function_config(a: ModelConfig, b: ModelConfig) -> bool:
    """Whether ``b`` configures everything but the depth as ``a`` does (``init_std`` and the
    name compute nothing; a changed ``max_seq_len`` would refuse inputs ``a`` takes)."""
    import dataclasses

    return dataclasses.replace(b, n_layers=a.n_layers, moe_layers=a.moe_layers, name=a.name, init_std=a.init_std) == a


def prove_unchanged(
    config_a: ModelConfig,
    tensors_a: Tensors,
    config_b: ModelConfig,
    tensors_b: Tensors,
    *,
    check_gradients: bool = True,
    device: torch.device | str | None = None,
    beside: Beside | None = None,
) -> Comparison | None:
    """The comparison of :func:`compare_streamed` without any sample, when the grown
    ``b`` is the original ``a`` by construction; None when it is not (then measure it).

    By construction means: ``b`` is configured as ``a`` but for its depth; its embedding,
    final norm and head are ``a``'s passed on unchanged (:func:`~.tensors.origin`: known
    without reading them); every block of ``b`` is either ``a``'s next block passed on unchanged
    with the same block config, or adds exactly zero to any finite residual stream
    (:meth:`_Model.zero_writers`, a LLaMA-Pro block as it is born); and every block of ``a`` is
    passed on, in order.  Then ``b`` computes ``a``'s states on every input whose states are
    finite in ``a`` — in float32, bf16 or float64; in float16 a new block's products on finite
    states can overflow to inf and ``0 * inf`` is NaN, which the float64 evaluation, passing
    such blocks over, does not see either — so its logits are bitwise ``a``'s: more than any sample shows,
    for one read of the new blocks (their extremes) instead of a float64 forward of the whole
    model.  The figures are ``max_abs = 0`` with no sample evaluated (``tokens = 0``, no losses);
    the parameter counts come from the tensors' shapes and the gradient check runs as in
    :func:`compare_streamed`, on the embeddings of ``GRAD_TOKENS`` seeded random ids (whether a
    gradient reaches a dense block's parameter is structure, which any input shows; so a proof
    needs no sample, and a growth proved so never loads a tokenizer to make one).  A new MoE
    block is not proved: which experts its gradient check reaches depends on what the sample
    routes to them, so only its real input (the evaluation's) gives the evaluation's verdict."""
    if not _same_function_config(config_a, config_b):
        return None
    device = torch.device("cpu" if device is None else device)
    ids = torch.randint(0, config_b.vocab_size, (1, GRAD_TOKENS), generator=torch.Generator().manual_seed(0))
    _Model(config_a, tensors_a, GRAD_TOKENS, device)  # refuses tensors that do not fit the config, as the evaluation would
    b = _Model(config_b, tensors_b, GRAD_TOKENS, device)
    ends = ["embed.weight", "norm.weight"] + ([] if config_a.tie_embeddings else ["lm_head.weight"])
    if not all(_one_origin(tensors_a, n, tensors_b, n) for n in ends):
        return None
    poll = beside.poll if beside is not None else (lambda: None)
    ends_count = sum(math.prod(_shape(tensors_a, n)) for n in ends)
    params_a = params_b = ends_count
    i, shared, silent = 0, 0, []
    for j in range(config_b.n_layers):
        poll()
        if i < config_a.n_layers and _block_key(config_a, i) == _block_key(config_b, j) and _layer_of_one_origin(tensors_a, i, tensors_b, j):
            count = b.stored_params(j)
            if count is None:
                return None
            params_a, params_b, i, shared = params_a + count, params_b + count, i + 1, shared + 1
        elif not config_b.is_moe_layer(j) and b.zero_writers(j) and (count := b.stored_params(j)) is not None:
            params_b += count
            silent.append(j)
        else:
            return None
    if i != config_a.n_layers:
        return None
    new, dead = [], []
    if check_gradients and silent:
        large = beside.large() if beside is not None else nullcontext()
        with large:
            x, _ = _embed(b, ids)
        new, dead = _gradient_checks(b, [(j, x, True) for j in sorted({silent[0], silent[-1]})], _Buffers(device), large, trim=False)
    return Comparison(
        max_abs=0.0, scale=0.0, sse=0.0, logits=0, loss_a=None, loss_b=None, tokens=0, params_a=params_a, params_b=params_b,
        new_params=new, dead_params=dead, shared_blocks=shared, silent_blocks=len(silent), proved=True,
    )


def compare_streamed(
    config_a: ModelConfig,
    tensors_a: Tensors,
    config_b: ModelConfig,
    tensors_b: Tensors,
    ids: torch.Tensor,
    *,
    check_gradients: bool = True,
    device: torch.device | str | None = None,
    beside: Beside | None = None,
    dtype: torch.dtype = FP64,
) -> Comparison:
    """Evaluate the original ``a`` and the grown ``b`` on ``ids`` (B, S) block by block in
    ``dtype`` (float64 unless told) on ``device`` (default the CPU) and compare their logits,
    losses, parameter counts and (``check_gradients``) the gradient flow into ``b``'s unshared
    blocks; see the module docstring.  ``beside`` is the writer this check runs beside
    (:class:`Beside`).  float32 (``dtype``) suits a depth step that is not meant to be exact:
    its loss jump and logit change are far above float32's rounding, for less work."""
    large = beside.large() if beside is not None else nullcontext()
    poll = beside.poll if beside is not None else (lambda: None)
    device = torch.device("cpu" if device is None else device)
    if config_a.vocab_size != config_b.vocab_size:
        raise ValueError(f"the models have different vocabularies ({config_a.vocab_size} vs {config_b.vocab_size} tokens); growth never changes the vocabulary")
    a, b = _Model(config_a, tensors_a, ids.shape[1], device, dtype), _Model(config_b, tensors_b, ids.shape[1], device, dtype)
    buffers = _Buffers(device, dtype)
    with large:
        xa, count = _embed(a, ids)
        a.params += count
        if _one_origin(tensors_a, "embed.weight", tensors_b, "embed.weight"):
            xb = xa
            b.params += count
        else:
            xb, count = _embed(b, ids)
            b.params += count
            xb = xa if _equal(xa, xb) else xb
    i, shared, silent = 0, 0, 0
    first = last = None  # the first and the latest grown block not shared with the original, their inputs, whether silent
    for j in range(config_b.n_layers):
        poll()
        if i < config_a.n_layers and _equal(xa, xb) and _block_key(config_a, i) == _block_key(config_b, j):
            same = _layer_of_one_origin(tensors_a, i, tensors_b, j)
            if not same and not isinstance(tensors_b, LazyTensors):
                same = _same_layer(tensors_a, i, tensors_b, j)  # from disk: compare bitwise
            if same:
                xa, count = b.run(j, xb, buffers)
                xb = xa
                a.params, b.params = a.params + count, b.params + count
                i, shared = i + 1, shared + 1
                continue
        count = b.writes_nothing(j, xb)
        if first is None:
            first = (j, xb, count is not None)
        else:
            last = (j, xb, count is not None)
        if count is not None:
            silent += 1
        else:
            xb_new, count = b.run(j, xb, buffers)
            xb = xa if _equal(xb_new, xa) else xb_new
        b.params += count
    new, dead = _gradient_checks(b, [block for block in (first, last) if block is not None], buffers, large) if check_gradients else ([], [])
    for k in range(i, config_a.n_layers):
        poll()
        xa, count = a.run(k, xa, buffers)
        a.params += count
    del buffers
    release_freed_memory()
    with large, _kernels(dtype, device):
        stats = _heads(a, b, xa, xb, ids)
    return Comparison(
        max_abs=stats.max_abs,
        scale=stats.scale,
        sse=stats.sse,
        logits=stats.count,
        loss_a=stats.loss(0),
        loss_b=stats.loss(1),
        tokens=int(ids.numel()),
        params_a=a.params,
        params_b=b.params,
        new_params=new,
        dead_params=dead,
        shared_blocks=shared,
        silent_blocks=silent,
    )
