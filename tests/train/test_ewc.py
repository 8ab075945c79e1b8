"""EWC: the penalty by hand, the Fisher against transformers' Llama per sample, the estimate
carried through growth, stored in checkpoints, and holding weights in training."""

from __future__ import annotations

import pytest
import torch

from lite_llm import ModelConfig, RoutingConfig, TierConfig, build_model
from lite_llm.checkpoint import load_checkpoint, save_checkpoint
from lite_llm.data import TokenData
from lite_llm.errors import CheckpointError, ConfigError
from lite_llm.grow import get_op
from lite_llm.grow.carry import carry_ewc
from lite_llm.grow.expand import expand_checkpoint, materialize
from lite_llm.grow.recipe import GrowthStep
from lite_llm.grow.tiers import add_tier_checkpoint
from lite_llm.model import stored_state
from lite_llm.train import TrainConfig, Trainer
from lite_llm.train.ewc import EWC, FisherEstimate, estimate_fisher, ewc_penalty, load_ewc, save_ewc

DENSE = ModelConfig(vocab_size=256, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, intermediate_size=48, max_seq_len=64)


def test_penalty_against_a_hand_computed_value():
    model = build_model(DENSE, seed=0)
    params = dict(model.named_parameters())
    fisher = {n: torch.zeros_like(p) for n, p in params.items()}
    anchor = {n: p.detach().clone() for n, p in params.items()}
    # Three entries moved away from their anchors by known amounts, with known Fisher values.
    fisher["embed.weight"][3, 4] = 2.0
    anchor["embed.weight"][3, 4] -= 0.5
    fisher["layers.1.attn.q_proj.weight"][0, 1] = 0.25
    anchor["layers.1.attn.q_proj.weight"][0, 1] += 2.0
    fisher["norm.weight"][7] = 10.0  # no displacement: contributes nothing
    estimate = FisherEstimate(fisher, anchor)
    expected = 2.0 * 0.5**2 + 0.25 * 2.0**2  # 0.5 + 1.0
    assert float(ewc_penalty(model, estimate).detach()) == pytest.approx(expected, rel=1e-6)
    # A frozen parameter cannot move, so it is not penalised.
    params["embed.weight"].requires_grad_(False)
    assert float(ewc_penalty(model, estimate).detach()) == pytest.approx(1.0, rel=1e-6)


def _llama_per_sample_fisher(model, sequences: torch.Tensor) -> dict[str, torch.Tensor]:
    """The slow reference: transformers' LlamaForCausalLM with the same weights, one backward
    per sequence, gradients squared and averaged, mapped back to our names."""
    transformers = pytest.importorskip("transformers")
    from lite_llm.interop import from_hf_state_dict, hf_config_dict, to_hf_state_dict

    cfg = model.config
    fields = {k: v for k, v in hf_config_dict(cfg).items() if k not in ("architectures", "model_type", "torch_dtype")}
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(**fields)).eval()
    llama.load_state_dict(to_hf_state_dict(model.state_dict(), cfg), strict=False)
    totals = {n: torch.zeros_like(p) for n, p in llama.named_parameters()}
    for row in sequences:
        llama.zero_grad()
        llama(row[None], labels=row[None]).loss.backward()
        for n, p in llama.named_parameters():
            totals[n] += p.grad.square() / len(sequences)
    return from_hf_state_dict(totals, cfg)


def test_fisher_matches_a_per_sample_reference_on_transformers_llama(small_dataset):
    data = TokenData(small_dataset)
    model = build_model(DENSE, seed=1)
    estimate = estimate_fisher(model, data, "prose", samples=12, seq_len=24, seed=3)
    sequences, domains = data.sample_batch("train", {"prose": 1.0}, 12, 24, seed=3, step=0)
    assert set(domains) == {"prose"}
    reference = _llama_per_sample_fisher(model, sequences)
    assert set(estimate.fisher) == {n for n, _ in model.named_parameters()}
    for name, f in estimate.fisher.items():
        assert torch.allclose(f, reference[name], rtol=1e-4, atol=1e-10), name
        assert torch.equal(estimate.anchor[name], dict(model.named_parameters())[name].detach())
    assert estimate.meta == {"domain": "prose", "estimator": "sample", "samples": 12, "seq_len": 24, "seed": 3, "split": "train"}
    # The micro-batch estimator with one sequence per batch is the per-sample one ...
    same = estimate_fisher(model, data, "prose", samples=12, seq_len=24, seed=3, estimator="batch", batch_size=1)
    for name in estimate.fisher:
        assert torch.allclose(same.fisher[name], estimate.fisher[name], rtol=1e-5, atol=1e-12), name
    # ... and with all of them in one batch it is B times the squared mean gradient.
    whole = estimate_fisher(model, data, "prose", samples=12, seq_len=24, seed=3, estimator="batch", batch_size=12)
    model.zero_grad()
    model(sequences, labels=sequences).lm_loss.backward()
    for name, p in model.named_parameters():
        assert torch.allclose(whole.fisher[name], 12 * p.grad.square(), rtol=1e-4, atol=1e-12), name


def _random_estimate(model, seed: int) -> FisherEstimate:
    gen = torch.Generator().manual_seed(seed)
    params = dict(model.named_parameters())
    fisher = {n: torch.rand(p.shape, generator=gen) for n, p in params.items()}
    return FisherEstimate(fisher, {n: p.detach().clone() for n, p in params.items()})


MOE = ModelConfig(
    vocab_size=64, d_model=24, n_layers=2, n_heads=4, n_kv_heads=2, intermediate_size=40, max_seq_len=64,
    tiers=[TierConfig("tier_a", num_groups=2, experts_per_group=2, expert_hidden=16)],
    routing=RoutingConfig(k_tier=1, k_group=1, k_expert=2),
)


@pytest.mark.parametrize(
    "config, method, params, unmapped",
    [
        (DENSE, "width", {"d_model": 64}, 0),  # tiling by 2
        # LEMON padding: the new norm entries are sqrt(d/D) mean(g), a mix of every old entry
        # (they scale zeros at first): 8 new entries in each of the 5 norms get no Fisher.
        (DENSE, "width", {"d_model": 40}, 5 * 8),
        (DENSE, "ffn_width", {"intermediate_size": 80, "mode": "split"}, 0),
        # fresh neurons: random incoming rows and zero outgoing columns come from no source
        # (Fisher 0, like LEMON's random reader columns; only mixed sources count as unmapped)
        (DENSE, "ffn_width", {"intermediate_size": 80, "mode": "fresh"}, 0),
        (DENSE, "llama_pro", {"target_layers": 4}, 0),
        (DENSE, "upcycle", {"num_experts": 4, "k_expert": 2}, 0),
        (MOE, "add_experts", {"tier": "tier_a", "count": 2}, 0),
    ],
    ids=["width-tile", "width-pad", "ffn-split", "ffn-fresh", "llama-pro", "upcycle", "add-experts"],
)
def test_carried_estimate_gives_the_same_penalty_for_the_same_change(config, method, params, unmapped):
    """Grow theta* and theta* + delta by the same map: the grown penalty of the grown change
    equals the original penalty of delta (fp32 round-off only)."""
    model = build_model(config, seed=2)
    estimate = _random_estimate(model, seed=5)
    op = get_op(method)
    source = stored_state(model)
    carried = carry_ewc(config, source, [(op, params)], estimate.fisher, estimate.anchor)
    grown_config, grown_tensors = op(config, source, **params)
    for name, tensor in carried.anchor.items():  # anchors go through the same map as weights
        assert torch.equal(tensor, grown_tensors[name].float()), name
    assert carried.unmapped == unmapped
    gen = torch.Generator().manual_seed(9)
    moved = build_model(config, seed=2)
    with torch.no_grad():
        for p in moved.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.01)
    before = float(ewc_penalty(moved, estimate).detach())
    grown_moved = materialize(grown_config, dict(op(config, stored_state(moved), **params)[1]))
    after = float(ewc_penalty(grown_moved, FisherEstimate(carried.fisher, carried.anchor)).detach())
    assert before > 0
    assert after == pytest.approx(before, rel=1e-5)


def test_entries_with_several_sources_get_no_fisher_and_are_counted():
    """Upcycling with noise scaled by each tensor's own spread makes every expert entry depend
    on the whole tensor: no single source, so Fisher 0 there, counted; other entries unaffected."""
    model = build_model(DENSE, seed=2)
    estimate = _random_estimate(model, seed=5)
    op = get_op("upcycle")
    carried = carry_ewc(DENSE, stored_state(model), [(op, {"num_experts": 2, "noise": 0.01})], estimate.fisher, estimate.anchor)
    banks = [n for n in carried.fisher if ".ffn.experts." in n]
    entries = sum(carried.fisher[n].numel() for n in banks)
    unmapped = sum(int((carried.fisher[n] == 0).sum()) for n in banks)
    # The noise is the same N(0, 1) draw times each probe's spread, so an entry whose draw is
    # within ~1e-3 of zero looks like a plain copy (about 0.2% of them); every other is unmapped.
    assert carried.unmapped == unmapped >= 0.99 * entries
    assert torch.equal(carried.fisher["layers.0.attn.q_proj.weight"], estimate.fisher["layers.0.attn.q_proj.weight"])


def test_llama_pro_new_blocks_are_free_and_the_originals_keep_their_whole_fisher():
    """The new blocks of llama_pro write zeros to the residual stream, so their copies of old
    weights do not count as copies: Fisher 0 there, and each original block's Fisher unchanged."""
    model = build_model(DENSE, seed=2)
    estimate = _random_estimate(model, seed=5)
    carried = carry_ewc(DENSE, stored_state(model), [(get_op("llama_pro"), {"target_layers": 4})], estimate.fisher, estimate.anchor)
    # 2 -> 4 blocks: a new block after each old one (old 0 -> 0, old 1 -> 2; new: 1 and 3)
    for old, new in ((0, 0), (1, 2)):
        for name, f in estimate.fisher.items():
            if name.startswith(f"layers.{old}."):
                assert torch.equal(carried.fisher[name.replace(f"layers.{old}.", f"layers.{new}.", 1)], f), name
    for name, f in carried.fisher.items():
        if name.startswith(("layers.1.", "layers.3.")):
            assert not f.any(), name
    assert torch.equal(carried.fisher["embed.weight"], estimate.fisher["embed.weight"])
    assert carried.unmapped == 0


def test_an_estimate_for_another_model_is_refused(tmp_path, small_dataset):
    data = TokenData(small_dataset)
    base = save_checkpoint(tmp_path / "base", build_model(DENSE, seed=0))
    other = estimate_fisher(build_model(DENSE.replace(d_model=64), seed=0), data, "prose", samples=2, seq_len=16)
    with pytest.raises(ConfigError, match=r"has embed.weight of shape \(256, 64\) where the model.s is \(256, 32\)"):
        save_ewc(base, other, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    mine = estimate_fisher(load_checkpoint(base).model, data, "prose", samples=2, seq_len=16)
    with pytest.raises(CheckpointError, match="is the source checkpoint"):
        save_ewc(base, mine, base)
    with pytest.raises(ConfigError, match="names layers.9.attn_norm.weight, which the model does not have"):
        carry_ewc(DENSE, stored_state(build_model(DENSE)), [], {"layers.9.attn_norm.weight": torch.ones(32)}, {})


def test_estimate_is_stored_in_the_checkpoint_and_carried_by_expand(tmp_path, small_dataset):
    data = TokenData(small_dataset)
    model = build_model(DENSE, seed=3)
    base = save_checkpoint(tmp_path / "base", model)
    estimate = estimate_fisher(model, data, "prose", samples=4, seq_len=16)
    with_ewc = save_ewc(base, estimate, tmp_path / "base-ewc")
    loaded = load_ewc(with_ewc)
    assert loaded.meta["domain"] == "prose" and loaded.meta["samples"] == 4
    for name in estimate.fisher:
        assert torch.equal(loaded.fisher[name], estimate.fisher[name])
    assert "ewc" in load_checkpoint(with_ewc).extra_dirs
    with pytest.raises(CheckpointError, match="holds no EWC estimate"):
        load_ewc(base)

    result = expand_checkpoint(with_ewc, tmp_path / "wide", [GrowthStep("width", {"d_model": 64})])
    grown = load_ewc(result.path)
    assert grown.meta["carried_through"] == ["width"] and grown.meta["unmapped_entries"] == 0
    expected = carry_ewc(DENSE, stored_state(model), [(get_op("width"), {"d_model": 64})], estimate.fisher, estimate.anchor)
    for name, f in expected.fisher.items():
        assert torch.equal(grown.fisher[name], f), name
    assert grown.fisher["embed.weight"].shape == (256, 64)


def test_add_tier_carries_the_estimate_and_leaves_the_new_tier_free(tmp_path, small_dataset):
    """add-tier passes every old tensor through bitwise and the new tier is unroutable, so old
    entries keep their Fisher and anchors and the new tier's get Fisher 0."""
    data = TokenData(small_dataset)
    model = build_model(ModelConfig.from_preset("tiny"), seed=0)
    base = save_checkpoint(tmp_path / "base", model)
    estimate = estimate_fisher(model, data, "prose", samples=2, seq_len=16)
    with_ewc = save_ewc(base, estimate, tmp_path / "base-ewc")
    out = add_tier_checkpoint(with_ewc, tmp_path / "tiered", tier="tier_new", num_groups=2, experts_per_group=2, expert_hidden=64, init="copy")
    carried = load_ewc(out)
    assert carried.meta["carried_through"] == ["add_tier"] and carried.meta["domain"] == "prose"
    grown = load_checkpoint(out).model
    assert set(carried.fisher) == {n for n, _ in grown.named_parameters()}
    for name, p in grown.named_parameters():
        if "tier_new" in name:
            assert not carried.fisher[name].any() and torch.equal(carried.anchor[name], p.detach()), name
        else:
            assert torch.equal(carried.fisher[name], estimate.fisher[name]) and torch.equal(carried.anchor[name], estimate.anchor[name]), name


def test_ewc_holds_weights_near_their_anchor_in_training(small_dataset):
    data = TokenData(small_dataset)
    cfg = TrainConfig(steps=6, batch_size=4, seq_len=32, lr=1e-2, warmup_steps=0, eval_every=0, eval_batches=1, eval_batch_size=2, domains={"code": 1.0})

    def drift(weight: float | None) -> float:
        model = build_model(DENSE, seed=4)
        estimate = estimate_fisher(model, data, "prose", samples=8, seq_len=32)
        callbacks = [EWC(estimate, weight=weight)] if weight else []
        Trainer(model, data, cfg, callbacks=callbacks, show_progress=False).train()
        return sum(float((estimate.fisher[n] * (p.detach() - estimate.anchor[n]).square()).sum()) for n, p in model.named_parameters())

    assert drift(1e4) < 0.5 * drift(None)


def test_bad_ewc_input_is_refused_in_one_sentence(small_dataset):
    data = TokenData(small_dataset)
    model = build_model(DENSE, seed=0)
    with pytest.raises(ConfigError, match="unknown Fisher estimator"):
        estimate_fisher(model, data, "prose", estimator="exact")
    with pytest.raises(ConfigError, match="unknown domain"):
        estimate_fisher(model, data, "poetry")
    with pytest.raises(ConfigError, match="must be positive"):
        EWC(_random_estimate(model, 0), weight=0.0)
    wide = build_model(DENSE.replace(d_model=64), seed=0)
    trainer = Trainer(wide, data, TrainConfig(steps=1, batch_size=2, seq_len=16, eval_every=0), callbacks=[EWC(_random_estimate(model, 0), weight=1.0)], show_progress=False)
    with pytest.raises(ConfigError, match="grow the checkpoint that holds the estimate"):
        trainer.train()


@pytest.mark.parametrize("fmt", ["ewc", "si"])
def test_an_estimate_from_before_a_depth_growth_is_refused_and_the_carried_one_taken(tmp_path, small_dataset, fmt):
    """LLaMA-Pro 2 -> 4 layers keeps the names layers.0 and layers.1 with their shapes, but the
    new layers.1 is an identity block and the old one is now layers.2: the old estimate would
    anchor the wrong weights, so it is refused; the estimate expand carried is taken."""
    from lite_llm.checkpoint.ewc import EWC_FORMAT, SI_FORMAT
    from lite_llm.train.ewc import check_fits

    data = TokenData(small_dataset)
    model = build_model(DENSE.replace(n_layers=2), seed=5)
    estimate = estimate_fisher(model, data, "prose", samples=2, seq_len=16)
    form = EWC_FORMAT if fmt == "ewc" else SI_FORMAT
    before = save_ewc(save_checkpoint(tmp_path / "base", model), estimate, tmp_path / "base-imp", form)
    grown = expand_checkpoint(before, tmp_path / "grown", [GrowthStep("llama_pro", {"target_layers": 4})]).path
    grown_model = load_checkpoint(grown).model
    with pytest.raises(ConfigError, match=r"has no entry for \d+ of the model's parameters \(layers\.2\..*made before a growth"):
        check_fits(grown_model, load_ewc(before, form), form)
    check_fits(grown_model, load_ewc(grown, form), form)  # carried: every parameter covered
