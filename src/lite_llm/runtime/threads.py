"""How many CPU threads a run uses and how idle threads wait, so that a run beside other
CPU-bound processes slows down in proportion to the cores it loses instead of collapsing.

Why the wait policy: PyTorch's CPU kernels (and MKL and oneDNN inside it) run on one OpenMP
thread team, here GNU libgomp.  With ``OMP_WAIT_POLICY`` unset, libgomp lets a thread that
reaches a barrier, or waits for the next parallel region, spin for ~3 ms (300,000 iterations)
before it sleeps.  On an idle machine that spin hides the wake-up latency.  Beside another
busy process it is what breaks a run: a team member that the kernel has descheduled holds up
every barrier, and the members that got there first spin on the cores the late one (or the
other process) needs.  A 2-thread training run fell to 0.32x of its idle speed beside one
single-threaded busy loop (BENCHMARKS.md, "Training under contention").  With a passive wait a
thread that has nothing to do sleeps at once, so its core goes to whichever task can use it —
but on an idle machine every wake-up then costs a futex round trip, and the quickstart ran at
0.60x of its spinning speed.  Neither is right everywhere, so the default is chosen when
lite_llm loads, from what else is running then (:func:`others_running`): passive when other
tasks are runnable, the runtime's spin when the machine is idle.  The wait policy changes
nothing that is computed, so choosing it by load keeps every number bitwise.  A competitor
that starts after the run began finds the spinning policy; ``LITE_LLM_OPENMP_WAIT=passive``
(or ``OMP_WAIT_POLICY``) fixes the policy for such machines.

Why the thread count is not chosen from the load: how many threads a run has decides how
ATen splits its reductions, hence the rounding of every step.  The quickstart's per-step
losses differ from the third step on between 1 and 2 threads.  A count picked from the load
average would make the same command give other numbers on a busy machine than on an idle one,
so the default stays what PyTorch picks (``OMP_NUM_THREADS``, else every CPU this process may
run on).  ``--threads`` changes it explicitly.  The wait policy changes nothing that is
computed: it only decides what a thread does while it has no work.

When the setting takes effect: libgomp reads its environment once, when ``import torch``
loads it, and has no call to change the wait policy afterwards.  So :func:`set_openmp_defaults`
runs from ``lite_llm/__init__.py`` before anything of ours imports torch, and only fills in
variables the user left unset.  A process that imported torch before lite_llm keeps the policy
its environment gave torch at that moment.  :func:`describe` reports which case applies.
The thread *count* can change at any time (``torch.set_num_threads``), so
:func:`apply_thread_policy` needs no re-exec.

This module must not import torch at module level (see above).  CPU only: nothing here
touches how CUDA computes.
"""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass

from ..errors import ConfigError

# The variables each OpenMP runtime reads for how idle threads wait.  ``OMP_WAIT_POLICY`` is
# the standard one (libgomp and Intel's libiomp5 both honour it); ``GOMP_SPINCOUNT`` is
# libgomp's, ``KMP_BLOCKTIME`` libiomp5's.  A user who set any of them chose a policy: keep it.
WAIT_VARIABLES = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")
PASSIVE_WAIT = {"OMP_WAIT_POLICY": "PASSIVE"}
# Our own switch: auto (the default: passive when the machine is busy at start), passive, spin.
CHOICE_VARIABLE = "LITE_LLM_OPENMP_WAIT"
CHOICES = ("auto", "passive", "spin")

_torch_first: bool | None = None  # whether torch was loaded before set_openmp_defaults first ran
_reason: str = ""  # why set_openmp_defaults chose what it chose, for the run header


def others_running(samples: int = 5, interval_s: float = 0.004) -> int | None:
    """How many tasks besides this one are runnable, the least over a few samples of the
    kernel's ``procs_running`` 4 ms apart (a task that is always runnable is CPU-bound; a
    short-lived one is rarely in every sample).  Counts that the other CPUs of the machine,
    outside this process's affinity mask, can absorb are subtracted.  None where the kernel
    does not say (not Linux)."""
    import time

    counts = []
    for i in range(samples):
        try:
            with open("/proc/stat", "rb") as f:
                line = next(l for l in f if l.startswith(b"procs_running "))
        except (OSError, StopIteration):
            return None
        counts.append(int(line.split()[1]) - 1)  # this process is running while it reads
        if i + 1 < samples:
            time.sleep(interval_s)
    elsewhere = max((os.cpu_count() or 1) - available_cpus(), 0)
    return max(min(counts) - elsewhere, 0)


def choose_wait(environ: Mapping[str, str], others: int | None = None) -> tuple[dict[str, str], str]:
    """The variables :func:`set_openmp_defaults` would add to ``environ``, and why: none when it
    already says how threads wait; else the passive policy when ``LITE_LLM_OPENMP_WAIT`` is
    ``passive``, or it is ``auto`` (the default) and ``others`` (:func:`others_running`,
    measured here when not given) tasks compete for this process's CPUs; else none (spin)."""
    if any(environ.get(name, "") != "" for name in WAIT_VARIABLES):
        return {}, ""
    choice = environ.get(CHOICE_VARIABLE, "").strip().lower() or "auto"
    if choice not in CHOICES:  # read at import, where an exception would be a traceback
        warnings.warn(f"{CHOICE_VARIABLE}={environ[CHOICE_VARIABLE]!r} is not one of {', '.join(CHOICES)}; using auto", stacklevel=2)
        choice = "auto"
    if choice != "auto":
        return (dict(PASSIVE_WAIT) if choice == "passive" else {}), f"{CHOICE_VARIABLE}={choice}"
    others = others_running() if others is None else others
    if others is None:
        return dict(PASSIVE_WAIT), "load unknown"
    reason = f"{others} other runnable task{'s' if others != 1 else ''} at start" if others else "no other runnable task at start"
    return (dict(PASSIVE_WAIT) if others > 0 else {}), reason


def openmp_wait_defaults(environ: Mapping[str, str], others: int | None = None) -> dict[str, str]:
    """Only the variables of :func:`choose_wait`."""
    return choose_wait(environ, others)[0]


def set_openmp_defaults(environ: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """Put the default wait policy into the environment if torch is not loaded yet.

    Returns what was set (empty when the user had chosen, or when torch was imported before
    lite_llm and setting it would no longer reach the OpenMP runtime).  Idempotent.
    """
    global _torch_first
    env = os.environ if environ is None else environ
    loaded = "torch" in sys.modules
    if _torch_first is None:
        _torch_first = loaded
    if loaded:
        return {}
    global _reason
    added, reason = choose_wait(env)
    if environ is None:
        _reason = reason
    env.update(added)
    return added


def wait_policy(environ: Mapping[str, str] | None = None, *, torch_first: bool | None = None) -> str:
    """How idle OpenMP threads wait in this process, in words, from the environment torch
    was loaded with (``environ``; this process's by default)."""
    env = os.environ if environ is None else environ
    first = bool(_torch_first) if torch_first is None else torch_first
    policy = env.get("OMP_WAIT_POLICY", "").strip().lower()
    spin = env.get("GOMP_SPINCOUNT", "").strip()
    blocktime = env.get("KMP_BLOCKTIME", "").strip()
    if spin:
        words = f"OpenMP spin count {spin}"
    elif blocktime:
        words = f"OpenMP block time {blocktime} ms"
    elif policy in ("passive", "active"):
        words = f"OpenMP {policy} wait"
    elif _reason and environ is None and not first:
        words = "OpenMP spin-then-sleep wait"
    else:
        words = "OpenMP spin-then-sleep wait (runtime default)"
    if first and not any(env.get(name, "") for name in WAIT_VARIABLES):
        words += ", torch was imported before lite_llm"
    elif _reason and environ is None and not first:
        words += f" ({_reason})"
    return words


def available_cpus() -> int:
    """CPUs this process may run on: its affinity mask (``taskset``, cgroups' cpusets), not
    the CPUs the machine has."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


@dataclass(frozen=True)
class ThreadPolicy:
    """What a run uses: ``threads`` intra-op threads of the ``cpus`` it may run on, chosen by
    ``source`` (``--threads``, ``OMP_NUM_THREADS`` or PyTorch's default), waiting as ``wait``."""

    threads: int
    cpus: int
    source: str
    wait: str

    def describe(self) -> str:
        """One line for a run's header, e.g. ``threads: 2 of 2 CPUs, OpenMP passive wait``."""
        head = f"threads: {self.threads} of {self.cpus} CPU{'s' if self.cpus != 1 else ''}"
        if self.source != "default":
            head += f" ({self.source})"
        if self.threads > self.cpus:
            head += ", more threads than CPUs"
        return f"{head}, {self.wait}"


def check_threads(threads: object) -> int | None:
    """``threads`` as given to ``--threads``: None (the default) or a positive integer."""
    if threads is None:
        return None
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ConfigError(f"--threads must be a whole number of at least 1, got {threads!r}; omit it to use every CPU this process may run on")
    return threads


def apply_thread_policy(threads: int | None = None) -> ThreadPolicy:
    """Set this process's CPU thread count and return what is in effect.

    ``threads=None`` keeps PyTorch's default, which is what every earlier run used and so keeps
    its numbers bitwise: ``OMP_NUM_THREADS`` when set, else the CPUs in the affinity mask.
    A count changes how reductions are split, so runs with different counts round
    differently; the wait policy (set at import, see the module docstring) never does.
    """
    import torch

    wanted = check_threads(threads)
    if wanted is not None:
        torch.set_num_threads(wanted)
        source = "--threads"
    else:
        source = "OMP_NUM_THREADS" if os.environ.get("OMP_NUM_THREADS", "").strip() else "default"
    return ThreadPolicy(threads=torch.get_num_threads(), cpus=available_cpus(), source=source, wait=wait_policy())
