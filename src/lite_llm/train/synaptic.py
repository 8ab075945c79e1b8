"""Synaptic Intelligence (Zenke, Poole & Ganguli, ICML 2017): importance measured along the path.

EWC asks, after a task, how sharply the loss depends on each weight (the Fisher).  SI instead
records, *while* a task trains, how much each weight's motion lowered the loss: the path
integral of the gradient along the parameter trajectory, accumulated step by step as

    omega_i += -g_i * delta_i

where ``g`` is the gradient of the task's loss (every term of the step's loss except SI's own
penalty, read before clipping and the optimizer step) and ``delta`` is the change the optimizer
step then made.  At the end of a task the importance is consolidated,

    Omega_i = max(0, Omega_prev_i + omega_i / ((theta_end_i - theta_start_i)^2 + xi))

(the damping ``xi`` keeps weights that barely moved from dividing by ~0; the paper's code
clamps the sum at 0, because a weight whose motion raised the loss would otherwise get a
negative coefficient and a penalty unbounded below), and the next task trains on
``loss + c * sum_i Omega_i (theta_i - theta*_i)^2`` with ``theta*`` the weights at the end
of the previous task.  ``xi`` defaults to 1e-3, the paper's value for split MNIST and split
CIFAR-10/100 (permuted MNIST used 0.1); ``c`` was 0.1-1 there, but its scale depends on the
loss and the size of the updates, so it has no default here.

A *task* is a training run.  Every checkpoint the run saves holds the importance consolidated
at that point (``si/``: tensors ``importance/<name>`` and ``anchor/<name>``, the same layout,
writer and reader as EWC's Fisher, :class:`lite_llm.checkpoint.ewc.ImportanceFormat`), so any checkpoint of the
run — the final one, the best one kept by a rollback — can start the next task, and growth
carries it like the Fisher (new weights get importance 0).  The running ``omega`` and
``theta_start`` are training state, stored bitwise, so a resumed run continues the integral
exactly.

The penalty's gradient ``2 c Omega (theta - theta*)`` is added to ``.grad`` in closed form
right after the task gradient was read (the loss term itself is returned detached, for the
step's loss record and its finiteness check): the path integral then sees the task gradient
exactly, as the paper's code does (``unreg_grads``), instead of a difference of two rounded
gradients.  Parameters that do not require grad (frozen) neither accumulate nor are penalised;
one the step's loss did not reach (an expert no token was routed to) gets the penalty's
gradient only where it is non-zero, so the optimizer leaves an untouched, unpulled weight alone.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..checkpoint.ewc import SI_FORMAT, FisherEstimate, load_ewc
from ..errors import CheckpointError, ConfigError
from .callbacks import TrainerCallback
from .ewc import check_fits, ewc_penalty

if TYPE_CHECKING:
    from ..model import LiteLLM, ModelOutput
    from .trainer import Trainer

DEFAULT_DAMPING = 1e-3


def consolidate(
    omega: torch.Tensor, start: torch.Tensor, end: torch.Tensor, damping: float, previous: torch.Tensor | None = None
) -> torch.Tensor:
    """``max(0, previous + omega / ((end - start)^2 + damping))``: a task's path integral
    turned into a penalty coefficient, added to the earlier tasks' (the module docstring)."""
    importance = omega / ((end - start).square() + damping)
    if previous is not None:
        importance = previous + importance
    return importance.clamp_min(0.0)


class SynapticIntelligence(TrainerCallback):
    """Accumulates SI's path integral over a run and penalises moving the weights that earlier
    tasks found important (``previous``: their consolidated importance and anchors, e.g.
    :func:`load_si` of the checkpoint a run starts from; ``None`` on the first task, which
    only measures)."""

    name = "si"

    def __init__(self, *, strength: float, damping: float = DEFAULT_DAMPING, previous: FisherEstimate | None = None) -> None:
        if not strength > 0:
            raise ConfigError(f"the SI strength (c) must be positive, got {strength}")
        if not damping > 0:
            raise ConfigError(f"the SI damping (xi) must be positive, got {damping}")
        self.strength, self.damping, self.previous = float(strength), float(damping), previous
        self.omega: dict[str, torch.Tensor] | None = None  # running path integral of this task
        self.start: dict[str, torch.Tensor] | None = None  # the weights when this task began
        self.steps = 0  # optimizer steps accumulated into omega
        self._pending: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # name -> (task gradient, weight before the step)
        self._penalty: tuple[int, torch.Tensor] | None = None  # (step, value): the weights do not move within a step

    # ------------------------------------------------------------------------------ hooks
    def on_train_begin(self, trainer: "Trainer") -> None:
        model = trainer.model
        params = dict(model.named_parameters())
        device = next(iter(params.values())).device  # everything SI keeps lives beside the weights
        if self.previous is not None:
            check_fits(model, self.previous, SI_FORMAT)
            self.previous = self.previous.to(device)
        if self.start is None:  # a new task (a resumed one has its state loaded already)
            self.start = {n: p.detach().float().clone() for n, p in params.items()}
            self.omega = {n: torch.zeros_like(s) for n, s in self.start.items()}
            self.steps = 0
            return
        assert self.omega is not None
        for kind, state in (("path integral", self.omega), ("start weights", self.start)):
            if set(state) != set(params) or any(state[n].shape != p.shape for n, p in params.items()):
                raise CheckpointError(f"the SI {kind} in the training state does not match the model's parameters; start a new run instead of resuming")
        self.omega = {n: t.to(device) for n, t in self.omega.items()}
        self.start = {n: t.to(device) for n, t in self.start.items()}

    def on_step_begin(self, trainer: "Trainer", step: int) -> None:
        self._pending = {}

    def extra_loss(self, trainer: "Trainer", step: int, batch: torch.Tensor, output: "ModelOutput") -> torch.Tensor | None:
        """The penalty's value, detached: its gradient is added in :meth:`on_before_step`."""
        if self.previous is None:
            return None
        if self._penalty is None or self._penalty[0] != step:
            with torch.no_grad():
                self._penalty = (step, self.strength * ewc_penalty(trainer.model, self.previous))
        return self._penalty[1]

    def on_before_step(self, trainer: "Trainer", step: int) -> None:
        """Read the task gradient and the weights before the step, then add the penalty's gradient."""
        importance = self.previous.fisher if self.previous is not None else {}
        anchor = self.previous.anchor if self.previous is not None else {}
        with torch.no_grad():
            for name, p in trainer.model.named_parameters():
                if not p.requires_grad:
                    continue
                if p.grad is not None:
                    self._pending[name] = (p.grad.detach().float().clone(), p.detach().float().clone())
                if name in importance:
                    push = (2.0 * self.strength) * importance[name] * (p.float() - anchor[name])
                    if p.grad is not None:
                        p.grad.add_(push)
                    elif push.any():  # untouched by the task and not pulled: the optimizer leaves it alone
                        p.grad = push.to(p.dtype)

    def on_step_end(self, trainer: "Trainer", step: int, record: dict[str, Any]) -> None:
        if record.get("skipped") or not self._pending:
            self._pending = {}
            return
        assert self.omega is not None
        params = dict(trainer.model.named_parameters())
        with torch.no_grad():
            for name, (grad, before) in self._pending.items():
                self.omega[name].sub_(grad * (params[name].detach().float() - before))
        self.steps += 1
        self._pending = {}

    # ------------------------------------------------------------------------------ results
    def consolidated(self, model: "LiteLLM") -> FisherEstimate:
        """The importance if the task ended now: earlier tasks' plus this one's, anchored at
        the current weights (what every checkpoint of the run stores in ``si/``)."""
        if self.omega is None or self.start is None:
            raise ConfigError("SI has no path integral yet; the run must begin before its importance can be consolidated")
        previous = self.previous.fisher if self.previous is not None else {}
        importance, anchor = {}, {}
        for name, p in model.named_parameters():
            end = p.detach().float()
            importance[name] = consolidate(self.omega[name], self.start[name], end, self.damping, previous.get(name))
            anchor[name] = end.clone()
        earlier = self.previous.meta if self.previous is not None else {}
        meta = {
            "method": "synaptic_intelligence",
            "damping": self.damping,
            "strength": self.strength,
            "tasks": int(earlier.get("tasks", 0) or 0) + 1,
            "steps": int(earlier.get("steps", 0) or 0) + self.steps,
        }
        return FisherEstimate(importance, anchor, meta)

    def checkpoint_dirs(self, trainer: "Trainer", progressive: dict[str, Any]) -> dict[str, dict[str, torch.Tensor]]:
        estimate = self.consolidated(trainer.model)
        progressive[SI_FORMAT.directory] = estimate.meta
        return {SI_FORMAT.directory: estimate.to_tensors(SI_FORMAT)}

    # ------------------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {"strength": self.strength, "damping": self.damping, "steps": self.steps, "previous": self.previous.meta if self.previous else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps = int(state.get("steps", 0))

    def state_tensors(self) -> dict[str, torch.Tensor]:
        if self.omega is None or self.start is None:
            return {}
        out = {f"omega/{n}": t for n, t in self.omega.items()}
        out.update({f"start/{n}": t for n, t in self.start.items()})
        return out

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        omega = {k[len("omega/") :]: v.clone() for k, v in tensors.items() if k.startswith("omega/")}
        start = {k[len("start/") :]: v.clone() for k, v in tensors.items() if k.startswith("start/")}
        if not omega and not start:
            return  # a checkpoint from before SI: this task starts at the resumed weights
        self.omega, self.start = omega, start


def load_si(checkpoint: str | Path) -> FisherEstimate:
    """The consolidated SI importance stored in ``checkpoint``'s ``si/`` (hashes verified)."""
    return load_ewc(checkpoint, SI_FORMAT)
