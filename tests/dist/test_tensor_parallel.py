"""Tensor parallel (DTensor colwise/rowwise on attention and the dense FFN) against one process.

The oracle is one process training a model built from the same seed on the same rows (AdamW as
the trainer builds it, clip at 1.0 with torch's clip_grad_norm_); TP clips with
lite_llm.dist.grad_norm (torch's clip_grad_norm_ fails on mixed DTensor / Tensor gradients:
"aten.mul_.Tensor got mixed torch.Tensor and DTensor").  Measured on this CPU (torch 2.13, gloo,
2 ranks, one thread each, 12 AdamW steps of 4 x 32 tokens), max relative differences:

==========  ===============  ================  ================
model       forward logits   per-step losses   gradient norms
==========  ===============  ================  ================
MoE tiny    2.3e-7           1.7e-7            2.1e-7
dense tiny  2.6e-7           8.6e-8            2.2e-7
MoE last    2.7e-7           1.7e-7            8.7e-7
==========  ===============  ================  ================

(logits: max |diff| / max |logit|; "MoE last": dense layer 0, MoE layer 1.)  Not bitwise: a
row-wise layer sums two partial products and all-reduces them where one process sums one
product.  Asserted: logits and losses <= 1e-6, gradient norms <= 5e-6; the two TP ranks
report bitwise the same losses.  Each training test spawns 2 processes and takes about 5 s.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from lite_llm.dist.tensor_parallel import check_tensor_parallel
from lite_llm.errors import ConfigError

from .tp_workers import max_rel, run_ranks, tiny_config, tp_refuse_worker, tp_worker

STEPS, ROWS, SEQ = 12, 4, 32


@pytest.mark.parametrize("config_name", ["moe", "dense", "moe-last"])
def test_tp2_training_matches_one_process(tmp_path: Path, config_name: str) -> None:
    r0, r1 = run_ranks(tp_worker, 2, tmp_path, config_name, STEPS, ROWS, SEQ)
    assert r0["losses"] == r1["losses"]  # the replicated parts agree bitwise on both ranks
    assert r0["logits_rel_diff"] <= 1e-6 and r1["logits_rel_diff"] <= 1e-6
    assert len(r0["losses"]) == STEPS
    assert max_rel(r0["losses"], r0["ref_losses"]) <= 1e-6
    assert max_rel(r0["grad_norms"], r0["ref_grad_norms"]) <= 5e-6 and max(r0["grad_norms"]) > 1.0  # clipping exercised
    cfg = tiny_config(config_name)
    assert r0["local_q_rows"] == cfg.n_heads * cfg.head_dim // 2
    sharded = r0["sharded"]
    assert all(".attn." in n or ".ffn." in n for n in sharded)
    assert not any("router" in n or "experts" in n or n.startswith(("embed", "lm_head", "norm")) for n in sharded)
    assert any(".ffn.down_proj" in n for n in sharded) == (config_name != "moe")


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
