"""Growing a checkpoint on disk: open lazily, chain the steps, validate, stream the result.

The source is opened with :func:`open_checkpoint` (hash-verified, nothing loaded), the steps
are chained as lazy tensor mappings, and the output is written with ``write_checkpoint`` one
tensor at a time — so a growth needs memory for a few tensors, not two models.  Unless
``validate="never"``, every step is checked at every size by :func:`check_growth`, which
streams both models block by block in float64 on 128 sample tokens — or, by default
(``validate="auto"``), proves a step that is the identity by construction (LLaMA-Pro) so from
the tensors' origins and the new blocks' zero writers, evaluating nothing, and measures a
depth step not meant to be exact (SOLAR) in float32.  The check runs in a
thread beside the writer (its float64 matmuls and reads release the GIL while the writer
copies and fsyncs); an exact step whose relative logit change exceeds its tolerance stops the
writer at its next tensor, and nothing is committed: the output is swapped into place only
after every check passed.  Each step appends a record (with the figures) to
``progressive.json``'s ``expansions``.

Where the source comes from and what the result is written as are pluggable: ``open_source``
opens something else that looks like a :class:`CheckpointTensors` (a Hugging Face folder, in
:mod:`lite_llm.interop.hf_stream`) and ``write_output`` writes the :class:`GrownModel` in
another format; by default both are the Lite LLM checkpoint.
"""

from __future__ import annotations

import functools
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from ..checkpoint.derived import copied_tokenizer, derivation_record, derive, source_tokenizer, with_record
from ..checkpoint.lazy import CheckpointTensors, check_sound, open_checkpoint
from ..checkpoint.save import write_checkpoint
from ..config import ModelConfig
from ..errors import ConfigError, LiteLLMError
from ..model import LiteLLM, load_stored
from ..runtime.cpu_memory import release_freed_memory
from .importance import layer_importance
from .recipe import VALIDATE_MODES, GrowthStep, parse_step
from .carry import CarriedEWC, carry_ewc
from .common import check_room, refuse_quantized, room_at
from .registry import GrowthOp, get_op
from .tensors import LazyMapping, LazyTensors, Tensors, expected_specs, row_chunks
from .streaming_validate import Beside
from .validate import DEFAULT_TOLERANCE, COARSE_STEP_DTYPE, SAMPLE_TOKENS, ValidationReport, check_growth, check_sample


class GrowthError(LiteLLMError):
    """A growth that would not keep its promise (an exact step changed the function)."""


SourceOpener = Callable[[Path], "tuple[Any, Callable[[], None] | None]"]
"""path -> (a :class:`CheckpointTensors` look-alike, a check of its integrity to run beside
the growth, or None)."""


@dataclass
class GrownModel:
    """What a growth hands its writer: the grown model as lazy tensors (our names, not yet cast
    to ``dtype``), the steps that made it, and what its record says."""

    source: Any  # CheckpointTensors, or a look-alike from an ``open_source``
    config: ModelConfig
    tensors: Tensors
    dtype: torch.dtype
    finish_progressive: Callable[[], dict[str, Any]]
    """The grown model's ``progressive.json``, whose records carry the checks' figures: the
    checks run beside the writer, so a writer calls this once the weights are out, from the
    thread that wrote them (it hands back the writer's turn at large tensors, which the check
    may be waiting for); it blocks until the checks are done and raises what they raised (then
    nothing may be committed, which ``before_commit`` enforces anyway)."""
    chain: list[tuple[GrowthOp, dict[str, Any]]]
    model_version: str
    stop_if_refused: Callable[[], None] = lambda: None
    """Raises the check's error once it has failed: a writer calls it between pieces of work
    that do not go through ``tensors`` (raw byte copies), which stops at the next tensor by
    itself."""


OutputWriter = Callable[..., Path]
"""(output, grown, *, max_shard_bytes, before_commit) -> the path written, atomically."""


@dataclass
class ExpandResult:
    path: Path
    config: ModelConfig
    records: list[dict[str, Any]] = field(default_factory=list)
    reports: list[ValidationReport | None] = field(default_factory=list)


def materialize(config: ModelConfig, tensors: Tensors) -> LiteLLM:
    """A model of ``config`` holding ``tensors`` (every name and shape checked)."""
    return load_stored(LiteLLM(config), tensors).eval()


def _resolve_params(step: GrowthStep, config: ModelConfig, tensors: Tensors, ids: torch.Tensor | None) -> dict[str, Any]:
    """Parameters with measured values filled in (``importance: measured``)."""
    params = dict(step.params)
    if params.get("importance") == "measured":
        if ids is None:
            raise ConfigError("importance: measured needs sample tokens; give explicit scores instead")
        params["importance"] = layer_importance(materialize(config, tensors), ids)
    return params


def expand_checkpoint(
    source: str | os.PathLike,
    output: str | os.PathLike,
    steps: Sequence[GrowthStep | dict[str, Any]],
    *,
    validate: str = "auto",
    tolerance: float | None = None,
    check_tokens: int = SAMPLE_TOKENS,
    verify: bool = True,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = 2 * 1024**3,
    open_source: SourceOpener | None = None,
    write_output: OutputWriter | None = None,
    overwrite: bool = False,
) -> ExpandResult:
    """Grow the checkpoint at ``source`` by ``steps`` into a new checkpoint at ``output``
    (or, with ``open_source`` / ``write_output``, another kind of source / output).

    ``validate``: ``auto`` checks every step (streamed, at any size), proving a step that is
    the identity by construction (LLaMA-Pro's zero-writer blocks between the original's, passed
    on unchanged) instead of evaluating it, and measuring a depth step not meant to be exact
    (SOLAR) in float32; ``always`` evaluates the float64 sample for every step; ``never`` skips the check.  ``check_tokens`` is the sample's size.  ``tolerance`` is the relative logit
    change an exact step may make (a step's own ``tolerance`` wins; None: ``DEFAULT_TOLERANCE``).
    ``overwrite``: replace an existing output (a checkpoint, or a Hugging Face folder), swapped
    in only once the new one is complete and checked."""
    if validate not in VALIDATE_MODES:
        raise ConfigError(f"validate must be one of {', '.join(VALIDATE_MODES)}, got {validate!r}")
    if not steps:
        raise ConfigError("no growth steps given; pass --method or a recipe with steps")
    # a step may also be written as a recipe writes it: {"method": ..., **params}
    steps = [s if isinstance(s, GrowthStep) else parse_step(s, f"step {i}") for i, s in enumerate(steps, 1)]
    # The source's hashes are checked in a background thread while the growth runs, and the
    # output is committed only if they pass: a corrupt source still leaves nothing behind, and
    # one sequential read of the source overlaps the writing instead of preceding it.
    if open_source is None:
        src = open_checkpoint(source, verify=False)
        refuse_quantized(src.config, "grow")
        check: Callable[[], None] | None = lambda: check_sound(src.path)  # noqa: E731
    else:
        src, check = open_source(Path(source))
    tol = DEFAULT_TOLERANCE if tolerance is None else tolerance
    write = write_output or write_grown_checkpoint
    return derive(
        src.path,
        Path(output),
        lambda verified: _expand(src, output, steps, validate, tol, check_tokens, dtype, max_shard_bytes, verified, write),
        check_source=check if verify else None,
        overwrite=overwrite,
    )


def _expand(
    src: CheckpointTensors,
    output: str | os.PathLike,
    steps: Sequence[GrowthStep],
    validate: str,
    tolerance: float,
    check_tokens: int,
    dtype: torch.dtype | None,
    max_shard_bytes: int,
    verified: Future | None,
    write: OutputWriter,
) -> ExpandResult:
    out = Path(output)
    config, tensors = src.config, src.tensors
    dtype = dtype or src.dtype
    chain: list[tuple[GrowthOp, dict[str, Any]]] = []
    planned: list[tuple[GrowthStep, GrowthOp, dict[str, Any], ModelConfig, Tensors, ModelConfig, Tensors]] = []
    do_validate = validate != "never"
    # The sample is made where it is first needed: before planning when a step measures
    # importance on it, else in the check beside the writer, and only if a step is evaluated
    # (a proof needs none): loading SmolLM2's tokenizer takes 0.1 s of a 0.9 s growth.
    ids = _sample(src, check_tokens) if _measures_importance(steps) else None
    with room_at(out, dtype):  # a size the output's disk cannot hold is refused before it is built
        for i, step in enumerate(steps, 1):
            op = get_op(step.method)
            try:
                params = _resolve_params(step, config, tensors, ids)
                new_config, new_tensors = op(config, tensors, **params)
                check_room(new_config, what=step.describe())
            except ConfigError as exc:  # in a recipe, say which step (the model it grows is not the source's)
                if len(steps) == 1:
                    raise
                raise ConfigError(f"step {i} ({step.method}): {exc}") from None
            chain.append((op, params))
            planned.append((step, op, params, config, tensors, new_config, new_tensors))
            config, tensors = new_config, new_tensors

    beside = _Beside()

    def check_and_record() -> tuple[list[dict[str, Any]], list[ValidationReport | None]]:
        records, reports = [], []
        sample = ids if ids is not None else functools.cache(lambda: _sample(src, check_tokens))  # made if a step is evaluated
        for step, op, params, before, before_tensors, after, after_tensors in planned:
            exact = op.exact(params)
            coarse = not exact and op.family == "depth"
            report = _check_step(step, exact, before, before_tensors, after, after_tensors, sample, tolerance, beside, auto=validate == "auto", coarse=coarse) if do_validate else None
            records.append(_record(src, step.method, params, exact, before, after, report))
            reports.append(report)
        return records, reports

    def finish_progressive() -> dict[str, Any]:
        beside.writer_done()
        return with_record(src.progressive, *beside.checked.result()[0])

    def before_commit() -> None:  # whatever the writer: nothing is committed before the check passed
        beside.writer_done()
        beside.checked.result()
        if verified is not None:
            verified.result()

    # The check reads and computes (float64 matmuls, which release the GIL) while the writer
    # copies and fsyncs: two cores busy instead of one after the other (:class:`_Beside`).
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="check-growth") as pool:
        beside.checked = pool.submit(check_and_record)
        grown = GrownModel(
            src, config, _UntilFailed(tensors, beside), dtype, finish_progressive, chain, _grown_version(src.manifest, steps),
            stop_if_refused=beside.stop_if_refused,
        )
        try:
            path = write(out, grown, max_shard_bytes=max_shard_bytes, before_commit=before_commit)
        except BaseException:
            beside.cancel()  # a failed (or interrupted) writer: the check stops at its next block
            raise
        finally:
            beside.writer_done()  # a writer that failed must not keep the check waiting
    records, reports = beside.checked.result()
    return ExpandResult(path, config, records, reports)


class _Beside:
    """How the writer and the check beside it share the work (the check's side is the
    :class:`~.streaming_validate.Beside` protocol).

    * Turns at holding large tensors.  Each side's peak is one large thing at a time: the
      writer's the embedding-sized tensor it writes, the check's the table it embeds from, a
      gradient-checked block, or the head it applies.  Both at once would add them up, which for
      a small model is most of the peak (SmolLM2's tied 113 MB embedding against a 0.68 GB
      output).  The check holds the lock around those phases (:meth:`large`); the writer takes
      it when it asks for one of ``NAMES`` and gives it back when it asks for the next tensor
      (it has written the last one) or is done.
    * The check's verdict for the writer: once ``checked`` has failed, :meth:`stop_if_refused`
      raises its error, so the writer stops instead of writing on for nothing.
    * The writer's failure for the check: after :meth:`cancel` the check stops at its next
      block (:meth:`poll`) instead of computing to the end for a growth that already failed."""

    NAMES = frozenset({"embed.weight", "lm_head.weight"})

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._holding = threading.Lock()  # guards _writer_holds (a writer may produce on several threads)
        self._writer_holds = False
        self._cancelled = threading.Event()
        self.checked: Future = Future()

    def large(self) -> threading.Lock:
        return self._lock

    def poll(self) -> None:
        if self._cancelled.is_set():
            raise GrowthError("the growth stopped before its check finished")

    def cancel(self) -> None:
        self._cancelled.set()

    def stop_if_refused(self) -> None:
        if self.checked.done() and self.checked.exception() is not None:
            raise self.checked.exception()

    def writer_takes(self, name: str) -> None:
        self.writer_done()
        if name in self.NAMES:
            self._lock.acquire()
            with self._holding:
                self._writer_holds = True

    def writer_done(self) -> None:
        with self._holding:
            holds, self._writer_holds = self._writer_holds, False
        if holds:
            self._lock.release()


class _UntilFailed(LazyMapping):
    """``tensors`` for the writer, raising the check's error instead of producing the next
    tensor once the check beside the writer has failed (so a refused growth does not write on
    for nothing).  Every name is a reference to the same name of ``tensors``, so a writer that
    copies unchanged bytes (:func:`~.tensors.origin`) still finds where they lie."""

    def __init__(self, tensors: Tensors, beside: _Beside) -> None:
        self._tensors, self._beside = tensors, beside
        self._names = tensors

    def __getitem__(self, name: str) -> torch.Tensor:
        self._beside.stop_if_refused()
        self._beside.writer_takes(name)
        return self._tensors[name]

    def reference(self, name: str) -> tuple[Tensors, str]:
        return self._tensors, name


def write_grown_checkpoint(
    out: Path, grown: GrownModel, *, max_shard_bytes: int, before_commit: Callable[[], None] | None, tokenizer: Any = None
) -> Path:
    """The default writer: ``grown`` as a Lite LLM checkpoint, its EWC and SI importance carried along,
    its tokenizer ``tokenizer`` (default: a copy of the source checkpoint's)."""
    carried = dict(grown.source.progressive)  # carried_ewc_dirs updates its ewc / si descriptions
    extra_dirs = _carried_ewc(grown.source, grown.chain, carried)

    def progressive() -> dict[str, Any]:
        return {**grown.finish_progressive(), **{name: carried[name] for name in extra_dirs}}

    return write_checkpoint(
        out,
        grown.config,
        _cast(grown.tensors, grown.dtype),
        specs=expected_specs(grown.config, grown.dtype),
        tokenizer=tokenizer if tokenizer is not None else copied_tokenizer(grown.source),
        progressive=progressive,
        extra_dirs=extra_dirs,
        max_shard_bytes=max_shard_bytes,
        before_commit=before_commit,
        model_version=grown.model_version,
        rows=lambda name: row_chunks(grown.tensors, name, grown.dtype, grown.stop_if_refused),
    )


def _carried_ewc(src: CheckpointTensors, chain: list[tuple[GrowthOp, dict[str, Any]]], progressive: dict) -> dict[str, dict[str, torch.Tensor]]:
    """The source's EWC and SI importance carried through the growth (``{}`` when it has none)."""
    return carried_ewc_dirs(
        src, progressive, [op.name for op, _ in chain], lambda f, a: carry_ewc(src.config, src.tensors, chain, f, a)
    )


def carried_ewc_dirs(
    src: CheckpointTensors,
    progressive: dict,
    methods: list[str],
    carry: "Callable[[dict[str, torch.Tensor], dict[str, torch.Tensor]], CarriedEWC]",
) -> dict[str, dict[str, torch.Tensor]]:
    """The grown checkpoint's ``ewc/`` and ``si/`` from the source's (``{}`` when it has
    neither) by ``carry`` (importance, anchor) -> :class:`CarriedEWC`: EWC's Fisher and SI's
    importance are both the weight of a quadratic penalty, so one map keeps both penalties.
    Each description in ``progressive`` gains the growth ``methods`` it went through and the
    entries that lost their importance."""
    from ..checkpoint.ewc import IMPORTANCE_FORMATS, FisherEstimate, has_ewc
    from ..checkpoint.load import load_extra

    dirs: dict[str, dict[str, torch.Tensor]] = {}
    for fmt in IMPORTANCE_FORMATS:
        if not has_ewc(src.manifest, fmt):
            continue
        estimate = FisherEstimate.from_tensors(load_extra(src.path, fmt.directory, manifest=src.manifest), fmt=fmt)
        carried = carry(estimate.fisher, estimate.anchor)
        meta = dict(progressive.get(fmt.directory) or {})
        meta["carried_through"] = list(meta.get("carried_through") or []) + methods
        meta["unmapped_entries"] = int(meta.get("unmapped_entries") or 0) + carried.unmapped
        progressive[fmt.directory] = meta
        dirs[fmt.directory] = FisherEstimate(carried.fisher, carried.anchor).to_tensors(fmt)
    return dirs


def _grown_version(manifest: dict, steps: Sequence[GrowthStep]) -> str:
    """The source's model_version, bumped: minor when every step only adds things an old reader
    can skip (experts or tiers it cannot route to), major otherwise."""
    from ..checkpoint.manifest import MODEL_VERSION_DEFAULT, next_major_version, next_minor_version

    version = manifest.get("model_version", MODEL_VERSION_DEFAULT)
    additive = all(step.method == "add_tier" for step in steps)
    return next_minor_version(version) if additive else next_major_version(version)


def _sample(src: CheckpointTensors, tokens: int) -> torch.Tensor:
    """The check's sample of ``tokens`` ids, from the source's tokenizer."""
    ids = check_sample([src.config], source_tokenizer(src), tokens)
    release_freed_memory()  # the tokenizer that made it (SmolLM2's: 30 MB) is gone; return its heap
    return ids


def _measures_importance(steps: Sequence[GrowthStep]) -> bool:
    return any(step.params.get("importance") == "measured" for step in steps)


def _check_step(
    step: GrowthStep,
    exact: bool,
    before: ModelConfig,
    tensors: Tensors,
    after: ModelConfig,
    grown: Tensors,
    ids: torch.Tensor | Callable[[], torch.Tensor],
    tolerance: float,
    beside: Beside | None = None,
    *,
    auto: bool = False,
    coarse: bool = False,
) -> ValidationReport:
    """The streamed check of one step; an exact step that changed the logits is refused.
    ``auto`` (``validate: auto``) checks at the least cost that answers: a step that is the
    identity by construction is proved so, not evaluated, and a ``coarse`` one (a depth step
    not meant to be exact) is measured in float32 (``validate: always``: float64 for every
    step; see ``COARSE_STEP_DTYPE``)."""
    tolerance = step.tolerance if step.tolerance is not None else tolerance
    dtype = COARSE_STEP_DTYPE if auto and coarse else torch.float64
    report = check_growth(before, tensors, after, grown, ids, exact_expected=exact, tolerance=tolerance, beside=beside, prove=auto, dtype=dtype)
    if exact and not report.preserved:
        raise GrowthError(
            f"{step.describe()} is meant to be exact but changed the logits by {report.max_rel:.3g} of their scale "
            f"({report.max_abs:.3g} absolute, float64; tolerance {tolerance:g}); nothing was written — "
            "pass a larger --tolerance (or tolerance: in the recipe) to accept it, or report this"
        )
    return report


def _cast(tensors: Tensors, dtype: torch.dtype) -> Tensors:
    """``tensors`` held in ``dtype`` (the output dtype; by default the source's)."""

    def cast(name: str) -> torch.Tensor:
        t = tensors[name]
        return t if t.dtype == dtype else t.to(dtype)

    return LazyTensors({k: (lambda k=k: cast(k)) for k in tensors})


def _record(
    src: CheckpointTensors,
    method: str,
    params: dict[str, Any],
    exact: bool,
    before: ModelConfig,
    after: ModelConfig,
    report: ValidationReport | None,
) -> dict[str, Any]:
    """The ``progressive.json`` record of one growth step and what its check measured."""
    return derivation_record(
        src, method, params, exact, before, after,
        preservation=report.preservation() if report is not None else None,
        dead_params=report.dead_params if report is not None else None,
        note=None if report is not None else "not measured: validation was off (validate: never); run lite-llm validate",
    )
