"""Step-numbered checkpoints of a run, pruned to the last few (protected ones always kept)."""

from __future__ import annotations

import json
import os
import shutil
import re
from pathlib import Path
from typing import Any, Iterable

from ..errors import CheckpointError
from ..model import LiteLLM
from . import atomic
from .manifest import MANIFEST
from .save import save_checkpoint

_STEP_DIR = re.compile(r"^step-(\d+)$")
PROTECTED_FILE = "protected.json"


class CheckpointManager:
    """Checkpoints at ``run_dir/checkpoints/step-00000100``; keeps the last ``keep_last``.

    After each :meth:`save` older checkpoints are deleted, except the one just written and
    protected ones.  Protect a checkpoint with ``save(..., protect=True)`` or :meth:`protect`
    (both persisted in ``checkpoints/protected.json``, so protection survives a restart), or
    for this manager only with the ``protected`` argument / the mutable ``protected`` set
    (steps, directory names or paths).
    Not safe for several processes saving into the same run at once.
    """

    def __init__(self, run_dir: str | os.PathLike, keep_last: int = 3, protected: Iterable[int | str | os.PathLike] = ()) -> None:
        if not isinstance(keep_last, int) or keep_last < 1:
            raise CheckpointError(f"keep_last must be an integer >= 1, got {keep_last!r}; pass how many recent checkpoints to keep")
        self.run_dir = Path(run_dir)
        self.dir = self.run_dir / "checkpoints"
        self.keep_last = keep_last
        self.protected: set[int | str | os.PathLike] = set(protected)

    # ----------------------------------------------------------------------------- naming
    def path_for(self, step: int) -> Path:
        if not isinstance(step, int) or step < 0:
            raise CheckpointError(f"checkpoint step must be a non-negative integer, got {step!r}")
        return self.dir / f"step-{step:08d}"

    def _name(self, ref: int | str | os.PathLike) -> str:
        if isinstance(ref, int) or (isinstance(ref, str) and ref.isdigit()):
            return self.path_for(int(ref)).name
        return Path(ref).name

    @staticmethod
    def step_of(path: str | os.PathLike) -> int | None:
        match = _STEP_DIR.match(Path(path).name)
        return int(match.group(1)) if match else None

    # ----------------------------------------------------------------------------- protection
    def protected_names(self) -> set[str]:
        """Directory names never pruned: this manager's ``protected`` plus the persisted ones."""
        return {self._name(p) for p in self.protected} | self._persisted()

    def _persisted(self) -> set[str]:
        path = self.dir / PROTECTED_FILE
        if not path.is_file():
            return set()
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            raise CheckpointError(f"{path} is not valid JSON; fix or delete it (it lists checkpoints that must never be pruned)") from None
        return {str(n) for n in data} if isinstance(data, list) else set()

    def _write_persisted(self, names: set[str]) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        atomic.replace_file(self.dir / PROTECTED_FILE, (json.dumps(sorted(names), indent=2) + "\n").encode())

    def protect(self, ref: int | str | os.PathLike) -> None:
        """Never prune this checkpoint (a step, directory name or path); persisted."""
        self._write_persisted(self._persisted() | {self._name(ref)})

    def unprotect(self, ref: int | str | os.PathLike) -> None:
        name = self._name(ref)
        self.protected.difference_update({p for p in self.protected if self._name(p) == name})
        self._write_persisted(self._persisted() - {name})

    def clean_interrupted(self) -> list[Path]:
        """Remove what a killed process left half-done: checkpoint directories renamed for
        deletion (``.step-N.deleting-*``) and unfinished writes (``.step-N.tmp-*``) of
        processes that are gone.  Call it only while holding the run's lock."""
        if not self.dir.is_dir():
            return []
        leftovers = [p for p in self.dir.iterdir() if p.is_dir() and p.name.startswith(".step-") and (".deleting-" in p.name or ".tmp-" in p.name)]
        for p in leftovers:
            shutil.rmtree(p, ignore_errors=True)
        return leftovers

    # ----------------------------------------------------------------------------- listing
    def list(self) -> list[Path]:
        """Complete checkpoints of this run, oldest step first."""
        if not self.dir.is_dir():
            return []
        found = [p for p in self.dir.iterdir() if _STEP_DIR.match(p.name) and (p / MANIFEST).is_file()]
        return sorted(found, key=lambda p: (self.step_of(p), p.name))

    def latest(self) -> Path | None:
        """The checkpoint with the highest step, or None."""
        found = self.list()
        return found[-1] if found else None

    # ----------------------------------------------------------------------------- saving
    def save(self, step: int, model: LiteLLM, *, protect: bool = False, **kwargs: Any) -> Path:
        """Save ``model`` as the checkpoint of ``step`` (keyword arguments as for
        :func:`save_checkpoint`), then prune.  Returns its path."""
        path = save_checkpoint(self.path_for(step), model, **kwargs)
        if protect:
            self.protect(path)
        self.prune(keep=path)
        return path

    def prune(self, keep: str | os.PathLike | None = None) -> list[Path]:
        """Delete all but the last ``keep_last`` checkpoints, ``keep`` and the protected ones.
        Returns the deleted paths."""
        found = self.list()
        spared = {p.name for p in found[-self.keep_last :]} | self.protected_names()
        if keep is not None:
            spared.add(Path(keep).name)
        deleted = []
        for p in found:
            if p.name not in spared:
                atomic.remove_dir(p)
                deleted.append(p)
        return deleted
