"""Synaptic Intelligence: the path integral against a closed form and a slow loop, the
consolidation formula, the penalty against autograd, bitwise resume, importance carried through
growth like EWC's Fisher, and less forgetting than no protection on two real tasks."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from lite_llm import ModelConfig, build_model
from lite_llm.checkpoint import CheckpointManager, load_checkpoint, save_checkpoint
from lite_llm.data import TokenData
from lite_llm.errors import CheckpointError, ConfigError
from lite_llm.eval import evaluate
from lite_llm.grow import get_op
from lite_llm.grow.carry import carry_ewc
from lite_llm.grow.expand import expand_checkpoint
from lite_llm.grow.recipe import GrowthStep
from lite_llm.model import stored_state
from lite_llm.train import TrainConfig, Trainer, estimate_fisher, load_ewc, save_ewc
from lite_llm.checkpoint.ewc import SI_FORMAT, FisherEstimate
from lite_llm.train.ewc import ewc_penalty
from lite_llm.train.synaptic import SynapticIntelligence, consolidate, load_si

DENSE = ModelConfig(vocab_size=256, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, intermediate_size=48, max_seq_len=64)


def _cfg(**fields) -> TrainConfig:
    base = dict(steps=4, batch_size=4, seq_len=16, lr=1e-2, warmup_steps=0, eval_every=0, eval_batches=1, eval_batch_size=2, seed=3)
    base.update(fields)
    return TrainConfig(**base)


def _si(trainer: Trainer) -> SynapticIntelligence:
    (cb,) = [cb for cb in trainer.callbacks if isinstance(cb, SynapticIntelligence)]
    return cb


class _Quadratic(torch.nn.Module):
    def __init__(self, theta0: torch.Tensor) -> None:
        super().__init__()
        self.theta = torch.nn.Parameter(theta0.clone())


def test_path_integral_of_sgd_on_a_quadratic_matches_the_closed_form_and_a_hand_loop():
    """L = 1/2 sum a (theta - m)^2 with plain SGD at rate eta: d_t = r^t d_0 (r = 1 - eta a),
    g_t = a d_t and delta_t = -eta g_t, so omega = eta a^2 d_0^2 (1 - r^2N) / (1 - r^2)."""
    a = torch.tensor([0.5, 2.0, 4.0, 1.0])
    m = torch.tensor([1.0, -2.0, 0.5, 3.0])
    theta0 = torch.tensor([3.0, 1.0, -1.0, 3.0])  # the last entry starts at its optimum
    eta, steps = 0.1, 25
    model = _Quadratic(theta0)
    trainer = SimpleNamespace(model=model)
    si = SynapticIntelligence(strength=1.0, damping=1e-3)
    optimizer = torch.optim.SGD(model.parameters(), lr=eta)
    by_hand = torch.zeros(4)
    si.on_train_begin(trainer)
    for step in range(steps):
        si.on_step_begin(trainer, step)
        (0.5 * (a * (model.theta - m).square()).sum()).backward()
        g, before = model.theta.grad.clone(), model.theta.detach().clone()
        si.on_before_step(trainer, step)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        si.on_step_end(trainer, step, {})
        by_hand -= g * (model.theta.detach() - before)
    omega = si.omega["theta"]
    assert torch.equal(omega, by_hand)
    r = 1 - eta * a.double()
    closed = eta * a.double() ** 2 * (theta0.double() - m) ** 2 * (1 - r ** (2 * steps)) / (1 - r**2)
    assert torch.allclose(omega.double(), closed, rtol=1e-5, atol=0)
    assert omega[3] == 0 and si.steps == steps
    # Consolidated: omega / (total displacement^2 + xi), anchored at the end point.
    end = m.double() + r**steps * (theta0.double() - m)
    estimate = si.consolidated(model)
    expected = closed / ((end - theta0.double()) ** 2 + 1e-3)
    assert torch.allclose(estimate.fisher["theta"].double(), expected, rtol=1e-4)
    assert torch.equal(estimate.anchor["theta"], model.theta.detach())


def test_consolidation_adds_to_earlier_tasks_and_is_clamped_at_zero():
    omega = torch.tensor([0.5, -0.3, 0.2, 0.0])
    start = torch.tensor([1.0, 2.0, 0.0, 5.0])
    end = torch.tensor([1.1, 2.0, -0.2, 5.0])
    previous = torch.tensor([2.0, 1.0, 0.0, 0.7])
    got = consolidate(omega, start, end, 1e-3, previous)
    # 0.5 / (0.01 + 0.001) + 2;  -0.3 / 0.001 + 1 < 0 -> 0;  0.2 / (0.04 + 0.001);  0 + 0.7
    assert torch.allclose(got, torch.tensor([0.5 / 0.011 + 2.0, 0.0, 0.2 / 0.041, 0.7]), rtol=1e-5)
    assert torch.allclose(consolidate(omega, start, end, 0.1), torch.tensor([0.5 / 0.11, 0.0, 0.2 / 0.14, 0.0]), rtol=1e-5)


def _previous(model, seed: int) -> FisherEstimate:
    gen = torch.Generator().manual_seed(seed)
    params = dict(model.named_parameters())
    importance = {n: torch.rand(p.shape, generator=gen) * 3 for n, p in params.items()}
    anchor = {n: p.detach() + 0.1 * torch.randn(p.shape, generator=gen) for n, p in params.items()}
    return FisherEstimate(importance, anchor, {"tasks": 2, "steps": 7})


def test_penalty_value_and_gradient_match_autograd_and_the_task_gradient_is_read_exactly():
    model = build_model(DENSE, seed=0)
    previous = _previous(model, seed=1)
    si = SynapticIntelligence(strength=0.7, previous=previous)
    trainer = SimpleNamespace(model=model)
    params = dict(model.named_parameters())
    params["norm.weight"].requires_grad_(False)  # frozen: neither read nor pushed
    trainable = [n for n, p in params.items() if p.requires_grad]
    closed = 0.7 * ewc_penalty(model, previous)
    reference = dict(zip(trainable, torch.autograd.grad(closed, [params[n] for n in trainable])))
    by_hand = sum(
        float((previous.fisher[n].double() * (params[n].detach().double() - previous.anchor[n].double()) ** 2).sum()) for n in trainable
    )
    gen = torch.Generator().manual_seed(2)
    task = {n: torch.randn(params[n].shape, generator=gen) for n in trainable}
    si.on_train_begin(trainer)
    si.on_step_begin(trainer, 0)
    value = si.extra_loss(trainer, 0, None, None)
    assert not value.requires_grad and float(value) == pytest.approx(0.7 * by_hand, rel=1e-5)
    for n in trainable:
        params[n].grad = task[n].clone()
    del params["lm_head.weight"].grad  # reached by no token this step: gets the penalty's pull only
    si.on_before_step(trainer, 0)
    assert params["norm.weight"].grad is None and "norm.weight" not in si._pending
    for n in trainable:
        if n == "lm_head.weight":
            assert n not in si._pending
            assert torch.allclose(params[n].grad, reference[n], rtol=1e-5, atol=1e-7), n
        else:
            assert torch.equal(si._pending[n][0], task[n]), n  # the task gradient, bit for bit
            assert torch.allclose(params[n].grad, task[n] + reference[n], rtol=1e-5, atol=1e-7), n


def test_in_the_trainer_omega_is_the_sum_of_minus_gradient_times_update(small_dataset):
    """A slow reference loop: the same batches through a copy of the model, plain SGD at a
    constant rate, omega -= g * (theta_after - theta_before) by hand.  Bitwise equal."""
    data = TokenData(small_dataset)
    cfg = _cfg(steps=5, lr=0.05, min_lr_ratio=1.0, grad_clip=0.0, si_strength=1.0)
    trainer = Trainer.from_config(build_model(DENSE, seed=0), data, cfg, show_progress=False)
    trainer.optimizer = torch.optim.SGD(trainer.model.parameters(), lr=cfg.lr)
    trainer.train()

    ref = build_model(DENSE, seed=0)
    params = dict(ref.named_parameters())
    omega = {n: torch.zeros_like(p) for n, p in params.items()}
    for step in range(cfg.steps):
        batch, _ = trainer.sample(step, 0)
        ref(batch, tierset=trainer.tierset, labels=batch, step=step).loss.backward()
        with torch.no_grad():
            for n, p in params.items():
                g, before = p.grad.clone(), p.detach().clone()
                p.add_(p.grad, alpha=-cfg.lr)
                omega[n] -= g * (p - before)
                p.grad = None
    si = _si(trainer)
    for n, p in trainer.model.named_parameters():
        assert torch.equal(p, params[n]), n
        assert torch.equal(si.omega[n], omega[n]), n
    assert sum(float(o.sum()) for o in omega.values()) > 0  # the loss went down along the path


def test_measuring_alone_changes_no_number_of_training(small_dataset):
    data = TokenData(small_dataset)
    plain = Trainer.from_config(build_model(DENSE, seed=0), data, _cfg(), show_progress=False)
    measured = Trainer.from_config(build_model(DENSE, seed=0), data, _cfg(si_strength=1.0), show_progress=False)
    assert plain.train().losses == measured.train().losses
    for (n, p), q in zip(plain.model.named_parameters(), measured.model.parameters()):
        assert torch.equal(p, q), n


def _run(tmp_path, data, name: str, *, until: int | None = None, resume=None, **fields):
    cfg = _cfg(steps=6, save_every=3, si_strength=0.5, domains={"code": 1.0}, **fields)
    trainer = Trainer.from_config(build_model(DENSE, seed=0), data, cfg, run_dir=tmp_path / name, show_progress=False)
    if resume is not None:
        trainer.resume(resume)
    result = trainer.train(until=until)
    return trainer, result


@pytest.mark.parametrize("task", ["first", "second"])
def test_a_resumed_run_continues_the_path_integral_bitwise(tmp_path, small_dataset, task):
    data = TokenData(small_dataset)
    fields = {}
    if task == "second":  # with earlier importance: the penalty's gradient is in every update
        first = Trainer.from_config(build_model(DENSE, seed=5), data, _cfg(steps=3, si_strength=1.0, domains={"prose": 1.0}), run_dir=tmp_path / "t1", show_progress=False)
        fields = dict(si_from=str(first.train().checkpoint))
    whole, whole_result = _run(tmp_path, data, "whole", **fields)
    _run(tmp_path, data, "cut", until=3, **fields)
    resumed, resumed_result = _run(tmp_path, data, "cut", resume=CheckpointManager(tmp_path / "cut").path_for(3), **fields)
    assert resumed_result.losses == whole_result.losses[3:]
    a, b = _si(whole), _si(resumed)
    assert a.steps == b.steps == 6
    for n in a.omega:
        assert torch.equal(a.omega[n], b.omega[n]) and torch.equal(a.start[n], b.start[n]), n
    saved_a, saved_b = load_si(whole_result.checkpoint), load_si(resumed_result.checkpoint)
    for n in saved_a.fisher:
        assert torch.equal(saved_a.fisher[n], saved_b.fisher[n]) and torch.equal(saved_a.anchor[n], saved_b.anchor[n]), n
    assert saved_a.meta == saved_b.meta
    assert saved_a.meta["tasks"] == (2 if task == "second" else 1)
    assert saved_a.meta["steps"] == (9 if task == "second" else 6)
    if task == "second":
        assert all(r > 0 for r in whole_result.losses) and whole.logger.last("extra_loss") > 0


def test_every_checkpoint_holds_the_consolidated_importance_and_a_plain_run_drops_it(tmp_path, small_dataset):
    data = TokenData(small_dataset)
    trainer = Trainer.from_config(build_model(DENSE, seed=0), data, _cfg(si_strength=1.0), run_dir=tmp_path / "si", show_progress=False)
    result = trainer.train()
    saved = load_si(result.checkpoint)
    expected = _si(trainer).consolidated(trainer.model)
    for n in expected.fisher:
        assert torch.equal(saved.fisher[n], expected.fisher[n]) and torch.equal(saved.anchor[n], expected.anchor[n]), n
    assert saved.meta == {"method": "synaptic_intelligence", "damping": 1e-3, "strength": 1.0, "tasks": 1, "steps": 4}
    assert load_checkpoint(result.checkpoint).progressive["si"] == saved.meta
    # A run continued from it without SI inherits neither the directory nor its description.
    parent = load_checkpoint(result.checkpoint)
    plain = Trainer.from_config(parent.model, data, _cfg(steps=1), run_dir=tmp_path / "plain", show_progress=False)
    plain.inherit(parent.progressive)
    child = load_checkpoint(plain.train().checkpoint)
    assert "si" not in child.extra_dirs and "si" not in child.progressive
    with pytest.raises(CheckpointError, match="holds no SI importance; train with train.si_strength > 0"):
        load_si(child.path)


@pytest.mark.parametrize(
    "method, params",
    [("llama_pro", {"target_layers": 4}), ("ffn_width", {"intermediate_size": 80, "mode": "fresh"})],
    ids=["depth", "width"],
)
def test_growth_carries_the_importance_by_the_fishers_map(tmp_path, small_dataset, method, params):
    data = TokenData(small_dataset)
    trainer = Trainer.from_config(build_model(DENSE, seed=0), data, _cfg(si_strength=1.0), run_dir=tmp_path / "si", show_progress=False)
    source = trainer.train().checkpoint
    # The EWC estimate and the SI importance live side by side and both travel.
    fisher = estimate_fisher(trainer.model, data, "prose", samples=2, seq_len=16)
    both = save_ewc(source, fisher, tmp_path / "both")
    importance = load_si(source)
    assert set(load_checkpoint(both).extra_dirs) == {"ewc", "si"}
    grown = expand_checkpoint(both, tmp_path / "grown", [GrowthStep(method, params)]).path
    carried = load_si(grown)
    assert carried.meta["carried_through"] == [method] and carried.meta["tasks"] == 1
    assert load_ewc(grown).meta["carried_through"] == [method]
    expected = carry_ewc(DENSE, stored_state(trainer.model), [(get_op(method), params)], importance.fisher, importance.anchor)
    for n, f in expected.fisher.items():
        assert torch.equal(carried.fisher[n], f) and torch.equal(carried.anchor[n], expected.anchor[n]), n
    if method == "llama_pro":  # old blocks 0, 1 -> 0, 2 keep theirs; the new 1, 3 are free
        for old, new in ((0, 0), (1, 2)):
            for n, f in importance.fisher.items():
                if n.startswith(f"layers.{old}."):
                    assert torch.equal(carried.fisher[n.replace(f"layers.{old}.", f"layers.{new}.", 1)], f), n
        assert all(not f.any() for n, f in carried.fisher.items() if n.startswith(("layers.1.", "layers.3.")))
    else:  # the 32 fresh neurons of each FFN are free; the 48 old ones keep theirs
        for layer in range(2):
            up, down = f"layers.{layer}.ffn.up_proj.weight", f"layers.{layer}.ffn.down_proj.weight"
            assert torch.equal(carried.fisher[up][:48], importance.fisher[up]) and not carried.fisher[up][48:].any()
            assert torch.equal(carried.fisher[down][:, :48], importance.fisher[down]) and not carried.fisher[down][:, 48:].any()
    # The grown model trains with it: the penalty is zero at the anchors and the run accepts it.
    model = load_checkpoint(grown).model
    assert float(ewc_penalty(model, carried).detach()) == 0.0
    Trainer.from_config(model, data, _cfg(steps=1, si_strength=1.0, si_from=str(grown)), show_progress=False).train()


def test_si_keeps_the_first_task_better_than_no_protection(tmp_path, small_dataset):
    """Prose for 60 steps (measuring), then code for 40 with and without SI: SI forgets a
    quarter as much prose (0.06 vs 0.21 nats on this machine) and still learns code."""
    data = TokenData(small_dataset)

    def cfg(steps: int, **fields) -> TrainConfig:
        return TrainConfig(steps=steps, batch_size=8, seq_len=32, lr=1e-2, warmup_steps=0, eval_every=0, eval_batches=1, eval_batch_size=2, seed=1, **fields)

    def losses(model) -> dict[str, float]:
        return {d: s.loss for d, s in evaluate(model, data, ["prose", "code"], batch_size=8, seq_len=32, max_batches=4).items()}

    first = Trainer.from_config(build_model(DENSE, seed=0), data, cfg(60, domains={"prose": 1.0}, si_strength=1.0), run_dir=tmp_path / "prose", show_progress=False)
    base_ckpt = first.train().checkpoint
    base = losses(first.model)
    after = {}
    for name, fields in (("none", {}), ("si", dict(si_strength=1.0, si_from=str(base_ckpt)))):
        model = load_checkpoint(base_ckpt).model
        Trainer.from_config(model, data, cfg(40, domains={"code": 1.0}, **fields), show_progress=False).train()
        after[name] = losses(model)
    forgot = {name: after[name]["prose"] - base["prose"] for name in after}
    assert forgot["none"] > 0.15
    assert forgot["si"] < 0.5 * forgot["none"]
    assert after["si"]["code"] < base["code"] - 0.05  # protection did not stop the new task


def test_bad_si_settings_are_refused_in_one_sentence(tmp_path, small_dataset):
    for fields, message in (
        (dict(si_from="ckpt"), "needs a positive train.si_strength"),
        (dict(si_strength=-1.0), "si_strength must be >= 0"),
        (dict(si_strength=1.0, si_damping=0.0), "si_damping > 0"),
        (dict(si_strength="high"), "si_strength must be a number"),
    ):
        with pytest.raises(ConfigError, match=message):
            _cfg(**fields)
    with pytest.raises(ConfigError, match="strength"):
        SynapticIntelligence(strength=0.0)
    data = TokenData(small_dataset)
    small = save_checkpoint(tmp_path / "small", build_model(DENSE, seed=0))
    with pytest.raises(CheckpointError, match="holds no SI importance"):
        Trainer.from_config(build_model(DENSE, seed=0), data, _cfg(si_strength=1.0, si_from=str(small)), show_progress=False)
    wide = build_model(DENSE.replace(d_model=64), seed=0)
    si = SynapticIntelligence(strength=1.0, previous=_previous(build_model(DENSE, seed=0), 0))
    with pytest.raises(ConfigError, match="the SI importance of embed.weight has shape .* grow the checkpoint that holds the estimate"):
        Trainer.from_config(wide, data, _cfg(), callbacks=[si], show_progress=False).train()
    first = Trainer.from_config(build_model(DENSE, seed=0), data, _cfg(steps=2, si_strength=1.0), run_dir=tmp_path / "run", show_progress=False).train()
    other = Trainer.from_config(build_model(DENSE, seed=0), data, _cfg(steps=2, si_strength=2.0), show_progress=False)
    with pytest.raises(ConfigError, match="cannot resume: train.si_strength was 1.0"):
        other.resume(first.checkpoint)
    assert SI_FORMAT.directory in load_checkpoint(first.checkpoint).extra_dirs


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
def test_si_on_cuda_matches_cpu_and_its_checkpoint_loads_on_cpu(tmp_path, small_dataset):
    """The path integral, the earlier importance and the penalty live on the trainer's device;
    fp32 on CUDA follows the CPU run up to round-off, and the saved si/ is on the CPU."""
    data = TokenData(small_dataset)
    first = Trainer.from_config(build_model(DENSE, seed=5), data, _cfg(steps=3, si_strength=1.0, domains={"prose": 1.0}), run_dir=tmp_path / "t1", show_progress=False)
    previous = first.train().checkpoint
    saved_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        runs = {}
        for device in ("cpu", "cuda"):
            cfg = _cfg(steps=3, si_strength=1.0, si_from=str(previous), domains={"code": 1.0})
            trainer = Trainer.from_config(build_model(DENSE, seed=0), data, cfg, run_dir=tmp_path / device, show_progress=False, device=device)
            runs[device] = (_si(trainer), trainer.train())
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved_tf32
    (cpu, cpu_result), (gpu, gpu_result) = runs["cpu"], runs["cuda"]
    assert gpu_result.losses == pytest.approx(cpu_result.losses, rel=1e-4)
    for n, omega in cpu.omega.items():
        assert gpu.omega[n].device.type == "cuda" and gpu.previous.fisher[n].device.type == "cuda", n
        scale = float(omega.abs().max()) or 1.0
        assert torch.allclose(gpu.omega[n].cpu(), omega, rtol=1e-3, atol=1e-3 * scale), n
    on_disk = load_si(gpu_result.checkpoint)
    assert all(t.device.type == "cpu" for t in (*on_disk.fisher.values(), *on_disk.anchor.values()))
    assert on_disk.meta["tasks"] == 2
