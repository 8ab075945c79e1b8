"""A third sweep, of what keeps a growing model's knowledge: `quantize`, `ewc estimate`,
`rollback`, `add-tier`, curriculum training, replay, distillation and `tiers choose`.

Each defect found is a test: one sentence instead of a traceback or a silently ignored
setting, nothing written over what the user had, and the numbers checked against independent
oracles (a closed-form quantization round trip, a per-sample Fisher loop, hand sums of the EWC
penalty and of the distillation KL, the replayed share of every batch)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from lite_llm.checkpoint import CheckpointManager, load_checkpoint, save_checkpoint
from lite_llm.checkpoint.ewc import EWC_FORMAT, FisherEstimate
from lite_llm.data import TokenData
from lite_llm.errors import ConfigError
from lite_llm.train import TrainConfig, Trainer
from lite_llm.train.curriculum import Curriculum, CurriculumConfig
from lite_llm.train.distill import distillation_loss
from lite_llm.train.ewc import EWC, estimate_fisher, ewc_penalty, load_ewc

from .test_issue16_safety import _hashes, _run

TRAIN = ["--batch-size", "4", "--seq-len", "32", "--eval-batches", "1", "--eval-batch-size", "2", "--quiet"]
INTEGRATION = {"name": "integration", "steps": 3, "to_share": 0.5, "ramp": "cosine"}
CURRICULUM = {
    "tier": "tier_new",
    "phases": [{"name": "preparation", "steps": 1}, {"name": "isolation", "steps": 2, "share": 0.1}, INTEGRATION, {"name": "joint", "steps": 1, "lr_scale": 0.1}],
    "rollback": {"domains": ["prose"], "margin": 10.0},
}


def _corpus(folder: Path, words: list[str]) -> Path:
    folder.mkdir(parents=True)
    for i in range(3):
        (folder / f"doc{i}.txt").write_text(" ".join(words[(i * 5 + j * 3) % len(words)] for j in range(3000)))
    return folder


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    """A tiny two-tier checkpoint, the same with an unroutable third tier, its EWC estimate, a
    two-domain byte dataset and a finished curriculum run (checkpoints every 2 steps)."""
    root = tmp_path_factory.mktemp("sweep3")
    w = {"root": root, "tiny": root / "tiny", "grown": root / "grown", "data": root / "data", "ewc": root / "tiny-ewc", "run": root / "run"}
    code = _corpus(root / "code", "def class return import self yield lambda for while if else".split())
    prose = _corpus(root / "prose", "the quick brown fox jumps over a lazy dog while wizards hex".split())
    assert _run(["data", "prepare", f"code={code}", f"prose={prose}", "-o", str(w["data"])])[0] == 0
    assert _run(["init", "--preset", "tiny", "-o", str(w["tiny"])])[0] == 0
    assert _run(["add-tier", str(w["tiny"]), "--tier", "tier_new", "-o", str(w["grown"])])[0] == 0
    code, out = _run(["ewc", "estimate", str(w["tiny"]), "--data", str(w["data"]), "--domain", "prose", "--samples", "6", "--seq-len", "32", "-o", str(w["ewc"])])
    assert code == 0, out
    (root / "curriculum.yaml").write_text(yaml.safe_dump(CURRICULUM))
    args = ["train", "--data", str(w["data"]), "--init", str(w["grown"]), "--curriculum", str(root / "curriculum.yaml"), "--save-every", "2", "--keep-last", "5"]
    code, out = _run([*args, *TRAIN, "-o", str(w["run"])])
    assert code == 0, out
    return w


def _logits(model, tierset=None) -> torch.Tensor:
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(3))
    model.eval()
    with torch.no_grad():
        return model(ids, tierset=tierset).logits


def _tensors(ckpt: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for shard in sorted(ckpt.glob("*.safetensors")):
        out.update(load_file(shard))
    return out


# ------------------------------------------------------------------------------ quantize
@pytest.mark.parametrize("kind, qmax", [("int8", 127), ("int4", 7)])
def test_quantized_banks_are_the_closed_form_round_trip_and_nothing_else_changes(world, tmp_path, kind, qmax):
    """Oracle: per row, groups of 64 weights, scale max|w| / qmax, q = round(w / scale)."""
    out = tmp_path / kind
    assert _run(["quantize", str(world["tiny"]), "--tier", "tier_1b", "--to", kind, "-o", str(out)])[0] == 0
    source, loaded = load_checkpoint(world["tiny"]).model.state_dict(), load_checkpoint(out).model.state_dict()
    errors = []
    for name, w in source.items():
        if ".experts.tier_1b." not in name:
            assert torch.equal(loaded[name], w), name
            continue
        groups = w.reshape(*w.shape[:-1], w.shape[-1] // 64, 64)
        scale = groups.abs().amax(-1, keepdim=True) / qmax
        expected = (torch.clamp(torch.round(groups / scale), -qmax, qmax) * scale).reshape(w.shape)
        assert torch.equal(loaded[name], expected), name
        errors.append(float((w - expected).norm() / w.norm()))
    record = json.loads((out / "progressive.json").read_text())["expansions"][-1]["preservation"]
    assert record["relative_weight_error_max"] == pytest.approx(max(errors), rel=1e-6)
    assert record["relative_weight_error_mean"] == pytest.approx(sum(errors) / len(errors), rel=1e-6)


def test_quantizing_a_dense_checkpoint_says_it_has_no_tiers(tmp_path):
    """Was: "unknown tier 'tier_1b'; this model has tiers (none)"."""
    assert _run(["init", "--preset", "tiny-dense", "-o", str(tmp_path / "dense")])[0] == 0
    code, out = _run(["quantize", str(tmp_path / "dense"), "--tier", "tier_1b", "--to", "int8", "-o", str(tmp_path / "q")])
    assert code == 1 and "this model is dense: it has no tier of experts to quantize" in out and not (tmp_path / "q").exists(), out


def test_a_model_trained_from_a_quantized_checkpoint_is_saved_as_what_it_holds(world, tmp_path):
    """Was: the saved config still said int8 over float banks, so the expert store looked for
    qweight tensors that were not there ("has no experts for tier tier_1b ...; restore its
    expert shard") and `quantize` refused the checkpoint as already quantized."""
    q8 = tmp_path / "q8"
    assert _run(["quantize", str(world["tiny"]), "--tier", "tier_1b", "--to", "int8", "-o", str(q8)])[0] == 0
    loaded = load_checkpoint(q8)
    saved = save_checkpoint(tmp_path / "again", loaded.model, tokenizer=loaded.tokenizer)
    assert load_checkpoint(saved).config.tier("tier_1b").quantization is None
    code, out = _run(["eval", str(saved), "--data", str(world["data"]), "--hot-budget", "100kB", "--batches", "1", "--batch-size", "1", "--seq-len", "16"])
    assert code == 0 and "Traceback" not in out, out
    assert _run(["quantize", str(saved), "--tier", "tier_1b", "--to", "int8", "-o", str(tmp_path / "requantized")])[0] == 0


# ------------------------------------------------------------------------------ ewc estimate
def test_ewc_estimate_refuses_an_existing_output_before_estimating(world, monkeypatch):
    """Was: the whole estimate (minutes at --samples 256) ran first, then the output was refused."""
    import lite_llm.train.ewc as ewc

    def no_estimate(*args, **kwargs):
        raise AssertionError("the estimate ran before the output was checked")

    monkeypatch.setattr(ewc, "estimate_fisher", no_estimate)
    before = _hashes(world["ewc"])
    code, out = _run(["ewc", "estimate", str(world["tiny"]), "--data", str(world["data"]), "--domain", "prose", "-o", str(world["ewc"])])
    assert code == 1 and "already exists" in out and "AssertionError" not in out, out
    assert _hashes(world["ewc"]) == before


def test_ewc_estimate_refuses_one_token_sequences(world, tmp_path):
    """Was: --seq-len 1 predicts nothing, and an all-zero Fisher (trace 0) was written as if it were one."""
    code, out = _run(["ewc", "estimate", str(world["tiny"]), "--data", str(world["data"]), "--domain", "prose", "--seq-len", "1", "-o", str(tmp_path / "e")])
    assert code != 0 and not (tmp_path / "e").exists(), out
    with pytest.raises(ConfigError, match="at least 2 tokens"):
        estimate_fisher(load_checkpoint(world["tiny"]).model, TokenData(world["data"]), "prose", samples=2, seq_len=1)


@pytest.mark.parametrize("estimator, batch", [("sample", 1), ("batch", 2)])
def test_fisher_matches_a_per_sample_reference_loop(world, estimator, batch):
    """Oracle: hand cross-entropy of the next tokens, ``backward`` per (micro-)batch, F = sum B^2 g^2 / N."""
    model, data = load_checkpoint(world["tiny"]).model, TokenData(world["data"])
    got = estimate_fisher(model, data, "prose", samples=5, seq_len=32, estimator=estimator, batch_size=batch)
    sequences, _ = data.sample_batch("train", {"prose": 1.0}, 5, 32, seed=0, step=0)
    reference = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    model.eval()
    for start in range(0, 5, batch):
        rows = sequences[start : start + batch]
        model.zero_grad()
        logits = model(rows).logits
        F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), rows[:, 1:].reshape(-1)).backward()
        for n, p in model.named_parameters():
            if p.grad is not None:
                reference[n] += rows.shape[0] ** 2 * p.grad.square() / 5
    for n, ref in reference.items():
        torch.testing.assert_close(got.fisher[n], ref, rtol=1e-4, atol=1e-6 * float(ref.abs().max()) + 1e-12)
        assert torch.equal(got.anchor[n], dict(model.named_parameters())[n].detach())


def test_ewc_estimate_takes_device_and_threads_like_every_computing_command(world, tmp_path):
    """`ewc estimate` had neither --device nor --threads (train, eval and generate have both):
    on a shared machine its minutes could not be kept to one core, nor moved to a GPU."""
    threads = torch.get_num_threads()
    try:
        code, out = _run(["ewc", "estimate", str(world["tiny"]), "--data", str(world["data"]), "--domain", "prose", "--samples", "3",
                          "--seq-len", "32", "--device", "cpu", "--threads", "1", "-o", str(tmp_path / "e")])
        assert code == 0, out
        assert "threads: 1" in out and torch.get_num_threads() == 1  # the CLI ran in this process: its thread count is applied
        stored = load_ewc(tmp_path / "e")
        expected = estimate_fisher(load_checkpoint(world["tiny"]).model, TokenData(world["data"]), "prose", samples=3, seq_len=32)
    finally:
        torch.set_num_threads(threads)
    for name, fisher in expected.fisher.items():  # the same computation on one thread: the same numbers
        assert torch.equal(stored.fisher[name], fisher), name


def test_ewc_penalty_is_the_hand_sum(world):
    estimate, model = load_ewc(world["ewc"]), load_checkpoint(world["tiny"]).model
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())) * 0.01)
    hand = sum(float((estimate.fisher[n].double() * (p.detach().double() - estimate.anchor[n].double()) ** 2).sum()) for n, p in model.named_parameters())
    assert float(ewc_penalty(model, estimate).detach()) == pytest.approx(hand, rel=1e-5)


@pytest.mark.parametrize("value", [-1.0, math.nan, math.inf])
def test_an_importance_that_is_negative_or_not_finite_is_refused(world, value):
    """Was: a negative Fisher rewarded moving away from the anchor and a non-finite one made
    every step's loss non-finite (each step skipped, the run 'finished')."""
    estimate = load_ewc(world["ewc"])
    name = next(iter(estimate.fisher))
    fisher = dict(estimate.fisher)
    fisher[name] = fisher[name].clone()
    fisher[name].view(-1)[0] = value
    bad = FisherEstimate(fisher, estimate.anchor, estimate.meta)
    cfg = TrainConfig(steps=1, batch_size=2, seq_len=16, eval_batches=1, eval_batch_size=2)
    trainer = Trainer(load_checkpoint(world["tiny"]).model, TokenData(world["data"]), cfg, callbacks=[EWC(bad, weight=1.0)], show_progress=False)
    with pytest.raises(ConfigError, match="negative or non-finite"):
        trainer.train()


# ------------------------------------------------------------------------------ train settings
@pytest.mark.parametrize(
    "extra, message",
    [
        (["--distill-domains", "prose"], "train.distill_domains (--distill-domains) is set but train.distill_from (--distill-from) is not"),
        (["--distill-weight", "5"], "train.distill_weight (--distill-weight) is set but train.distill_from (--distill-from) is not"),
        (["--distill-temperature", "0"], "train.distill_temperature (--distill-temperature) is set but train.distill_from (--distill-from) is not"),
        (["--si-damping", "0.1"], "train.si_damping (--si-damping) is set but train.si_strength (--si-strength) is not"),
        (["--ewc", "EWC", "--ewc-weight", "inf"], "train.ewc_weight (--ewc-weight) must be a finite number"),
        (["--distill-from", "TINY", "--distill-weight", "inf"], "train.distill_weight (--distill-weight) must be a finite number"),
        (["--distill-from", "TINY", "--distill-temperature", "inf"], "train.distill_temperature (--distill-temperature) must be a finite number"),
        (["--si-strength", "inf"], "train.si_strength (--si-strength) must be a finite number"),
    ],
)
def test_protection_settings_that_would_do_nothing_or_skip_every_step_are_refused(world, tmp_path, extra, message):
    """Was: settings without their switch were ignored without a word, and an infinite weight or
    temperature made every loss non-finite: every step skipped, exit 0, a checkpoint written."""
    extra = [str(world["ewc"]) if a == "EWC" else str(world["tiny"]) if a == "TINY" else a for a in extra]
    code, out = _run(["train", "--data", str(world["data"]), "--init", str(world["tiny"]), "--steps", "1", *TRAIN, *extra, "-o", str(tmp_path / "r")])
    assert code == 1 and message in out and "Traceback" not in out, out
    assert not (tmp_path / "r" / "checkpoints").exists()


def test_replay_weights_must_be_finite_and_are_named_first():
    """Was: a NaN replay weight read as 'names no old domain with a positive weight'."""
    with pytest.raises(ConfigError, match="replay weights must be finite numbers >= 0"):
        TrainConfig(replay={"prose": math.nan}, replay_share=0.25)


@pytest.mark.parametrize("batch, share", [(4, 0.25), (8, 0.3), (5, 0.5)])
def test_replayed_rows_follow_the_share(world, batch, share):
    """Every micro-batch within one row of share * B, the long-run share exact to sampling."""
    cfg = TrainConfig(batch_size=batch, seq_len=16, replay={"prose": 1.0}, replay_share=share, domains={"code": 1.0}, steps=300)
    trainer = Trainer(load_checkpoint(world["tiny"]).model, TokenData(world["data"]), cfg, show_progress=False)
    counts = [trainer.sample(step, 0)[1].count("prose") for step in range(300)]
    assert set(counts) <= {math.floor(share * batch), math.ceil(share * batch)}
    assert sum(counts) / (300 * batch) == pytest.approx(share, abs=0.02)


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_distillation_loss_is_t_squared_kl_div(temperature):
    g = torch.Generator().manual_seed(1)
    student, teacher = torch.randn(3, 7, 50, generator=g), torch.randn(3, 7, 50, generator=g)
    log_s, log_t = (F.log_softmax(x / temperature, -1).reshape(-1, 50) for x in (student, teacher))
    expected = F.kl_div(log_s, log_t, log_target=True, reduction="batchmean") * temperature**2
    assert float(distillation_loss(student, teacher, temperature)) == pytest.approx(float(expected), rel=1e-5)


def test_a_distillation_teacher_with_a_shorter_context_is_refused_before_training(world, tmp_path):
    """Was: step 0 failed inside the teacher with 'exceeds this model's max_seq_len=32' — which model?"""
    (tmp_path / "short.yaml").write_text("preset: tiny\nmax_seq_len: 16\n")
    assert _run(["init", "--config", str(tmp_path / "short.yaml"), "-o", str(tmp_path / "short")])[0] == 0
    code, out = _run(["train", "--data", str(world["data"]), "--init", str(world["tiny"]), "--steps", "1", *TRAIN, "--distill-from", str(tmp_path / "short"), "-o", str(tmp_path / "r")])
    assert code == 1 and "the distillation teacher's context is 16 tokens but train.seq_len (--seq-len) is 32" in out, out


def test_a_distillation_teacher_with_another_tokenizer_of_the_same_size_is_refused(world, tmp_path):
    """Was: accepted (only the vocabulary size was compared): the student learnt another
    tokenizer's distribution over its own ids."""
    model_yaml = tmp_path / "m.yaml"
    model_yaml.write_text("preset: tiny\nvocab_size: 300\n")
    for name, words in (("a", "alpha beta gamma delta epsilon zeta eta theta"), ("b", "one two three four five six seven eight")):
        corpus = _corpus(tmp_path / f"corpus_{name}", words.split())
        assert _run(["tokenizer", "train", str(corpus), "--vocab-size", "300", "-o", str(tmp_path / f"tok_{name}")])[0] == 0
        assert _run(["init", "--config", str(model_yaml), "--tokenizer", str(tmp_path / f"tok_{name}"), "-o", str(tmp_path / f"m_{name}")])[0] == 0
    assert _run(["data", "prepare", f"x={tmp_path / 'corpus_a'}", "--tokenizer", str(tmp_path / "tok_a"), "-o", str(tmp_path / "d")])[0] == 0
    args = ["train", "--data", str(tmp_path / "d"), "--init", str(tmp_path / "m_a"), "--steps", "1", *TRAIN]
    code, out = _run([*args, "--distill-from", str(tmp_path / "m_b"), "-o", str(tmp_path / "r")])
    assert code == 1 and "the distillation teacher's tokenizer" in out, out
    code, out = _run([*args, "--distill-from", str(tmp_path / "m_a"), "-o", str(tmp_path / "r2")])
    assert code == 0, out


# ------------------------------------------------------------------------------ curriculum files
@pytest.mark.parametrize(
    "change, message",
    [
        ({"phases": {"name": "integration"}}, "curriculum phases must be a list"),
        ({"phases": ["integration"]}, "curriculum phase 1 must be a mapping"),
        ({"phases": [{**INTEGRATION, "speed": 3}]}, "curriculum phase 1 has unknown key 'speed'"),
        ({"phases": [{"name": "integration"}]}, "curriculum phase 1 needs name and steps"),
        ({"phases": [{**INTEGRATION, "steps": True}]}, "steps must be a non-negative integer"),
        ({"phases": [{**INTEGRATION, "to_share": "0.5"}]}, "to_share must be a probability"),
        ({"phases": [{**INTEGRATION, "lr_scale": "x"}]}, "lr_scale must be a finite positive number"),
        ({"phases": [{**INTEGRATION, "lr_scale": math.inf}]}, "lr_scale must be a finite positive number"),
        ({"phases": [{**INTEGRATION, "trainable": 5}]}, "trainable must be 'new', 'all' or parameter-name patterns"),
        ({"phases": [{**INTEGRATION, "balance": "yes"}]}, "balance must be true or false"),
        ({"phases": [INTEGRATION], "gain": "1"}, "gain must be a finite positive number"),
        ({"phases": [INTEGRATION], "rollback": ["prose"]}, "curriculum rollback must be a mapping"),
        ({"phases": [INTEGRATION], "rollback": {"domains": "prose"}}, "rollback.domains must be a list of domain names"),
        ({"phases": [INTEGRATION], "rollback": {"domains": ["prose"], "marg": 1}}, "curriculum rollback has unknown key 'marg'"),
        ({"phases": [INTEGRATION], "rollback": {"domains": ["prose"], "margin": math.nan}}, "rollback.margin must be a finite number"),
        ({"phases": [INTEGRATION], "rollback": {"enabled": "no"}}, "rollback.enabled must be true or false"),
        ({"phases": [INTEGRATION], "tier": ""}, "curriculum tier must be the new tier's name"),
    ],
)
def test_a_malformed_curriculum_is_one_sentence(change, message):
    """Was: Python's own words ('Phase() argument after ** must be a mapping', "'<=' not
    supported between 'int' and 'str'", 'unexpected keyword argument'), tracebacks (TypeError
    for trainable: 5, AttributeError for a rollback list), a string's letters read as domains,
    and true, 'yes', inf and NaN accepted where they make no sense."""
    with pytest.raises(ConfigError, match=message):
        CurriculumConfig.from_dict({"tier": "tier_new", **change})


@pytest.mark.parametrize(
    "phases, message",
    [
        ([{**INTEGRATION, "share": 0.3}], "phase 'integration' does not use share"),
        ([{"name": "isolation", "steps": 2, "to_share": 0.3}, INTEGRATION], "phase 'isolation' does not use to_share"),
        ([INTEGRATION, {"name": "joint", "steps": 2, "ramp": "cosine"}], "phase 'joint' does not use ramp"),
    ],
)
def test_a_setting_a_phase_does_not_read_is_refused(phases, message):
    """Was: silently ignored, so the schedule run was not the one written."""
    with pytest.raises(ConfigError, match=message):
        CurriculumConfig("tier_new", phases)


def test_a_saved_schedule_reads_back_as_itself():
    plan = CurriculumConfig.from_dict(CURRICULUM)
    assert CurriculumConfig.from_dict(plan.to_dict()).to_dict() == plan.to_dict()


def test_curriculum_file_with_a_bad_trainable_is_one_sentence_from_the_cli(world, tmp_path):
    spec = {"tier": "tier_new", "phases": [{**INTEGRATION, "trainable": 5}]}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(spec))
    code, out = _run(["train", "--data", str(world["data"]), "--init", str(world["grown"]), "--curriculum", str(tmp_path / "c.yaml"), *TRAIN, "-o", str(tmp_path / "r")])
    assert code == 1 and "trainable must be" in out and "Traceback" not in out, out


@pytest.mark.parametrize("tiers", ["upto:tier_1b", "only:tier_new"])
def test_a_curriculum_needs_its_tier_and_another_in_the_tierset(world, tmp_path, tiers):
    """Was: upto:tier_1b (new tier masked out, nothing trainable) a RuntimeError traceback from
    backward; only:tier_new a NaN bias and skipped steps."""
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({"tier": "tier_new", "phases": [INTEGRATION]}))
    args = ["train", "--data", str(world["data"]), "--init", str(world["grown"]), "--curriculum", str(tmp_path / "c.yaml"), "--tiers", tiers]
    code, out = _run([*args, *TRAIN, "-o", str(tmp_path / "r")])
    assert code == 1 and "a curriculum needs its tier 'tier_new' and at least one existing tier" in out and "Traceback" not in out, out


# ------------------------------------------------------------------------------ resume and automatic rollback
def test_resuming_a_curriculum_run_without_the_file_continues_its_curriculum_bitwise(world, tmp_path):
    """Was: `train --resume` without --curriculum dropped it without a word: every weight
    trained, no ramp, no lr_scale (the resumed run's metrics had no phase)."""
    run = Path(shutil.copytree(world["run"], tmp_path / "run"))
    for late in ("step-00000006", "step-00000007"):
        shutil.rmtree(run / "checkpoints" / late)
    code, out = _run(["train", "--data", str(world["data"]), "-o", str(run), "--resume", "--quiet"])
    assert code == 0 and "continuing the run's curriculum for tier tier_new" in out, out
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["phase"] for r in rows if r["step"] >= 4] == ["integration", "integration", "joint"]
    final, whole = _tensors(run / "checkpoints" / "step-00000007"), _tensors(world["run"] / "checkpoints" / "step-00000007")
    assert final.keys() == whole.keys() and all(torch.equal(final[k], whole[k]) for k in whole)


def test_an_automatic_rollback_saves_the_restored_model_and_is_not_resumed(world, tmp_path):
    """Was: the restored model was never saved ('checkpoint: None', no checkpoints/ at all),
    and nothing stopped a resume from ramping the tier in again over it."""
    spec = {"tier": "tier_new", "phases": [{"name": "isolation", "steps": 2}, {**INTEGRATION, "steps": 4}], "rollback": {"domains": ["prose"], "margin": -0.5}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(spec))
    run = tmp_path / "run"
    args = ["train", "--data", str(world["data"]), "--init", str(world["grown"]), "--curriculum", str(tmp_path / "c.yaml"), "--eval-every", "3"]
    code, out = _run([*args, *TRAIN, "-o", str(run)])
    assert code == 0 and "rolled back at step 3" in out and "checkpoint: None" not in out, out
    saved = CheckpointManager(run).latest()
    assert saved is not None and saved.name == "step-00000003"
    restored = load_checkpoint(saved).model
    assert torch.equal(_logits(restored), _logits(load_checkpoint(world["tiny"]).model))  # the tier unroutable again
    code, out = _run(["train", "--data", str(world["data"]), "-o", str(run), "--resume", "--quiet"])
    assert code == 1 and "cannot resume: this curriculum run was rolled back at step 3" in out, out
    assert _run(["rollback", str(saved), "-o", str(tmp_path / "before")])[0] == 0


def test_an_automatic_rollback_after_resuming_from_another_directory_finds_its_snapshot(world, tmp_path, monkeypatch):
    """Was: the snapshot's path was recorded relative to where the run started, so a run
    resumed elsewhere failed at the rollback ('checkpoint directory run/pre-integration does not exist')."""
    spec = {"tier": "tier_new", "phases": [{"name": "isolation", "steps": 2}, {**INTEGRATION, "steps": 4}], "rollback": {"domains": ["prose"], "margin": -0.5}}
    data = TokenData(world["data"])
    cfg = TrainConfig(steps=6, batch_size=4, seq_len=32, eval_every=0, eval_batches=1, eval_batch_size=2, save_every=4)
    (tmp_path / "a").mkdir()
    monkeypatch.chdir(tmp_path / "a")
    first = Trainer(load_checkpoint(world["grown"]).model, data, cfg, run_dir=Path("run"), callbacks=[Curriculum(CurriculumConfig.from_dict(spec))], show_progress=False)
    first.train(until=4)
    monkeypatch.chdir(tmp_path)
    again = TrainConfig.from_dict({**cfg.to_dict(), "eval_every": 1})
    second = Trainer(load_checkpoint(world["grown"]).model, data, again, run_dir=Path("a/run"), callbacks=[Curriculum(CurriculumConfig.from_dict(spec))], show_progress=False)
    second.resume(Path("a/run/checkpoints/step-00000004"))
    result = second.train()
    assert result.stopped_early and "rolled back at step 5" in result.stopped_early
    assert torch.equal(_logits(second.model), _logits(load_checkpoint(world["tiny"]).model))


# ------------------------------------------------------------------------------ rollback by hand
def test_rollback_restores_the_original_tensors_bitwise(world, tmp_path):
    out = tmp_path / "before"
    assert _run(["rollback", str(world["run"] / "checkpoints" / "step-00000007"), "-o", str(out)])[0] == 0
    shards = lambda ckpt: {k: v for k, v in _hashes(ckpt).items() if k.endswith(".safetensors")}  # noqa: E731
    assert shards(out) == shards(world["tiny"])  # every shard's sha256: the model before add-tier


def test_rollback_never_writes_over_the_checkpoints_it_reads(world, tmp_path):
    """Was: `-o` the checkpoint itself (or its run's pre-integration folder) with --overwrite
    replaced it: the run's own checkpoint was lost."""
    run = Path(shutil.copytree(world["run"], tmp_path / "run"))
    final = run / "checkpoints" / "step-00000007"
    before = _hashes(run)
    for target in (final, run / "pre-integration", final / "inside", run):
        code, out = _run(["rollback", str(final), "-o", str(target), "--overwrite"])
        assert code == 1 and "write the rolled-back model to another directory" in out, out
    assert _hashes(run) == before


def test_rollback_works_from_another_directory_after_the_run_moved(world, tmp_path, monkeypatch):
    """Was: the path recorded relative to where the run was started was read from the current
    directory, or the checkpoint's parent: 'checkpoint directory moved/checkpoints/run/pre-integration does not exist'."""
    spec = {"tier": "tier_new", "phases": [{"name": "isolation", "steps": 1}, {**INTEGRATION, "steps": 2}], "rollback": {"domains": ["prose"]}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(spec))
    (tmp_path / "started").mkdir()
    monkeypatch.chdir(tmp_path / "started")
    args = ["train", "--data", str(world["data"]), "--init", str(world["grown"]), "--curriculum", str(tmp_path / "c.yaml"), *TRAIN, "-o", "run"]
    assert _run(args)[0] == 0
    shutil.move(tmp_path / "started" / "run", tmp_path / "moved")
    monkeypatch.chdir(tmp_path)
    code, out = _run(["rollback", "moved/checkpoints/step-00000003", "-o", "before"])
    assert code == 0, out
    assert torch.equal(_logits(load_checkpoint(tmp_path / "before").model), _logits(load_checkpoint(world["tiny"]).model))


def test_rollback_from_the_pre_integration_checkpoint_itself(world, tmp_path):
    """Was: 'records no pre-integration checkpoint' for the very snapshot rollback restores."""
    code, out = _run(["rollback", str(world["run"] / "pre-integration"), "-o", str(tmp_path / "before")])
    assert code == 0, out
    assert torch.equal(_logits(load_checkpoint(tmp_path / "before").model), _logits(load_checkpoint(world["tiny"]).model))


# ------------------------------------------------------------------------------ tiers choose
def test_no_fit_advice_for_a_zero_memory_budget_names_the_smallest_tierset():
    """Was: with every ratio infinite the tie went to the fastest TierSet, the biggest: 'raise
    the budgets to at least 1.81 MB' where 1.02 MB would do."""
    from lite_llm.serve.selection import TierSetProfile, no_fit_message

    small, big = TierSetProfile(("a",), 9.0, 1_000_000, -8.0), TierSetProfile(("a", "b"), 8.0, 2_000_000, -7.9)
    message = no_fit_message([small, big], ("a", "b"), None, 0)
    assert "1 MB" in message and "2 MB" not in message, message
    assert "2 MB" in no_fit_message([small, big], ("a", "b"), 0.0, None)  # a zero latency budget: the fastest
