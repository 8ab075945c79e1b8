"""A demanding user's sweep of `tiers`, the expert-store options, `import`/`export` and `eval`:
each defect it found, as the command that showed it.  Every refusal is one sentence, exits 1
and leaves the files it was given as they were (checked by hash)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from lite_llm.config import TierConfig
from lite_llm.errors import ConfigError

from .test_issue16_safety import _hashes, _run

transformers = pytest.importorskip("transformers")
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

WORDS = "the quick brown fox jumps over a lazy dog while seven wizards quietly hex every jolly bat".split()
OTHER_WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi".split()
SMALL = ["--batches", "1", "--batch-size", "1", "--seq-len", "16"]
LLAMA = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)


def _corpus(folder: Path, words: list[str]) -> Path:
    folder.mkdir(parents=True)
    for i in range(4):
        (folder / f"doc{i}.txt").write_text(" ".join(words[(i * 7 + j * 3) % len(words)] for j in range(1500)))
    return folder


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    """Byte and BPE checkpoints (tiny preset), and datasets made by three tokenizers."""
    root = tmp_path_factory.mktemp("sweep")
    corpus, other = _corpus(root / "corpus", WORDS), _corpus(root / "other", OTHER_WORDS)
    w = {"root": root, "byte_ckpt": root / "byte_ckpt", "bpe_ckpt": root / "bpe_ckpt"}
    assert _run(["init", "--preset", "tiny", "-o", str(w["byte_ckpt"])])[0] == 0
    for name, text in (("tok", corpus), ("tok_other", other)):
        code, out = _run(["tokenizer", "train", str(text), "--vocab-size", "300", "-o", str(root / name)])
        assert code == 0, out
    (root / "model.yaml").write_text("preset: tiny\nvocab_size: 320\n")
    code, out = _run(["init", "--config", str(root / "model.yaml"), "--tokenizer", str(root / "tok"), "-o", str(w["bpe_ckpt"])])
    assert code == 0, out
    for name, tokenizer in (("byte_data", "byte"), ("bpe_data", str(w["bpe_ckpt"] / "tokenizer")), ("other_data", str(root / "tok_other"))):
        w[name] = root / name
        code, out = _run(["data", "prepare", f"x={corpus}", "--tokenizer", tokenizer, "--val-fraction", "0.25", "-o", str(w[name])])
        assert code == 0, out
    return w


def _copy(src: Path, tmp_path: Path, name: str = "ckpt") -> Path:
    return Path(shutil.copytree(src, tmp_path / name))


# ------------------------------------------------------------------ eval: tokenizer of the data
def test_eval_refuses_data_made_by_another_tokenizer(world, tmp_path):
    """Was: an IndexError traceback for ids past the vocabulary, and plausible but meaningless
    scores (exit 0) for byte data or another BPE of the same size scored by a BPE model."""
    before = {k: _hashes(world[k]) for k in ("byte_ckpt", "bpe_ckpt", "byte_data", "bpe_data", "other_data")}
    report = tmp_path / "scores.json"
    for ckpt, data, message in (
        ("byte_ckpt", "bpe_data", "was tokenized with 300 token ids but checkpoint"),
        ("bpe_ckpt", "byte_data", "was tokenized by another tokenizer (byte, 256 tokens) than checkpoint"),
        ("bpe_ckpt", "other_data", "was tokenized by another tokenizer (bpe, 300 tokens) than checkpoint"),
    ):
        code, out = _run(["eval", str(world[ckpt]), "--data", str(world[data]), *SMALL, "--json", str(report)])
        assert code == 1 and message in out and "--tokenizer" in out and "Traceback" not in out, out
        assert not report.exists()
    code, out = _run(["eval", str(world["bpe_ckpt"]), "--data", str(world["bpe_data"]), *SMALL, "--json", str(report)])
    assert code == 0 and report.is_file(), out  # the checkpoint's own tokenizer is accepted
    assert {k: _hashes(world[k]) for k in before} == before


def test_train_from_a_checkpoint_refuses_data_made_by_another_tokenizer(world, tmp_path):
    """Was: ``train --init`` (and ``--resume``) a BPE checkpoint on byte data, or on another
    BPE of the same size, trained without a word: the model learned other words under its old ids
    and the run's checkpoints were saved with the data's tokenizer in place of the model's."""
    before = {k: _hashes(world[k]) for k in ("bpe_ckpt", "byte_data", "other_data")}
    steps = ["--steps", "1", "--batch-size", "1", "--seq-len", "16", "--eval-every", "0"]
    for data, message in (("byte_data", "(byte, 256 tokens) than checkpoint"), ("other_data", "(bpe, 300 tokens) than checkpoint")):
        run = tmp_path / f"run_{data}"
        code, out = _run(["train", "--init", str(world["bpe_ckpt"]), "--data", str(world[data]), *steps, "-o", str(run)])
        assert code == 1 and message in out and "--tokenizer" in out and "Traceback" not in out, out
        assert not (run / "checkpoints").exists()
    run = tmp_path / "run_own"
    code, out = _run(["train", "--init", str(world["bpe_ckpt"]), "--data", str(world["bpe_data"]), *steps, "-o", str(run)])
    assert code == 0, out  # the checkpoint's own tokenizer is accepted
    code, out = _run(["train", "--data", str(world["other_data"]), "--steps", "2", "-o", str(run), "--resume"])
    assert code == 1 and "(bpe, 300 tokens) than checkpoint" in out and "Traceback" not in out, out
    assert {k: _hashes(world[k]) for k in before} == before


def test_tiers_profile_refuses_data_made_by_another_tokenizer_and_a_long_seq_len(world, tmp_path):
    ckpt = _copy(world["bpe_ckpt"], tmp_path)
    before = _hashes(ckpt)
    fast = ["--tokens", "2", "--repeats", "1", "--batches", "1", "--batch-size", "1"]
    code, out = _run(["tiers", "profile", str(ckpt), "--data", f"x={world['byte_data']}", *fast, "--seq-len", "16"])
    assert code == 1 and "was tokenized by another tokenizer" in out and "Traceback" not in out, out
    code, out = _run(["tiers", "profile", str(ckpt), "--data", f"x={world['bpe_data']}", *fast, "--seq-len", "1000"])
    assert code == 1 and "--seq-len 1000 is longer than checkpoint" in out and "give --seq-len 256 or less" in out, out
    assert _hashes(ckpt) == before  # no profile stored
    # the library call checks the same before timing anything (it used to check only the vocabulary's size)
    from lite_llm.errors import DataError
    from lite_llm.serve.profiling import profile_checkpoint

    with pytest.raises(DataError, match="was tokenized by another tokenizer"):
        profile_checkpoint(ckpt, {"x": world["other_data"]}, tokens=2, repeats=1, eval_batches=1, batch_size=1, seq_len=16)
    assert _hashes(ckpt) == before


# ------------------------------------------------------------------ eval: arguments
def test_eval_seq_len_domains_and_report_are_checked_before_any_work(world, tmp_path):
    ckpt, data = str(world["byte_ckpt"]), str(world["byte_data"])
    before = _hashes(world["byte_ckpt"])
    # --seq-len 1 scored no token and printed nan with exit 0
    code, out = _run(["eval", ckpt, "--data", data, "--batches", "1", "--seq-len", "1"])
    assert code == 2 and "--seq-len" in out
    code, out = _run(["eval", ckpt, "--data", data, "--batches", "1", "--seq-len", "1000"])
    assert code == 1 and "--seq-len 1000 is longer than checkpoint" in out and "context of 256 tokens" in out, out
    # a trailing comma read as an unknown domain named '' ("unknown domain(s) ; ...")
    code, out = _run(["eval", ckpt, "--data", data, "--domains", "x,", *SMALL, "--json", str(tmp_path / "x.json")])
    assert code == 0, out
    assert list(__import__("json").loads((tmp_path / "x.json").read_text())) == ["x"]
    code, out = _run(["eval", ckpt, "--data", data, "--domains", " , ", *SMALL])
    assert code == 1 and "names no domain" in out, out
    # --report naming a file: a FileExistsError traceback after the whole evaluation
    (tmp_path / "report").write_text("mine")
    code, out = _run(["eval", ckpt, "--against", str(tmp_path / "base"), "--data", data, *SMALL, "--report", str(tmp_path / "report")])
    assert code == 1 and "--report" in out and "is a file" in out and "Traceback" not in out, out
    assert (tmp_path / "report").read_text() == "mine"
    # the base again among the models: scored once, labelled '//tmp/...'
    code, out = _run(["eval", ckpt, "--against", ckpt, "--data", data, *SMALL, "--report", str(tmp_path / "r")])
    assert code == 1 and "is given twice" in out and not (tmp_path / "r").exists(), out
    assert _hashes(world["byte_ckpt"]) == before


# ------------------------------------------------------------------ the expert store
def _flip_expert_bytes(ckpt: Path) -> None:
    """Corrupt tier_1b's expert shard in place: same size, other bytes in every expert."""
    shard = ckpt / "tier-tier_1b-experts.safetensors"
    data = bytearray(shard.read_bytes())
    for i in range(len(data) - 40_000, 2_000, -20_000):  # past the header, into every bank
        data[i] ^= 0x55
    shard.write_bytes(bytes(data))


def test_the_store_refuses_an_expert_shard_corrupted_in_place(world, tmp_path):
    """Was: exit 0 and text computed with the corrupt weights (only sizes were checked)."""
    ckpt = _copy(world["byte_ckpt"], tmp_path)
    _flip_expert_bytes(ckpt)
    before = _hashes(ckpt)
    code, out = _run(["generate", str(ckpt), "--prompt", "the", "--max-new-tokens", "4", "--temperature", "0", "--hot-budget", "10MB"])
    assert code == 1 and "does not match its sha256 in the manifest" in out and "nothing was computed with it" in out, out
    code, out = _run(["eval", str(ckpt), "--data", str(world["byte_data"]), *SMALL, "--hot-budget", "100kB", "--warm-budget", "1MB"])
    assert code == 1 and "does not match its sha256 in the manifest" in out and "Traceback" not in out, out
    assert _hashes(ckpt) == before


def test_a_checkpoint_url_reaches_the_archive_level(world):
    """Was: typer's Path folded file:///x into file:/x, refused as a directory that does not exist."""
    local = world["byte_ckpt"]
    args = ["--prompt", "the", "--max-new-tokens", "6", "--temperature", "0", "--hot-budget", "10MB"]
    code, want = _run(["generate", str(local), *args])
    assert code == 0, want
    code, got = _run(["generate", local.resolve().as_uri(), *args])
    assert code == 0 and got.split("the", 1)[1] == want.split("the", 1)[1], got
    code, out = _run(["generate", local.resolve().as_uri(), "--prompt", "the"])
    assert code == 1 and "is read through the expert store; add --hot-budget" in out, out


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--stats"], "--stats reports the expert store, which only --hot-budget uses"),
        (["--prefetch"], "--prefetch needs --hot-budget and --warm-budget"),
        (["--cache-policy", "lru"], "--cache-policy lru chooses what the expert store evicts"),
        (["--hot-budget", "1MB", "--prefetch"], "--prefetch reads experts into the warm level, which --warm-budget sizes"),
    ],
)
def test_store_options_that_would_do_nothing_are_refused(world, extra, message):
    """Was: exit 0 with the option silently ignored (no statistics, no prefetching)."""
    code, out = _run(["generate", str(world["byte_ckpt"]), "--prompt", "a", "--max-new-tokens", "2", *extra])
    assert code == 1 and message in out and "Traceback" not in out, out


# ------------------------------------------------------------------ import / export
@pytest.mark.parametrize(
    "fields, message",
    [
        ({"hidden_act": "gelu"}, "uses the 'gelu' activation, but Lite LLM computes SwiGLU with silu"),
        ({"mlp_bias": True}, "has biases in its MLP (mlp_bias)"),
        ({"attention_bias": True}, "has attention_bias, which also biases o_proj"),
    ],
)
def test_import_refuses_llama_variants_it_cannot_compute(fields, message, tmp_path):
    """Was: gelu imported silently as a SwiGLU-silu model (wrong logits, exit 0); biases refused
    as tensors 'that a llama model of this config.json does not have' (the config said they exist)."""
    src = tmp_path / "hf"
    LlamaForCausalLM(LlamaConfig(**LLAMA, **fields)).save_pretrained(src)
    before = _hashes(src)
    code, out = _run(["import", str(src), "-o", str(tmp_path / "ckpt")])
    assert code == 1 and message in out and "cannot be imported" in out, out
    assert not (tmp_path / "ckpt").exists() and _hashes(src) == before


def test_import_tells_a_file_from_a_folder_and_finds_gguf_by_its_magic(tmp_path):
    from .interop.test_gguf_import import _classic_state, _write_gguf

    src = tmp_path / "hf"
    LlamaForCausalLM(LlamaConfig(**LLAMA)).save_pretrained(src)
    code, out = _run(["import", str(src / "model.safetensors"), "-o", str(tmp_path / "a")])
    assert code == 1 and "is a file, not a Hugging Face model folder" in out, out  # was: "folder ... does not exist"
    hf = LlamaForCausalLM(LlamaConfig(**LLAMA)).eval()
    gguf_file = tmp_path / "model.gguf"
    _write_gguf(gguf_file, hf.config, _classic_state(hf, tmp_path))
    renamed = tmp_path / "model-q8"  # downloaded without its suffix
    shutil.copy(gguf_file, renamed)
    code, out = _run(["import", str(renamed), "-o", str(tmp_path / "b")])
    assert code == 0 and (tmp_path / "b" / "manifest.json").is_file(), out
    truncated = tmp_path / "cut.gguf"
    truncated.write_bytes(gguf_file.read_bytes()[:-500])
    code, out = _run(["import", str(truncated), "-o", str(tmp_path / "c")])
    assert code == 1 and "cannot be read as a GGUF file: it is truncated or corrupt" in out and "Traceback" not in out, out
    assert not (tmp_path / "c").exists()


def test_export_into_the_checkpoint_is_refused(tmp_path):
    """Was: exit 0, with the Hugging Face folder written inside the checkpoint — under
    tokenizer/ it made the checkpoint unloadable ('tokenizer holds no tokenizer')."""
    src = tmp_path / "hf"
    LlamaForCausalLM(LlamaConfig(**LLAMA)).save_pretrained(src)
    ckpt = tmp_path / "ckpt"
    assert _run(["import", str(src), "-o", str(ckpt)])[0] == 0
    before = _hashes(ckpt)
    for inside in (ckpt / "hf", ckpt / "tokenizer" / "x"):
        code, out = _run(["export", str(ckpt), "-o", str(inside)])
        assert code == 1 and "nested in each other" in out, out
    assert _hashes(ckpt) == before and sorted(p.name for p in ckpt.iterdir()) == ["dense.safetensors", "manifest.json", "progressive.json"]
    code, out = _run(["export", str(ckpt), "-o", str(tmp_path / "out")])
    assert code == 0 and (tmp_path / "out" / "config.json").is_file(), out


# ------------------------------------------------------------------ tiers
def test_a_tier_cannot_be_named_all(world, tmp_path):
    """Was: add-tier --tier all wrote a checkpoint whose tier `--tiers all` can never pick alone."""
    with pytest.raises(ConfigError, match="tier name 'all' is reserved"):
        TierConfig("all")
    before = _hashes(world["byte_ckpt"])
    code, out = _run(["add-tier", str(world["byte_ckpt"]), "--tier", "all", "-o", str(tmp_path / "grown")])
    assert code == 1 and "tier name 'all' is reserved" in out, out
    assert not (tmp_path / "grown").exists() and _hashes(world["byte_ckpt"]) == before


def test_each_expert_is_hashed_on_its_first_read_only(world, monkeypatch):
    """Hashing every read would cost ~8 ms per decoded token at a 10% hot budget; an expert
    that matched its hash is not hashed again while its file is unchanged."""
    import hashlib

    import torch

    from lite_llm.checkpoint.lazy import open_checkpoint
    from lite_llm.store import ColdExperts, cold

    hashed, real = [], hashlib.sha256
    monkeypatch.setattr(cold.hashlib, "sha256", lambda data: hashed.append(bytes(data)) or real(data))
    experts = ColdExperts(open_checkpoint(world["byte_ckpt"], verify=False))
    key = (0, "tier_1b", 1)
    first = experts.read(key)
    once = len(hashed)
    again = experts.read(key)
    assert once >= 1 and len(hashed) == once  # the second read hashed nothing
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    experts.read((0, "tier_1b", 2))
    assert len(hashed) > once  # another expert is hashed on its own first read


def test_import_refuses_an_output_nested_with_its_source(tmp_path):
    """``import hf -o hf/sub`` wrote the checkpoint into the Hugging Face folder, and
    ``import dir/model.gguf -o dir --overwrite`` would have deleted the GGUF it reads."""
    src = tmp_path / "hf"
    LlamaForCausalLM(LlamaConfig(**LLAMA)).save_pretrained(src)
    before = _hashes(src)
    for args in (["-o", str(src / "sub")], ["-o", str(tmp_path), "--overwrite"], ["-o", str(src), "--overwrite"]):
        code, out = _run(["import", str(src), *args])
        assert code == 1 and "nested in each other" in out and "Traceback" not in out, out
    assert _hashes(src) == before and not (src / "sub").exists()
