"""A fifth sweep, of `data prepare` and `tokenizer train`: a full disk, files a folder left out
without a word, an empty or too small tokenizer corpus, bare SPECs the help promised, and a
validation split lopsided by a few large documents.

Each defect is a test: the command, its one sentence (error or warning) or its corrected
result, and the files left behind."""

from __future__ import annotations

import builtins
import errno
import json
import warnings
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lite_llm.cli import app
from lite_llm.data import ByteTokenizer, prepare_data, resolve_source
from lite_llm.data import prepare as prepare_module
from lite_llm.errors import DataError

from .conftest import assert_one_sentence, make_text

runner = CliRunner()
DISK_FULL = "nothing half-written was kept — free some space (or write to another disk) and run the command again"


def _cli(args: list[str]) -> tuple[int, str, str]:
    """Exit code, stdout and stderr of one `lite-llm` command."""
    result = runner.invoke(app, args, env={"COLUMNS": "400"})
    return result.exit_code, result.stdout, result.stderr


def _lines(stderr: str, kind: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith(f"{kind}: ")]


def _leftovers(folder: Path) -> list[str]:
    """Hidden temporary siblings a failed write could have left (``.<name>.tmp-…``)."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


@pytest.fixture()
def mix(tmp_path: Path) -> Path:
    """A folder of one UTF-8 file beside a UTF-16 file, a binary file and an empty file."""
    folder = tmp_path / "mix"
    folder.mkdir()
    (folder / "a.txt").write_text(make_text(1, 20), encoding="utf-8")
    (folder / "u16.txt").write_bytes("hi there".encode("utf-16"))
    (folder / "blob.dat2").write_bytes(bytes(range(256)) * 4)
    (folder / "empty.txt").write_bytes(b"")
    return folder


# ------------------------------------------------------------------ 1. a full disk
def _disk_fills_on_bin_files(monkeypatch: pytest.MonkeyPatch, after_bytes: int = 100) -> None:
    """Token files take ``after_bytes`` bytes, then the disk is full (ENOSPC, as the kernel says)."""
    real_open = builtins.open

    class FullDisk:
        def __init__(self, f) -> None:
            self.f, self.left = f, after_bytes

        def write(self, data) -> int:
            n = len(memoryview(data).cast("B"))
            if n > self.left:
                raise OSError(errno.ENOSPC, "No space left on device")
            self.left -= n
            return self.f.write(data)

        def __enter__(self):
            return self

        def __exit__(self, *exc) -> None:
            self.f.close()

    def fake_open(path, mode="r", *args, **kwargs):
        f = real_open(path, mode, *args, **kwargs)
        return FullDisk(f) if str(path).endswith(".bin") and "w" in mode else f

    monkeypatch.setattr(prepare_module, "open", fake_open, raising=False)


def test_a_full_disk_is_one_sentence_naming_the_dataset_and_leaves_nothing(corpus, tmp_path, monkeypatch):
    _disk_fills_on_bin_files(monkeypatch)
    out = tmp_path / "d"
    code, stdout, stderr = _cli(["data", "prepare", f"code={corpus}", "-o", str(out)])
    assert code == 1 and "Traceback" not in stderr
    assert _lines(stderr, "error") == [f"error: the disk is full writing {out}; {DISK_FULL}"]
    assert not out.exists() and _leftovers(tmp_path) == []


def test_a_full_disk_keeps_the_old_dataset(corpus, single_file, tmp_path, monkeypatch):
    out = tmp_path / "d"
    prepare_data({"book": str(single_file)}, out, ByteTokenizer())
    before = {p.name: p.read_bytes() for p in (out / "book").iterdir()}
    _disk_fills_on_bin_files(monkeypatch)
    with pytest.raises(OSError) as err:
        prepare_data({"code": str(corpus)}, out, ByteTokenizer())
    assert err.value.errno == errno.ENOSPC and err.value.filename == str(out)
    assert {p.name: p.read_bytes() for p in (out / "book").iterdir()} == before
    assert _leftovers(tmp_path) == []


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs Linux's /dev/full")
def test_the_kernels_own_enospc_reaches_the_same_sentence(corpus, tmp_path, monkeypatch):
    """The token files written to /dev/full, which refuses every write with ENOSPC: what
    ndarray.tofile reported as a bare "N requested and M written" traceback."""
    real_open = builtins.open

    def to_dev_full(path, mode="r", *args, **kwargs):
        return real_open("/dev/full" if str(path).endswith(".bin") else path, mode, *args, **kwargs)

    monkeypatch.setattr(prepare_module, "open", to_dev_full, raising=False)
    out = tmp_path / "d"
    code, _, stderr = _cli(["data", "prepare", f"code={corpus}", "-o", str(out)])
    assert (code, _lines(stderr, "error")) == (1, [f"error: the disk is full writing {out}; {DISK_FULL}"])
    assert not out.exists() and _leftovers(tmp_path) == []


# ------------------------------------------------------------------ 2. files a folder left out
SKIPPED = "left out 3 files that are not usable text (blob.dat2 is binary, empty.txt is empty, u16.txt is UTF-16 text); convert text files to UTF-8 to include them"


def test_a_folder_names_each_file_it_leaves_out_and_why(mix):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        docs = resolve_source(str(mix))
    assert [d.key for d in docs] == ["a.txt"]
    assert [str(w.message) for w in caught] == [f"source folder {mix}: {SKIPPED}"]


def test_a_glob_names_each_file_it_leaves_out_and_why(mix):
    pattern = str(mix / "*")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        docs = resolve_source(pattern)
    assert [d.key for d in docs] == ["a.txt"]
    assert [str(w.message) for w in caught] == [f"pattern {pattern!r}: {SKIPPED}"]


def test_past_a_handful_the_warning_names_the_first_few_and_counts_the_rest(tmp_path):
    folder = tmp_path / "many"
    folder.mkdir()
    (folder / "keep.txt").write_text("text", encoding="utf-8")
    for i in range(8):
        (folder / f"e{i}.txt").write_bytes(b"")
    with pytest.warns(UserWarning) as caught:
        resolve_source(str(folder))
    shown = ", ".join(f"e{i}.txt is empty" for i in range(5))
    assert [str(w.message) for w in caught] == [
        f"source folder {folder}: left out 8 files that are not usable text ({shown} and 3 more); convert text files to UTF-8 to include them"
    ]


def test_a_folder_with_nothing_usable_is_an_error_that_says_why(tmp_path):
    folder = tmp_path / "none"
    folder.mkdir()
    (folder / "u16.txt").write_bytes("hi".encode("utf-16"))
    (folder / "empty.txt").write_bytes(b"")
    with pytest.raises(DataError) as err:
        resolve_source(str(folder))
    assert str(err.value) == f"source folder {folder} holds no UTF-8 text files (empty.txt is empty, u16.txt is UTF-16 text)"
    assert_one_sentence(str(err.value))


def test_data_prepare_prints_the_skip_warning_as_one_plain_line(mix, tmp_path):
    out = tmp_path / "d"
    code, stdout, stderr = _cli(["data", "prepare", f"m={mix}", "-o", str(out)])
    assert code == 0, stderr
    assert f"warning: source folder {mix}: {SKIPPED}" in _lines(stderr, "warning")
    assert "UserWarning" not in stderr
    assert json.loads((out / "m" / "documents.json").read_text()) == {"train": ["a.txt"], "val": ["a.txt"]}


# ------------------------------------------------------------------ 3. tokenizer train
def test_tokenizer_train_refuses_an_empty_file_and_writes_nothing(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    out = tmp_path / "tok"
    code, stdout, stderr = _cli(["tokenizer", "train", str(empty), "-o", str(out)])
    assert code == 1 and "wrote" not in stdout
    assert _lines(stderr, "error") == [f"error: source {str(empty)!r} holds no text to train a tokenizer on; give files with text in them"]
    assert not out.exists() and _leftovers(tmp_path) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["empty.txt"]


def test_tokenizer_train_warns_when_the_corpus_is_too_small_for_the_vocabulary(tmp_path):
    small = tmp_path / "small.txt"
    small.write_text("some text\nmore text here\n", encoding="utf-8")
    out = tmp_path / "tok"
    code, stdout, stderr = _cli(["tokenizer", "train", str(small), "--vocab-size", "4096", "-o", str(out)])
    assert code == 0, stderr
    vocab = json.loads((out / "lite_tokenizer.json").read_text())["vocab_size"]
    assert 257 < vocab < 4096 and f"wrote {out} ({vocab} tokens)" in stdout
    assert _lines(stderr, "warning") == [
        f"warning: learned {vocab} of the 4096 tokens asked for: the corpus has too little text for more merges "
        "(no other pair of tokens occurs 2+ times); give it more text, or a smaller --vocab-size or --min-frequency"
    ]


def test_tokenizer_train_reaching_its_vocabulary_says_nothing(tmp_path):
    out = tmp_path / "tok"
    code, stdout, stderr = _cli(["tokenizer", "train", "stdlib-docs", "--vocab-size", "300", "-o", str(out)])
    assert (code, stderr) == (0, "") and f"wrote {out} (300 tokens)" in stdout


# ------------------------------------------------------------------ 4. a bare SPEC names its domain
def test_a_bare_spec_names_its_domain_after_the_folder_file_or_glob(tmp_path):
    (tmp_path / "src" / "a").mkdir(parents=True)
    (tmp_path / "src" / "a" / "x.txt").write_text(make_text(1, 30), encoding="utf-8")
    (tmp_path / "src" / "a" / "y.txt").write_text(make_text(2, 30), encoding="utf-8")
    (tmp_path / "notes.txt").write_text(make_text(3, 30), encoding="utf-8")
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "p.md").write_text(make_text(4, 30), encoding="utf-8")
    out = tmp_path / "d"
    specs = [f"{tmp_path / 'src' / 'a'}/", str(tmp_path / "notes.txt"), str(tmp_path / "docs" / "*.md"), "stdlib-docs"]
    code, stdout, stderr = _cli(["data", "prepare", *specs, "--max-mb", "0.05", "-o", str(out)])
    assert code == 0, stderr
    index = json.loads((out / "index.json").read_text())
    assert {name: info["source"] for name, info in index["domains"].items()} == {
        "a": specs[0], "notes": specs[1], "docs": specs[2], "stdlib-docs": "stdlib-docs"
    }


@pytest.mark.parametrize("specs, message", [
    (["{root}/one/a", "{root}/two/a"], "sources '{root}/one/a' and '{root}/two/a' would both be domain 'a'; name them apart as DOMAIN=SPEC"),
    (["a={root}/one/a", "{root}/two/a"], "sources '{root}/one/a' and '{root}/two/a' would both be domain 'a'; name them apart as DOMAIN=SPEC"),
    (["{root}/v1.2"], "source '{root}/v1.2' cannot name its domain, as 'v1.2' is not a domain name (use letters, digits, '-' and '_', and not 'tokenizer'); write DOMAIN=SPEC, e.g. mydata={root}/v1.2"),
    (["{root}/tokenizer"], "source '{root}/tokenizer' cannot name its domain, as 'tokenizer' is not a domain name (use letters, digits, '-' and '_', and not 'tokenizer'); write DOMAIN=SPEC, e.g. mydata={root}/tokenizer"),
    (["*.txt"], "pattern '*.txt' has no folder before its wildcard to name its domain after; write DOMAIN=SPEC, e.g. mydata=*.txt"),
])
def test_a_bare_spec_that_cannot_name_its_domain_is_one_sentence(tmp_path, specs, message):
    for folder in ("one/a", "two/a", "v1.2", "tokenizer"):
        (tmp_path / folder).mkdir(parents=True)
        (tmp_path / folder / "t.txt").write_text("text", encoding="utf-8")
    out = tmp_path / "d"
    code, _, stderr = _cli(["data", "prepare", *(s.format(root=tmp_path) for s in specs), "-o", str(out)])
    assert (code, _lines(stderr, "error")) == (1, ["error: " + message.format(root=tmp_path)])
    assert_one_sentence(message)
    assert not out.exists()


def test_the_help_says_how_a_bare_spec_is_named():
    text = runner.invoke(app, ["data", "prepare", "--help"], env={"COLUMNS": "400"}).output
    assert "SPEC alone to name the domain after it" in " ".join(text.split())


# ------------------------------------------------------------------ 5. a lopsided split
def _two_sizes(folder: Path) -> Path:
    """Three documents of one size: whichever is held out, it is a third of the text."""
    folder.mkdir()
    for i in range(3):
        (folder / f"big{i}.txt").write_text(make_text(50 + i, 200), encoding="utf-8")
    return folder


def test_a_split_far_from_val_fraction_warns_with_the_real_share(tmp_path):
    folder = _two_sizes(tmp_path / "c")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        index = prepare_data({"c": str(folder)}, tmp_path / "d", ByteTokenizer(), val_fraction=0.1)
    info = index["domains"]["c"]
    share = info["val"]["tokens"] / (info["train"]["tokens"] + info["val"]["tokens"])
    assert share > 0.2  # the premise: whole documents could not come near 10%
    assert [str(w.message) for w in caught] == [
        f"domain 'c' holds out {share * 100:.3g}% of its tokens for validation, not the 10% asked for, because it is "
        f"split by whole documents ({info['val']['documents']} of 3); give it more or smaller documents, or choose "
        "another val fraction"
    ]
    assert_one_sentence(str(caught[0].message))


def test_a_split_near_val_fraction_and_a_position_split_say_nothing(tmp_path, single_file):
    folder = tmp_path / "even"
    folder.mkdir()
    for i in range(200):
        (folder / f"d{i:03d}.txt").write_text(make_text(i, 3), encoding="utf-8")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        index = prepare_data({"even": str(folder), "book": str(single_file)}, tmp_path / "d", ByteTokenizer(), val_fraction=0.1)
    info = index["domains"]["even"]
    assert 0.05 <= info["val"]["tokens"] / (info["train"]["tokens"] + info["val"]["tokens"]) <= 0.2
    assert index["domains"]["book"]["split_by"] == "position"
    assert [str(w.message) for w in caught] == []


def test_data_prepare_prints_the_lopsided_warning_and_still_writes_the_dataset(tmp_path):
    folder = _two_sizes(tmp_path / "c")
    out = tmp_path / "d"
    code, stdout, stderr = _cli(["data", "prepare", f"c={folder}", "--val-fraction", "0.1", "-o", str(out)])
    assert code == 0 and f"wrote {out}" in stdout
    (line,) = _lines(stderr, "warning")
    assert line.startswith("warning: domain 'c' holds out ") and line.endswith("or choose another val fraction")
    assert (out / "index.json").is_file()
