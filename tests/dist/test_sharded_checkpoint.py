"""Sharded checkpoints: saved at world size 4 (dp=2, ep=2), resumed at 2 and at 1; consolidation."""

from __future__ import annotations

from pathlib import Path

from lite_llm.dist.checkpoint import latest_sharded, list_sharded
from tests.dist import workers
from lite_llm.dist.local import run_ranks
from tests.dist.test_data_expert_parallel import LOSS_RTOL, max_rel

STEPS, PAUSE = 12, 6


def test_resume_at_other_world_sizes_continues_the_run(small_dataset, tmp_path):
    data = str(small_dataset)
    whole = workers.train_single(data, STEPS)["losses"]
    run = tmp_path / "run"
    first = run_ranks(workers.train_dist, 4, tmp_path / "w4", data, "dp=2,ep=2", STEPS, str(run), None, PAUSE, {"save_every": PAUSE}, timeout_s=120)
    assert first[0]["step"] == PAUSE
    saved = latest_sharded(run)
    assert saved is not None and saved.name == f"step-{PAUSE:08d}"
    # an interrupted save (no metadata yet) is never picked
    (saved.parent / f"step-{STEPS + 50:08d}").mkdir()
    assert latest_sharded(run) == saved

    at2 = run_ranks(workers.train_dist, 2, tmp_path / "w2", data, "ep=2", STEPS, str(tmp_path / "run2"), str(saved), None, None, timeout_s=120)
    at1 = workers.train_single(data, STEPS, resume_sharded_from=str(saved))
    continued = whole[PAUSE:]
    assert max_rel(first[0]["losses"], whole[:PAUSE]) <= LOSS_RTOL
    assert max_rel(at2[0]["losses"], continued) <= LOSS_RTOL
    assert max_rel(at1["losses"], continued) <= LOSS_RTOL

    # the end of the distributed run is consolidated into an ordinary checkpoint
    final = Path(at2[0]["checkpoint"])
    assert (final / "manifest.json").is_file()
    assert all(r["consolidated_bitwise"] and r["held"] == r["consolidated_names"] for r in at2)  # consolidation loses nothing
    # and it is the one-process model up to the rounding drift of the losses above: AdamW turns
    # ~1e-7 gradient differences into ~2e-5 of a tensor's largest weight where gradients are
    # near zero (measured 2.1e-5 after 12 steps)
    same = workers.consolidated_equals_single(str(final), data, STEPS)
    assert same["names_equal"] and same["max_rel"] <= 1e-4, same
    assert [p.name for p in list_sharded(tmp_path / "run2")][-1] == f"step-{STEPS:08d}"


def test_consolidation_keeps_router_biases(tmp_path):
    """Persistent buffers (the routers' logit biases, which a curriculum steers) are checkpoint
    state like the weights: saved sharded and written out by consolidation."""
    import torch

    from lite_llm.checkpoint import load_checkpoint
    from lite_llm.dist.checkpoint import consolidate, save_sharded
    from lite_llm.model import build_model
    from tests.conftest import two_tier_config

    model = build_model(two_tier_config(), seed=1)
    bias = model.layers[0].ffn.router.heads["tier_b"].tier_bias
    bias.fill_(-2.5)
    optimizer = torch.optim.AdamW(model.parameters())
    meta = {"model_config": model.config.to_dict(), "trainer": {"step": 0}, "progressive": {}}
    saved = save_sharded(tmp_path / "run", 0, model, optimizer, meta, None, keep_last=1)
    back = load_checkpoint(consolidate(saved, tmp_path / "ckpt")).model
    assert torch.equal(back.layers[0].ffn.router.heads["tier_b"].tier_bias, bias)
    assert all(torch.equal(v, back.state_dict()[k]) for k, v in model.state_dict().items())
