"""Thread policy: the OpenMP wait policy reaches the runtime (libgomp's own report of its
settings is the oracle), idle threads stop burning CPU, the user's choices are kept, and
``--threads`` is applied or refused in one sentence.

The wait policy is read once per process when torch loads, so those checks run in fresh
interpreters."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lite_llm.errors import ConfigError
from lite_llm.runtime.threads import (
    ThreadPolicy,
    apply_thread_policy,
    available_cpus,
    check_threads,
    choose_wait,
    openmp_wait_defaults,
    others_running,
    set_openmp_defaults,
    wait_policy,
)

SRC = str(Path(__file__).resolve().parents[1] / "src")
WAIT_VARS = ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME", "OMP_DISPLAY_ENV", "OMP_NUM_THREADS", "LITE_LLM_OPENMP_WAIT")
GNU_OPENMP = os.path.exists("/proc/self/maps") and "libgomp" in Path("/proc/self/maps").read_text()


def _python(code: str, *args: str, **env: str) -> subprocess.CompletedProcess:
    """``code`` in a fresh interpreter whose environment has none of the OpenMP settings
    this test process may carry, plus ``env``."""
    clean = {k: v for k, v in os.environ.items() if k not in WAIT_VARS}
    clean["PYTHONPATH"] = SRC
    clean.update(env)
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=clean, check=True)


def _gomp_settings(stderr: str) -> dict[str, str]:
    """libgomp's OMP_DISPLAY_ENV report: ``  NAME = 'value'`` lines."""
    out = {}
    for line in stderr.splitlines():
        name, eq, value = line.strip().partition(" = ")
        if eq:
            out[name] = value.strip("'")
    return out


# ------------------------------------------------------------------------------ environment
def test_passive_wait_when_others_compete_and_only_where_the_user_chose_nothing() -> None:
    assert choose_wait({}, others=1) == ({"OMP_WAIT_POLICY": "PASSIVE"}, "1 other runnable task at start")
    assert choose_wait({}, others=0) == ({}, "no other runnable task at start")  # idle: libgomp's spin
    assert openmp_wait_defaults({"OMP_WAIT_POLICY": ""}, others=3) == {"OMP_WAIT_POLICY": "PASSIVE"}  # empty is unset
    assert openmp_wait_defaults({"OMP_WAIT_POLICY": "ACTIVE"}, others=3) == {}
    assert openmp_wait_defaults({"GOMP_SPINCOUNT": "10000"}, others=3) == {}
    assert openmp_wait_defaults({"KMP_BLOCKTIME": "1"}, others=3) == {}
    assert choose_wait({"LITE_LLM_OPENMP_WAIT": "passive"}, others=0) == ({"OMP_WAIT_POLICY": "PASSIVE"}, "LITE_LLM_OPENMP_WAIT=passive")
    assert choose_wait({"LITE_LLM_OPENMP_WAIT": "spin"}, others=5) == ({}, "LITE_LLM_OPENMP_WAIT=spin")
    with pytest.warns(UserWarning, match="LITE_LLM_OPENMP_WAIT='fast' is not one of auto, passive, spin; using auto"):
        assert choose_wait({"LITE_LLM_OPENMP_WAIT": "fast"}, others=2)[0] == {"OMP_WAIT_POLICY": "PASSIVE"}


@pytest.mark.skipif(not Path("/proc/stat").exists(), reason="others_running reads Linux's /proc/stat")
def test_a_busy_process_beside_the_import_makes_the_wait_passive() -> None:
    busy = subprocess.Popen([sys.executable, "-c", "import time\nend = time.time() + 30\nwhile time.time() < end: pass"])
    try:
        time.sleep(0.3)
        assert others_running() >= 1
        report = _python("import lite_llm\nfrom lite_llm.runtime.threads import apply_thread_policy\nprint(apply_thread_policy().describe())")
        assert re.search(r"OpenMP passive wait \(\d+ other runnable tasks? at start\)$", report.stdout.strip()), report.stdout
    finally:
        busy.kill()
        busy.wait()


def test_nothing_is_set_once_torch_is_loaded() -> None:
    env: dict[str, str] = {}
    assert "torch" in sys.modules  # this test process imported it above
    assert set_openmp_defaults(env) == {} and env == {}


@pytest.mark.skipif(not GNU_OPENMP, reason="OMP_DISPLAY_ENV's report is read from GNU libgomp's format")
def test_importing_lite_llm_gives_libgomp_a_zero_spin_count() -> None:
    # the passive choice forced: auto would depend on what else runs while the suite does
    ours = _gomp_settings(_python("import lite_llm", OMP_DISPLAY_ENV="VERBOSE", LITE_LLM_OPENMP_WAIT="passive").stderr)
    plain = _gomp_settings(_python("import torch", OMP_DISPLAY_ENV="VERBOSE").stderr)
    assert ours["GOMP_SPINCOUNT"] == "0"
    assert plain["GOMP_SPINCOUNT"] == "300000"  # libgomp's own default: ~3 ms of spinning
    # the user's choice wins
    kept = _gomp_settings(_python("import lite_llm", OMP_DISPLAY_ENV="VERBOSE", GOMP_SPINCOUNT="12345").stderr)
    assert kept["GOMP_SPINCOUNT"] == "12345"
    # torch loaded first: too late to change, and lite_llm does not pretend otherwise
    late = _python(
        "import torch, lite_llm, os\nfrom lite_llm.runtime.threads import apply_thread_policy\n"
        "print(os.environ.get('OMP_WAIT_POLICY')); print(apply_thread_policy().describe())",
        OMP_DISPLAY_ENV="VERBOSE",
    )
    assert _gomp_settings(late.stderr)["GOMP_SPINCOUNT"] == "300000"
    printed = late.stdout.splitlines()
    assert printed[0] == "None"
    assert printed[1].endswith("OpenMP spin-then-sleep wait (runtime default), torch was imported before lite_llm")


# A parallel op, then 20 ms of sleep, 40 times: the CPU seconds this process burns. With
# libgomp's default the helper thread spins ~3 ms after each op; with passive wait it sleeps.
_IDLE_BURN = """
import resource, sys, time
if sys.argv[1] == "ours":
    import lite_llm
import torch
torch.set_num_threads(2)
x = torch.randn(2_000_000)
for _ in range(5):
    x.sum()
def cpu():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime
start = cpu()
for _ in range(40):
    x.mul_(1.0)
    time.sleep(0.02)
print(cpu() - start)
"""


@pytest.mark.skipif(available_cpus() < 2, reason="needs 2 CPUs for a second OpenMP thread")
def test_idle_threads_do_not_spin_between_ops() -> None:
    plain = float(_python(_IDLE_BURN, "plain").stdout)
    ours = float(_python(_IDLE_BURN, "ours", LITE_LLM_OPENMP_WAIT="passive").stdout)
    # plain torch burnt ~0.5 s of CPU here (spinning after each op), ours ~0.02 s (the work itself)
    assert plain > 0.1
    assert ours < plain / 3


# ------------------------------------------------------------------------------ thread count
def test_describe_says_what_was_chosen() -> None:
    assert ThreadPolicy(2, 2, "default", "OpenMP passive wait").describe() == "threads: 2 of 2 CPUs, OpenMP passive wait"
    assert ThreadPolicy(1, 2, "--threads", "OpenMP passive wait").describe() == "threads: 1 of 2 CPUs (--threads), OpenMP passive wait"
    assert ThreadPolicy(4, 1, "OMP_NUM_THREADS", "OpenMP active wait").describe() == (
        "threads: 4 of 1 CPU (OMP_NUM_THREADS), more threads than CPUs, OpenMP active wait"
    )


def test_wait_policy_words() -> None:
    assert wait_policy({"OMP_WAIT_POLICY": "PASSIVE"}, torch_first=False) == "OpenMP passive wait"
    assert wait_policy({"OMP_WAIT_POLICY": "active"}, torch_first=True) == "OpenMP active wait"
    assert wait_policy({"GOMP_SPINCOUNT": "1000"}, torch_first=False) == "OpenMP spin count 1000"
    assert wait_policy({}, torch_first=False) == "OpenMP spin-then-sleep wait (runtime default)"


def test_threads_flag_sets_the_count_and_the_default_keeps_torchs() -> None:
    before = torch.get_num_threads()
    try:
        one = apply_thread_policy(1)
        assert torch.get_num_threads() == 1
        assert (one.threads, one.cpus, one.source) == (1, available_cpus(), "--threads")
        kept = apply_thread_policy(None)
        assert kept.threads == 1 and kept.source in ("default", "OMP_NUM_THREADS")  # None changes nothing
    finally:
        torch.set_num_threads(before)


def test_default_count_is_the_affinity_mask_in_a_fresh_process() -> None:
    out = _python("from lite_llm.runtime.threads import apply_thread_policy\nprint(apply_thread_policy().threads)")
    assert int(out.stdout) == available_cpus()
    out = _python("from lite_llm.runtime.threads import apply_thread_policy\nprint(apply_thread_policy().describe())", OMP_NUM_THREADS="1", LITE_LLM_OPENMP_WAIT="passive")
    assert out.stdout.strip() == (
        f"threads: 1 of {available_cpus()} CPU{'s' if available_cpus() != 1 else ''} (OMP_NUM_THREADS), OpenMP passive wait (LITE_LLM_OPENMP_WAIT=passive)"
    )


@pytest.mark.parametrize("bad", [0, -2, True, 1.5, "2"])
def test_bad_thread_counts_are_one_sentence(bad: object) -> None:
    with pytest.raises(ConfigError) as err:
        check_threads(bad)
    message = str(err.value)
    assert message.startswith("--threads must be a whole number of at least 1, got ")
    assert message.count(".") <= 1 and "\n" not in message


# ------------------------------------------------------------------------------ command line
def test_cli_applies_threads_and_says_so(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from lite_llm.cli import app

    runner = CliRunner()
    ckpt = tmp_path / "ckpt"
    assert runner.invoke(app, ["init", "--preset", "tiny", "-o", str(ckpt)]).exit_code == 0
    before = torch.get_num_threads()
    try:
        result = runner.invoke(app, ["generate", str(ckpt), "--prompt", "ab", "--max-new-tokens", "2", "--temperature", "0", "--threads", "1"])
        assert result.exit_code == 0, result.output
        assert torch.get_num_threads() == 1
        cpus = available_cpus()
        assert result.stderr.splitlines()[0].startswith(f"threads: 1 of {cpus} CPU{'s' if cpus != 1 else ''} (--threads), OpenMP ")
        assert result.stdout.startswith("ab")
    finally:
        torch.set_num_threads(before)
    for command in (["train", "--data", str(tmp_path / "none"), "-o", str(tmp_path / "run")], ["eval", str(ckpt), "--data", str(tmp_path / "none")], ["quickstart", "-o", str(tmp_path / "q")]):
        bad = runner.invoke(app, [*command, "--threads", "0"])
        assert bad.exit_code == 1, bad.output
        assert bad.stderr.strip() == "error: --threads must be a whole number of at least 1, got 0; omit it to use every CPU this process may run on"
        assert torch.get_num_threads() == before
    assert not (tmp_path / "q").exists() and not (tmp_path / "run").exists()  # refused before any work


def test_a_fresh_cli_process_waits_passively(tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    _python("from lite_llm.cli import main; main()", "init", "--preset", "tiny", "-o", str(ckpt))
    out = _python(
        "from lite_llm.cli import main; main()", "generate", str(ckpt), "--prompt", "a", "--max-new-tokens", "1", "--threads", "1",
        LITE_LLM_OPENMP_WAIT="passive",
    )
    cpus = available_cpus()
    assert out.stderr.splitlines()[0] == f"threads: 1 of {cpus} CPU{'s' if cpus != 1 else ''} (--threads), OpenMP passive wait (LITE_LLM_OPENMP_WAIT=passive)"
