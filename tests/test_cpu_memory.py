"""keep_freed_memory: checked against the kernel's own page-fault counter, in fresh processes
(the setting is process-wide, so it must not leak into the test process)."""

from __future__ import annotations

import statistics
import subprocess
import sys

import pytest

from lite_llm.runtime.cpu_memory import GLIBC

pytestmark = pytest.mark.skipif(not GLIBC, reason="keep_freed_memory acts on glibc only")

# Allocate, touch and free a 96 MiB tensor nine times; print the page faults of each of the last
# six rounds.  Without the setting every round gets fresh pages from mmap; with it the heap hands
# the same memory back once it has settled (where a block lands depends on where the randomised
# heap starts, and an early round's block may not fit the next, differently aligned request).
_PROBE = """
import resource, sys, torch
from lite_llm.runtime.cpu_memory import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory() and keep_freed_memory()
def faults_of_one_round():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t = torch.ones(96 * 2**20 // 4)
    del t
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(*[faults_of_one_round() for _ in range(9)][3:])
"""


def _faults_per_round(mode: str) -> list[int]:
    out = subprocess.run([sys.executable, "-c", _PROBE, mode], check=True, capture_output=True, text=True)
    return [int(n) for n in out.stdout.split()]


def test_freed_memory_is_reused_without_new_page_faults() -> None:
    system = _faults_per_round("system")
    kept = _faults_per_round("keep")
    assert min(system) >= 48, f"without the setting each fresh 96 MiB block should fault (>= 48 huge pages), saw {system}"
    assert statistics.median(kept) <= min(system) // 10, f"with memory kept, most rounds should not fault: {kept} vs {system}"
