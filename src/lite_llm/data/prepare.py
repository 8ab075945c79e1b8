"""Turn named corpora into token files the trainer can memory-map.

Layout of a prepared dataset (``out_dir``)::

    index.json              format version, tokenizer, and per domain: source spec(s) as given,
                            split method, documents / tokens / bytes per split
    tokenizer/              the tokenizer, so the data can never be read with the wrong one
    <domain>/train.bin      raw little-endian token ids (uint16, or uint32 for big vocabularies)
    <domain>/val.bin
    <domain>/documents.json the keys of the documents in each split, in file order

Each *domain* (code, prose, …) is kept apart so that training can mix them with chosen
weights and evaluation can report bits per byte per domain — which is how forgetting shows.
The split is by document, decided by a stable hash of (seed, key), so a file never leaks half
into validation and adding a file to a corpus does not move any other file between splits.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from ..errors import DataError
from .hashing import stable_unit
from .sources import Document, resolve_source
from .tokenizer import AnyTokenizer, ByteTokenizer, get_tokenizer

FORMAT_VERSION = 1
INDEX_FILE = "index.json"
TOKENIZER_DIR = "tokenizer"
SPLITS = ("train", "val")
DOC_SEPARATOR = "\n\n"
_DOMAIN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
_CHUNK_BYTES = 32 << 20  # tokenise this much text at a time: bounded memory on big corpora


DOMAIN_NAME_RULE = f"letters, digits, '-' and '_', and not {TOKENIZER_DIR!r}"


def is_domain_name(name: object) -> bool:
    """Whether ``name`` can name a domain: it becomes a folder of the dataset beside ``tokenizer/``."""
    return isinstance(name, str) and bool(_DOMAIN_NAME.match(name)) and name != TOKENIZER_DIR


def token_dtype(vocab_size: int) -> np.dtype:
    """The narrowest unsigned type that holds every id (half the disk and page cache of int32)."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def prepare_data(
    sources: Mapping[str, str | Sequence[str]],
    out_dir: str | Path,
    tokenizer: AnyTokenizer | str,
    *,
    val_fraction: float = 0.05,
    seed: int = 0,
    max_bytes_per_domain: int | None = None,
) -> dict:
    """Tokenise each domain's sources into ``out_dir`` and return the index that was written.

    ``sources`` maps a domain name to one source spec or several (see ``resolve_source``).
    ``tokenizer`` is a tokenizer object or a spec for ``get_tokenizer``.  Everything is
    written to a temporary folder beside ``out_dir`` and renamed into place at the end, so an
    interrupted run leaves either the old dataset or the new one, never a mix.  An existing
    prepared dataset at ``out_dir`` is replaced; any other non-empty folder is refused.
    """
    if not sources:
        raise DataError("prepare_data needs at least one domain, e.g. {'code': 'stdlib-code'}")
    for name in sources:
        if not is_domain_name(name):
            raise DataError(f"domain name {name!r} is not allowed; use {DOMAIN_NAME_RULE}")
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"val_fraction must be between 0 and 1 (exclusive), not {val_fraction}")
    if max_bytes_per_domain is not None and max_bytes_per_domain <= 0:
        raise DataError(f"max_bytes_per_domain must be positive or None, not {max_bytes_per_domain}")
    tok = get_tokenizer(tokenizer) if isinstance(tokenizer, (str, os.PathLike)) else tokenizer
    dtype = token_dtype(tok.vocab_size)
    separator = _separator_ids(tok)

    out_dir = Path(out_dir).expanduser()
    _check_target(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        domains = {}
        for name, spec in sources.items():
            single = isinstance(spec, (str, os.PathLike))
            specs = [os.fspath(spec)] if single else [os.fspath(s) for s in spec]
            domains[name] = {
                "source": specs[0] if single else specs,
                **_prepare_domain(name, specs, tmp, tok, dtype, separator, val_fraction, seed, max_bytes_per_domain),
            }
        tok.save(tmp / TOKENIZER_DIR)
        index = {
            "format_version": FORMAT_VERSION,
            "tokenizer": {"kind": tok.kind, "vocab_size": tok.vocab_size, "eos_id": tok.eos_id},
            "dtype": dtype.name,
            "separator": [int(i) for i in separator],
            "val_fraction": val_fraction,
            "seed": seed,
            "max_bytes_per_domain": max_bytes_per_domain,
            "domains": domains,
        }
        _write_json(tmp / INDEX_FILE, index)
        _install(tmp, out_dir)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise _naming_the_dataset(exc, tmp, out_dir) from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return index


def _naming_the_dataset(exc: OSError, tmp: Path, out_dir: Path) -> OSError:
    """``exc`` naming ``out_dir`` where it named nothing or the temporary folder (removed by
    now), so the CLI's one sentence for it (a full disk, say) names the path the user gave."""
    if exc.errno is None or (exc.filename is not None and not os.fspath(exc.filename).startswith(os.fspath(tmp))):
        return exc
    return OSError(exc.errno, exc.strerror, os.fspath(out_dir))


def _separator_ids(tok: AnyTokenizer) -> list[int]:
    """A blank line between documents, plus end-of-text where the tokenizer has one, so the
    model learns where one document stops without the byte tokenizer needing a special id."""
    ids = list(tok.encode(DOC_SEPARATOR))
    if tok.eos_id is not None:
        ids.append(int(tok.eos_id))
    return ids


def _prepare_domain(
    name: str,
    specs: list[str],
    tmp: Path,
    tok: AnyTokenizer,
    dtype: np.dtype,
    separator: list[int],
    val_fraction: float,
    seed: int,
    max_bytes: int | None,
) -> dict:
    docs = [doc for spec in specs for doc in resolve_source(spec)]
    if not docs:
        raise DataError(f"domain {name!r} has no text in {', '.join(specs)}")
    docs, truncated = truncate_documents(docs, max_bytes)
    splits, method = split_documents(docs, val_fraction, seed)
    if splits is None:
        hint = "raise max_bytes_per_domain" if truncated else "give it more text"
        raise DataError(f"domain {name!r} is a single character of text, too little to split into train and val; {hint}")

    folder = tmp / name
    folder.mkdir()
    sep_bytes = len(DOC_SEPARATOR.encode("utf-8")) if separator else 0
    entry: dict = {"split_by": method, "truncated": truncated, "dtype": dtype.name}
    for split in SPLITS:
        part = splits[split]
        n_tokens = _write_split(folder / f"{split}.bin", part, tok, separator, dtype)
        n_bytes = sum(len(d.text.encode("utf-8")) for d in part) + sep_bytes * (len(part) - 1)
        entry[split] = {"path": f"{name}/{split}.bin", "documents": len(part), "tokens": n_tokens, "bytes": n_bytes}
    _write_json(folder / "documents.json", {s: [d.key for d in splits[s]] for s in SPLITS})
    if method == "document":
        _warn_lopsided_split(name, entry, val_fraction)
    return entry


_LOPSIDED = 2.0  # warn when the held-out share of tokens is more than this many times val_fraction


def _warn_lopsided_split(name: str, entry: dict, val_fraction: float) -> None:
    """Warn when whole documents held out far more tokens than ``val_fraction`` asks: the split
    is by document (so no file leaks into both halves), and a few large documents can take half
    the text from training.  Fewer tokens than asked only make the validation figure noisier
    (the built-in prose holds out 1.7% for 5%), and are not warned of."""
    total = entry["train"]["tokens"] + entry["val"]["tokens"]
    if not total:
        return
    share = entry["val"]["tokens"] / total
    if share <= val_fraction * _LOPSIDED:
        return
    n_val, n_docs = entry["val"]["documents"], entry["train"]["documents"] + entry["val"]["documents"]
    warnings.warn(
        f"domain {name!r} holds out {_percent(share)} of its tokens for validation, not the {_percent(val_fraction)} "
        f"asked for, because it is split by whole documents ({n_val} of {n_docs}); give it more or smaller documents, "
        "or choose another val fraction",
        stacklevel=4,
    )


def _percent(x: float) -> str:
    return f"{x * 100:.3g}%"


def truncate_documents(docs: list[Document], max_bytes: int | None) -> tuple[list[Document], bool]:
    """Keep whole documents while they fit in ``max_bytes``; if even the first does not fit,
    keep its first ``max_bytes`` bytes (so a single huge file still gives a quick run)."""
    if max_bytes is None:
        return docs, False
    kept, total = [], 0
    for doc in docs:
        size = len(doc.text.encode("utf-8"))
        if total + size > max_bytes:
            break
        kept.append(doc)
        total += size
    if kept:
        return kept, len(kept) < len(docs)
    head = docs[0].text.encode("utf-8")[:max_bytes].decode("utf-8", errors="ignore")
    return [Document(docs[0].key, head)], True


def split_documents(docs: list[Document], val_fraction: float, seed: int) -> tuple[dict | None, str]:
    """Assign documents to train/val by a stable hash; one document is split by position."""
    if len(docs) == 1:
        return _split_by_position(docs[0], val_fraction), "position"
    scores = [stable_unit("split", seed, d.key) for d in docs]
    is_val = [s < val_fraction for s in scores]
    # Both splits must be non-empty: hold out the lowest-scoring document, or keep the highest.
    if not any(is_val):
        is_val[min(range(len(docs)), key=scores.__getitem__)] = True
    if all(is_val):
        is_val[max(range(len(docs)), key=scores.__getitem__)] = False
    return {
        "train": [d for d, v in zip(docs, is_val) if not v],
        "val": [d for d, v in zip(docs, is_val) if v],
    }, "document"


def _split_by_position(doc: Document, val_fraction: float) -> dict | None:
    """The last ``val_fraction`` of the document's bytes is validation, cut at a character
    boundary so each half is valid text and byte counts stay exact.  ``None`` if the document
    is a single character and cannot be cut."""
    data = doc.text.encode("utf-8")

    def inside_char(i: int) -> bool:
        return 0 < i < len(data) and (data[i] & 0xC0) == 0x80  # a UTF-8 continuation byte

    target = min(max(round(len(data) * (1.0 - val_fraction)), 1), max(len(data) - 1, 1))
    cut = target
    while inside_char(cut):
        cut -= 1
    if cut == 0:
        cut = target
        while inside_char(cut):
            cut += 1
    if not 0 < cut < len(data):
        return None
    return {
        "train": [Document(doc.key, data[:cut].decode("utf-8"))],
        "val": [Document(doc.key, data[cut:].decode("utf-8"))],
    }


def _write_split(path: Path, docs: list[Document], tok: AnyTokenizer, separator: list[int], dtype: np.dtype) -> int:
    """Append the documents' tokens, separated by ``separator``, to ``path``; return the count."""
    total = 0
    with open(path, "wb") as f:
        for i, chunk in enumerate(_chunks(docs)):
            arr = _encode_chunk(chunk, tok, separator, leading_separator=i > 0)
            if arr.size and int(arr.max()) > np.iinfo(dtype).max:
                raise DataError(f"the tokenizer produced id {int(arr.max())}, which does not fit in {dtype.name}")
            # f.write, not ndarray.tofile: a short write (a full disk) then raises OSError with its
            # errno, which the CLI turns into one sentence, instead of a bare "N requested and M written"
            f.write(memoryview(np.ascontiguousarray(arr, dtype=dtype)).cast("B"))
            total += int(arr.size)
    return total


def _chunks(docs: list[Document]):
    chunk: list[Document] = []
    size = 0
    for doc in docs:
        chunk.append(doc)
        size += len(doc.text)
        if size >= _CHUNK_BYTES:
            yield chunk
            chunk, size = [], 0
    if chunk:
        yield chunk


def _encode_chunk(chunk: list[Document], tok: AnyTokenizer, separator: list[int], *, leading_separator: bool) -> np.ndarray:
    if isinstance(tok, ByteTokenizer):
        # Bytes are the ids: one join and one frombuffer instead of a Python loop per byte.
        sep = bytes(separator)
        data = sep.join(d.text.encode("utf-8") for d in chunk)
        return np.frombuffer(sep + data if leading_separator else data, dtype=np.uint8)
    texts = [d.text for d in chunk]
    encoded = tok.encode_batch(texts) if hasattr(tok, "encode_batch") else [tok.encode(t) for t in texts]
    sep = np.asarray(separator, dtype=np.int64)
    pieces: list[np.ndarray] = []
    for i, ids in enumerate(encoded):
        if i > 0 or leading_separator:
            pieces.append(sep)
        pieces.append(np.asarray(ids, dtype=np.int64))
    return np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int64)


def _check_target(out_dir: Path) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise DataError(f"{out_dir} is a file; choose a folder for the prepared data")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / INDEX_FILE).is_file():
        raise DataError(f"{out_dir} is a non-empty folder that is not a prepared dataset; choose an empty or new folder")


def _install(tmp: Path, out_dir: Path) -> None:
    """Rename the finished dataset into place; an old dataset is moved aside first and
    deleted only after the new one is in place."""
    old = None
    if out_dir.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
        os.replace(out_dir, old / "data")
    try:
        os.replace(tmp, out_dir)
    except BaseException:
        if old is not None:
            os.replace(old / "data", out_dir)
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
