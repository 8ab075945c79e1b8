"""The validation suite: does a grown model do what its growth promised?

Four checks, each against something independent of the growth code:

* **forward equivalence** — logits of the original and the grown model on the same tokens
  (max abs and MSE), in fp32;
* **gradient flow** — every parameter the growth created receives a non-zero gradient: after
  one backward, or, for parameters behind a zero-initialised writer (a LLaMA-Pro block's
  q/k/v sit behind its zeroed o_proj), after one plain SGD step and a second backward;
* **parameter count** — the built model's count equals the config's analytic count;
* **loss jump** — the change in next-token loss on the sample, which is what a non-exact
  method (SOLAR, stacking, noise) costs before continued training.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from ..model import LiteLLM


@dataclass
class ValidationReport:
    """What :func:`validate_models` measured."""

    max_abs: float
    mse: float
    loss_original: float
    loss_grown: float
    params_original: int
    params_grown: int
    params_analytic: int
    new_params: list[str] = field(default_factory=list)
    dead_params: list[str] = field(default_factory=list)  # new and still without gradient
    exact_expected: bool | None = None
    tolerance: float = 1e-5
    tokens: int = 0

    @property
    def loss_jump(self) -> float:
        return self.loss_grown - self.loss_original

    @property
    def count_ok(self) -> bool:
        return self.params_grown == self.params_analytic

    @property
    def preserved(self) -> bool:
        return self.max_abs <= self.tolerance

    @property
    def passed(self) -> bool:
        """Counts match, no new parameter is dead, and an exact growth preserved the logits."""
        return self.count_ok and not self.dead_params and (not self.exact_expected or self.preserved)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "loss_jump": self.loss_jump, "preserved": self.preserved, "passed": self.passed}

    def preservation(self) -> dict[str, float]:
        """The figures recorded in ``progressive.json``."""
        return {"max_abs": self.max_abs, "mse": self.mse, "loss_jump": self.loss_jump, "tokens": self.tokens}


def _fp32(model: LiteLLM) -> LiteLLM:
    return model if model.embed.weight.dtype == torch.float32 else model.float()


@torch.no_grad()
def _logits_and_loss(model: LiteLLM, ids: torch.Tensor) -> tuple[torch.Tensor, float]:
    out = model(ids, labels=ids)
    return out.logits.float(), float(out.lm_loss)


def _new_parameter_names(original: LiteLLM, grown: LiteLLM) -> list[str]:
    """Parameters of ``grown`` that ``original`` lacks or holds with another shape."""
    before = {n: tuple(p.shape) for n, p in original.named_parameters()}
    return [n for n, p in grown.named_parameters() if before.get(n) != tuple(p.shape)]


def _zero_grad_names(model: LiteLLM, ids: torch.Tensor, names: list[str]) -> list[str]:
    model.zero_grad(set_to_none=True)
    model(ids, labels=ids).loss.backward()
    params = dict(model.named_parameters())
    return [n for n in names if params[n].grad is None or not params[n].grad.any()]


def gradient_flow(model: LiteLLM, ids: torch.Tensor, names: list[str], *, sgd_lr: float = 1e-2) -> list[str]:
    """The parameters among ``names`` that get no gradient, even after one SGD step.

    Works on a copy: the model passed in is left untouched."""
    if not names:
        return []
    state = {k: v.clone() for k, v in model.state_dict().items()}
    was_training = model.training
    model.train()
    try:
        silent = _zero_grad_names(model, ids, names)
        if silent:
            with torch.no_grad():
                for p in model.parameters():
                    if p.grad is not None:
                        p.sub_(sgd_lr * p.grad)
            silent = _zero_grad_names(model, ids, silent)
    finally:
        model.zero_grad(set_to_none=True)
        model.load_state_dict(state)
        model.train(was_training)
    return silent


def validate_models(
    original: LiteLLM,
    grown: LiteLLM,
    input_ids: torch.Tensor,
    *,
    exact_expected: bool | None = None,
    tolerance: float = 1e-5,
    check_gradients: bool = True,
) -> ValidationReport:
    """Compare ``grown`` with ``original`` on ``input_ids`` (B, S); see the module docstring."""
    original, grown = _fp32(original).eval(), _fp32(grown).eval()
    a, loss_a = _logits_and_loss(original, input_ids)
    b, loss_b = _logits_and_loss(grown, input_ids)
    if a.shape != b.shape:
        raise ValueError(f"the models disagree on the vocabulary ({a.shape[-1]} vs {b.shape[-1]} logits); growth never changes the vocabulary")
    diff = (a - b).double()
    new = _new_parameter_names(original, grown)
    dead = gradient_flow(grown, input_ids, new) if check_gradients else []
    return ValidationReport(
        max_abs=float(diff.abs().max()),
        mse=float(diff.square().mean()),
        loss_original=loss_a,
        loss_grown=loss_b,
        params_original=original.num_params(),
        params_grown=grown.num_params(),
        params_analytic=grown.config.num_params(),
        new_params=new,
        dead_params=dead,
        exact_expected=exact_expected,
        tolerance=tolerance,
        tokens=int(input_ids.numel()),
    )


def sample_text() -> str:
    """A few kilobytes of real English prose and Python code from the standard library."""
    import inspect
    import json as json_module

    try:
        from pydoc_data.topics import topics

        prose = "\n".join(topics[k] for k in sorted(topics)[:3])
    except ImportError:  # pragma: no cover - some distributions strip pydoc_data
        prose = inspect.getdoc(os) or ""
    return prose[:3000] + "\n" + inspect.getsource(json_module.dumps)[:3000]


def sample_ids(vocab_size: int, tokenizer: Any = None, *, batch: int = 2, seq: int = 64, seed: int = 0) -> torch.Tensor:
    """Sample token ids for validation: the tokenized :func:`sample_text` when a tokenizer
    fits the vocabulary, else seeded random ids."""
    n = batch * seq
    if tokenizer is not None:
        ids = [i for i in tokenizer.encode(sample_text()) if i < vocab_size]
        if len(ids) >= n:
            return torch.tensor(ids[:n]).view(batch, seq)
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (batch, seq), generator=gen)
