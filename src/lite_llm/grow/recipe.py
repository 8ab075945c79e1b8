"""Growth recipes: a YAML/JSON list of growth steps, checked before anything runs.

```yaml
# grow.yaml
source: runs/small/checkpoints/step-00000300  # optional when given on the command line
output: runs/grown                            # optional likewise
steps:
  - method: llama_pro
    target_layers: 12
  - method: width
    d_model: 384
validate: auto                  # auto (prove identity steps, evaluate the rest) | always (evaluate every step) | never
tolerance: 1e-5                 # optional: largest relative logit change an exact step may make
```
Each step is a method name from :func:`available_ops` and that method's parameters, and
optionally its own ``tolerance`` (which wins over the recipe's).  A tolerance is relative to the
logits' scale: ``max|a - b| / max|a|`` in float64 (see :mod:`lite_llm.grow.validate`).
``importance: measured`` (for ``llama_pro``) measures layer importance on sample data first.

A recipe may also come on standard input: ``--recipe -`` (or ``/dev/stdin``, or any other
existing file that is not a regular one, such as a named pipe or ``<(...)``), as any config file may.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from .registry import get_op
from .validate import check_tolerance

VALIDATE_MODES = ("auto", "always", "never")


@dataclass
class GrowthStep:
    method: str
    params: dict[str, Any] = field(default_factory=dict)
    tolerance: float | None = None  # this step's own; None: the recipe's or the default

    def describe(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.params.items())
        return f"{self.method}({args})"


# What a growth writes: a Lite LLM checkpoint, or a Hugging Face (transformers) folder.
OUTPUT_FORMATS = ("checkpoint", "hf")


@dataclass
class Recipe:
    steps: list[GrowthStep]
    source: str | None = None
    output: str | None = None
    validate: str = "auto"
    tolerance: float | None = None
    format: str = "checkpoint"  # the output's: a Lite LLM checkpoint, or "hf" (a transformers folder)

    @classmethod
    def from_dict(cls, data: Any, where: str = "recipe") -> "Recipe":
        if not isinstance(data, dict):
            raise ConfigError(f"{where} must be a mapping with a 'steps' list")
        unknown = sorted(set(data) - {"steps", "source", "output", "validate", "tolerance", "format"})
        if unknown:
            raise ConfigError(f"{where} has unknown key {unknown[0]!r}; expected steps, source, output, validate, tolerance, format")
        output_format = str(data.get("format", "checkpoint"))
        if output_format not in OUTPUT_FORMATS:
            raise ConfigError(f"{where}: format must be one of {', '.join(OUTPUT_FORMATS)}, got {output_format!r}")
        raw_steps = data.get("steps")
        if not isinstance(raw_steps, list) or not raw_steps:
            raise ConfigError(f"{where} needs a non-empty 'steps' list, each step a mapping with a 'method'")
        validate = str(data.get("validate", "auto"))
        if validate not in VALIDATE_MODES:
            raise ConfigError(f"{where}: validate must be one of {', '.join(VALIDATE_MODES)}, got {validate!r}")
        tolerance = check_tolerance(data["tolerance"], where) if data.get("tolerance") is not None else None
        for key in ("source", "output"):  # a number or a list here would fail later as a TypeError, far from the file
            if data.get(key) is not None and not isinstance(data[key], str):
                raise ConfigError(f"{where}: {key} must be a path, got {data[key]!r}; write it as a string or leave it out")
        steps = [parse_step(raw, f"{where} step {i + 1}") for i, raw in enumerate(raw_steps)]
        return cls(steps, data.get("source"), data.get("output"), validate, tolerance, output_format)

    @classmethod
    def from_file(cls, path: str | Path) -> "Recipe":
        """The recipe in ``path``; ``-`` is standard input (:func:`~lite_llm.config.files.read_config_file`)."""
        from ..config import load_config_file

        return load_config_file(path, "recipe", lambda data: cls.from_dict(data, where=f"recipe {path}"))


def parse_step(raw: Any, where: str) -> GrowthStep:
    """One step, its method looked up and its parameter names checked."""
    if not isinstance(raw, dict) or "method" not in raw:
        raise ConfigError(f"{where} must be a mapping with a 'method' key, got {raw!r}")
    params = {k: v for k, v in raw.items() if k not in ("method", "tolerance")}
    tolerance = check_tolerance(raw["tolerance"], where) if raw.get("tolerance") is not None else None
    try:
        op = get_op(str(raw["method"]))
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    try:
        op.check_params(params)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    return GrowthStep(op.name, params, tolerance)
