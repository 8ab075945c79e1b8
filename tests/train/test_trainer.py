"""The training loop: learning, exact resume, non-finite handling, schedule, FLOP counting."""

from __future__ import annotations

import math

import pytest
import torch

from lite_llm import ModelConfig, build_model
from lite_llm.checkpoint import CheckpointManager
from lite_llm.data import TokenData
from lite_llm.train import TrainConfig, Trainer, flops_per_token, lr_at


def _cfg(**overrides) -> TrainConfig:
    fields = dict(steps=12, batch_size=4, seq_len=32, lr=3e-3, warmup_steps=3, eval_every=0, eval_batches=2, eval_batch_size=4, seed=3)
    fields.update(overrides)
    return TrainConfig(**fields)


def test_validation_loss_falls(small_dataset, tmp_path):
    data = TokenData(small_dataset)
    model = build_model(ModelConfig.from_preset("tiny"), seed=0)
    cfg = _cfg(steps=40, batch_size=8, seq_len=64, eval_every=40, eval_batches=4, eval_batch_size=8)
    trainer = Trainer(model, data, cfg, show_progress=False)
    before = trainer.evaluate()
    result = trainer.train()
    after = result.final_eval
    for domain in ("code", "prose"):
        assert after[domain]["loss"] < before[domain]["loss"] - 0.5, (domain, before[domain], after[domain])
        # byte-level: bits per byte is the loss in bits
        assert after[domain]["bpb"] == pytest.approx(after[domain]["loss"] / math.log(2), rel=1e-6)
    assert result.tokens == 40 * 8 * 64
    assert result.flops == pytest.approx(40 * 8 * 64 * flops_per_token(model.config, 64))


def test_resume_is_bitwise_identical(small_dataset, tmp_path):
    data = TokenData(small_dataset)
    cfg = _cfg(save_every=4)
    straight_trainer = Trainer(build_model(ModelConfig.from_preset("tiny"), seed=1), data, cfg, show_progress=False)
    straight = straight_trainer.train()

    run = tmp_path / "run"
    first = Trainer(build_model(ModelConfig.from_preset("tiny"), seed=1), data, cfg, run_dir=run, show_progress=False)
    first.train(until=6)  # "killed" after step 6; the last checkpoint is at step 4
    latest = CheckpointManager(run).latest()
    assert latest is not None and latest.name.endswith("4")

    # A different initial model proves the weights come from the checkpoint.
    second = Trainer(build_model(ModelConfig.from_preset("tiny"), seed=99), data, cfg, run_dir=run, show_progress=False)
    second.resume(latest)
    assert second.step == 4
    resumed = second.train()
    assert resumed.losses == straight.losses[4:]  # bitwise: float equality of every later step
    final, expected = second.model.state_dict(), straight_trainer.model.state_dict()
    assert all(torch.equal(final[k], expected[k]) for k in expected)


def test_resume_refuses_a_different_schedule(small_dataset, tmp_path):
    from lite_llm import ConfigError

    data = TokenData(small_dataset)
    run = tmp_path / "run"
    Trainer(build_model(ModelConfig.from_preset("tiny")), data, _cfg(steps=4, save_every=2), run_dir=run, show_progress=False).train()
    other = Trainer(build_model(ModelConfig.from_preset("tiny")), data, _cfg(steps=4, lr=1e-2), run_dir=run, show_progress=False)
    with pytest.raises(ConfigError, match=r"cannot resume: train.lr was 0.003 in the checkpoint but is 0.01 now"):
        other.resume(CheckpointManager(run).latest())


def test_non_finite_loss_skips_the_step_and_says_so(small_dataset):
    from lite_llm.train import TrainerCallback

    class PoisonStep(TrainerCallback):
        name = "poison"

        def extra_loss(self, trainer, step, batch, output):
            return torch.tensor(float("nan")) if step == 2 else None

    data = TokenData(small_dataset)
    model = build_model(ModelConfig.from_preset("tiny"))
    trainer = Trainer(model, data, _cfg(steps=4), callbacks=[PoisonStep()], show_progress=False)
    snapshot = {}

    class Snapshot(TrainerCallback):
        def on_step_begin(self, trainer, step):
            if step == 2:
                snapshot.update({k: v.clone() for k, v in trainer.model.state_dict().items()})

        def on_step_end(self, trainer, step, record):
            if step == 2:
                for k, v in trainer.model.state_dict().items():
                    assert torch.equal(v, snapshot[k]), f"{k} changed during a skipped step"

    trainer.callbacks.append(Snapshot())
    result = trainer.train()
    assert result.skipped_steps == [2]
    assert all(math.isfinite(l) for i, l in enumerate(result.losses) if i != 2)


def test_lr_schedule_closed_form():
    kw = dict(lr=1.0, warmup_steps=10, total_steps=110, min_lr_ratio=0.1)
    assert lr_at(0, **kw) == pytest.approx(0.1)
    assert lr_at(9, **kw) == pytest.approx(1.0)
    assert lr_at(10, **kw) == pytest.approx(1.0)
    assert lr_at(60, **kw) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_at(110, **kw) == pytest.approx(0.1)


def test_flops_per_token_closed_form():
    cfg = ModelConfig.from_preset("tiny-dense")
    n_active = cfg.num_params() - cfg.vocab_size * cfg.d_model  # input embedding is a lookup
    assert flops_per_token(cfg, 64) == 6 * n_active + 12 * cfg.n_layers * 64 * cfg.d_model


def test_unknown_domain_and_tier_fail_before_training(small_dataset):
    from lite_llm import ConfigError, TierSetError

    data = TokenData(small_dataset)
    with pytest.raises(ConfigError, match="train.domains names unknown domain\\(s\\) math; the data has code, prose"):
        Trainer(build_model(ModelConfig.from_preset("tiny")), data, _cfg(domains={"math": 1.0}), show_progress=False)
    with pytest.raises(TierSetError, match="unknown tier"):
        Trainer(build_model(ModelConfig.from_preset("tiny")), data, _cfg(tierset="tier_9"), show_progress=False)


@pytest.mark.parametrize("keep", [True, False])
def test_training_on_cpu_keeps_freed_memory_unless_told_not_to(small_dataset, monkeypatch, keep):
    calls = []
    monkeypatch.setattr("lite_llm.train.trainer.keep_freed_memory", lambda: calls.append(1) or True)
    data = TokenData(small_dataset)
    cfg = _cfg(steps=1, keep_freed_cpu_memory=keep)
    Trainer(build_model(ModelConfig.from_preset("tiny")), data, cfg, show_progress=False).train()
    assert len(calls) == (1 if keep else 0)


def test_progress_in_a_log_is_plain_lines_with_the_metrics_log(small_dataset, capsys, monkeypatch):
    """stderr that is not a terminal gets one whole line about every 5% of the run and at every
    evaluation (a rich bar there was drawn once, at the end, with its stats elided), and its
    figures are the metrics' (the oracle: the losses the result returns)."""
    for forcing in ("FORCE_COLOR", "TTY_INTERACTIVE", "TTY_COMPATIBLE"):  # would make rich call a pipe a terminal
        monkeypatch.delenv(forcing, raising=False)
    data = TokenData(small_dataset)
    trainer = Trainer(build_model(ModelConfig.from_preset("tiny"), seed=0), data, _cfg(steps=40, eval_every=20), show_progress=True)
    result = trainer.train()
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("train step")]
    steps = [int(line.split()[2].split("/")[0]) for line in lines]
    assert steps == list(range(2, 41, 2)) and all(line.split()[2].endswith("/40") for line in lines)
    for line, step in zip(lines, steps):
        assert f"loss {result.losses[step - 1]:.3f}" in line and "…" not in line
    assert [("val bpb" in line) for line in lines] == [step % 20 == 0 for step in steps]
