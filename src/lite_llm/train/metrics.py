"""Metrics sinks: a JSONL file (always) and TensorBoard (when installed)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from ..errors import LiteLLMError


def _scalars(record: dict[str, Any], prefix: str = "") -> dict[str, float]:
    out: dict[str, float] = {}
    for key, value in record.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_scalars(value, name + "/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            out[name] = float(value)
    return out


class MetricsLogger:
    """Appends one JSON object per logged step to ``path`` and mirrors scalars to TensorBoard."""

    def __init__(self, path: str | Path | None) -> None:
        self.path = Path(path) if path is not None else None
        self._file = None
        self._tb = None
        self._last: dict[str, Any] = {}
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = self.path.open("a")
            try:  # optional: only when tensorboard is installed
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(self.path.parent / "tensorboard"))
            except Exception:
                self._tb = None

    def log(self, record: dict[str, Any]) -> None:
        for key, value in record.items():
            self._last[key] = value
        if self._file is not None:
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()
        if self._tb is not None:
            step = int(record.get("step", 0))
            for name, value in _scalars({k: v for k, v in record.items() if k not in ("step", "expert_routes")}).items():
                self._tb.add_scalar(name, value, step)

    def drop_from(self, step: int) -> int:
        """Remove the rows of steps ``>= step`` (a resumed run re-runs them, and its rows replace
        theirs rather than follow them).  The file is rewritten atomically.  Returns how many
        records were dropped (a row cut short by a killed run is dropped too, not counted)."""
        if self.path is None or not self.path.exists():
            return 0
        from ..checkpoint.atomic import replace_file

        if self._file is not None:
            self._file.close()
        rows = _records(self.path)  # a row cut short by a killed run is dropped with the re-run ones
        kept = [line for line, record in rows if record["step"] < step]
        replace_file(self.path, "".join(line + "\n" for line in kept).encode())  # durable before the new rows follow
        self._file = self.path.open("a")
        return len(rows) - len(kept)

    def last(self, key: str) -> Any:
        return self._last.get(key)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """All records of a metrics file (a run directory or the JSONL file itself).  A last line
    cut short (a run killed while writing it) is left out; any other line that is not a
    record is one sentence naming the file and the line."""
    path = Path(path)
    if path.is_dir():
        path = path / "metrics.jsonl"
    if not path.is_file():
        raise LiteLLMError(f"no metrics at {path}; point at a run directory that `lite-llm train` wrote")
    return [record for _, record in _records(path)]


def _records(path: Path) -> list[tuple[str, dict[str, Any]]]:
    """(line, record) for each record of ``path``; see :func:`read_metrics`."""
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    last = max((n for n, line in enumerate(lines, 1) if line.strip()), default=0)
    out: list[tuple[str, dict[str, Any]]] = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            out.append((line, record))
        elif number < last or not out:  # a cut-short last line, but not the only one
            raise LiteLLMError(f"line {number} of {path} is not a metrics record; delete or repair that line and run again")
    return out
