"""The seams between commands, as a user chains them: import -> expand -> train --init ->
export -> transformers.  Each test feeds one command's output to the next and checks what
must be carried along (tokenizer side files, chat template, end-of-turn id) against an
independent oracle (transformers, the files' bytes, safetensors headers).

The SmolLM2 tests need ``models/SmolLM2-135M-Instruct.Q4_1.gguf`` (``make fetch-smollm2``)
and skip without it; they train a tiny model that carries SmolLM2's real tokenizer, so that
they take seconds.  The export test of a width-grown model needs no file."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from lite_llm import ModelConfig, build_model
from lite_llm.checkpoint import load_checkpoint, save_checkpoint
from lite_llm.cli import app
from lite_llm.data.tokenizer import load_tokenizer
from lite_llm.interop import import_gguf, import_hf

GGUF = Path(__file__).resolve().parents[1] / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
IM_END = 2  # SmolLM2's <|im_end|>: its eos and the end of every chat turn
QUESTION = "What is the capital of France?"

needs_smollm2 = pytest.mark.skipif(not GGUF.exists(), reason=f"{GGUF} is absent; run `make fetch-smollm2` to fetch it")


def _cli(*args: str) -> str:
    result = CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def _safetensors_elements(folder: Path) -> int:
    """Elements of every tensor in ``folder``'s safetensors files, from their headers alone."""
    total = 0
    for f in folder.glob("*.safetensors"):
        with open(f, "rb") as fh:
            header = json.loads(fh.read(struct.unpack("<Q", fh.read(8))[0]))
        total += sum(math.prod(v["shape"]) for k, v in header.items() if k != "__metadata__")
    return total


class _Files:
    """A tokenizer that saves a folder's files as they are (to build a tiny test checkpoint)."""

    def __init__(self, folder: Path) -> None:
        self.files = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}

    def save(self, target) -> None:
        for name, data in self.files.items():
            (Path(target) / name).write_bytes(data)


@pytest.fixture(scope="module")
def tiny_smollm2(tmp_path_factory):
    """A tiny Llama checkpoint carrying SmolLM2's tokenizer folder exactly as `lite-llm import`
    wrote it (tokenizer.json, lite_tokenizer.json, tokenizer_config.json, chat_template.jinja)."""
    root = tmp_path_factory.mktemp("journey")
    real = import_gguf(GGUF, root / "smollm2")
    tok_dir = real / "tokenizer"
    for name in ("tokenizer_config.json", "chat_template.jinja"):
        assert (tok_dir / name).is_file()  # what import gives: the precondition of the tests below
    cfg = ModelConfig(vocab_size=49152, d_model=16, n_layers=1, n_heads=2, n_kv_heads=1, intermediate_size=32, max_seq_len=64, tie_embeddings=True)
    tiny = save_checkpoint(root / "tiny", build_model(cfg, seed=0), tokenizer=_Files(tok_dir))
    return root, tiny, tok_dir


@pytest.mark.realmodel
@needs_smollm2
@pytest.mark.parametrize("tokenizer_source", ["folder", "tokenizer.json"])
def test_train_init_keeps_the_checkpoints_tokenizer_chat_template_and_eos(tiny_smollm2, tokenizer_source):
    """`train --init CKPT` on data prepared with CKPT's tokenizer (its folder, or its
    tokenizer.json as a file: the same ids, so the run accepts it) writes checkpoints whose
    tokenizer is CKPT's: same side files, chat template and end of turn, so `generate --chat`
    and `export` -> transformers work on the trained model as on the one it started from."""
    root, tiny, tok_dir = tiny_smollm2
    data, run = root / f"data-{tokenizer_source}", root / f"run-{tokenizer_source}"
    tok_arg = tok_dir if tokenizer_source == "folder" else tok_dir / "tokenizer.json"
    _cli("data", "prepare", "prose=stdlib-docs", "-o", data, "--tokenizer", tok_arg, "--max-mb", "0.02")
    _cli("train", "--data", data, "--init", tiny, "--steps", "1", "--batch-size", "1", "--seq-len", "16", "--eval-every", "0",
         "--eval-batches", "1", "--eval-batch-size", "1", "--warmup-steps", "0", "-o", run, "--quiet", "--device", "cpu")
    trained = run / "checkpoints" / "step-00000001"
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        assert (trained / "tokenizer" / name).read_bytes() == (tok_dir / name).read_bytes(), name
    tok = load_tokenizer(trained / "tokenizer")
    assert list(tok.eos_ids) == [IM_END]
    assert tok.chat_template == (tok_dir / "chat_template.jinja").read_text()

    # the trained model exported: transformers' tokenizer renders the chat and ends turns at <|im_end|>
    transformers = pytest.importorskip("transformers")
    hf = root / f"hf-{tokenizer_source}"
    _cli("export", trained, "-o", hf)
    hf_tok = transformers.AutoTokenizer.from_pretrained(hf)
    assert hf_tok.eos_token_id == IM_END
    text = hf_tok.apply_chat_template([{"role": "user", "content": QUESTION}], add_generation_prompt=True, tokenize=False)
    assert text.endswith("<|im_start|>assistant\n") and QUESTION in text
    assert json.loads((hf / "config.json").read_text())["eos_token_id"] == IM_END
    assert json.loads((hf / "generation_config.json").read_text())["eos_token_id"] == IM_END


@pytest.mark.realmodel
@needs_smollm2
def test_export_of_a_folder_without_side_files_takes_eos_and_template_from_the_tokenizer(tiny_smollm2):
    """A checkpoint whose tokenizer folder holds only tokenizer.json and lite_tokenizer.json
    (what `train` wrote before it kept the side files) still says eos <|im_end|> and has the
    chat template: the export's tokenizer_config.json, config.json and generation_config.json
    must say the same eos, and carry the template, rather than fall back to <|endoftext|>."""
    transformers = pytest.importorskip("transformers")
    root, tiny, tok_dir = tiny_smollm2
    bare = root / "bare-tokenizer"
    bare.mkdir()
    for name in ("tokenizer.json", "lite_tokenizer.json"):
        (bare / name).write_bytes((tok_dir / name).read_bytes())
    ckpt = save_checkpoint(root / "tiny-bare", load_checkpoint(tiny).model, tokenizer=_Files(bare))
    hf = root / "hf-bare"
    _cli("export", ckpt, "-o", hf)
    hf_tok = transformers.AutoTokenizer.from_pretrained(hf)
    assert hf_tok.eos_token_id == IM_END
    assert json.loads((hf / "config.json").read_text())["eos_token_id"] == IM_END
    assert json.loads((hf / "generation_config.json").read_text())["eos_token_id"] == IM_END
    ours = hf_tok.apply_chat_template([{"role": "user", "content": QUESTION}], add_generation_prompt=True, tokenize=False)
    assert ours == transformers.AutoTokenizer.from_pretrained(tok_dir).apply_chat_template(
        [{"role": "user", "content": QUESTION}], add_generation_prompt=True, tokenize=False
    )


def test_export_of_a_width_grown_model_loads_in_transformers_and_computes_the_same(tmp_path):
    """`expand --method width` keeps head_dim and n_heads, so d_model need not be a multiple of
    n_heads any more (SmolLM2: 576 -> 640 with 9 heads).  transformers' LlamaConfig refuses
    such a config; the export must still give a folder transformers loads, computing the same
    logits, with as many parameters as the safetensors headers hold."""
    transformers = pytest.importorskip("transformers")
    cfg = ModelConfig(vocab_size=97, d_model=48, n_layers=2, n_heads=6, n_kv_heads=2, head_dim=8, intermediate_size=64, max_seq_len=64, tie_embeddings=True)
    src = save_checkpoint(tmp_path / "src", build_model(cfg, seed=0))
    _cli("expand", src, "--method", "width", "--set", "d_model=52", "-o", tmp_path / "wider")
    grown = load_checkpoint(tmp_path / "wider")
    assert grown.config.d_model == 52 and grown.config.d_model % grown.config.n_heads != 0
    _cli("export", tmp_path / "wider", "-o", tmp_path / "hf")
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    assert model.num_parameters() == grown.manifest["num_params"] == _safetensors_elements(tmp_path / "wider")
    ids = torch.randint(0, 97, (1, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        theirs, ours = model(ids).logits, grown.model(ids).logits
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)
    again = load_checkpoint(import_hf(tmp_path / "hf", tmp_path / "again"))  # and back: Lite LLM reads what it wrote
    with torch.no_grad():
        torch.testing.assert_close(again.model(ids).logits, ours, rtol=0, atol=1e-5)


CURRICULUM = """\
tier: tier_new
phases:
  - {name: preparation, steps: 0}
  - {name: isolation, steps: 1, share: 0.1}
  - {name: integration, steps: 1, to_share: 0.5, ramp: cosine}
  - {name: joint, steps: 1, lr_scale: 0.1}
rollback: {domains: [prose], margin: 0.05}
"""


@pytest.mark.realmodel
@needs_smollm2
def test_rollback_keeps_the_tokenizer_side_files(tiny_smollm2):
    """expand (upcycle) -> add-tier -> train --curriculum -> rollback: the rolled-back
    checkpoint's tokenizer is the run's, side files included, so its export still gives
    transformers SmolLM2's pad and unk tokens (not a tokenizer that cannot pad a batch)."""
    transformers = pytest.importorskip("transformers")
    root, tiny, tok_dir = tiny_smollm2
    data = root / "data-rollback"
    _cli("data", "prepare", "prose=stdlib-docs", "-o", data, "--tokenizer", tok_dir, "--max-mb", "0.02")
    _cli("expand", tiny, "--method", "upcycle", "--set", "num_experts=2", "-o", root / "rb-moe")
    _cli("add-tier", root / "rb-moe", "--tier", "tier_new", "--groups", "1", "--experts-per-group", "2", "--init", "copy", "--k-tier", "2", "-o", root / "rb-2t")
    (root / "curriculum.yaml").write_text(CURRICULUM)
    _cli("train", "--data", data, "--init", root / "rb-2t", "--curriculum", root / "curriculum.yaml", "--steps", "3", "--batch-size", "1",
         "--seq-len", "16", "--eval-every", "1", "--eval-batches", "1", "--eval-batch-size", "1", "--warmup-steps", "0", "-o", root / "rb-run",
         "--quiet", "--device", "cpu")
    _cli("rollback", root / "rb-run" / "checkpoints" / "step-00000003", "-o", root / "rb-before")
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        assert (root / "rb-before" / "tokenizer" / name).read_bytes() == (tok_dir / name).read_bytes(), name
    _cli("export", root / "rb-before", "-o", root / "hf-rb")
    hf_tok = transformers.AutoTokenizer.from_pretrained(root / "hf-rb")
    assert (hf_tok.eos_token_id, hf_tok.pad_token, hf_tok.unk_token) == (IM_END, "<|im_end|>", "<|endoftext|>")
