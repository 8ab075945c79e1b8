"""Distillation: zero for a student identical to its teacher, the closed-form KL otherwise,
and only the chosen domains' rows count."""

from __future__ import annotations

import math

import pytest
import torch

from lite_llm import ModelConfig, build_model
from lite_llm.data import TokenData
from lite_llm.errors import ConfigError
from lite_llm.train import TrainConfig, Trainer
from lite_llm.train.distill import Distillation, distillation_loss


def test_zero_for_an_identical_student_and_closed_form_otherwise():
    logits = torch.randn(2, 5, 7, generator=torch.Generator().manual_seed(0))
    assert float(distillation_loss(logits, logits.clone(), 2.0)) == pytest.approx(0.0, abs=1e-7)
    # Two-way distributions by hand: KL(p||q) = p log p/q + (1-p) log (1-p)/(1-q), times T^2.
    s, t = torch.tensor([[[0.0, 1.0]]]), torch.tensor([[[0.0, 2.0]]])
    temp = 2.0
    p = 1 / (1 + math.exp(-2.0 / temp))
    q = 1 / (1 + math.exp(-1.0 / temp))
    expected = (p * math.log(p / q) + (1 - p) * math.log((1 - p) / (1 - q))) * temp**2
    assert float(distillation_loss(s, t, temp)) == pytest.approx(expected, rel=1e-5)  # fp32


def test_callback_distils_only_the_chosen_domain(small_dataset):
    config = ModelConfig.from_preset("tiny")
    student, teacher = build_model(config, seed=0), build_model(config, seed=0)
    data = TokenData(small_dataset)
    cfg = TrainConfig(steps=2, batch_size=6, seq_len=32, warmup_steps=0, eval_every=0, eval_batches=1, eval_batch_size=2, seed=4)
    seen = []

    class Spy(Distillation):
        def extra_loss(self, trainer, step, batch, output):
            loss = super().extra_loss(trainer, step, batch, output)
            seen.append((list(trainer.batch_domains), None if loss is None else float(loss.detach())))
            return loss

    Trainer(student, data, cfg, callbacks=[Spy(teacher, domains=["prose"])], show_progress=False).train()
    domains, first = seen[0]
    assert "prose" in domains and first == pytest.approx(0.0, abs=1e-6)  # identical before the first update
    assert seen[1][1] > 0  # the student moved, the teacher did not
    with pytest.raises(ConfigError, match="must be positive"):
        Distillation(teacher, temperature=0)


def test_a_teacher_with_another_vocabulary_is_refused_before_the_first_step(small_dataset):
    config = ModelConfig.from_preset("tiny")
    teacher = build_model(config.replace(vocab_size=512), seed=0)
    cfg = TrainConfig(steps=1, batch_size=2, seq_len=16, eval_every=0, eval_batches=1, eval_batch_size=2)
    trainer = Trainer(build_model(config, seed=0), TokenData(small_dataset), cfg, callbacks=[Distillation(teacher)], show_progress=False)
    with pytest.raises(ConfigError, match="teacher has a vocabulary of 512 tokens but the model has 256"):
        trainer.train()
    assert trainer.step == 0
