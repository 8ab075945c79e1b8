"""Freezing: masked entries stay bitwise fixed through AdamW steps (weight decay included);
whole parameters freeze by name pattern."""

from __future__ import annotations

import pytest
import torch

from lite_llm import ModelConfig, build_model
from lite_llm.data import TokenData
from lite_llm.errors import ConfigError
from lite_llm.grow.moe import old_expert_mask
from lite_llm.train import TrainConfig, Trainer, TrainerCallback
from lite_llm.train.freezing import PartialFreeze, freeze_parameters

from ..grow.helpers import grow


def _cfg(**overrides) -> TrainConfig:
    fields = {"steps": 3, "batch_size": 2, "seq_len": 32, "lr": 1e-2, "warmup_steps": 0, "weight_decay": 0.1}
    fields.update(eval_every=0, eval_batches=1, eval_batch_size=2, seed=1)
    fields.update(overrides)
    return TrainConfig(**fields)


def _snapshot(model, masks):
    state = dict(model.named_parameters()) | dict(model.named_buffers())
    return {name: state[name].detach().clone() for name in masks}


def _row_mask(n: int, rows: list[int]) -> torch.Tensor:
    mask = torch.zeros(n, dtype=torch.bool)
    mask[rows] = True
    return mask


class CheckAtEval(TrainerCallback):
    """Evaluation runs between the optimizer step and on_step_end: the frozen values must
    already be back by then."""

    name = "check_at_eval"

    def __init__(self, model, masks, before):
        self.model, self.masks, self.before, self.evals = model, masks, before, 0

    def on_eval(self, trainer, step, scores):
        params = dict(self.model.named_parameters())
        for name, mask in self.masks.items():
            if name in params:
                assert torch.equal(params[name].detach()[mask], self.before[name][mask]), f"{name} moved before evaluation"
        self.evals += 1


def test_partial_freeze_keeps_masked_entries_bitwise_through_adamw(small_dataset):
    model = build_model(ModelConfig.from_preset("tiny"), seed=0)
    masks = {
        "embed.weight": _row_mask(256, [0, 5, 97]),  # row mask on a 2-D weight
        "layers.0.attn.q_proj.weight": torch.rand(64, 64, generator=torch.Generator().manual_seed(0)) < 0.5,  # elementwise
        "layers.1.ffn.experts.tier_1b.gate_up_proj": _row_mask(8, [1, 6]),  # whole experts of a 3-D bank
        "layers.1.ffn.router.heads.tier_1b.expert_gate": _row_mask(8, [1, 6]),
        "norm.weight": _row_mask(64, list(range(10))),  # no weight decay here, but Adam still moves it
    }
    before = _snapshot(model, masks)
    check = CheckAtEval(model, masks, before)
    trainer = Trainer(model, TokenData(small_dataset), _cfg(eval_every=1), callbacks=[PartialFreeze(model, masks), check], show_progress=False)
    trainer.train()
    assert check.evals == 3
    params = dict(model.named_parameters())
    for name, mask in masks.items():
        now = params[name].detach()
        assert torch.equal(now[mask], before[name][mask]), f"{name}: a masked entry changed"
        assert not torch.equal(now[~mask], before[name][~mask]), f"{name}: the unmasked entries did not train"
        state = trainer.optimizer.state[params[name]]
        assert not state["exp_avg"][mask].any(), f"{name}: the masked gradient reached Adam's moments"


def test_without_the_callback_weight_decay_moves_zero_gradient_entries():
    """The control for the test above, outside the Trainer: AdamW with weight decay changes an
    entry whose gradient is always zero; attach() keeps it."""
    for freeze in (False, True):
        torch.manual_seed(0)
        model = torch.nn.Linear(6, 4, bias=False)
        mask = _row_mask(4, [2])
        before = model.weight.detach().clone()
        optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.5)
        if freeze:
            PartialFreeze(model, {"weight": mask}).attach(optimizer)
        for _ in range(3):
            x = torch.randn(8, 6)
            model(x).square().sum().backward()
            if not freeze:
                model.weight.grad[mask] = 0  # zero gradient alone is not enough
            optimizer.step()
            optimizer.zero_grad()
        same = torch.equal(model.weight.detach()[mask], before[mask])
        assert same is freeze
        assert not torch.equal(model.weight.detach()[~mask], before[~mask])


def test_old_experts_stay_fixed_while_added_ones_train(small_dataset):
    """The curriculum's use: grow a tier, freeze its old experts with old_expert_mask."""
    old = build_model(ModelConfig.from_preset("tiny"), seed=0)
    model = grow(old, "add_experts", tier="tier_1b", count=1)
    masks = old_expert_mask(old.config, model.config)
    before = _snapshot(model, masks)
    Trainer(model.train(), TokenData(small_dataset), _cfg(), callbacks=[PartialFreeze(model, masks)], show_progress=False).train()
    state = dict(model.named_parameters()) | dict(model.named_buffers())
    for name, mask in masks.items():
        assert torch.equal(state[name].detach()[mask], before[name][mask]), name
    gate = "layers.0.ffn.router.heads.tier_1b.expert_gate"  # new rows learn (from the z-loss while unroutable)
    assert not torch.equal(state[gate].detach()[~masks[gate]], before[gate][~masks[gate]])


def test_partial_freeze_refuses_bad_masks():
    model = build_model(ModelConfig.from_preset("tiny-dense"))
    with pytest.raises(ConfigError, match="PartialFreeze has a mask for 'layers.9.attn.q_proj.weight', which is not a parameter or buffer"):
        PartialFreeze(model, {"layers.9.attn.q_proj.weight": torch.ones(64, dtype=torch.bool)})
    with pytest.raises(ConfigError, match=r"the mask for embed.weight has shape \(64,\) but must match the leading dimensions of the tensor's shape \(256, 64\)"):
        PartialFreeze(model, {"embed.weight": torch.ones(64, dtype=torch.bool)})


def test_freeze_parameters_by_pattern():
    model = build_model(ModelConfig.from_preset("tiny"))
    frozen = freeze_parameters(model, ["layers.0.*", "*.experts.tier_10b.*"])
    names = [n for n, _ in model.named_parameters()]
    assert frozen == [n for n in names if n.startswith("layers.0.") or ".experts.tier_10b." in n]
    assert "layers.1.ffn.experts.tier_10b.down_proj" in frozen
    assert all(not p.requires_grad for n, p in model.named_parameters() if n in frozen)
    assert all(p.requires_grad for n, p in model.named_parameters() if n not in frozen)
    assert freeze_parameters(model, "embed.weight") == ["embed.weight"]
    with pytest.raises(ConfigError, match=r"freeze pattern 'layer.0.\*' matches no parameter of the model; names look like 'embed.weight'"):
        freeze_parameters(model, ["layer.0.*"])
