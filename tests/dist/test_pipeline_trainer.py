"""Pipeline parallel in the DistributedTrainer (``--parallel pp=2``) against one process.

The oracle is the single-process Trainer on the same global batch with the same grad_accum
(= the pipeline's microbatches): the two-tier MoE test model, 12 steps of 2 x 8 rows of 32
tokens, clipping at 1.0, validation every 6 steps.  The building block is bitwise one process
(tests/dist/test_pipeline_parallel.py) and the trainer adds the losses in the order the
single-process loop does, so every reported figure — loss, balance and z-loss, gradient norm,
validation loss and bits per byte — is asserted *equal*, as are the weights after a pp=2
checkpoint is resumed in one process.  Each test spawns 2 processes (about 5 s).
"""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

import pytest

from lite_llm.dist.checkpoint import list_sharded
from lite_llm.dist.degrees import ParallelDegrees
from lite_llm.dist.local import run_ranks
from lite_llm.errors import ConfigError
from tests.dist import workers

STEPS, PAUSE = 12, 6
REPORTED = ("step", "lr", "loss", "balance_loss", "z_loss", "extra_loss", "grad_norm", "val")


def _reported(records: list[dict]) -> list[dict]:
    """What a run reports of each step (routing statistics are not carried through pp)."""
    return [{k: r[k] for k in REPORTED if k in r} for r in records]


def _pp2_run(tmp_path: Path, data: str, overrides: dict) -> list[dict]:
    return run_ranks(workers.train_dist, 2, tmp_path / "ranks", data, "pp=2", STEPS, str(tmp_path / "pp"), None, None, overrides, timeout_s=120)


def test_pp2_1f1b_trains_as_one_process_and_resumes_in_one(small_dataset, tmp_path):
    data = str(small_dataset)
    overrides = {"grad_accum": 2, "eval_every": PAUSE, "save_every": PAUSE}
    one = workers.train_single(data, STEPS, run_dir=str(tmp_path / "one"), overrides=overrides)
    r0, r1 = _pp2_run(tmp_path, data, overrides)
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


def test_pp2_gpipe_trains_as_one_process(small_dataset, tmp_path):
    data = str(small_dataset)
    overrides = {"grad_accum": 4, "batch_size": 4, "pp_schedule": "gpipe", "eval_every": PAUSE}
    one = workers.train_single(data, STEPS, run_dir=str(tmp_path / "one"), overrides=overrides)
    r0, _ = _pp2_run(tmp_path, data, overrides)
    assert _reported(r0["records"]) == _reported(one["records"])


# ------------------------------------------------------------------------------------ refusals
def _ranks(**degrees: int) -> SimpleNamespace:
    """Enough of a Ranks for the checks that run before any collective."""
    return SimpleNamespace(degrees=ParallelDegrees(**degrees), is_main=True)


@pytest.mark.parametrize(
    "degrees, word", [({"pp": 2, "tp": 2}, "not yet with tp or ep"), ({"pp": 2, "ep": 2}, "not yet with tp or ep")]
)
def test_pp_with_tp_or_ep_is_refused_in_one_sentence(degrees: dict, word: str) -> None:
    from lite_llm.dist.parallelize import parallelize
    from lite_llm.model import build_model
    from tests.conftest import two_tier_config

    with pytest.raises(ConfigError, match=re.escape(word)) as err:
        parallelize(build_model(two_tier_config(), seed=0), _ranks(**degrees))  # type: ignore[arg-type]
    assert "\n" not in str(err.value)


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
