"""The tier curriculum: phases, frozen weights, the share schedule, bitwise resume mid-ramp,
automatic and manual rollback, and refusals of bad schedules."""

from __future__ import annotations

import math

import pytest
import torch

from lite_llm import ModelConfig
from lite_llm.checkpoint import CheckpointManager, load_checkpoint
from lite_llm.data import TokenData
from lite_llm.errors import ConfigError
from lite_llm.model import LiteLLM, build_model
from lite_llm.train import TrainConfig, Trainer
from lite_llm.train.curriculum import UNROUTABLE, Curriculum, CurriculumConfig, Phase, new_tier_parameters
from lite_llm.train.rollback import rollback_checkpoint

NEW = "tier_10b"
PHASES = [
    {"name": "preparation", "steps": 2},
    {"name": "isolation", "steps": 6, "share": 0.1},
    {"name": "integration", "steps": 10, "to_share": 0.4, "ramp": "linear"},
    {"name": "joint", "steps": 4, "lr_scale": 0.3},
]


def _models(seed: int = 0) -> tuple[LiteLLM, LiteLLM]:
    """(base with one tier, the same model after adding an unroutable second tier)."""
    full = ModelConfig.from_preset("tiny")
    grown = build_model(full, seed=seed)
    with torch.no_grad():
        for block in grown.layers:
            block.ffn.router.heads[NEW].tier_bias.fill_(UNROUTABLE)
    base_cfg = full.replace(tiers=full.tiers[:1])
    base = LiteLLM(base_cfg)
    base.load_state_dict({k: v for k, v in grown.state_dict().items() if f".{NEW}." not in k})
    return base.eval(), grown


def _train_cfg(**overrides) -> TrainConfig:
    fields = dict(steps=22, batch_size=4, seq_len=32, lr=3e-3, warmup_steps=2, eval_every=0, eval_batches=2, eval_batch_size=4, seed=5, domains={"code": 1.0})
    fields.update(overrides)
    return TrainConfig(**fields)


def _ids() -> torch.Tensor:
    return torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(7))


def _logits(model, ids, tierset=None):
    model.eval()
    with torch.no_grad():
        return model(ids, tierset=tierset).logits


def test_added_tier_changes_nothing_before_the_curriculum():
    base, grown = _models()
    assert torch.equal(_logits(base, _ids()), _logits(grown, _ids()))


def test_phases_freeze_follow_the_schedule_and_monitor(small_dataset):
    _, model = _models()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plan = CurriculumConfig(NEW, PHASES, gain=1.0)
    records = []

    class Spy(Curriculum):
        def on_step_end(self, trainer, step, record):
            super().on_step_end(trainer, step, record)
            records.append(dict(record))

    trainer = Trainer(model, TokenData(small_dataset), _train_cfg(), callbacks=[Spy(plan)], show_progress=False)
    trainer.train(until=18)  # through integration
    new = set(new_tier_parameters(model, NEW))
    state = model.state_dict()
    for name, value in before.items():
        if name in new:
            continue
        if name.endswith(f"{NEW}.tier_bias"):
            assert not torch.equal(value, state[name])  # the controller steers it
        else:
            assert torch.equal(value, state[name]), name  # frozen, bitwise
    assert any(not torch.equal(before[n], state[n]) for n in new)
    assert [r["phase"] for r in records] == ["preparation"] * 2 + ["isolation"] * 6 + ["integration"] * 10
    assert all(r["new_tier_share"] == 0.0 for r in records[:2])  # not routable in preparation
    ramp = records[8:]
    assert [round(r["target_share"], 6) for r in ramp] == [round(0.1 + 0.3 * (i + 1) / 10, 6) for i in range(10)]
    errors = [abs(r["new_tier_share"] - r["target_share"]) for r in ramp]
    # The share follows the schedule: set for each batch from the last one's router margins,
    # so what remains is batch-to-batch variation of 128 tokens and the router's own learning.
    assert sum(errors) / len(errors) < 0.08 and max(errors) < 0.3, errors
    assert all("starved_experts" in r and 0 < r["starvation_bound"] <= 1 for r in records)
    assert trainer.progressive["curriculum"]["phase"] == "integration"
    trainer.train()  # joint: everything trains
    assert not torch.equal(before["layers.0.attn.q_proj.weight"], model.state_dict()["layers.0.attn.q_proj.weight"])


def test_resume_mid_ramp_is_bitwise(small_dataset, tmp_path):
    data = TokenData(small_dataset)
    plan = CurriculumConfig(NEW, PHASES)
    cfg = _train_cfg(save_every=3)
    straight = Trainer(_models()[1], data, cfg, callbacks=[Curriculum(plan)], show_progress=False).train()

    run = tmp_path / "run"
    Trainer(_models()[1], data, cfg, run_dir=run, callbacks=[Curriculum(plan)], show_progress=False).train(until=13)
    latest = CheckpointManager(run).latest()
    assert latest.name.endswith("12")  # mid-integration
    second = Trainer(_models(seed=9)[1], data, cfg, run_dir=run, callbacks=[Curriculum(CurriculumConfig(NEW, PHASES))], show_progress=False)
    second.resume(latest)
    assert second.train().losses == straight.losses[12:]

    changed = [dict(p) for p in PHASES]
    changed[2]["to_share"] = 0.5
    third = Trainer(_models()[1], data, cfg, run_dir=run, callbacks=[Curriculum(CurriculumConfig(NEW, changed))], show_progress=False)
    with pytest.raises(ConfigError, match="cannot resume: the curriculum schedule differs"):
        third.resume(CheckpointManager(run).latest())


def test_automatic_rollback_restores_the_old_model(small_dataset, tmp_path):
    base, model = _models()
    phases = [dict(p) for p in PHASES]
    plan = CurriculumConfig(NEW, phases, rollback={"domains": ["prose"], "margin": -0.5})  # any eval trips it
    cfg = _train_cfg(eval_every=10)
    result = Trainer(model, TokenData(small_dataset), cfg, run_dir=tmp_path / "run", callbacks=[Curriculum(plan)], show_progress=False).train()
    assert result.stopped_early and "rolled back at step 10" in result.stopped_early and "prose" in result.stopped_early
    assert (tmp_path / "run" / "pre-integration" / "manifest.json").exists()
    assert torch.equal(_logits(model, _ids()), _logits(model, _ids(), tierset="tier_1b"))  # new tier unroutable again
    # Isolation froze the old tier: the restored model is the base model, bitwise.
    assert torch.equal(_logits(model, _ids()), _logits(base, _ids()))


def test_manual_rollback_gives_back_the_previous_tierset(small_dataset, tmp_path):
    base, model = _models()
    plan = CurriculumConfig(NEW, PHASES, rollback={"domains": ["prose"], "margin": 10.0})
    run = tmp_path / "run"
    result = Trainer(model, TokenData(small_dataset), _train_cfg(), run_dir=run, callbacks=[Curriculum(plan)], show_progress=False).train()
    assert result.stopped_early is None
    assert not torch.equal(_logits(load_checkpoint(result.checkpoint).model, _ids()), _logits(base, _ids()))
    path, tiers = rollback_checkpoint(result.checkpoint, tmp_path / "rolled")
    restored = load_checkpoint(path)
    assert tiers == ["tier_1b"] and [t.name for t in restored.config.tiers] == ["tier_1b"]
    assert torch.equal(_logits(restored.model, _ids()), _logits(base, _ids()))


def test_target_share_ramps():
    plan = CurriculumConfig(NEW, [{"name": "isolation", "steps": 2, "share": 0.05}, {"name": "integration", "steps": 4, "to_share": 0.45, "ramp": "cosine"}])
    shares = [plan.target_share(s) for s in range(6)]
    assert shares[:2] == [0.05, 0.05]
    expected = [0.05 + 0.4 * (1 - math.cos(math.pi * (i + 1) / 4)) / 2 for i in range(4)]
    assert shares[2:] == pytest.approx(expected)
    assert shares[-1] == pytest.approx(0.45)


@pytest.mark.parametrize(
    "phases, message",
    [
        ([{"name": "integration", "steps": 3, "to_share": 0.5}, {"name": "isolation", "steps": 2}], "phases are out of order or repeated"),
        ([{"name": "integration", "steps": 0, "to_share": 0.5}], "zero-length ramp"),
        ([{"name": "isolation", "steps": 2}], "needs an integration phase"),
        ([{"name": "warmup", "steps": 2}], "unknown curriculum phase 'warmup'"),
        ([{"name": "integration", "steps": 3, "to_share": 1.5}], "to_share must be a probability"),
    ],
)
def test_bad_curricula(phases, message):
    with pytest.raises(ConfigError, match=message):
        CurriculumConfig(NEW, phases)


def test_steps_must_match_and_tier_must_exist(small_dataset):
    _, model = _models()
    data = TokenData(small_dataset)
    with pytest.raises(ConfigError, match="train.steps is 5 but the curriculum's phases add up to 22"):
        Trainer(model, data, _train_cfg(steps=5), callbacks=[Curriculum(CurriculumConfig(NEW, PHASES))], show_progress=False).train()
    with pytest.raises(ConfigError, match="tier 'tier_x' is not in the model"):
        Trainer(model, data, _train_cfg(), callbacks=[Curriculum(CurriculumConfig("tier_x", PHASES))], show_progress=False).train()
    assert Phase("joint", 3).trainable == "all" and Phase("joint", 3).balance


def test_cli_curriculum_plot_and_rollback(small_dataset, tmp_path):
    import yaml
    from typer.testing import CliRunner

    from lite_llm.checkpoint import save_checkpoint
    from lite_llm.cli import app

    base, model = _models()
    init = save_checkpoint(tmp_path / "grown", model)
    spec = {"tier": NEW, "phases": PHASES, "rollback": {"domains": ["prose"], "margin": 10.0}}
    (tmp_path / "curriculum.yaml").write_text(yaml.safe_dump(spec))
    runner = CliRunner()
    run = tmp_path / "run"
    args = ["train", "--data", str(small_dataset), "--init", str(init), "--curriculum", str(tmp_path / "curriculum.yaml"), "-o", str(run)]
    result = runner.invoke(app, args + ["--batch-size", "4", "--seq-len", "32", "--domains", "code=1", "--eval-every", "8", "--quiet"])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["plot", str(run)])
    assert result.exit_code == 0 and (run / "plots" / "ramp.png").stat().st_size > 10_000
    final = CheckpointManager(run).latest()
    assert final.name.endswith("22")
    result = runner.invoke(app, ["rollback", str(final), "-o", str(tmp_path / "rolled")])
    assert result.exit_code == 0, result.output
    assert torch.equal(_logits(load_checkpoint(tmp_path / "rolled").model, _ids()), _logits(base, _ids()))
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump({"tier": NEW, "phases": [{"name": "integration", "steps": 0, "to_share": 0.3}]}))
    result = runner.invoke(app, args[:-4] + ["--curriculum", str(tmp_path / "bad.yaml"), "-o", str(tmp_path / "run2")])
    assert result.exit_code == 1 and "zero-length ramp" in result.output and not (tmp_path / "run2").exists()
