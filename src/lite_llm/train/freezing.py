"""Freezing: whole parameters by name, or parts of them by mask.

Growth adds rows to existing tensors (new experts in a tier's bank, new router rows), and
forgetting prevention wants the old rows fixed while the new ones learn.  ``requires_grad``
works per tensor only, so :class:`PartialFreeze` keeps masked entries fixed itself.  Zeroing
their gradient is not enough: AdamW's decoupled weight decay (``p -= lr * wd * p``) moves an
entry whose gradient is zero, and so does momentum left from earlier steps.  So the masked
gradient is zeroed (it then adds nothing to the grad-norm clip or to Adam's moments) *and* the
saved values are written back right after every optimizer step: bitwise unchanged.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..errors import ConfigError
from .callbacks import TrainerCallback

if TYPE_CHECKING:
    from .trainer import Trainer


@dataclass
class _Frozen:
    """The masked part of one tensor: where it is and what it must stay equal to."""

    name: str
    tensor: torch.Tensor  # a parameter or a buffer, updated in place by training
    mask: torch.Tensor  # bool over the tensor's leading dimensions
    saved: torch.Tensor | None = None  # tensor[mask] as of attach()

    @property
    def broadcast_mask(self) -> torch.Tensor:
        """The mask shaped to broadcast over the tensor's trailing dimensions."""
        return self.mask.view(*self.mask.shape, *([1] * (self.tensor.dim() - self.mask.dim())))


class PartialFreeze(TrainerCallback):
    """Keep the entries of model tensors where ``masks[name]`` is True bitwise unchanged.

    A mask is a bool tensor shaped like the leading dimensions of its tensor (a row mask
    freezes whole rows, e.g. experts of a bank) or like the whole tensor.  Buffers may be
    named too (a router's ``expert_bias``): they are restored the same way.

    With the :class:`Trainer`, ``on_train_begin`` snapshots the masked values, hooks the
    gradients and registers an optimizer step post-hook that restores them.  The post-hook is
    used rather than ``on_step_end`` because the Trainer evaluates between the optimizer step
    and ``on_step_end``; evaluation must see the frozen values.  Outside the Trainer call
    :meth:`attach` with the optimizer (or call :meth:`restore` after each step yourself).
    """

    name = "partial_freeze"

    def __init__(self, model: nn.Module, masks: Mapping[str, torch.Tensor]) -> None:
        tensors = {**dict(model.named_buffers()), **dict(model.named_parameters())}
        self.frozen: list[_Frozen] = []
        for name, mask in masks.items():
            if name not in tensors:
                raise ConfigError(f"PartialFreeze has a mask for {name!r}, which is not a parameter or buffer of the model")
            tensor = tensors[name]
            mask = torch.as_tensor(mask, dtype=torch.bool, device=tensor.device)
            if tuple(mask.shape) != tuple(tensor.shape[: mask.dim()]):
                raise ConfigError(
                    f"the mask for {name} has shape {tuple(mask.shape)} but must match the leading dimensions of the tensor's shape {tuple(tensor.shape)}"
                )
            if mask.any():  # an all-False mask freezes nothing: no hook, no copy
                self.frozen.append(_Frozen(name, tensor, mask))
        self._grad_hooks: list[Any] = []
        self._step_hook: Any = None

    # ------------------------------------------------------------------------------ set-up
    def attach(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Snapshot the masked values, zero their gradients from now on and, given an
        optimizer, restore them after each of its steps.  Calling it again re-snapshots (after
        a resume, say) without stacking hooks."""
        with torch.no_grad():
            for f in self.frozen:
                f.saved = f.tensor[f.mask].clone()
        if not self._grad_hooks:
            for f in self.frozen:
                if isinstance(f.tensor, nn.Parameter) and f.tensor.requires_grad:
                    self._grad_hooks.append(f.tensor.register_hook(lambda g, m=f.broadcast_mask: g.masked_fill(m, 0)))
        if self._step_hook is not None:
            self._step_hook.remove()
            self._step_hook = None
        if optimizer is not None:
            self._step_hook = optimizer.register_step_post_hook(lambda opt, args, kwargs: self.restore())

    def detach(self) -> None:
        """Remove every hook (the values stay as they are)."""
        for handle in self._grad_hooks:
            handle.remove()
        self._grad_hooks = []
        if self._step_hook is not None:
            self._step_hook.remove()
            self._step_hook = None

    @torch.no_grad()
    def restore(self) -> None:
        """Write the snapshot back into the masked entries (an exact copy, so bitwise)."""
        for f in self.frozen:
            if f.saved is None:
                raise RuntimeError("PartialFreeze.restore() was called before attach(); nothing was saved yet")
            f.tensor[f.mask] = f.saved

    # ------------------------------------------------------------------------------ Trainer hooks
    def on_train_begin(self, trainer: Trainer) -> None:
        self.attach(trainer.optimizer)


class FreezeSchedule(TrainerCallback):
    """Progressive freezing: parameters matching a rule's patterns get no update before the
    rule's ``thaw_at`` step (never, when it is None), then train normally (AdamW's moments
    start from zero at the thaw, as for a new parameter).

    Rules are ``{"patterns": [...], "thaw_at": step or None}`` (``TrainConfig.freeze``).  The
    state is a function of the step, so a resumed run freezes exactly what the original did.
    Freezing is by ``requires_grad``: a frozen parameter gets no gradient and AdamW skips it
    entirely, weight decay included, so it stays bitwise unchanged.

    The schedule only ever clears ``requires_grad`` while a rule holds, every step (the trainer
    runs it after other callbacks, so a curriculum phase that unfreezes everything cannot
    unfreeze these); at the thaw it gives back the flag the parameter had when it was first
    frozen, once, and then leaves it to whoever else manages it.
    """

    name = "freeze_schedule"

    def __init__(self, model: nn.Module, rules: Iterable[Mapping[str, Any]]) -> None:
        params = dict(model.named_parameters())
        self.rules: list[tuple[list[nn.Parameter], int | None]] = []
        for rule in rules:
            patterns = rule["patterns"]
            names = _matching(params, [patterns] if isinstance(patterns, str) else list(patterns))
            self.rules.append(([params[n] for n in names], rule.get("thaw_at")))
        self._held: dict[int, tuple[nn.Parameter, bool]] = {}  # id -> (parameter, flag before freezing)

    def on_step_begin(self, trainer: "Trainer", step: int) -> None:
        frozen = {id(p): p for ps, thaw in self.rules if thaw is None or step < thaw for p in ps}
        for key in [k for k in self._held if k not in frozen]:
            p, before = self._held.pop(key)
            p.requires_grad_(before)
        for key, p in frozen.items():
            if key not in self._held:
                self._held[key] = (p, p.requires_grad)
            p.requires_grad_(False)
        if frozen and not any(p.requires_grad for p in trainer.model.parameters()):
            raise ConfigError(
                f"at step {step} the freeze rules hold every parameter of the model, so nothing would train; "
                "leave some parameters out of --freeze, or thaw them (PATTERN@STEP)"
            )

    def state_dict(self) -> dict[str, Any]:
        return {"rules": [{"parameters": len(ps), "thaw_at": thaw} for ps, thaw in self.rules]}


def _matching(params: Mapping[str, Any], patterns: list[str]) -> list[str]:
    """Names matching any fnmatch pattern, in model order; a pattern matching nothing is an
    error (almost always a typo)."""
    chosen: set[str] = set()
    for pattern in patterns:
        matched = [name for name in params if fnmatch.fnmatchcase(name, pattern)]
        if not matched:
            example = next(iter(params), "")
            raise ConfigError(
                f"freeze pattern {pattern!r} matches no parameter of the model; names look like {example!r} (use * as a wildcard, e.g. 'layers.0.*')"
            )
        chosen.update(matched)
    return [name for name in params if name in chosen]


def freeze_parameters(model: nn.Module, patterns: Iterable[str] | str) -> list[str]:
    """Set ``requires_grad=False`` on every parameter whose name matches one of the fnmatch
    ``patterns`` (``layers.0.*``, ``*.experts.tier_1b.*``); returns the frozen names in model
    order.  A frozen parameter gets no gradient, so AdamW skips it entirely (no weight decay
    either).  A pattern that matches nothing is an error: it is almost always a typo."""
    params = dict(model.named_parameters())
    frozen = _matching(params, [patterns] if isinstance(patterns, str) else list(patterns))
    for name in frozen:
        params[name].requires_grad_(False)
    return frozen
