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
from lite_llm.train import EWC, Distillation, FreezeSchedule, TrainConfig, Trainer, TrainerCallback, estimate_fisher, load_ewc, replay_rows, save_ewc
from lite_llm.train.distill import distillation_loss

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
    trainer = Trainer.from_config(build_model(DENSE), data, _cfg(domains={"code": 1.0}, replay={"prose": 1.0}, replay_share=0.25), show_progress=False)
    rows = [trainer.sample(step, 0)[1] for step in range(300)]
    shares = [sum(d == "prose" for d in r) / len(r) for r in rows]
    assert statistics.mean(shares) == pytest.approx(0.25, abs=0.02)
    for step, r in enumerate(rows):  # new data first, then the replayed rows
        n = replay_rows(6, 0.25, seed=3, step=step, micro=0)
        assert r[: 6 - n] == ["code"] * (6 - n) and r[6 - n :] == ["prose"] * n
    # Without replay the trainer draws exactly what the data layer draws.
    plain = Trainer.from_config(build_model(DENSE), data, _cfg(domains={"code": 1.0}), show_progress=False)
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
    trainer = Trainer.from_config(model, data, cfg, callbacks=[Snapshot()], show_progress=False)
    assert isinstance(trainer.callbacks[-1], FreezeSchedule)  # after the caller's callbacks: it has the last word
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
    trainer = Trainer.from_config(model, data, cfg, show_progress=False)
    kinds = [type(cb) for cb in trainer.callbacks]
    assert kinds == [FreezeSchedule, EWC, Distillation]
    extra = []

    class Spy(TrainerCallback):
        def on_step_end(self, trainer, step, record):
            extra.append(record["extra_loss"])

    trainer.callbacks.insert(0, Spy())
    result = trainer.train()
    assert all(torch.isfinite(torch.tensor(result.losses)))
    # Step 0 starts at the anchor and the teacher (both terms 0); once the weights move, both
    # terms are live, and each equals its closed form on the trained model.
    assert extra[0] == 0.0 and all(e > 0 for e in extra[1:])
    ewc_cb, distill_cb = trainer.callbacks[2], trainer.callbacks[3]
    estimate = load_ewc(ewc)
    by_hand = 10.0 * sum(float((estimate.fisher[n] * (p.detach() - estimate.anchor[n]).square()).sum()) for n, p in model.named_parameters())
    assert float(ewc_cb.extra_loss(trainer, 0, None, None).detach()) == pytest.approx(by_hand, rel=1e-5)
    batch, trainer.batch_domains = data.sample_batch("train", {"prose": 1.0}, 2, 16, seed=0, step=0, micro=0)
    with torch.no_grad():
        student = model(batch).logits
        teacher = load_checkpoint(base).model(batch).logits
        expected = float(distillation_loss(student, teacher, 2.0))
        assert expected > 0
        assert float(distill_cb.extra_loss(trainer, 0, batch, model(batch))) == pytest.approx(expected, rel=1e-5)


def test_freeze_schedule_has_the_last_word_and_gives_back_the_flag_it_found(small_dataset):
    """A callback that unfreezes everything every step (as a curriculum's 'all' phase does)
    cannot unfreeze a held parameter before its thaw; at the thaw a parameter that was frozen
    by someone else before the schedule held it stays frozen."""
    data = TokenData(small_dataset)
    cfg = _cfg(steps=4, lr=1e-2, freeze=[{"patterns": ["layers.0.*", "norm.*"], "thaw_at": 2}])

    class UnfreezeEverything(TrainerCallback):
        def on_step_begin(self, trainer, step):
            for p in trainer.model.parameters():
                p.requires_grad_(True)

    model = build_model(DENSE, seed=1)
    q0 = model.layers[0].attn.q_proj.weight.detach().clone()
    held = []

    class Watch(TrainerCallback):
        def on_step_end(self, trainer, step, record):
            held.append(torch.equal(trainer.model.layers[0].attn.q_proj.weight, q0))

    Trainer.from_config(model, data, cfg, callbacks=[UnfreezeEverything(), Watch()], show_progress=False).train()
    assert held == [True, True, False, False]  # held until step 2, trained from then on

    model = build_model(DENSE, seed=1)
    model.norm.weight.requires_grad_(False)  # frozen before the schedule saw it
    norm0 = model.norm.weight.detach().clone()
    Trainer.from_config(model, data, cfg, show_progress=False).train()
    assert not model.norm.weight.requires_grad and torch.equal(model.norm.weight, norm0)
    assert model.layers[0].attn.q_proj.weight.requires_grad  # thawed: the flag it found was True


def test_resuming_with_other_protection_is_refused(tmp_path, small_dataset):
    data = TokenData(small_dataset)
    cfg = _cfg(steps=2, domains={"code": 1.0}, replay={"prose": 1.0}, replay_share=0.25)
    first = Trainer.from_config(build_model(DENSE, seed=0), data, cfg, run_dir=tmp_path / "run", show_progress=False).train()
    for change, key in ((dict(replay_share=0.5), "replay_share"), (dict(freeze=[{"patterns": ["embed.*"], "thaw_at": None}]), "freeze")):
        other = Trainer.from_config(build_model(DENSE, seed=0), data, TrainConfig.from_dict({**cfg.to_dict(), **change}), show_progress=False)
        with pytest.raises(ConfigError, match=f"cannot resume: train.{key} was"):
            other.resume(first.checkpoint)


def test_a_run_counts_the_compute_of_the_checkpoint_it_started_from(tmp_path, small_dataset):
    data = TokenData(small_dataset)
    model = build_model(DENSE, seed=0)
    first = Trainer.from_config(model, data, _cfg(steps=2), run_dir=tmp_path / "small", show_progress=False)
    small = first.train()
    parent = load_checkpoint(small.checkpoint)
    assert parent.progressive["training"]["total_flops"] == small.flops > 0

    second = Trainer.from_config(parent.model, data, _cfg(steps=3), run_dir=tmp_path / "grown", show_progress=False)
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
        (dict(replay={"prose": 1.0}), "replay_share is 0, so nothing would be replayed"),
        (dict(replay={"prose": 1.0}, replay_share=0.9), "leaves no row of new data in a micro-batch of 6"),
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


def test_unknown_replay_domain_and_unmatched_freeze_pattern(small_dataset, tmp_path):
    data = TokenData(small_dataset)
    with pytest.raises(ConfigError, match="train.replay names unknown domain"):
        Trainer.from_config(build_model(DENSE), data, _cfg(replay={"poetry": 1.0}, replay_share=0.2), show_progress=False)
    teacher = save_checkpoint(tmp_path / "teacher", build_model(DENSE))  # distill_domains without a teacher is refused by TrainConfig
    with pytest.raises(ConfigError, match="train.distill_domains names unknown domain"):
        Trainer.from_config(build_model(DENSE), data, _cfg(distill_from=str(teacher), distill_domains=["poetry"]), show_progress=False)
    with pytest.raises(ConfigError, match="matches no parameter"):
        Trainer.from_config(build_model(DENSE), data, _cfg(freeze=[{"patterns": ["layer.0.*"]}]), show_progress=False)
