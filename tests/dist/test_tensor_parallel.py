"""Tensor parallel (DTensor colwise/rowwise on attention and the dense FFN) against one process.

Measured on this CPU (torch 2.13, gloo, 2 ranks, one thread each, 12 AdamW steps of 4 x 32
tokens with gradient clipping at 1.0):

* forward logits, TP=2 vs one process: max |diff| / max |logit| = 2.3e-7 (two-tier MoE tiny),
  2.6e-7 (dense tiny) — the row-wise layers sum two partial products where one process sums
  one, so the last bits differ; asserted <= 1e-6.
* per-step training losses: max relative difference 1.7e-7 (MoE), 8.6e-8 (dense); asserted
  <= 1e-5 (the brief's bound), and the two TP ranks report bitwise the same losses.

Each test spawns 2 processes and takes about 5 s.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from lite_llm.dist.tensor_parallel import check_tensor_parallel
from lite_llm.errors import ConfigError

from .tp_workers import max_rel, run_ranks, tiny_config, tp_refuse_worker, tp_worker

STEPS, ROWS, SEQ = 12, 4, 32


@pytest.mark.parametrize("config_name", ["moe", "dense"])
def test_tp2_training_matches_one_process(tmp_path: Path, config_name: str) -> None:
    r0, r1 = run_ranks(tp_worker, 2, tmp_path, config_name, STEPS, ROWS, SEQ)
    assert r0["losses"] == r1["losses"]  # the replicated parts agree bitwise on both ranks
    assert r0["logits_rel_diff"] <= 1e-6 and r1["logits_rel_diff"] <= 1e-6
    assert len(r0["losses"]) == STEPS
    assert max_rel(r0["losses"], r0["ref_losses"]) <= 1e-5
    cfg = tiny_config(config_name)
    assert r0["local_q_rows"] == cfg.n_heads * cfg.head_dim // 2
    sharded = r0["sharded"]
    assert all(".attn." in n or ".ffn." in n for n in sharded)
    assert not any("router" in n or "experts" in n or n.startswith(("embed", "lm_head", "norm")) for n in sharded)
    assert any(".ffn.down_proj" in n for n in sharded) == (config_name == "dense")


def test_tp_refuses_heads_that_do_not_split(tmp_path: Path) -> None:
    r0, r1 = run_ranks(tp_refuse_worker, 2, tmp_path, 3, 3)
    assert r0["error"] == r1["error"]
    assert r0["error"] is not None and "n_heads (3)" in r0["error"]
    assert r0["error"].count(". ") == 0 and "\n" not in r0["error"]  # one sentence


@pytest.mark.parametrize(
    "overrides, tp, word",
    [
        (dict(n_heads=4, n_kv_heads=2), 4, "n_kv_heads (2)"),
        (dict(n_heads=6, n_kv_heads=6, d_model=96), 4, "n_heads (6)"),
        (dict(intermediate_size=161), 2, "intermediate_size (161)"),
    ],
)
def test_tp_degree_must_divide(overrides: dict, tp: int, word: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(word)):
        check_tensor_parallel(tiny_config("dense", **overrides), tp)


def test_moe_layers_need_no_dense_split() -> None:
    check_tensor_parallel(tiny_config("moe", intermediate_size=129), 2)  # every layer is MoE: no dense FFN to split
