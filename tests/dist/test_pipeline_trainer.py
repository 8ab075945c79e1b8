"""Pipeline parallel in the DistributedTrainer (``--parallel pp=2``) against one process.

The oracle is the single-process Trainer on the same global batch with the same grad_accum
(= the pipeline's microbatches): the two-tier MoE test model, 12 steps of 2 x 8 rows of 32
tokens, clipping at 1.0, validation every 6 steps.  The building block is bitwise one process
(tests/dist/test_pipeline_parallel.py) and the trainer adds the losses in the order the
single-process loop does, so every reported figure — loss, balance and z-loss, gradient norm,
validation loss and bits per byte — is asserted *equal*, as are the weights after a pp=2
checkpoint is resumed in one process.  Each pp=2 test spawns 2 processes (about 5 s).

pp=2 x dp=2 (4 processes, about 10 s) shards each stage over its two data ranks with FSDP2:
each data rank's mean and the reduce-scattered gradients round differently from one
process's, so it follows one process to rounding (measured 1.2e-7 relative over 12 steps),
asserted with the DP x EP tolerance of 1e-6.  pp=2 x ep=2 splits each stage's experts over
its two ranks instead, rows exchanged by all-to-all inside every microbatch's forward and
backward (measured 1.4e-7); pp=2 x tp=2 splits each stage's attention and dense FFN
(4.7e-8); pp=2 x ep=2 x tp=2 does all three at once (8 processes; 1.4e-7).
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from types import SimpleNamespace

import pytest

from lite_llm.dist.checkpoint import list_sharded
from lite_llm.dist.degrees import ParallelDegrees
from lite_llm.dist.local import run_ranks
from lite_llm.errors import ConfigError
from tests.dist import workers
from tests.dist.test_data_expert_parallel import LOSS_RTOL, max_rel

STEPS, PAUSE = 12, 6
REPORTED = ("step", "lr", "loss", "balance_loss", "z_loss", "extra_loss", "grad_norm", "val")


def _reported(records: list[dict]) -> list[dict]:
    """What a run reports of each step (routing statistics are not carried through pp)."""
    return [{k: r[k] for k in REPORTED if k in r} for r in records]


def _pp_run(tmp_path: Path, data: str, overrides: dict, parallel: str = "pp=2") -> list[dict]:
    world = math.prod(int(pair.split("=")[1]) for pair in parallel.split(","))
    return run_ranks(workers.train_dist, world, tmp_path / "ranks", data, parallel, STEPS, str(tmp_path / "pp"), None, None, overrides, timeout_s=120)


def test_pp2_1f1b_trains_as_one_process_and_resumes_in_one(small_dataset, tmp_path):
    data = str(small_dataset)
    overrides = {"grad_accum": 2, "eval_every": PAUSE, "save_every": PAUSE}
    one = workers.train_single(data, STEPS, run_dir=str(tmp_path / "one"), overrides=overrides)
    r0, r1 = _pp_run(tmp_path, data, overrides)
    assert r0["losses"] == r1["losses"] == one["losses"]  # bitwise, on both stages
    assert _reported(r0["records"]) == _reported(one["records"])  # every figure rank 0 logs, validation too
    assert sum("val" in r for r in r0["records"]) == 2 and max(r["grad_norm"] for r in r0["records"]) > 1.0  # clipping ran

    # each stage saved only its modules, under the model's own names; the consolidated
    # checkpoint is bitwise both stages' weights and has nothing else
    assert set(r0["held"]).isdisjoint(r1["held"]) and sorted(r0["held"] + r1["held"]) == r0["consolidated_names"]
    assert r0["consolidated_bitwise"] and r1["consolidated_bitwise"]
    assert r0["held"][0] == "embed.weight" and "lm_head.weight" in r1["held"]

    # the pp=2 checkpoint of step 6, continued in one process, runs on as if never interrupted
    paused = next(p for p in list_sharded(tmp_path / "pp") if p.name == f"step-{PAUSE:08d}")
    rest = workers.train_single(data, STEPS, resume_sharded_from=str(paused), overrides=overrides)
    assert rest["step"] == STEPS and rest["losses"] == one["losses"][PAUSE:]
    assert rest["final_eval"] == one["final_eval"]
    # and at pp=2 again (a stopped pipelined run continued with --resume): each stage loads its part
    again = run_ranks(workers.train_dist, 2, tmp_path / "again", data, "pp=2", STEPS, str(tmp_path / "pp2"), str(paused), None, overrides, timeout_s=120)
    assert again[0]["losses"] == again[1]["losses"] == one["losses"][PAUSE:]


def test_pp2_gpipe_trains_as_one_process(small_dataset, tmp_path):
    data = str(small_dataset)
    overrides = {"grad_accum": 4, "batch_size": 4, "pp_schedule": "gpipe", "eval_every": PAUSE}
    one = workers.train_single(data, STEPS, run_dir=str(tmp_path / "one"), overrides=overrides)
    r0, _ = _pp_run(tmp_path, data, overrides)
    assert _reported(r0["records"]) == _reported(one["records"])


@pytest.mark.parametrize(
    "parallel",
    ["pp=2,dp=2", "pp=2,ep=2", "pp=2,tp=2", pytest.param("pp=2,ep=2,tp=2", marks=pytest.mark.slow)],  # the last: 8 processes, about 20 s
)
def test_pp2_composed_with_other_degrees_follows_one_process_and_resumes_in_one(small_dataset, tmp_path, parallel):
    data = str(small_dataset)
    overrides = {"grad_accum": 2, "eval_every": PAUSE, "save_every": PAUSE}
    one = workers.train_single(data, STEPS, run_dir=str(tmp_path / "one"), overrides=overrides)
    ranks = _pp_run(tmp_path, data, overrides, parallel)
    assert all(r["losses"] == ranks[0]["losses"] for r in ranks)
    assert max_rel(ranks[0]["losses"], one["losses"]) <= LOSS_RTOL
    vals = [(r["val"][d]["loss"], o["val"][d]["loss"]) for r, o in zip(ranks[0]["records"], one["records"]) if "val" in o for d in o["val"]]
    assert len(vals) == 4 and max_rel(*zip(*vals)) <= LOSS_RTOL
    # stage 0 on the first half of the ranks, stage 1 on the second, each gathering its stage's
    # full weights (split over ep, over tp or sharded by FSDP2, each saved once)
    half = len(ranks) // 2
    assert all(r["held"] == ranks[0]["held"] for r in ranks[:half]) and all(r["held"] == ranks[half]["held"] for r in ranks[half:])
    assert sorted(ranks[0]["held"] + ranks[half]["held"]) == ranks[0]["consolidated_names"] and all(r["consolidated_bitwise"] for r in ranks)
    paused = next(p for p in list_sharded(tmp_path / "pp") if p.name == f"step-{PAUSE:08d}")
    rest = workers.train_single(data, STEPS, resume_sharded_from=str(paused), overrides=overrides)
    assert max_rel(rest["losses"], one["losses"][PAUSE:]) <= LOSS_RTOL


def test_a_pipelined_step_reports_and_stops_as_the_loop_does() -> None:
    """The loop adds each micro-batch's LM, balance and z-loss / grad_accum in order and, at
    the first non-finite loss, reports that micro-batch's LM loss and skips the step."""
    from lite_llm.dist.trainer import pipeline_totals

    parts = [(3.0, 2.0, 0.5, 0.5), (float("nan"), 7.0, 0.25, 0.25), (1.0, 1.0, 0.0, 0.0)]
    done = pipeline_totals(parts, 3, 3)
    assert done.finite and done.totals == {"loss": 2 / 3 + 7 / 3 + 1 / 3, "balance_loss": 0.5 / 3 + 0.25 / 3, "z_loss": 0.5 / 3 + 0.25 / 3, "extra_loss": 0.0}
    stopped = pipeline_totals(parts, 1, 3)
    assert not stopped.finite and stopped.totals == {"loss": 7.0, "balance_loss": 0.5 / 3, "z_loss": 0.5 / 3, "extra_loss": 0.0}


# ------------------------------------------------------------------------------------ refusals
def _ranks(**degrees: int) -> SimpleNamespace:
    """Enough of a Ranks for the checks that run before any collective."""
    return SimpleNamespace(degrees=ParallelDegrees(**degrees), is_main=True)


@pytest.mark.parametrize(
    "overrides, callbacks, word",
    [
        ({"grad_accum": 1}, [], "the 1f1b schedule needs at least as many microbatches as stages (2), got 1"),
        ({"grad_accum": 2}, [object()], "callbacks (a curriculum and the like) cannot run under pipeline parallel"),
    ],
)
def test_pipelined_trainer_refuses_what_pp_cannot_carry(small_dataset, overrides: dict, callbacks: list, word: str) -> None:
    from lite_llm.data import TokenData
    from lite_llm.dist.pipeline import StageModule
    from lite_llm.dist.trainer import DistributedTrainer
    from lite_llm.model import build_model
    from tests.conftest import two_tier_config

    stage = StageModule(build_model(two_tier_config(), seed=0), range(0, 1), first=True, last=False)
    with pytest.raises(ConfigError, match=re.escape(word)):
        DistributedTrainer(stage, TokenData(small_dataset), workers.train_config(4, **overrides), _ranks(pp=2), callbacks=callbacks)  # type: ignore[arg-type]


def test_unknown_pp_schedule_is_one_sentence() -> None:
    with pytest.raises(ConfigError, match=re.escape("train.pp_schedule must be 1f1b or gpipe, got 'zb'")):
        workers.train_config(4, pp_schedule="zb")
