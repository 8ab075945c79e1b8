"""The Python API as a user meets it: README's library example, bad inputs answered in one
sentence (not a traceback from inside torch), and values checked against independent oracles
(``F.cross_entropy`` by hand, an fp64 evaluation, a second load)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from lite_llm import (
    CheckpointError,
    ConfigError,
    LiteLLMError,
    ModelConfig,
    TierSet,
    TierSetError,
    build_model,
)
from lite_llm.checkpoint import load_checkpoint, save_checkpoint
from lite_llm.errors import PromptError
from lite_llm.generate import generate_ids
from lite_llm.grow import get_op
from lite_llm.model import LiteLLM, load_stored, stored_state
from lite_llm.model.router import _topk_by_exact_key, stable_topk
from lite_llm.train import TrainConfig, Trainer

README = Path(__file__).resolve().parents[1] / "README.md"


def assert_one_sentence(exc: BaseException) -> None:
    msg = str(exc)
    assert msg and "\n" not in msg, msg
    assert not re.search(r"[.!?]\s+[A-Z]", msg) and not msg.endswith("."), msg


@pytest.fixture(scope="module")
def tiny() -> LiteLLM:
    return build_model(ModelConfig.from_preset("tiny"), seed=0)


def _ids(b: int = 2, s: int = 12, vocab: int = 256, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, vocab, (b, s), generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------ README's library section
def test_readme_library_example_runs_as_written():
    text = README.read_text(encoding="utf-8")
    section = text.split("## The library", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert blocks, "README's library section has no python block"
    namespace: dict = {}
    for block in blocks:
        if "load_checkpoint(" in block:  # the generation example needs SmolLM2: tests/interop/test_smollm2_chat.py runs it
            continue
        exec(compile(block, "README.md", "exec"), namespace)  # noqa: S102 - the documented example
    out, cfg = namespace["out"], namespace["cfg"]
    assert cfg.num_params() == namespace["model"].num_params()
    assert torch.allclose(out.loss, out.lm_loss + out.balance_loss + out.z_loss)
    assert len(out.routing) == cfg.n_layers


# ------------------------------------------------------------------ the loss, by hand
def test_lm_loss_is_cross_entropy_of_the_shifted_targets(tiny):
    ids = _ids()
    labels = ids.clone()
    labels[0, 3] = labels[1, 7] = -100
    out = tiny(ids, tierset="only:tier_10b", labels=labels)
    logits = out.logits.detach()
    # the oracle: position t predicts token t+1, -100 ignored, mean over the rest
    terms = [
        -torch.log_softmax(logits[b, t].double(), -1)[labels[b, t + 1]]
        for b in range(ids.shape[0]) for t in range(ids.shape[1] - 1) if labels[b, t + 1] != -100
    ]
    assert len(terms) == 2 * 11 - 2
    assert out.lm_loss.item() == pytest.approx(torch.stack(terms).mean().item(), rel=1e-6)
    assert out.loss.item() == pytest.approx((out.lm_loss + out.balance_loss + out.z_loss).item(), rel=1e-6)


def test_an_fp64_model_computes_its_loss_in_fp64():
    """Was: the logits were cast to fp32 for the loss, so an fp64 model's loss had fp32's ~1e-7."""
    model = build_model(ModelConfig.from_preset("tiny-dense"), dtype=torch.float64)
    ids = _ids()
    out = model(ids, labels=ids)
    assert out.lm_loss.dtype == torch.float64
    ref = F.cross_entropy(out.logits[:, :-1].reshape(-1, 256), ids[:, 1:].reshape(-1))
    assert ref.dtype == torch.float64 and abs(out.lm_loss.item() - ref.item()) < 1e-13
    bf16 = build_model(ModelConfig.from_preset("tiny-dense"), dtype=torch.bfloat16)
    assert bf16(ids, labels=ids).lm_loss.dtype == torch.float32  # low precision: at least fp32


def test_int32_ids_and_labels_are_accepted(tiny):
    """Was: int32 labels (which the embedding takes) failed inside F.cross_entropy."""
    ids = _ids()
    with torch.no_grad():
        a = tiny(ids, labels=ids)
        b = tiny(ids.int(), labels=ids.int())
    assert torch.equal(a.logits, b.logits) and torch.equal(a.lm_loss, b.lm_loss)


# ------------------------------------------------------------------ bad inputs: one sentence
BAD_INPUTS = [
    ("float ids", lambda ids: dict(input_ids=ids.float()), "must hold integer token ids"),
    ("bool ids", lambda ids: dict(input_ids=ids.bool()), "must hold integer token ids"),
    ("a list", lambda ids: dict(input_ids=ids.tolist()), "must be a torch.Tensor"),
    ("1-D ids", lambda ids: dict(input_ids=ids[0]), "must be a (batch, seq) tensor"),
    ("3-D ids", lambda ids: dict(input_ids=ids[None]), "must be a (batch, seq) tensor"),
    ("no tokens", lambda ids: dict(input_ids=ids[:, :0]), "holds no token"),
    ("id past the vocabulary", lambda ids: dict(input_ids=ids + 256), "outside this model's vocabulary of 256"),
    ("negative id", lambda ids: dict(input_ids=ids - 300), "token ids must lie in [0, 256)"),
    ("too long", lambda ids: dict(input_ids=torch.zeros(1, 257, dtype=torch.long)), "exceeds this model's max_seq_len=256"),
    ("past the context at start_pos", lambda ids: dict(input_ids=ids, start_pos=250), "a sequence of 262 positions"),
    ("negative start_pos", lambda ids: dict(input_ids=ids, start_pos=-3), "start_pos must be a non-negative integer"),
    ("labels of another shape", lambda ids: dict(input_ids=ids, labels=ids[:, :5]), "must have the shape of input_ids"),
    ("float labels", lambda ids: dict(input_ids=ids, labels=ids.float()), "must hold integer token ids"),
    ("labels past the vocabulary", lambda ids: dict(input_ids=ids, labels=ids + 256), "outside this model's vocabulary"),
    ("negative labels other than -100", lambda ids: dict(input_ids=ids, labels=ids - 300), "or -100 (ignored)"),
]


@pytest.mark.parametrize("case, kwargs, message", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_model_inputs_are_one_sentence(tiny, case, kwargs, message):
    """Was: IndexError / RuntimeError / ValueError from torch's embedding, reshape or loss (a
    device-side assert on a GPU), or silently wrong positions for a negative start_pos."""
    with pytest.raises(PromptError) as err:
        tiny(**kwargs(_ids()))
    assert message in str(err.value), str(err.value)
    assert isinstance(err.value, LiteLLMError) and isinstance(err.value, ValueError)
    assert_one_sentence(err.value)


def test_minus_100_labels_stay_allowed(tiny):
    ids = _ids()
    labels = torch.full_like(ids, -100)
    labels[:, 1:4] = ids[:, 1:4]
    assert torch.isfinite(tiny(ids, labels=labels).lm_loss)


def test_generate_with_an_id_past_the_vocabulary_is_one_sentence(tiny):
    with pytest.raises(PromptError, match="outside this model's vocabulary of 256"):
        list(generate_ids(tiny, [1, 2, 300], 3))


# ------------------------------------------------------------------ TierSets
@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: TierSet("bogus", ("tier_1b",)), "mode must be one of"),
        (lambda: TierSet("cumulative", ()), "names exactly one tier"),
        (lambda: TierSet("cumulative", ("tier_1b", "tier_10b")), "names exactly one tier"),
        (lambda: TierSet("explicit", "tier_1b"), "must be tier names"),
        (lambda: TierSet.of("tier_1b", 3), "must be tier names"),
        (lambda: TierSet.coerce(3), "a TierSet must be a TierSet"),
    ],
)
def test_malformed_tiersets_are_one_sentence(make, message):
    """Was: KeyError / IndexError / TypeError when the TierSet was used."""
    with pytest.raises(TierSetError, match=re.escape(message)) as err:
        make()
    assert_one_sentence(err.value)


def test_tierset_names_given_as_a_list_are_kept_as_a_tuple():
    assert TierSet("explicit", ["tier_1b"]) == TierSet.of("tier_1b")
    assert hash(TierSet("explicit", ["tier_1b"])) == hash(TierSet.of("tier_1b"))


def test_a_dense_model_refuses_a_tierset_naming_a_tier():
    """Was: a dense model ignored any TierSet silently (the forward and num_active_params)."""
    cfg = ModelConfig.from_preset("tiny-dense")
    model = build_model(cfg)
    ids = _ids()
    for tierset in ("tier_1b", "upto:tier_1b", TierSet.only("tier_10b")):
        with pytest.raises(TierSetError, match="this model has no tiers"):
            model(ids, tierset=tierset)
        with pytest.raises(TierSetError, match="this model has no tiers"):
            cfg.num_active_params(tierset)
    with torch.no_grad():
        assert torch.equal(model(ids, tierset="all").logits, model(ids).logits)
    assert cfg.num_active_params("all") == cfg.num_params()


# ------------------------------------------------------------------ fp64 routing
def test_an_fp64_model_routes_in_fp64_so_exact_growth_is_exact_to_fp64():
    """Was: the router cast its input to fp32 even in an fp64 model, so an exact growth (new,
    unroutable experts) changed fp64 logits by ~2e-9 instead of fp64 rounding (~1e-16)."""
    cfg = ModelConfig.from_preset("tiny")
    model = build_model(cfg, dtype=torch.float64)
    ids = _ids()
    grown_cfg, tensors = get_op("add_experts")(cfg, stored_state(model), tier="tier_1b", count=2)
    grown = load_stored(LiteLLM(grown_cfg), {k: tensors[k] for k in tensors})
    with torch.no_grad():
        before, after = model(ids, return_routes=True), grown(ids)
    assert before.routing[0].routes.weights.dtype == torch.float64
    scale = before.logits.abs().max().item()
    assert (after.logits - before.logits).abs().max().item() <= 1e-12 * scale


def test_fp64_topk_breaks_ties_like_the_exact_keys():
    """The fp64 path of stable_topk (a stable sort in tie-break order) against the fp32 exact
    keys, on scores every one of which fp32 holds exactly, ties and NaN included."""
    gen = torch.Generator().manual_seed(0)
    scores = torch.randint(-3, 4, (64, 9), generator=gen).float() / 4
    scores[0, 2] = float("nan")
    scores[1] = -0.0
    scores[1, ::2] = 0.0
    rank = torch.randperm(9, generator=gen)
    for k in (1, 2, 5, 9):
        expected = _topk_by_exact_key(scores, k, rank)
        assert torch.equal(stable_topk(scores.double(), k, rank), expected)
        assert torch.equal(stable_topk(scores, k, rank), expected)


# ------------------------------------------------------------------ wrong objects
def test_build_model_and_save_checkpoint_refuse_other_objects(tmp_path):
    with pytest.raises(ConfigError, match="build_model needs a ModelConfig, got dict") as err:
        build_model({"vocab_size": 3})
    assert_one_sentence(err.value)
    with pytest.raises(CheckpointError, match=r"save_checkpoint needs a LiteLLM model \(.*\), got Linear") as err:
        save_checkpoint(tmp_path / "c", torch.nn.Linear(2, 2))
    assert_one_sentence(err.value)
    assert not (tmp_path / "c").exists()


# ------------------------------------------------------------------ checkpoints keep dtypes
def test_a_model_moved_to_bf16_saves_and_loads_as_bf16_bitwise(tmp_path):
    model = build_model(ModelConfig.from_preset("tiny"), seed=3).to(torch.bfloat16)
    save_checkpoint(tmp_path / "c", model)
    again = load_checkpoint(tmp_path / "c").model
    ids = _ids()
    with torch.no_grad():
        assert torch.equal(model(ids).logits, again(ids).logits)
    model.layers[0].attn.to(torch.float16)  # mixed dtypes are stored as they are, too
    save_checkpoint(tmp_path / "mixed", model)
    for path in (tmp_path / "c", tmp_path / "mixed"):
        mine, theirs = stored_state(model if path.name == "mixed" else again), stored_state(load_checkpoint(path).model)
        assert mine.keys() == theirs.keys()
        assert all(mine[k].dtype == theirs[k].dtype and torch.equal(mine[k], theirs[k]) for k in mine)
    assert {t.dtype for t in stored_state(again).values()} == {torch.bfloat16}


def test_save_into_a_non_empty_folder_is_refused_and_leaves_it(tmp_path, tiny):
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "todo.txt").write_text("keep me")
    with pytest.raises(CheckpointError, match="refusing to overwrite") as err:
        save_checkpoint(folder, tiny)
    assert_one_sentence(err.value)
    assert [p.name for p in folder.iterdir()] == ["todo.txt"]


# ------------------------------------------------------------------ the trainer
def _train_cfg(**overrides) -> TrainConfig:
    fields = dict(steps=2, batch_size=2, seq_len=16, warmup_steps=1, eval_every=0, eval_batches=1, eval_batch_size=2)
    fields.update(overrides)
    return TrainConfig(**fields)


def _data(vocab_size: int) -> SimpleNamespace:
    """Only what the trainer's constructor reads before it refuses (no batch is drawn)."""
    return SimpleNamespace(tokenizer=SimpleNamespace(vocab_size=vocab_size), domains=["code"])


def test_trainer_refuses_a_seq_len_past_the_context_at_construction(tiny):
    """Was: a ValueError from the model's forward at step 0, after the set-up."""
    with pytest.raises(ConfigError, match="train.seq_len 512 is longer than the model's context of 256") as err:
        Trainer(tiny, _data(256), _train_cfg(seq_len=512), show_progress=False)
    assert_one_sentence(err.value)


def test_trainer_refuses_data_of_a_larger_vocabulary_at_construction():
    """Was: an IndexError from the embedding at step 0."""
    model = build_model(ModelConfig.from_preset("tiny", vocab_size=100))
    with pytest.raises(ConfigError, match="tokenized with 256 token ids but the model's vocabulary has 100") as err:
        Trainer(model, _data(256), _train_cfg(), show_progress=False)
    assert_one_sentence(err.value)


def test_trainer_refuses_a_config_that_is_not_a_train_config(tiny):
    with pytest.raises(ConfigError, match="Trainer needs a TrainConfig, got dict"):
        Trainer(tiny, _data(256), {"steps": 2}, show_progress=False)


@pytest.mark.parametrize("field, value", [("beta1", 1.5), ("beta2", -0.1), ("beta1", "x"), ("beta2", 1.0), ("beta1", True)])
def test_train_config_refuses_adam_betas_outside_0_1(field, value):
    """Was: accepted, then AdamW failed (or diverged) once training began."""
    with pytest.raises(ConfigError, match=f"train.{field} must be a number in \\[0, 1\\)") as err:
        _train_cfg(**{field: value})
    assert_one_sentence(err.value)


def test_train_config_keeps_a_tierset_in_its_string_form():
    """Was: a TierSet object was kept as given, written to JSON as a dict, and a resume then
    refused the run because the dict read back never equalled the object."""
    for given, text in ((TierSet.up_to("tier_1b"), "upto:tier_1b"), (["tier_1b", "tier_10b"], "tier_1b,tier_10b"), ("all", "all")):
        cfg = _train_cfg(tierset=given)
        assert cfg.tierset == text
        again = TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
        assert again == cfg
    for bad, message in ((3, "train.tierset must be a TierSet"), ("upto:", "names no tier after"), ("", "TierSet is empty")):
        with pytest.raises(ConfigError, match=message) as err:
            _train_cfg(tierset=bad)
        assert_one_sentence(err.value)


@pytest.mark.parametrize("kwargs, said", [({"seed": "a"}, "seed must be a whole number >= 0"), ({"seed": -1}, "seed must be a whole number >= 0"),
                                          ({"device": "bogus"}, "device 'bogus' is not a device")])
def test_build_model_names_a_bad_seed_or_device(kwargs, said):
    """Both ended in torch's RuntimeError (a generator's seed, a list of two dozen device types)."""
    with pytest.raises(ConfigError, match=said):
        build_model(ModelConfig.from_preset("tiny"), **kwargs)


@pytest.mark.parametrize("call, message", [
    (lambda m, p: generate_ids(m, "def", 3), "the prompt is text; give token ids"),
    (lambda m, p: generate_ids(m, torch.tensor([p, p]), 3), r"1-D \(or 1 x S\) tensor of integer token ids, got shape \(2, 3\)"),
    (lambda m, p: generate_ids(m, torch.tensor([p], dtype=torch.float32), 3), "tensor of integer token ids"),
    (lambda m, p: generate_ids(m, [p], 3), "a sequence of integer token ids"),
    (lambda m, p: generate_ids(m, p, 2.5), r"max_new_tokens must be an integer >= 0, got 2.5"),
    (lambda m, p: generate_ids(m, p, None), "max_new_tokens must be an integer >= 0, got None"),
    (lambda m, p: generate_ids(m, p, -1), "max_new_tokens must be an integer >= 0, got -1"),
    (lambda m, p: generate_ids(m, p, 3, logit_bias={10**7: 100.0}), r"logit_bias names token 10000000, outside the vocabulary \(0..255\)"),
])
def test_bad_generate_inputs_are_one_sentence(tiny, call, message):
    with pytest.raises(LiteLLMError, match=message) as err:
        list(call(tiny, [3, 4, 5]))
    assert_one_sentence(err.value)


def test_a_transformers_style_1_by_s_prompt_tensor_generates_as_the_list(tiny):
    assert list(generate_ids(tiny, torch.tensor([[3, 4, 5]]), 4)) == list(generate_ids(tiny, [3, 4, 5], 4))


def test_build_model_on_cuda_without_one_is_one_sentence():
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    with pytest.raises(ConfigError, match="needs a CUDA GPU, and this torch sees none") as err:
        build_model(ModelConfig.from_preset("tiny"), device="cuda")
    assert_one_sentence(err.value)


@pytest.mark.parametrize("make, message", [
    (lambda: TierSet.of(), "must name at least one tier"),
    (lambda: TierSet.only(""), "tier names must not be empty"),
    (lambda: TierSet.of("tier_1b", " "), "tier names must not be empty"),
])
def test_an_empty_tierset_is_refused_when_built(make, message):
    with pytest.raises(TierSetError, match=message):
        make()


def test_expand_checkpoint_takes_steps_written_as_a_recipe_writes_them(tmp_path):
    from lite_llm.grow import GrowthStep, expand_checkpoint

    model = build_model(ModelConfig.from_preset("tiny-dense"), seed=1)
    src = save_checkpoint(tmp_path / "src", model)
    as_dict = expand_checkpoint(src, tmp_path / "a", [{"method": "llama_pro", "target_layers": 4}])
    as_step = expand_checkpoint(src, tmp_path / "b", [GrowthStep("llama_pro", {"target_layers": 4})])
    assert as_dict.config == as_step.config and as_dict.records[0]["preservation"] == as_step.records[0]["preservation"]
    with pytest.raises(ConfigError, match="step 1 must be a mapping with a 'method' key"):
        expand_checkpoint(src, tmp_path / "c", ["llama_pro"])
