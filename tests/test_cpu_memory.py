"""keep_freed_memory: checked against the kernel's own page-fault counter, in fresh processes
(the setting is process-wide, so it must not leak into the test process)."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="keep_freed_memory acts on glibc only"
)

# Allocate, touch and free a 96 MiB tensor twice; print the page faults of the second round.
# Without the setting both rounds get fresh pages from mmap; with it the second reuses the first's.
_PROBE = """
import resource, sys, torch
from lite_llm.cpu_memory import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory() and keep_freed_memory()
def faults_of_one_round():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t = torch.ones(96 * 2**20 // 4)
    del t
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
faults_of_one_round()
print(faults_of_one_round())
"""


def _second_round_faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", _PROBE, mode], check=True, capture_output=True, text=True)
    return int(out.stdout.strip().splitlines()[-1])


def test_freed_memory_is_reused_without_new_page_faults() -> None:
    system = _second_round_faults("system")
    kept = _second_round_faults("keep")
    assert system >= 24, f"without the setting a fresh 96 MiB block should fault (>= 24 huge pages), saw {system}"
    assert kept <= system // 10, f"with memory kept the second round should barely fault: {kept} vs {system}"
