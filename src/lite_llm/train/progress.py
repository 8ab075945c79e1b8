"""A rich progress bar for training: step, loss, tokens/s, learning rate and tier shares."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


class TrainProgress:
    def __init__(self, total: int, start: int, enabled: bool = True) -> None:
        self.enabled = enabled
        self.console = Console(stderr=True)
        self._progress = Progress(
            TextColumn("[bold]train"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[stats]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=self.console,
            disable=not enabled,
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
        parts = [f"loss {record['loss']:.3f}", f"{record.get('tokens_per_s', 0):,.0f} tok/s", f"lr {record['lr']:.2e}"]
        shares = record.get("tier_share")
        if shares:
            parts.append(" ".join(f"{name} {share:.0%}" for name, share in shares.items()))
        if "val" in record:
            parts.append("val bpb " + " ".join(f"{d} {s['bpb']:.2f}" for d, s in record["val"].items()))
        self._progress.update(self._task, completed=step, stats=" | ".join(parts))

    def warn(self, message: str) -> None:
        self.console.print(f"[yellow]warning:[/yellow] {message}")
