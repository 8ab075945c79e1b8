"""Tensor parallel composed with data and expert parallel in the trainer (TP inside, EP on the
experts, FSDP2 over the data ranks), against one process on the same global batch.

``dp=2,tp=2`` (dense weights 2-D: FSDP over the data ranks of each TP rank's slice),
``ep=2,tp=2`` (experts split over the ``ep`` ranks of each TP index, replicated over ``tp``) and,
marked slow, ``dp=2,ep=2,tp=2`` at world 8.  Measured on a 2-core CPU (torch 2.13, gloo, one
thread a rank, 12 steps of 8 x 32 tokens, lr 1e-3), max differences from one process:

===============  ================  ===============  ====================
degrees          losses (rel)      grad norms (rel) balance losses (abs)
===============  ================  ===============  ====================
dp=2,tp=2        1.7e-7            2.0e-7           3.0e-9
ep=2,tp=2        1.7e-7            2.0e-7           3.0e-9
dp=2,ep=2,tp=2   2.2e-7            3.4e-7           4.8e-9
===============  ================  ===============  ====================

(DP x EP without TP: 2.2e-7, 3.4e-7, 2.4e-9 — TP adds nothing measurable on top of the data
split.)  The 2-D checkpoint of the dp=2,tp=2 run resumed at step 6 continues within 0 (tp=2)
and 9.4e-8 (one process) of the uninterrupted losses.

Not bitwise, for the reasons of TP alone (a row-wise layer sums two partial products) and of DP
(a split batch's means round differently).  The gradient norm is the check that nothing is
counted twice: a weight replicated over ``tp`` (routers, experts, embeddings) is reduced over its
own mesh only, so a double count would show as a norm off by far more than rounding.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest

from lite_llm.dist.checkpoint import sharded_path
from lite_llm.dist.degrees import ParallelDegrees
from lite_llm.dist.local import run_ranks
from lite_llm.dist.parallelize import parallelize
from lite_llm.errors import ConfigError
from lite_llm.model import build_model
from tests.conftest import two_tier_config
from tests.dist import workers
from tests.dist.test_data_expert_parallel import LOSS_RTOL, max_rel

STEPS, PAUSE = 12, 6
NORM_RTOL = 5e-6  # as tests/dist/test_tensor_parallel.py asks of TP alone
# The load-balance loss is a KL to uniform near its minimum (~1e-4 here): second order in the
# batch means' deviation, so their 1e-7 rounding shows as ~1e-5 of it relative (TP alone, DP
# alone and DP x EP all measured 1.1e-5 to 1.8e-5, 3.0e-9 absolute).  Asked absolutely; a mean
# over this rank's rows alone, or one divided by the wrong count, would move it by the KL's own
# size.  (A mean over the world, tp twins included, would not show here: they hold the same
# means — it is ruled out by construction, the router's group being Ranks.data_group.)
BALANCE_ATOL = 1e-8


def max_abs(a: list[float], b: list[float]) -> float:
    return max(abs(x - y) for x, y in zip(a, b))


def assert_follows_one_process(results: list[dict[str, Any]], single: dict[str, Any], start: int = 0) -> None:
    """Every rank reports the same figures, and they are one process's from step ``start`` on."""
    first = results[0]
    assert all(r["losses"] == first["losses"] and r["grad_norms"] == first["grad_norms"] for r in results)
    assert len(first["losses"]) == STEPS - start and all(math.isfinite(x) for x in first["losses"])
    assert max_rel(first["losses"], single["losses"][start:]) <= LOSS_RTOL
    assert max_abs(first["balance_losses"], single["balance_losses"][start:]) <= BALANCE_ATOL
    assert max_rel(first["grad_norms"], single["grad_norms"][start:]) <= NORM_RTOL


def test_dp2_tp2_trains_like_one_process_and_resumes_at_other_degrees(small_dataset: Path, tmp_path: Path) -> None:
    data = str(small_dataset)
    single = workers.train_single(data, STEPS)
    assert max(single["grad_norms"]) > 1.0  # clipping is exercised
    run = tmp_path / "run"
    whole = run_ranks(workers.train_dist, 4, tmp_path / "w4", data, "dp=2,tp=2", STEPS, str(run), None, None, {"save_every": PAUSE},
                      timeout_s=120)
    print("dp=2,tp=2 vs one process, max:", _differences(whole[0], single))
    assert_follows_one_process(whole, single)
    assert all(r["consolidated_bitwise"] for r in whole)  # consolidation of 2-D weights loses nothing

    saved = sharded_path(run, PAUSE)  # the 2-D checkpoint halfway, resumed at tp=2 alone and at one process
    at_tp2 = run_ranks(workers.train_dist, 2, tmp_path / "w2", data, "tp=2", STEPS, str(tmp_path / "run2"), str(saved), None, None,
                       timeout_s=120)
    at1 = workers.train_single(data, STEPS, resume_sharded_from=str(saved))
    print("resumed at tp=2 / at one process, max relative loss:", max_rel(at_tp2[0]["losses"], single["losses"][PAUSE:]),
          max_rel(at1["losses"], single["losses"][PAUSE:]))
    assert_follows_one_process(at_tp2, single, start=PAUSE)
    assert_follows_one_process([at1], single, start=PAUSE)
    assert all(r["consolidated_bitwise"] for r in at_tp2)


@pytest.mark.parametrize(
    "spec, world",
    [
        ("ep=2,tp=2", 4),
        # every group at once: expert gradients summed over dp within one tp index (about 20 s)
        pytest.param("dp=2,ep=2,tp=2", 8, marks=pytest.mark.slow),
    ],
)
def test_expert_and_tensor_parallel_train_like_one_process(small_dataset: Path, tmp_path: Path, spec: str, world: int) -> None:
    data = str(small_dataset)
    single = workers.train_single(data, STEPS)
    results = run_ranks(workers.train_dist, world, tmp_path / "ranks", data, spec, STEPS, str(tmp_path / "run"), None, None, None,
                        timeout_s=150)
    print(spec, "vs one process, max:", _differences(results[0], single))
    assert_follows_one_process(results, single)
    assert all(r["consolidated_bitwise"] for r in results)  # the experts, split over ep and replicated over tp, saved once


class _DegreesOnly:
    """What ``parallelize`` reads before it refuses: the degrees (no process group needed)."""

    def __init__(self, spec: str, world: int) -> None:
        self.degrees = ParallelDegrees.parse(spec, world)


@pytest.mark.parametrize(
    "spec, world, moe, words",
    [
        ("pp=2,ep=2", 4, False, "this model has no MoE layer; drop ep"),
        ("ep=2,tp=2", 4, False, "this model has no MoE layer; drop ep"),
    ],
)
def test_what_stays_unsupported_is_one_sentence_before_any_split(spec: str, world: int, moe: bool, words: str) -> None:
    config = two_tier_config() if moe else two_tier_config(tiers=[])
    model = build_model(config, seed=0)
    with pytest.raises(ConfigError) as refused:
        parallelize(model, _DegreesOnly(spec, world))  # type: ignore[arg-type]
    message = str(refused.value)
    assert words in message and "\n" not in message and ". " not in message
    assert not any(type(p).__name__ == "DTensor" for p in model.parameters())  # refused before anything was split


def _differences(got: dict[str, Any], single: dict[str, Any]) -> dict[str, float]:
    return {"loss (rel)": max_rel(got["losses"], single["losses"]), "grad norm (rel)": max_rel(got["grad_norms"], single["grad_norms"]),
            "balance loss (abs)": max_abs(got["balance_losses"], single["balance_losses"])}
