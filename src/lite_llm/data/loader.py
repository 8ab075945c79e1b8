"""Read a prepared dataset: memory-mapped token files and reproducible batches.

Training batches are a pure function of (seed, step, micro-batch, mixture weights, data
sizes): the random generator is seeded from a stable hash of those, never from global RNG
state.  A run resumed from a checkpoint at step N therefore sees exactly the batches the
uninterrupted run would have seen, and two ranks or two processes agree without talking.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import numpy as np
import torch

from ..errors import DataError
from .hashing import stable_u64
from .prepare import FORMAT_VERSION, INDEX_FILE, SPLITS, TOKENIZER_DIR
from .tokenizer import AnyTokenizer, load_tokenizer


class TokenData:
    """A prepared dataset (see ``prepare_data``) opened read-only.

    ``domains`` lists the domain names in the order they were prepared, ``index`` is the
    parsed ``index.json`` and ``tokenizer`` the tokenizer the data was made with.  The token
    files are memory-mapped, so opening is instant and the OS shares pages between processes.
    """

    def __init__(self, data_dir: str | Path) -> None:
        self.data_dir = Path(data_dir).expanduser()
        self.index: dict = _read_index(self.data_dir)
        self.domains: list[str] = list(self.index["domains"])
        self.tokenizer: AnyTokenizer = load_tokenizer(self.data_dir / TOKENIZER_DIR)
        if self.tokenizer.vocab_size != self.index["tokenizer"]["vocab_size"]:
            raise DataError(f"the tokenizer in {self.data_dir} does not match its index.json; prepare the data again")
        self._tokens: dict[tuple[str, str], np.ndarray] = {
            (domain, split): self._open(domain, split) for domain in self.domains for split in SPLITS
        }

    def __repr__(self) -> str:
        sizes = ", ".join(f"{d}: {self.num_tokens(d, 'train')}+{self.num_tokens(d, 'val')}" for d in self.domains)
        return f"TokenData({str(self.data_dir)!r}, tokens train+val {{{sizes}}})"

    @property
    def fingerprint(self) -> str:
        """The sha256 of the dataset's index (its domains, sources, token counts and
        tokenizer): what a resumed run checks it is reading the data it was trained on."""
        return hashlib.sha256(json.dumps(self.index, sort_keys=True).encode("utf-8")).hexdigest()

    def num_tokens(self, domain: str, split: str = "train") -> int:
        return len(self._array(domain, split))

    def bytes_per_token(self, domain: str, split: str = "val") -> float:
        """UTF-8 bytes per token, for bits per byte: ``bpb = loss_nats / ln(2) / bytes_per_token``."""
        self._check_domain(domain)
        _check_split(split)
        stats = self.index["domains"][domain][split]
        return stats["bytes"] / stats["tokens"]

    @functools.cached_property
    def _token_bytes(self) -> np.ndarray | None:
        """Each id's bytes of text where the tokenizer knows them exactly (:meth:`bytes_of`)."""
        return self.tokenizer.token_bytes() if hasattr(self.tokenizer, "token_bytes") else None

    def bytes_of(self, ids: torch.Tensor) -> int:
        """UTF-8 bytes of text the token ids stand for: the bits-per-byte denominator of the
        tokens a validation actually scored (the split's average bytes per token is off for
        any part of it: 6% on a README's paragraphs).  Exact for the byte tokenizer and
        byte-level BPE; other tokenizers decode each row (a character cut at a row's end then
        counts as U+FFFD)."""
        rows = ids.reshape(-1, ids.shape[-1]) if ids.dim() else ids.reshape(1, 1)
        if self._token_bytes is not None:
            return int(self._token_bytes[rows.cpu().numpy()].sum())
        return sum(len(self.tokenizer.decode(row.tolist(), skip_special_tokens=True).encode("utf-8")) for row in rows)

    def sample_batch(
        self,
        split: str,
        weights: Mapping[str, float],
        batch_size: int,
        seq_len: int,
        *,
        seed: int,
        step: int,
        micro: int = 0,
        stream: str = "batch",
    ) -> tuple[torch.Tensor, list[str]]:
        """``batch_size`` random windows of ``seq_len`` tokens and the domain of each row.

        Each row picks a domain with probability proportional to ``weights`` (domains left out
        or weighted 0 are never drawn), then a uniformly random start in that domain's split.
        ``stream`` names an independent sequence of draws for the same step (replay rows).
        """
        _check_split(split)
        _check_shape(batch_size, seq_len)
        names, probs = self._mixture(weights)
        arrays = [self._array_long_enough(name, split, seq_len) for name in names]

        key = ("batch",) if stream == "batch" else ("batch", stream)  # "batch" keeps the original draws
        rng = np.random.Generator(np.random.PCG64(stable_u64(*key, seed, step, micro, split)))
        cumulative = np.cumsum(probs)
        cumulative[-1] = 1.0  # guard against rounding leaving a gap at the top
        which = np.minimum(np.searchsorted(cumulative, rng.random(batch_size), side="right"), len(names) - 1)
        highs = np.array([len(a) - seq_len + 1 for a in arrays], dtype=np.int64)[which]
        starts = rng.integers(0, highs)

        out = np.empty((batch_size, seq_len), dtype=np.int64)
        for row, (d, start) in enumerate(zip(which.tolist(), starts.tolist())):
            out[row] = arrays[d][start : start + seq_len]
        domains = [names[d] for d in which.tolist()]
        return self._check_ids(torch.from_numpy(out), domains, split), domains

    def val_batches(
        self, domain: str, batch_size: int, seq_len: int, max_batches: int | None = None
    ) -> Iterator[torch.Tensor]:
        """Consecutive, non-overlapping windows from the start of ``domain``'s val split, in
        batches of up to ``batch_size`` rows (the last may be smaller); the same every call,
        so evaluations at different steps or of different models are comparable."""
        _check_shape(batch_size, seq_len)
        self._check_domain(domain)
        tokens = self._array_long_enough(domain, "val", seq_len)
        return (self._check_ids(batch, [domain] * len(batch), "val") for batch in _windows(tokens, batch_size, seq_len, max_batches))

    # -- helpers ---------------------------------------------------------------------------

    def _open(self, domain: str, split: str) -> np.ndarray:
        stats = self.index["domains"][domain][split]
        dtype = np.dtype(self.index["domains"][domain].get("dtype", self.index["dtype"]))
        path = self.data_dir / stats["path"]
        if not path.is_file():
            raise DataError(f"{path} is missing; prepare the data again")
        expected = int(stats["tokens"]) * dtype.itemsize
        if path.stat().st_size != expected:
            raise DataError(f"{path} holds {path.stat().st_size} bytes but index.json expects {expected}; prepare the data again")
        if expected == 0:
            return np.zeros(0, dtype=dtype)
        return np.memmap(path, dtype=dtype, mode="r")

    def _array(self, domain: str, split: str) -> np.ndarray:
        self._check_domain(domain)
        _check_split(split)
        return self._tokens[(domain, split)]

    def _array_long_enough(self, domain: str, split: str, seq_len: int) -> np.ndarray:
        tokens = self._array(domain, split)
        if len(tokens) < seq_len + 1:
            raise DataError(
                f"the {split} split of domain {domain!r} has {len(tokens)} tokens, fewer than seq_len + 1 = {seq_len + 1}; "
                f"use a shorter seq_len or give the domain more text"
            )
        return tokens

    def _check_ids(self, batch: torch.Tensor, domains: Sequence[str], split: str) -> torch.Tensor:
        """``batch`` (rows from ``domains``, one per row), after refusing token ids outside the
        tokenizer's vocabulary: a token file damaged behind an intact index would otherwise
        index past the model's embedding.  One ``max`` per batch; the file is found on failure."""
        vocab = self.tokenizer.vocab_size
        if batch.numel() and int(batch.max()) >= vocab:
            row = int((batch >= vocab).any(-1).nonzero()[0])
            bad = int(batch[row].max())
            raise DataError(
                f"{self.data_dir / self.index['domains'][domains[row]][split]['path']} holds token id {bad}, outside its "
                f"tokenizer's vocabulary of {vocab}; the file is damaged: prepare the data again"
            )
        return batch

    def _check_domain(self, domain: str) -> None:
        if domain not in self.index["domains"]:
            raise DataError(f"unknown domain {domain!r}; this dataset has {', '.join(self.domains)}")

    def _mixture(self, weights: Mapping[str, float]) -> tuple[list[str], np.ndarray]:
        unknown = [name for name in weights if name not in self.index["domains"]]
        if unknown:
            raise DataError(
                f"unknown domain{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))} in the mixture weights; "
                f"this dataset has {', '.join(self.domains)}"
            )
        values = {}
        for name, w in weights.items():
            try:
                values[name] = float(w)
            except (TypeError, ValueError):
                values[name] = math.nan
            if not (math.isfinite(values[name]) and values[name] >= 0):
                raise DataError(f"mixture weight of domain {name!r} must be a finite number >= 0, not {w!r}")
        # Dataset order, not the mapping's order: the same weights give the same batches.
        names = [d for d in self.domains if values.get(d, 0.0) > 0]
        if not names:
            raise DataError(f"every mixture weight is zero; give at least one of {', '.join(self.domains)} a positive weight")
        probs = np.array([values[d] for d in names], dtype=np.float64)
        return names, probs / probs.sum()


def _windows(tokens: np.ndarray, batch_size: int, seq_len: int, max_batches: int | None) -> Iterator[torch.Tensor]:
    n_windows = len(tokens) // seq_len
    for b, first in enumerate(range(0, n_windows, batch_size)):
        if max_batches is not None and b >= max_batches:
            return
        rows = min(batch_size, n_windows - first)
        block = np.asarray(tokens[first * seq_len : (first + rows) * seq_len], dtype=np.int64)
        yield torch.from_numpy(block.reshape(rows, seq_len))


def _read_index(data_dir: Path) -> dict:
    path = data_dir / INDEX_FILE
    if not data_dir.is_dir():
        raise DataError(f"data folder {data_dir} does not exist; prepare it first with lite-llm data prepare (or lite_llm.data.prepare_data)")
    if not path.is_file():
        raise DataError(f"{data_dir} is not a prepared dataset (it has no {INDEX_FILE}); prepare it first with lite-llm data prepare (or lite_llm.data.prepare_data)")
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
        version = int(index["format_version"])
        index["domains"], index["tokenizer"], index["dtype"]
    except (ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{path} is corrupt; prepare the data again") from exc
    if version > FORMAT_VERSION:
        raise DataError(f"{data_dir} was prepared by a newer Lite LLM (data format {version}); upgrade lite-llm to read it")
    return index


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}; use 'train' or 'val'")


def _check_shape(batch_size: int, seq_len: int) -> None:
    if batch_size < 1 or seq_len < 1:
        raise DataError(f"batch_size and seq_len must be at least 1, not {batch_size} and {seq_len}")
