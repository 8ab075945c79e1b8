"""The streamed float64 check: equal to a whole-model float64 forward, judged relative to the
logits' scale, never building a whole model, with --tolerance / tolerance: and a refusal of
unrelated checkpoints."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from lite_llm.checkpoint import load_checkpoint, save_checkpoint
from lite_llm.cli import app
from lite_llm.data import ByteTokenizer
from lite_llm.errors import ConfigError
from lite_llm.grow import get_op
from lite_llm.grow.expand import expand_checkpoint
from lite_llm.grow.recipe import GrowthStep, Recipe
from lite_llm.grow.validate import DEFAULT_TOLERANCE, check_growth, check_sample
from lite_llm.model import LiteLLM

from .helpers import CountingTensors, dense_shapes, model_from, moe_shapes, random_model, stored_state

runner = CliRunner()

GROWTHS = {
    "llama_pro": lambda c: {"target_layers": c.n_layers + 2},
    "solar": lambda c: {"drop": 1},
    "width": lambda c: {"d_model": 2 * c.d_model},
    "ffn_width": lambda c: {"intermediate_size": c.intermediate_size + 8},
    "upcycle": lambda c: {"num_experts": 4, "k_expert": 2},
}


def _reference(model: LiteLLM, ids: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Whole-model float64 logits and next-token loss (the oracle the streamed check must equal)."""
    m = model_from(model.config, stored_state(model)).double()
    with torch.no_grad():
        logits = m(ids).logits
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    return logits, float(loss)


SHAPES = {**dense_shapes(), **moe_shapes()}
CASES = [
    (shape, method) for shape in sorted(SHAPES) for method in GROWTHS
    if not (method == "upcycle" and shape in moe_shapes()) and not (method == "solar" and SHAPES[shape].n_layers < 3)  # solar cannot deepen 2 layers
]


@pytest.mark.parametrize("shape, method", CASES)
def test_streamed_check_equals_a_whole_model_float64_forward(shape, method):
    config = {**dense_shapes(), **moe_shapes()}[shape]
    model = random_model(config)
    params = GROWTHS[method](config)
    state = stored_state(model)
    new_config, tensors = get_op(method)(config, state, **params)
    grown = model_from(new_config, tensors)
    ids = check_sample([config])
    report = check_growth(config, state, new_config, tensors, ids, exact_expected=get_op(method).exact(params))
    a, loss_a = _reference(model, ids)
    b, loss_b = _reference(grown, ids)
    assert report.max_abs == pytest.approx(float((a - b).abs().max()), rel=1e-9, abs=1e-13)
    assert report.logits_scale == pytest.approx(float(a.abs().max()), rel=1e-12)
    assert report.mse == pytest.approx(float((a - b).square().mean()), rel=1e-6, abs=1e-24)
    assert report.loss_original == pytest.approx(loss_a, rel=1e-10)
    assert report.loss_grown == pytest.approx(loss_b, rel=1e-10)
    assert report.params_original == model.num_params() and report.params_grown == grown.num_params() == report.params_analytic
    assert report.tokens == ids.numel() == 128
    if get_op(method).exact(params):
        assert report.preserved and report.passed and report.max_rel <= 1e-6  # float64: only the grown weights' own rounding
    if method == "llama_pro":
        assert report.max_abs == 0.0
        # Every original dense block is computed once for both; a MoE block only at its own
        # index (routing breaks ties by the layer index), so only those before the first new one.
        assert report.shared_blocks == config.n_layers if not config.is_moe else 1 <= report.shared_blocks <= config.n_layers
        assert report.silent_blocks == 2  # the new blocks' zeroed writers are read, their forward skipped
    else:
        assert report.silent_blocks == 0


def test_relative_tolerance_follows_the_logits_scale():
    """max_rel = max|a - b| / max|a|: scaling both heads by 100 scales max_abs, not the verdict."""
    config = dense_shapes()["gqa2-untied"]
    ids = check_sample([config])
    for scale in (1.0, 100.0):
        base = stored_state(random_model(config))
        base["lm_head.weight"] = base["lm_head.weight"] * scale
        nudged = dict(base, **{"lm_head.weight": base["lm_head.weight"] * (1 + 3e-5)})  # logits * (1 + 3e-5)
        strict = check_growth(config, base, config, nudged, ids, exact_expected=True, tolerance=1e-5, check_gradients=False)
        loose = check_growth(config, base, config, nudged, ids, exact_expected=True, tolerance=1e-4, check_gradients=False)
        assert strict.max_rel == pytest.approx(3e-5, rel=1e-2)  # the nudged fp32 weights round by ~6e-8
        assert strict.max_abs == pytest.approx(strict.max_rel * strict.logits_scale, rel=1e-12)
        assert not strict.preserved and not strict.passed and loose.preserved and loose.passed
    assert DEFAULT_TOLERANCE == 1e-5


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_a_silent_block_must_be_finite_to_be_passed_over(bad):
    """A new block whose writers are zero is passed over only when all of it is finite: a NaN
    behind the zeroed o_proj makes 0 * NaN = NaN in a real forward, and the check must see it."""
    config = dense_shapes()["gqa2-untied"]
    state = stored_state(random_model(config))
    new_config, tensors = get_op("llama_pro")(config, state, positions=[0])
    tensors = dict(tensors)
    q = tensors["layers.1.attn.q_proj.weight"].clone()
    q[0, 0] = bad
    tensors["layers.1.attn.q_proj.weight"] = q
    report = check_growth(config, state, new_config, tensors, check_sample([config]), exact_expected=True, check_gradients=False)
    assert report.silent_blocks == 0 and not report.preserved and not report.passed


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gradient_check_finds_a_dead_new_block(dtype):
    """A LLaMA-Pro block whose FFN norm is zero: gate/up see zeros and down's input is zero, so
    no SGD step ever gives the FFN a gradient; the attention (behind the zeroed o_proj) revives.
    A bf16 model's dense blocks are gradient-checked in bf16: the same verdict as float32's."""
    config = dense_shapes()["gqa2-untied"]
    model = random_model(config)
    state = {name: t.to(dtype) for name, t in stored_state(model).items()}
    new_config, tensors = get_op("llama_pro")(config, state, positions=[0])
    tensors = dict(tensors)
    tensors["layers.1.ffn_norm.weight"] = torch.zeros_like(tensors["layers.1.ffn_norm.weight"])
    report = check_growth(config, state, new_config, tensors, check_sample([config]), exact_expected=True)
    assert report.preserved  # still the identity: the check of the function is not the check of the gradients
    assert sorted(report.dead_params) == ["layers.1.ffn.down_proj.weight", "layers.1.ffn.gate_proj.weight", "layers.1.ffn.up_proj.weight", "layers.1.ffn_norm.weight"]
    assert "layers.1.attn.q_proj.weight" in report.new_params and not report.passed


def test_streamed_check_never_builds_a_model_and_reads_shared_blocks_once(monkeypatch):
    config = dense_shapes()["gqa2-untied"]
    source = CountingTensors(stored_state(random_model(config)))
    new_config, tensors = get_op("llama_pro")(config, source, target_layers=5)
    monkeypatch.setattr(LiteLLM, "__init__", lambda *a, **k: pytest.fail("the streamed check built a whole model"))
    report = check_growth(config, source, new_config, tensors, check_sample([config]), exact_expected=True)
    assert report.max_abs == 0.0 and report.shared_blocks == 3 and report.passed
    reads = Counter(source.reads)
    # A block shared by both models is read once (layer 0 is not copied by this growth); the
    # copied ones again for their copies (and by the growth's zeros_like for their shapes),
    # and for the gradient check of the last new block.
    assert {n: reads[n] for n in source.tensors if n.startswith("layers.0.")} == {n: 1 for n in source.tensors if n.startswith("layers.0.")}
    assert reads["embed.weight"] == 1 and reads["lm_head.weight"] == 1


@pytest.mark.parametrize("shape, method", [("gqa3-tied", "llama_pro"), ("gqa2-untied", "llama_pro"), ("gqa2-untied", "width")])
def test_a_checkpoint_on_disk_gives_the_same_figures_reading_only_rows_of_its_ends(shape, method, tmp_path, monkeypatch):
    """From a checkpoint on disk the check reads only the sample's embedding rows and the head
    slice by slice (never the whole tables), and its figures equal those of the same tensors
    held in memory."""
    from lite_llm.checkpoint.lazy import open_checkpoint
    from lite_llm.checkpoint.stream import SafetensorsReader

    config = dense_shapes()[shape]
    model = random_model(config)
    params = GROWTHS[method](config)
    state = stored_state(model)
    in_memory = check_growth(config, state, *get_op(method)(config, state, **params), check_sample([config]), exact_expected=True)
    stored = open_checkpoint(save_checkpoint(tmp_path / "src", model, tokenizer=ByteTokenizer()), verify=False).tensors
    read: list[str] = []
    real_get = SafetensorsReader.get
    monkeypatch.setattr(SafetensorsReader, "get", lambda self, name: read.append(name) or real_get(self, name))
    from_disk = check_growth(config, stored, *get_op(method)(config, stored, **params), check_sample([config]), exact_expected=True)
    assert from_disk.to_dict() == in_memory.to_dict()
    whole = Counter(name for name in read if name in ("embed.weight", "lm_head.weight"))
    # llama_pro passes both ends on and width makes its grown ends row by row (RowWise) from the
    # source's rows: neither whole table is ever read.
    assert whole == Counter()


@pytest.fixture
def source(tmp_path):
    model = random_model(dense_shapes()["gqa3-tied"])
    return model, save_checkpoint(tmp_path / "src", model, tokenizer=ByteTokenizer())


def test_expand_records_both_figures_and_obeys_tolerance(source, tmp_path):
    model, path = source
    args = ["expand", str(path), "--method", "width", "--set", "d_model=72", "-o"]
    refused = runner.invoke(app, args + [str(tmp_path / "strict"), "--tolerance", "1e-9"])
    assert refused.exit_code == 1 and "Traceback" not in refused.output
    assert "is meant to be exact but changed the logits by" in refused.output and "--tolerance" in refused.output
    assert not (tmp_path / "strict").exists()
    ok = runner.invoke(app, args + [str(tmp_path / "default")])
    assert ok.exit_code == 0, ok.output
    (record,) = load_checkpoint(tmp_path / "default").progressive["expansions"]
    p = record["preservation"]
    assert p["tolerance"] == DEFAULT_TOLERANCE and p["preserved"] and 0 < p["max_rel"] <= 1e-6
    assert p["max_abs"] == pytest.approx(p["max_rel"] * p["logits_scale"], rel=1e-9)
    assert p["tokens"] == 128 and p["loss_jump"] == pytest.approx(p["loss_grown"] - p["loss_original"])
    loose = runner.invoke(app, args + [str(tmp_path / "loose"), "--tolerance", "0.001"])
    assert loose.exit_code == 0 and load_checkpoint(tmp_path / "loose").progressive["expansions"][0]["preservation"]["tolerance"] == 0.001
    bad = runner.invoke(app, args + [str(tmp_path / "bad"), "--tolerance", "-1"])
    assert bad.exit_code == 1 and "tolerance must be a positive number" in bad.output


@pytest.mark.parametrize("kernels", ["onednn", "default"])
def test_a_depth_step_not_meant_to_be_exact_is_measured_in_float32_by_default(kernels, source, tmp_path, monkeypatch):
    """``validate: auto`` measures SOLAR in float32 (less work than float64); its figures equal
    the float64 sample's (``always``, itself checked against a whole-model forward above) far
    inside what the step changes, and the record says which precision measured it — whichever
    library the float32 products ran on (oneDNN where it measured faster: forced on, and off).
    A step made inexact by noise stays float64 (its change can be as small as float32's rounding)."""
    from lite_llm.runtime import cpu_linear

    if kernels == "onednn" and not torch.backends.mkldnn.is_available():
        pytest.skip("PyTorch built without oneDNN")
    routed: list[tuple[int, ...]] = []
    real = cpu_linear._onednn_linear
    monkeypatch.setattr(cpu_linear, "onednn_is_faster", lambda: kernels == "onednn")
    monkeypatch.setattr(cpu_linear, "_onednn_linear", lambda x, w, b: routed.append(tuple(x.shape)) or real(x, w, b))
    _, path = source
    step = [GrowthStep("solar", {"drop": 1})]
    records = {mode: expand_checkpoint(path, tmp_path / mode, step, validate=mode).records[0]["preservation"] for mode in ("auto", "always")}
    assert bool(routed) == (kernels == "onednn")
    auto, always = records["auto"], records["always"]
    assert "float32" in auto["measure"] and "float64" in always["measure"] and auto["tokens"] == always["tokens"] == 128
    assert always["max_rel"] > 1e-2  # SOLAR changes the function: the figures are far above float32's rounding
    for key in ("loss_original", "loss_grown", "max_abs", "logits_scale", "mse"):
        assert auto[key] == pytest.approx(always[key], rel=1e-4), key
    assert auto["loss_jump"] == pytest.approx(always["loss_jump"], abs=1e-5)
    noisy = expand_checkpoint(path, tmp_path / "noisy", [GrowthStep("width", {"d_model": 72, "noise": 1e-6})]).records[0]["preservation"]
    assert "float64" in noisy["measure"] and not noisy["proved"]


def test_recipe_tolerance_per_recipe_and_per_step(source, tmp_path):
    _, path = source
    recipe = tmp_path / "grow.yaml"
    recipe.write_text(
        f"source: {path}\noutput: {tmp_path / 'grown'}\ntolerance: 1e-9\nsteps:\n"
        "  - method: llama_pro\n    target_layers: 5\n"
        "  - method: width\n    d_model: 72\n"
    )
    refused = runner.invoke(app, ["expand", "--recipe", str(recipe)])
    assert refused.exit_code == 1 and "width(d_model=72) is meant to be exact" in refused.output and not (tmp_path / "grown").exists()
    recipe.write_text(recipe.read_text().replace("    d_model: 72\n", "    d_model: 72\n    tolerance: 0.0001\n"))
    ok = runner.invoke(app, ["expand", "--recipe", str(recipe)])
    assert ok.exit_code == 0, ok.output
    records = load_checkpoint(tmp_path / "grown").progressive["expansions"]
    assert [r["preservation"]["tolerance"] for r in records] == [1e-9, 1e-4]  # the recipe's, then the step's own
    assert records[0]["preservation"]["max_abs"] == 0.0 and records[1]["params"] == {"d_model": 72}  # tolerance is no method parameter
    recipe.write_text(recipe.read_text().replace(f"output: {tmp_path / 'grown'}\n", ""))  # -o and another output: are refused
    flag = runner.invoke(app, ["expand", "--recipe", str(recipe), "-o", str(tmp_path / "flag"), "--tolerance", "1e-3"])
    assert flag.exit_code == 0 and [r["preservation"]["tolerance"] for r in load_checkpoint(tmp_path / "flag").progressive["expansions"]] == [1e-3, 1e-4]
    with pytest.raises(ConfigError, match="recipe step 1: tolerance must be a positive number"):
        Recipe.from_dict({"steps": [{"method": "stack", "tolerance": "small"}]})
    with pytest.raises(ConfigError, match="recipe: tolerance must be a positive number"):
        Recipe.from_dict({"steps": [{"method": "stack"}], "tolerance": 0})


def test_validate_refuses_checkpoints_that_are_not_a_growth(source, tmp_path):
    model, path = source
    other_vocab = save_checkpoint(tmp_path / "other-vocab", random_model(dense_shapes()["gqa2-untied"]))
    stranger = save_checkpoint(tmp_path / "stranger", random_model(model.config, seed=5))
    for other, message in [(other_vocab, "vocabulary of 61 tokens"), (stranger, "was not grown from")]:
        result = runner.invoke(app, ["validate", str(path), str(other)])
        assert result.exit_code == 1 and message in result.output and "Traceback" not in result.output, result.output
        assert "validate compares a grown checkpoint with the one it was grown from" in " ".join(result.output.split())
    grown = expand_checkpoint(path, tmp_path / "grown", [GrowthStep("width", {"d_model": 72})]).path
    report_file = tmp_path / "report.json"
    result = runner.invoke(app, ["validate", str(path), str(grown), "--json", str(report_file)])
    assert result.exit_code == 0, result.output
    report = json.loads(report_file.read_text())
    assert report["passed"] and 0 < report["max_rel"] <= 1e-6 and report["tolerance"] == DEFAULT_TOLERANCE
    strict = runner.invoke(app, ["validate", str(path), str(grown), "--tolerance", "1e-10"])
    assert strict.exit_code == 1 and "FAIL" in strict.output


def test_validate_of_checkpoints_on_disk_shares_bitwise_equal_blocks(source, tmp_path):
    """From disk nothing says which tensors were passed on: blocks are compared bitwise, so
    the original's blocks are still computed once for both models."""
    model, path = source
    grown = expand_checkpoint(path, tmp_path / "deeper", [GrowthStep("llama_pro", {"target_layers": 6})]).path
    report_file = tmp_path / "report.json"
    result = runner.invoke(app, ["validate", str(path), str(grown), "--json", str(report_file)])
    assert result.exit_code == 0, result.output
    report = json.loads(report_file.read_text())
    assert report["max_abs"] == 0.0 and report["shared_blocks"] == model.config.n_layers and report["passed"]


# ------------------------------------------------------------------ identity by construction
@pytest.mark.parametrize("shape", sorted(dense_shapes()))
def test_a_llama_pro_growth_is_proved_with_the_figures_the_sample_measures(shape, monkeypatch):
    """``prove=True`` on LLaMA-Pro: no block is evaluated and no head computed, yet the verdict,
    the parameter counts and the gradient check equal the float64 sample's (the oracle here)."""
    from lite_llm.grow import streaming_validate

    config = dense_shapes()[shape]
    model = random_model(config)
    state = stored_state(model)
    new_config, tensors = get_op("llama_pro")(config, state, target_layers=config.n_layers + 2)
    ids = check_sample([config])
    measured = check_growth(config, state, new_config, tensors, ids, exact_expected=True)
    monkeypatch.setattr(streaming_validate._Model, "run", lambda *a: pytest.fail("a block was evaluated"))
    monkeypatch.setattr(streaming_validate, "_heads", lambda *a: pytest.fail("a head was computed"))
    proved = check_growth(config, state, new_config, tensors, ids, exact_expected=True, prove=True)
    assert proved.proved and not measured.proved and proved.passed and measured.passed
    assert proved.max_abs == measured.max_abs == 0.0 and proved.max_rel == 0.0 and proved.loss_jump == measured.loss_jump == 0.0
    assert proved.tokens == 0 and proved.loss_original is None and measured.tokens == 128
    assert (proved.params_original, proved.params_grown) == (measured.params_original, measured.params_grown) == (model.num_params(), new_config.num_params())
    assert proved.new_params == measured.new_params and proved.dead_params == measured.dead_params == []
    assert (proved.shared_blocks, proved.silent_blocks) == (measured.shared_blocks, measured.silent_blocks) == (config.n_layers, 2)
    assert proved.preservation()["proved"] is True and "no sample evaluated" in proved.preservation()["measure"]


def _llama_pro(config_name: str = "gqa2-untied"):
    config = dense_shapes()[config_name]
    state = stored_state(random_model(config))
    new_config, tensors = get_op("llama_pro")(config, state, positions=[0])
    return config, state, new_config, tensors


def _changed(tensors, changes: dict):
    """``tensors`` with ``changes`` computed and every other tensor passed on (origins kept)."""
    from lite_llm.grow.tensors import LazyTensors, Ref

    return LazyTensors({n: (lambda t=changes[n]: t) if n in changes else Ref(tensors, n) for n in tensors})


def _nan_in_new_block(t):
    q = t["layers.1.attn.q_proj.weight"].clone()
    q[0, 0] = float("nan")
    return {"layers.1.attn.q_proj.weight": q}


def test_the_changed_helper_keeps_the_proof():
    config, state, new_config, tensors = _llama_pro()
    assert check_growth(config, state, new_config, _changed(tensors, {}), check_sample([config]), exact_expected=True, prove=True).proved


@pytest.mark.parametrize(
    "change, refused",
    [
        (lambda t: {"layers.1.attn.o_proj.weight": torch.full_like(t["layers.1.attn.o_proj.weight"], 1e-3)}, True),  # a writer not zero
        (_nan_in_new_block, True),  # 0 * NaN is NaN: not silent
        (lambda t: {"layers.0.ffn.up_proj.weight": t["layers.0.ffn.up_proj.weight"] * 1.5}, True),  # an original block changed
        (lambda t: {"norm.weight": t["norm.weight"].clone()}, False),  # bitwise the same, but computed: not known without reading
        (lambda t: {"embed.weight": t["embed.weight"] * 1.01}, True),
    ],
)
def test_anything_not_the_identity_by_construction_is_evaluated(change, refused):
    """The proof declines whatever it cannot show from origins and zero writers; the float64
    sample then judges (and refuses what changed the function)."""
    config, state, new_config, tensors = _llama_pro()
    tensors = _changed(tensors, change(tensors))
    report = check_growth(config, state, new_config, tensors, check_sample([config]), exact_expected=True, check_gradients=False, prove=True)
    assert not report.proved and report.tokens == 128
    assert report.passed is not refused and report.preserved is not refused


def test_a_config_that_differs_beyond_depth_is_evaluated():
    config, state, new_config, tensors = _llama_pro()
    other = new_config.replace(norm_eps=new_config.norm_eps * 10)
    report = check_growth(config, state, other, tensors, check_sample([config]), exact_expected=True, check_gradients=False, prove=True)
    assert not report.proved and report.max_abs > 0 and not report.passed
    shorter = new_config.replace(max_seq_len=new_config.max_seq_len - 1)  # would refuse inputs the original takes
    assert not check_growth(config, state, shorter, tensors, check_sample([config]), exact_expected=True, check_gradients=False, prove=True).proved


def test_widening_and_moe_depth_growth_are_evaluated():
    """Width growth computes new tensors; LLaMA-Pro on an MoE model shifts the routed blocks'
    indices, on which routing's tie-breaks depend: neither is the identity by construction."""
    config = dense_shapes()["gqa2-untied"]
    state = stored_state(random_model(config))
    report = check_growth(config, state, *get_op("width")(config, state, d_model=80), check_sample([config]), exact_expected=True, prove=True)
    assert not report.proved and report.passed
    moe = moe_shapes()["two-tier"]
    state = stored_state(random_model(moe))
    report = check_growth(moe, state, *get_op("llama_pro")(moe, state, positions=[0]), check_sample([moe]), exact_expected=True, prove=True)
    assert not report.proved and report.passed


def test_a_new_moe_block_is_evaluated_even_at_the_end():
    """A new MoE block after the last one shifts no index, and its output is provably zero; but
    which experts its gradient check reaches depends on what its input routes to them, so only
    the evaluation (the block's real input) gives the verdict: the proof declines it."""
    moe = moe_shapes()["two-tier"]
    state = stored_state(random_model(moe))
    new_config, tensors = get_op("llama_pro")(moe, state, positions=[moe.n_layers - 1])
    assert new_config.is_moe_layer(moe.n_layers)  # the new block is routed
    proved = check_growth(moe, state, new_config, tensors, check_sample([moe]), exact_expected=True, prove=True)
    measured = check_growth(moe, state, new_config, tensors, check_sample([moe]), exact_expected=True)
    assert not proved.proved and proved.to_dict() == measured.to_dict()


def test_the_proof_still_finds_a_dead_new_block():
    """The gradient check runs on the proof's path too (on the sample's embeddings): a new
    block with a zero FFN norm is still silent (proved), and its FFN gets no gradient."""
    config, state, new_config, tensors = _llama_pro()
    tensors = _changed(tensors, {"layers.1.ffn_norm.weight": torch.zeros_like(tensors["layers.1.ffn_norm.weight"])})
    report = check_growth(config, state, new_config, tensors, check_sample([config]), exact_expected=True, prove=True)
    assert report.proved and report.preserved and not report.passed
    assert sorted(report.dead_params) == ["layers.1.ffn.down_proj.weight", "layers.1.ffn.gate_proj.weight", "layers.1.ffn.up_proj.weight", "layers.1.ffn_norm.weight"]


def test_silenced_writers_are_known_zero_and_made_without_reading_the_source(tmp_path, monkeypatch):
    """A LLaMA-Pro block's zeroed writers are :class:`~lite_llm.grow.tensors.Zeros`: made from the
    file's header (nothing of the source's o_proj/down_proj is read, by the proof, its gradient
    check or the writer), known zero through a second growth step, and equal to real zeros."""
    from lite_llm.checkpoint.lazy import open_checkpoint
    from lite_llm.checkpoint.stream import SafetensorsReader
    from lite_llm.grow.tensors import known_zeros

    config = dense_shapes()["gqa2-untied"]
    model = random_model(config)
    stored = open_checkpoint(save_checkpoint(tmp_path / "src", model, tokenizer=ByteTokenizer()), verify=False).tensors
    new_config, tensors = get_op("llama_pro")(config, stored, positions=[0])  # block 1 is the silenced copy of block 0
    twice_config, twice = get_op("llama_pro")(new_config, tensors, positions=[1])  # block 2 the silenced copy of block 1
    read: list[str] = []
    real_get = SafetensorsReader.get
    monkeypatch.setattr(SafetensorsReader, "get", lambda self, name: read.append(name) or real_get(self, name))
    writers = ("attn.o_proj.weight", "ffn.down_proj.weight")
    assert all(known_zeros(tensors, f"layers.1.{w}") for w in writers)
    assert all(known_zeros(twice, f"layers.{j}.{w}") for j in (1, 2) for w in writers)  # passed on, and copied again
    assert not any(known_zeros(twice, f"layers.{j}.{w}") for j in (0, 3) for w in writers)
    assert not known_zeros(tensors, "layers.1.attn.q_proj.weight")
    for j in (1, 2):
        for w in writers:
            made = twice[f"layers.{j}.{w}"]
            assert made.dtype == model.layers[0].attn.o_proj.weight.dtype and not made.any()
            assert made.shape == stored_state(model)[f"layers.0.{w}"].shape
    report = check_growth(config, stored, twice_config, twice, check_sample([config]), exact_expected=True, prove=True)
    assert report.proved and report.silent_blocks == 2 and report.new_params and report.dead_params == []
    assert not [n for n in read if n.endswith(writers)]


@pytest.mark.parametrize("dead_ffn", [False, True])
def test_a_silent_blocks_first_sweep_stopping_at_its_writers_gives_the_same_verdict(dead_ffn):
    """For a block whose writers are all zero, the gradient check's first sweep computes only the
    writers' gradients (everything behind them is exactly zero then); the full first sweep is
    the oracle: the same parameters reached, the same ones dead."""
    from lite_llm.grow import streaming_validate as sv

    config, state, new_config, tensors = _llama_pro()
    if dead_ffn:
        tensors = _changed(tensors, {"layers.1.ffn_norm.weight": torch.zeros_like(tensors["layers.1.ffn_norm.weight"])})
    model = sv._Model(new_config, tensors, 16, torch.device("cpu"))
    assert model.zero_writers(1)
    x, _ = sv._embed(model, check_sample([config])[:, :16])
    verdicts = {silent: sv._dead_parameters(model.grad_block(1, torch.float32), x, model, 1, torch.float32, silent) for silent in (False, True)}
    assert verdicts[True] == verdicts[False] == (["ffn_norm.weight", "ffn.gate_proj.weight", "ffn.up_proj.weight", "ffn.down_proj.weight"] if dead_ffn else [])


@pytest.mark.parametrize("steps, evaluated", [(["llama_pro"], False), (["solar"], True), (["llama_pro", "solar"], True)])
def test_the_sample_is_made_only_when_a_step_is_evaluated(steps, evaluated, tmp_path, monkeypatch):
    """A growth proved unchanged needs no sample, so it never loads the source's tokenizer (0.1 s
    of a 0.9 s SmolLM2 growth); a growth with an evaluated step makes the sample once, from the
    tokenizer, and records its tokens.  The proof's gradient check runs on seeded ids instead and
    finds the same dead parameters as the evaluation on the sample (the oracle: ``always``)."""
    from lite_llm.grow import expand as expand_module

    config = dense_shapes()["gqa2-untied"]
    src = save_checkpoint(tmp_path / "src", random_model(config), tokenizer=ByteTokenizer())
    loaded: list[object] = []
    real = expand_module.source_tokenizer
    monkeypatch.setattr(expand_module, "source_tokenizer", lambda s: loaded.append(s) or real(s))
    n, plan = config.n_layers, []
    for method in steps:  # llama_pro: two more layers; solar: 2 * (n - 1)
        n = n + 2 if method == "llama_pro" else 2 * (n - 1)
        plan.append(GrowthStep(method, {"target_layers": n}))
    result = expand_checkpoint(src, tmp_path / "g", plan)
    assert len(loaded) == (1 if evaluated else 0)
    assert [r.proved for r in result.reports] == [m == "llama_pro" for m in steps]
    assert [r.tokens for r in result.reports] == [0 if m == "llama_pro" else 128 for m in steps]
    if not evaluated:
        sampled = expand_checkpoint(src, tmp_path / "a", plan, validate="always").reports[0]
        assert not sampled.proved and sampled.tokens == 128
        assert result.reports[0].new_params == sampled.new_params and result.reports[0].dead_params == sampled.dead_params


def test_a_tier_no_sample_token_routes_to_is_checked_under_that_tier_alone():
    """The router, not the growth, decides which tier a token goes to: a new block whose
    router sends none of the sample to tier_b is still trainable (an ``only:tier_b`` request
    sends everything there), so its experts are checked under tier_b alone.  Experts that no
    gradient reaches under any TierSet (both matrices zero) are still found."""
    moe = moe_shapes()["two-tier"]
    state = stored_state(random_model(moe))
    new_config, tensors = get_op("llama_pro")(moe, state, positions=[0])
    bias = "layers.1.ffn.router.heads.tier_b.tier_bias"
    unrouted = _changed(tensors, {bias: torch.full_like(tensors[bias], -1e4)})  # no token picks tier_b by default
    report = check_growth(moe, state, new_config, unrouted, check_sample([moe]), exact_expected=True)
    assert report.preserved and report.passed and report.dead_params == []
    experts = ["layers.1.ffn.experts.tier_b.down_proj", "layers.1.ffn.experts.tier_b.gate_up_proj"]
    dead = _changed(unrouted, {name: torch.zeros_like(tensors[name]) for name in experts})
    report = check_growth(moe, state, new_config, dead, check_sample([moe]), exact_expected=True)
    assert sorted(report.dead_params) == experts and not report.passed
