"""Replay shares, the freezing schedule, protection built from the config, and the compute a
run inherits from the checkpoint it started from."""

from __future__ import annotations

import statistics

import pytest
import torch

from lite_llm import ModelConfig, build_model
from lite_llm.checkpoint import load_checkpoint, save_checkpoint
from lite_llm.data import TokenData
from lite_llm.errors import ConfigError
from lite_llm.train import EWC, Distillation, FreezeSchedule, TrainConfig, Trainer, TrainerCallback, estimate_fisher, replay_rows, save_ewc

DENSE = ModelConfig(vocab_size=256, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, intermediate_size=48, max_seq_len=64)


def _cfg(**fields) -> TrainConfig:
    base = dict(steps=4, batch_size=6, seq_len=16, warmup_steps=0, eval_every=0, eval_batches=1, eval_batch_size=2, seed=3)
    base.update(fields)
    return TrainConfig(**base)


def test_replay_rows_are_within_one_of_the_share_and_exact_on_average():
    counts = [replay_rows(6, 0.25, seed=1, step=s, micro=m) for s in range(400) for m in range(2)]
    assert set(counts) == {1, 2}  # 1.5 rows: one or two, never further off
    assert statistics.mean(counts) == pytest.approx(1.5, abs=0.06)
    assert {replay_rows(10, 0.3, seed=0, step=s, micro=0) for s in range(50)} == {3}
    assert replay_rows(4, 0.99, seed=0, step=0, micro=0) == 3  # one row of new data at least


def test_replayed_rows_come_from_the_old_domains_at_the_configured_share(small_dataset):
    data = TokenData(small_dataset)
    trainer = Trainer(build_model(DENSE), data, _cfg(domains={"code": 1.0}, replay={"prose": 1.0}, replay_share=0.25), show_progress=False)
    rows = [trainer.sample(step, 0)[1] for step in range(300)]
    shares = [sum(d == "prose" for d in r) / len(r) for r in rows]
    assert statistics.mean(shares) == pytest.approx(0.25, abs=0.02)
    for r in rows:  # new data first, then the replayed rows
        n = replay_rows(6, 0.25, seed=3, step=rows.index(r), micro=0)
        assert r[: 6 - n] == ["code"] * (6 - n) and r[6 - n :] == ["prose"] * n
    # Without replay the trainer draws exactly what the data layer draws.
    plain = Trainer(build_model(DENSE), data, _cfg(domains={"code": 1.0}), show_progress=False)
    batch, domains = plain.sample(5, 1)
    expected, expected_domains = data.sample_batch("train", {"code": 1.0}, 6, 16, seed=3, step=5, micro=1)
    assert torch.equal(batch, expected) and domains == expected_domains


def test_freeze_schedule_holds_parameters_bitwise_until_their_thaw_step(small_dataset):
    data = TokenData(small_dataset)
    model = build_model(DENSE, seed=1)
    cfg = _cfg(steps=5, lr=1e-2, freeze=[{"patterns": ["layers.0.*"], "thaw_at": 3}, {"patterns": ["embed.*"], "thaw_at": None}])
    snapshots = []

    class Snapshot(TrainerCallback):
        def on_step_end(self, trainer, step, record):
            snapshots.append({n: p.detach().clone() for n, p in trainer.model.named_parameters()})

    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer = Trainer(model, data, cfg, callbacks=[Snapshot()], show_progress=False)
    assert isinstance(trainer.callbacks[0], FreezeSchedule)
    trainer.train()
    layer0 = [n for n in start if n.startswith("layers.0.")]
    for step, snap in enumerate(snapshots):
        assert torch.equal(snap["embed.weight"], start["embed.weight"])  # never thaws
        assert not torch.equal(snap["layers.1.attn.q_proj.weight"], start["layers.1.attn.q_proj.weight"])
        unchanged = all(torch.equal(snap[n], start[n]) for n in layer0)
        assert unchanged == (step < 3), step


def test_protection_is_built_from_the_config(tmp_path, small_dataset):
    data = TokenData(small_dataset)
    model = build_model(DENSE, seed=2)
    base = save_checkpoint(tmp_path / "base", model)
    ewc = save_ewc(base, estimate_fisher(model, data, "prose", samples=4, seq_len=16), tmp_path / "ewc")
    cfg = _cfg(ewc_from=str(ewc), ewc_weight=10.0, distill_from=str(base), distill_domains=["prose"], freeze=[{"patterns": "norm.*", "thaw_at": 2}])
    trainer = Trainer(model, data, cfg, show_progress=False)
    kinds = [type(cb) for cb in trainer.callbacks]
    assert kinds == [FreezeSchedule, EWC, Distillation]
    result = trainer.train()
    assert all(torch.isfinite(torch.tensor(result.losses)))


def test_a_run_counts_the_compute_of_the_checkpoint_it_started_from(tmp_path, small_dataset):
    data = TokenData(small_dataset)
    model = build_model(DENSE, seed=0)
    first = Trainer(model, data, _cfg(steps=2), run_dir=tmp_path / "small", show_progress=False)
    small = first.train()
    parent = load_checkpoint(small.checkpoint)
    assert parent.progressive["training"]["total_flops"] == small.flops > 0

    second = Trainer(parent.model, data, _cfg(steps=3), run_dir=tmp_path / "grown", show_progress=False)
    second.inherit(parent.progressive)
    grown = second.train()
    training = load_checkpoint(grown.checkpoint).progressive["training"]
    assert training["ancestor_flops"] == small.flops
    assert training["total_flops"] == pytest.approx(small.flops + grown.flops)
    assert second.logger.last("total_flops") == pytest.approx(small.flops + grown.flops)


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(replay_share=0.3), "names no old domain"),
        (dict(replay={"prose": 1.0}, replay_share=1.0), r"must be in \[0, 1\)"),
        (dict(freeze=[{"pattern": "x"}]), "must be {patterns"),
        (dict(freeze=[{"patterns": ["x"], "thaw_at": -1}]), "thaw_at must be a step"),
        (dict(ewc_from="ckpt"), "go together"),
        (dict(ewc_weight=1.0), "go together"),
        (dict(distill_from="ckpt", distill_temperature=0.0), "must be positive"),
    ],
)
def test_bad_protection_settings_are_refused_in_one_sentence(fields, message):
    with pytest.raises(ConfigError, match=message):
        _cfg(**fields)


def test_unknown_replay_domain_and_unmatched_freeze_pattern(small_dataset):
    data = TokenData(small_dataset)
    with pytest.raises(ConfigError, match="unknown domain"):
        Trainer(build_model(DENSE), data, _cfg(replay={"poetry": 1.0}, replay_share=0.2), show_progress=False)
    with pytest.raises(ConfigError, match="matches no parameter"):
        Trainer(build_model(DENSE), data, _cfg(freeze=[{"patterns": ["layer.0.*"]}]), show_progress=False)
