"""The validation suite: does a grown model do what its growth promised?

Four checks, each against something independent of the growth code, all from one streamed
float64 evaluation of both models (:mod:`lite_llm.grow.streaming_validate`: block by block,
never two whole models in memory):

* **forward equivalence** — the logits of the original (``a``) and the grown model (``b``) on
  the same sample tokens, judged by ``max_rel = max|a - b| / max|a|`` (the largest logit
  change relative to the logits' scale, every logit of the sample, float64) against
  ``tolerance``; ``max_abs`` and the MSE are recorded beside it;
* **gradient flow** — every parameter of a grown block the original does not share receives a
  non-zero gradient, at once or after one plain SGD step (a LLaMA-Pro block's q/k/v sit behind
  its zeroed o_proj);
* **parameter count** — the parameters the grown tensors hold equal the config's analytic count;
* **loss jump** — the change in next-token loss on the sample, which is what a non-exact
  method (SOLAR, stacking, noise) costs before continued training.

A growth that is the identity by construction — every original block passed on unchanged,
every new block with all-zero residual writers (LLaMA-Pro as it is born) — can be *proved*
instead (``prove=True``, what ``validate: auto`` asks for): forward equivalence holds on every
input, bitwise, without evaluating one (the report says ``proved``, with no sample losses);
the gradient flow and parameter count are checked as always.  On a 2-core CPU the float64
forward of the original is the check's whole cost (BENCHMARKS.md, "Validation that streams"),
which ``validate: always`` still pays.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import torch

from ..config import ModelConfig
from ..errors import ConfigError, LiteLLMError
from ..model import LiteLLM, stored_state
from .streaming_validate import Beside, compare_streamed, prove_unchanged
from .tensors import Tensors

# fp32-stored weights of an exact growth evaluated in float64 differ from the source by the
# rounding of the grown weights (measured on SmolLM2: up to ~1e-6 relative); fp32 evaluation
# adds ~1e-6 per layer.  1e-5 relative keeps a margin over both and still flags any real
# change of the function, which moves logits by far more than 1e-3 of their scale.
DEFAULT_TOLERANCE = 1e-5
# The check's cost is sample tokens x (original + unshared grown parameters) x 2 FLOPs in
# float64 plus one read of both models; 128 tokens keep it near the growth's own time on a
# 2-core CPU (BENCHMARKS.md, "Validation that streams"), and any change of the function shows
# on far fewer.
SAMPLE_TOKENS = 128
MEASURE = "max_rel = max|logit change| / max|original logit|, {precision}"
# A depth step not meant to be exact (SOLAR, stacking, interpolation) is measured in float32
# under ``validate: auto``: re-ordering or repeating blocks moves the logits by a good part of
# their scale, far above float32's rounding (up to ~4e-5 of the scale on a 24-layer model),
# and float32 matmuls run faster than float64's (SOLAR's check is 28 blocks of a 1.7 GB
# Llama: BENCHMARKS.md).  A step made inexact by noise stays float64: it moves the logits by
# the noise's scale, which float32's rounding could hide.
COARSE_STEP_DTYPE = torch.float32
PROOF = "proved: every original block passed on unchanged, every new block adds exactly zero (no sample evaluated)"


class ValidationError(LiteLLMError):
    """Two checkpoints that are not a model and its growth (so they cannot be compared)."""


def check_tolerance(value: Any, where: str) -> float:
    """A tolerance as given by a user: a positive finite number (YAML reads ``1e-5``, without a
    dot, as a string, so a string that spells a number is taken as that number)."""
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{where}: tolerance must be a positive number (the largest relative logit change allowed), got {value!r}")
    return float(value)


@dataclass
class ValidationReport:
    """What :func:`check_growth` measured (logit figures in ``precision``, float64 unless a
    step not meant to be exact was measured in float32)."""

    max_abs: float
    max_rel: float
    logits_scale: float
    mse: float
    loss_original: float | None  # None when proved: no sample was evaluated
    loss_grown: float | None
    params_original: int
    params_grown: int
    params_analytic: int
    new_params: list[str] = field(default_factory=list)
    dead_params: list[str] = field(default_factory=list)  # new and still without gradient
    exact_expected: bool | None = None
    tolerance: float = DEFAULT_TOLERANCE
    tokens: int = 0
    shared_blocks: int = 0
    silent_blocks: int = 0  # grown blocks proven (all-zero writers) to pass their input on, not computed
    proved: bool = False  # the grown model is the original by construction (no sample evaluated)
    precision: str = "float64"  # what the sample was evaluated in

    @property
    def loss_jump(self) -> float:
        """The change in next-token loss on the sample (zero when proved: the same function)."""
        if self.proved or self.loss_grown is None or self.loss_original is None:
            return 0.0
        return self.loss_grown - self.loss_original

    @property
    def measure(self) -> str:
        return PROOF if self.proved else MEASURE.format(precision=self.precision)

    @property
    def count_ok(self) -> bool:
        return self.params_grown == self.params_analytic

    @property
    def preserved(self) -> bool:
        return self.max_rel <= self.tolerance

    @property
    def passed(self) -> bool:
        """Counts match, no new parameter is dead, and an exact growth preserved the logits."""
        return self.count_ok and not self.dead_params and (not self.exact_expected or self.preserved)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "loss_jump": self.loss_jump, "preserved": self.preserved, "passed": self.passed, "measure": self.measure}

    def preservation(self) -> dict[str, Any]:
        """The figures recorded in ``progressive.json``."""
        return {
            "max_abs": self.max_abs,
            "max_rel": self.max_rel,
            "logits_scale": self.logits_scale,
            "mse": self.mse,
            "loss_original": self.loss_original,
            "loss_grown": self.loss_grown,
            "loss_jump": self.loss_jump,
            "tokens": self.tokens,
            "tolerance": self.tolerance,
            "preserved": self.preserved,
            "proved": self.proved,
            "measure": self.measure,
        }


def check_growth(
    original_config: ModelConfig,
    original: Tensors,
    grown_config: ModelConfig,
    grown: Tensors,
    input_ids: torch.Tensor | Callable[[], torch.Tensor],
    *,
    exact_expected: bool | None = None,
    tolerance: float = DEFAULT_TOLERANCE,
    check_gradients: bool = True,
    device: torch.device | str | None = None,
    beside: Beside | None = None,
    prove: bool = False,
    dtype: torch.dtype = torch.float64,
) -> ValidationReport:
    """Compare the grown tensors with the original's on ``input_ids`` (B, S), streaming both,
    computing in ``dtype`` (float64 unless told) on ``device`` (default the CPU); ``beside`` see
    :func:`compare_streamed`.  ``prove``: when the grown model is the original by construction
    (:func:`~.streaming_validate.prove_unchanged`), say so instead of evaluating the sample.
    ``input_ids`` may be a callable making the sample, called only when it is evaluated (a
    proof needs none)."""
    if original_config.vocab_size != grown_config.vocab_size:
        raise ValidationError(
            f"the models have different vocabularies ({original_config.vocab_size} vs {grown_config.vocab_size} tokens), "
            "so one is not a growth of the other; compare a grown checkpoint with the one it was grown from"
        )
    c = prove_unchanged(original_config, original, grown_config, grown, check_gradients=check_gradients, device=device, beside=beside) if prove else None
    if c is None:
        ids = input_ids() if callable(input_ids) else input_ids
        c = compare_streamed(original_config, original, grown_config, grown, ids, check_gradients=check_gradients, device=device, beside=beside, dtype=dtype)
    max_rel = c.max_abs / c.scale if c.scale > 0 else (0.0 if c.max_abs == 0 else math.inf)
    return ValidationReport(
        max_abs=c.max_abs,
        max_rel=max_rel,
        logits_scale=c.scale,
        mse=c.sse / max(c.logits, 1),
        loss_original=c.loss_a,
        loss_grown=c.loss_b,
        params_original=c.params_a,
        params_grown=c.params_b,
        params_analytic=grown_config.num_params(),
        new_params=c.new_params,
        dead_params=c.dead_params,
        exact_expected=exact_expected,
        tolerance=tolerance,
        tokens=c.tokens,
        shared_blocks=c.shared_blocks,
        silent_blocks=c.silent_blocks,
        proved=c.proved,
        precision=str(dtype).removeprefix("torch."),
    )


def validate_models(
    original: LiteLLM,
    grown: LiteLLM,
    input_ids: torch.Tensor,
    *,
    exact_expected: bool | None = None,
    tolerance: float = DEFAULT_TOLERANCE,
    check_gradients: bool = True,
    device: torch.device | str | None = None,
) -> ValidationReport:
    """:func:`check_growth` for two models in memory."""
    return check_growth(
        original.config, stored_state(original), grown.config, stored_state(grown), input_ids,
        exact_expected=exact_expected, tolerance=tolerance, check_gradients=check_gradients, device=device,
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


def check_sample(configs: list[ModelConfig], tokenizer: Any = None, tokens: int = SAMPLE_TOKENS) -> torch.Tensor:
    """The validation sample for models of ``configs``: ``tokens`` ids in rows of up to 128
    (within every config's ``max_seq_len``)."""
    seq = max(2, min([128, tokens] + [c.max_seq_len for c in configs]))
    return sample_ids(configs[0].vocab_size, tokenizer, batch=max(1, -(-tokens // seq)), seq=seq)
