"""Retention reports: what each model scores per domain, and how that moved from a base.

After growth and continued training the question is two-sided: did the new domain improve,
and did the old ones hold?  A :class:`RetentionReport` holds validation bits per byte per
domain for a base model and any number of others, and the relative change of each against
the base (negative is better: fewer bits per byte).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class RetentionReport:
    """``scores[model][domain]`` is bits per byte; ``base`` names the reference model."""

    base: str
    domains: list[str]
    scores: dict[str, dict[str, float]] = field(default_factory=dict)

    def change(self, model: str, domain: str) -> float:
        """Relative change of ``model`` against the base on ``domain`` (+0.05: 5% worse)."""
        return self.scores[model][domain] / self.scores[self.base][domain] - 1.0

    def rows(self) -> list[dict[str, Any]]:
        """One row per model: its bits per byte and relative change per domain."""
        out = []
        for model, by_domain in self.scores.items():
            row: dict[str, Any] = {"model": model}
            for d in self.domains:
                row[f"{d}_bpb"] = by_domain[d]
                row[f"{d}_change"] = None if model == self.base else self.change(model, d)
            out.append(row)
        return out

    def to_markdown(self) -> str:
        head = "| model | " + " | ".join(f"{d} bpb | {d} vs base" for d in self.domains) + " |"
        rule = "|---|" + "---|---|" * len(self.domains)
        lines = [head, rule]
        for model in self.scores:
            cells = []
            for d in self.domains:
                change = "base" if model == self.base else f"{self.change(model, d):+.2%}"
                cells += [f"{self.scores[model][d]:.4f}", change]
            lines.append(f"| {model} | " + " | ".join(cells) + " |")
        return "\n".join(lines) + "\n"

    def to_dict(self) -> dict[str, Any]:
        return {"base": self.base, "domains": self.domains, "scores": self.scores, "rows": self.rows()}

    def write(self, directory: str | Path, *, chart: bool = True) -> list[Path]:
        """``retention.json``, ``retention.md`` and, when matplotlib is installed (the ``plot``
        extra), ``retention.png``; without it the chart is skipped with a warning, since the
        table is the report and the chart only draws it."""
        import importlib.util
        import warnings

        from ..plot import plot_retention

        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        written = [out / "retention.json", out / "retention.md"]
        written[0].write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        written[1].write_text(self.to_markdown())
        if chart and importlib.util.find_spec("matplotlib") is None:
            warnings.warn("retention chart skipped: matplotlib is not installed (pip install 'lite-llm[plot]')", stacklevel=2)
        elif chart:
            written.append(plot_retention(self, out / "retention.png"))
        return written
