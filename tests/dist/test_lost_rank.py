"""A rank that dies mid-run: the survivor's collective fails well within the timeout, and
the failure is told as one sentence that says what to do (not a gloo traceback)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from lite_llm.dist.local import free_port

ROOT = Path(__file__).resolve().parents[2]
WORKER = "import json; from tests.dist.workers import lose_a_peer; print(json.dumps(lose_a_peer()))"


def test_the_survivor_of_a_killed_rank_reports_one_sentence():
    port = free_port()
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{ROOT}", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
    started = time.monotonic()
    ranks = [
        subprocess.Popen([sys.executable, "-c", WORKER], cwd=ROOT, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for r in range(2)
    ]
    try:
        out, err = ranks[0].communicate(timeout=60)
        ranks[1].wait(timeout=10)
    finally:
        for p in ranks:
            p.kill()
    assert ranks[1].returncode == -signal.SIGKILL
    assert ranks[0].returncode == 0, err[-2000:]
    assert time.monotonic() - started < 50  # told, not hung until the collective timeout
    result = json.loads(out.strip().splitlines()[-1])
    sentence = result["sentence"]
    assert sentence is not None, result["raw"]
    assert sentence.startswith("rank 0 lost contact with another rank of the distributed run (")
    assert sentence.endswith("restart it with --resume to continue from the last complete sharded checkpoint")
    assert "\n" not in sentence
