"""Pipeline parallel (torch.distributed.pipelining, GPipe and 1F1B) against one process.

The oracle is one process running the trainer's step on the same rows with grad_accum =
n_microbatches ((loss / n).backward() per consecutive row slice, clip at 1.0, AdamW).
Measured on this CPU (torch 2.13, gloo, 2 ranks, one thread each, 10 steps of 4 x 32 tokens):
the per-step losses (total and LM), the first step's gradients of every parameter and the
clipped gradient norms are *bitwise* equal to one process — for the two-tier MoE tiny model
(1, 2 and 4 microbatches, GPipe and 1F1B), a dense 3-layer model (uneven 2 + 1 split) and a MoE
model whose first stage has no MoE layer.  So the tolerance asserted is zero.  Why it can be
exact: each stage runs the same ops on the same values, the aux-loss sums are carried between
stages in the order one process adds them, and dividing the summed gradients by a power-of-two
microbatch count is exact, as is one process's (loss / n) backward.

Each test spawns 2 processes and takes about 5 s.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from lite_llm.dist.pipeline import check_pipeline, stage_layers
from lite_llm.errors import ConfigError

from .tp_workers import pp_worker, run_ranks, tiny_config

STEPS, ROWS, SEQ = 10, 4, 32


@pytest.mark.parametrize(
    "config_name, n_micro, schedule, n_layers",
    [("moe", 2, "gpipe", None), ("moe", 4, "1f1b", None), ("dense", 4, "1f1b", 3), ("moe-last", 2, "gpipe", None), ("moe", 1, "gpipe", None)],
)
def test_pp2_training_matches_grad_accum(tmp_path: Path, config_name: str, n_micro: int, schedule: str, n_layers: int | None) -> None:
    r0, r1 = run_ranks(pp_worker, 2, tmp_path, config_name, STEPS, ROWS, SEQ, n_micro, schedule, n_layers)
    cfg = tiny_config(config_name, **({"n_layers": n_layers} if n_layers else {}))
    # the stages partition the model's parameters, named as in the model
    from lite_llm.model import build_model

    assert r0["names"] + r1["names"] == [n for n, _ in build_model(cfg, seed=0).named_parameters()]
    assert r0["names"][0] == "embed.weight" and r1["names"][-1] == "lm_head.weight"
    for r in (r0, r1):
        assert len(r["losses"]) == STEPS
        assert r["losses"] == r["ref_losses"]  # bitwise, on every rank (broadcast from the last stage)
        assert r["lm_losses"] == r["ref_lm_losses"]
        assert r["grad_names_match"] and r["grads_bitwise"] and r["grad_max_abs_diff"] == 0.0
    assert r0["grad_norms"] == r1["grad_norms"]
    assert r0["grad_norms"] == r0["ref_grad_norms"]  # bitwise: gathered in the model's parameter order
    assert max(r0["grad_norms"]) > 1.0  # clipping was exercised


def test_stage_layers_split_contiguously() -> None:
    assert stage_layers(5, 2) == [range(0, 3), range(3, 5)]
    assert stage_layers(4, 4) == [range(i, i + 1) for i in range(4)]


@pytest.mark.parametrize(
    "overrides, pp, n_micro, schedule, word",
    [
        ({}, 3, 2, "1f1b", "pp=3 must be between 1 and the model's n_layers (2)"),
        ({"tie_embeddings": True}, 2, 2, "1f1b", "tie_embeddings"),
        ({}, 2, 0, "1f1b", "n_microbatches must be at least 1"),
        ({}, 2, 2, "zb", "unknown pipeline schedule 'zb'"),
        ({}, 2, 1, "1f1b", "the 1f1b schedule needs at least as many microbatches as stages (2), got 1"),
    ],
)
def test_pipeline_refusals_are_one_sentence(overrides: dict, pp: int, n_micro: int, schedule: str, word: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(word)) as err:
        check_pipeline(tiny_config("moe", **overrides), pp, n_micro, schedule)
    assert "\n" not in str(err.value) and ". " not in str(err.value)


def test_tied_embeddings_allowed_on_one_stage() -> None:
    check_pipeline(tiny_config("moe", tie_embeddings=True), 1, 2)
