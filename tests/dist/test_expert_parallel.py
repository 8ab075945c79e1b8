"""Expert parallel against one process: bitwise forward, skewed routing, ranks without rows."""

from __future__ import annotations

import pytest

from tests.dist import workers
from lite_llm.dist.local import run_ranks


def test_ep2_forward_is_bitwise_one_process(tmp_path):
    results = run_ranks(workers.ep_forward, 2, tmp_path, None, True)
    for r in results:
        assert r["layer_equal"], r
        assert r["logits_equal"], r
        assert r["input_grad_max_rel"] < 1e-6
        assert r["expert_grad_max_rel"] < 1e-6
    assert all(n > 0 for n in results[0]["routes_to_rank"])  # both ranks really hold routed experts


@pytest.mark.parametrize("onto", ["rank0", "rank1"])
def test_routing_skewed_onto_one_rank_does_not_hang(tmp_path, onto):
    results = run_ranks(workers.ep_forward, 2, tmp_path, onto, True, timeout_s=60)
    empty = 1 if onto == "rank0" else 0
    assert results[0]["routes_to_rank"][empty] == 0  # one rank's experts receive no row at all
    for r in results:
        assert r["layer_equal"] and r["logits_equal"], r
