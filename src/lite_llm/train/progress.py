"""Training progress: step, loss, tokens/s, learning rate and tier shares.

On a terminal, a rich progress bar.  In a log or a pipe a bar is drawn once, at the end, fitted
into 80 columns (its stats elided: ``t… loss 4.309 | … | val bp…``), so there one plain line
is written every ~5% of the run and at every evaluation instead, as transformers' and
torchtitan's trainers log."""

from __future__ import annotations

import time
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class TrainProgress:
    def __init__(self, total: int, start: int, enabled: bool = True) -> None:
        self.enabled = enabled
        self.console = Console(stderr=True)
        self.plain = enabled and not self.console.is_terminal and not self.console.is_jupyter  # a notebook keeps its live bar
        self._total, self._started = total, time.monotonic()
        self._every = max(1, (total - start) // 20)  # plain lines: about twenty a run, and every evaluation
        self._progress = Progress(
            TextColumn("[bold]train"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[stats]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=self.console,
            disable=not enabled or self.plain,
            transient=False,
        )
        self._task = self._progress.add_task("train", total=total, completed=start, stats="")

    def __enter__(self) -> "TrainProgress":
        self._progress.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._progress.__exit__(*exc)

    def update(self, step: int, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        if self.plain and not ("val" in record or step % self._every == 0 or step == self._total):
            return
        parts = [f"loss {record['loss']:.3f}", f"{record.get('tokens_per_s', 0):,.0f} tok/s", f"lr {record['lr']:.2e}"]
        shares = record.get("tier_weight_share") or record.get("tier_share")  # routing weight: meaningful at any k_tier
        if shares:
            parts.append(" ".join(f"{name} {share:.0%}" for name, share in shares.items()))
        if "val" in record:
            parts.append("val bpb " + " ".join(f"{d} {s['bpb']:.2f}" for d, s in record["val"].items()))
        if self.plain:
            elapsed = time.strftime("%H:%M:%S", time.gmtime(time.monotonic() - self._started))
            self.console.print(f"train step {step}/{self._total} | {' | '.join(parts)} | {elapsed}", soft_wrap=True, highlight=False, markup=False)
        else:
            self._progress.update(self._task, completed=step, stats=" | ".join(parts))

    def warn(self, message: str) -> None:
        self.console.print(f"[yellow]warning:[/yellow] {message}", soft_wrap=self.plain)
