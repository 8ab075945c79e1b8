"""`lite-llm train`'s options for :class:`TrainConfig`, made from the dataclass itself.

Each TrainConfig field carries its help text, flag and how a command line spells it
(``metadata`` of :func:`lite_llm.train.config._setting`); this module turns every field into a
typer option and the options a user gave back into TrainConfig fields.  A new field appears on
the command line by being declared, once, in TrainConfig.

Every option defaults to ``None`` (not given): a run takes the field from ``--config`` or the
saved run when resuming, and from TrainConfig's default otherwise — the default the help shows.
"""

from __future__ import annotations

import dataclasses
import inspect
from pathlib import Path
from typing import Any, Optional

import typer

from ..errors import LiteLLMError
from ..train.config import NON_NEGATIVE_INTS, POSITIVE_INTS, TrainConfig
from .app import option_flag

# how each kind of field is typed on the command line
_CLI_TYPES: dict[str | None, Any] = {"weights": str, "names": str, "freeze": list[str], "path": Path}
_METAVARS = {"weights": "DOMAIN=W,...", "names": "NAME,...", "freeze": "PATTERN[@STEP]"}


def flag_of(name: str) -> str:
    """The command-line flag of TrainConfig field ``name`` (e.g. ``--tiers`` for ``tierset``)."""
    spec = next(f for f in dataclasses.fields(TrainConfig) if f.name == name)
    return spec.metadata.get("flag") or option_flag(name)


def _default_text(spec: dataclasses.Field) -> str:
    default = spec.default_factory() if spec.default_factory is not dataclasses.MISSING else spec.default  # type: ignore[misc]
    if default in (None, {}, []):
        return "none"
    return str(default).lower() if isinstance(default, bool) else str(default)


def train_config_parameters() -> list[inspect.Parameter]:
    """One keyword parameter per TrainConfig field, its default a typer option."""
    params = []
    for spec in dataclasses.fields(TrainConfig):
        kind = spec.metadata.get("kind")
        flag = flag_of(spec.name)
        if spec.type in ("bool", bool):
            decls: tuple[str, ...] = (f"{flag}/--no-{flag[2:]}",)
            annotation: Any = Optional[bool]
        else:
            decls = (flag,)
            annotation = Optional[_CLI_TYPES.get(kind) or {"int": int, "float": float, "str": str}[str(spec.type)]]
        bounds = {"min": 1} if spec.name in POSITIVE_INTS else {"min": 0} if spec.name in NON_NEGATIVE_INTS else {}
        extra = {"metavar": _METAVARS[kind]} if kind in _METAVARS else {}
        # The default is said in the help: the option's own default is None (not given), and a
        # string show_default is printed in parentheses, "[default: (200)]".
        default = _default_text(spec)
        help_text = spec.metadata["help"] + ("" if default == "none" else f" Default: {default}.")
        option = typer.Option(None, *decls, help=help_text, show_default=False, **bounds, **extra)
        params.append(inspect.Parameter(spec.name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=annotation))
    return params


def train_config_fields(options: dict[str, Any]) -> dict[str, Any]:
    """The TrainConfig fields of the options that were given (``None`` means not given)."""
    fields: dict[str, Any] = {}
    for spec in dataclasses.fields(TrainConfig):
        value = options.get(spec.name)
        if value is None or value == []:
            continue
        kind = spec.metadata.get("kind")
        if kind == "weights":
            value = parse_weights(value, flag_of(spec.name))
        elif kind == "names":
            value = [name.strip() for name in value.split(",") if name.strip()]
        elif kind == "freeze":
            value = [_freeze_rule(item) for item in value]
        elif kind == "path":
            value = str(value)
        fields[spec.name] = value
    return fields


def parse_weights(text: str, flag: str = "--domains") -> dict[str, float]:
    """``'code=0.7,prose=0.3'`` -> ``{"code": 0.7, "prose": 0.3}``."""
    weights = {}
    for part in text.split(","):
        name, sep, value = part.partition("=")
        try:
            weights[name.strip()] = float(value)
        except ValueError:
            sep = ""
        if not sep or not name.strip():
            raise LiteLLMError(f"cannot read {flag} weight {part!r}; write DOMAIN=WEIGHT, e.g. code=0.7,prose=0.3")
    return weights


def _freeze_rule(item: str) -> dict[str, Any]:
    pattern, sep, thaw = item.rpartition("@") if "@" in item else (item, "", "")
    if (sep and not thaw.isdigit()) or not pattern:
        raise LiteLLMError(f"cannot read --freeze {item!r}; write PATTERN or PATTERN@STEP, e.g. 'layers.0.*@200'")
    return {"patterns": [pattern], "thaw_at": int(thaw) if sep else None}
