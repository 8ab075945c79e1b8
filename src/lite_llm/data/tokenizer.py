"""Tokenizers: a byte-level one that needs no training, and byte-level BPE.

Both map *any* text to ids and back exactly, so bits-per-byte is well defined and no input
can crash the data pipeline.  A tokenizer is saved as a folder: ``lite_tokenizer.json`` says
which kind it is (so loading never has to guess), and a BPE tokenizer adds the standard
Hugging Face ``tokenizer.json`` so other tools can read it unchanged.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Iterable, Iterator, Protocol, Sequence, Union

import numpy as np

from ..errors import DataError

LITE_TOKENIZER_FILE = "lite_tokenizer.json"
HF_TOKENIZER_FILE = "tokenizer.json"
EOS_TOKEN = "<|endoftext|>"


class Tokenizer(Protocol):
    """What the rest of Lite LLM relies on from a tokenizer."""

    kind: str
    vocab_size: int
    eos_id: int | None
    eos_ids: tuple[int, ...]
    chat_template: str | None

    def encode(self, text: str) -> list[int]: ...

    def encode_prompt(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str: ...

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]: ...

    def num_bytes(self, text: str) -> int: ...

    def save(self, directory: str | Path) -> None: ...


def _write_meta(directory: Path, meta: dict) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / LITE_TOKENIZER_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")


@dataclass(frozen=True)
class ByteTokenizer:
    """Token id == byte value of the UTF-8 encoding: no training, no unknown tokens.

    ``eos_id`` stays ``None`` by default because all 256 ids are bytes; a run that wants an
    end-of-document marker can reuse a byte that never occurs in its text (e.g. 0).
    """

    eos_id: int | None = None

    kind: ClassVar[str] = "byte"
    vocab_size: ClassVar[int] = 256
    chat_template: ClassVar[str | None] = None
    bos_id: ClassVar[int | None] = None  # bytes have no beginning-of-sequence token

    def __post_init__(self) -> None:
        if self.eos_id is not None and not 0 <= self.eos_id < 256:
            raise DataError(f"a byte tokenizer's eos_id must be a byte value 0-255, not {self.eos_id}")

    @property
    def eos_ids(self) -> tuple[int, ...]:
        return () if self.eos_id is None else (self.eos_id,)

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_prompt(self, text: str) -> list[int]:
        """A prompt's ids: its bytes (a byte tokenizer adds no special tokens)."""
        return self.encode(text)

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """``skip_special_tokens`` drops the end-of-sequence byte, the one special id."""
        if skip_special_tokens and self.eos_id is not None:
            ids = [i for i in ids if i != self.eos_id]
        # Invalid UTF-8 (a model's sample cut mid-character) becomes U+FFFD instead of failing.
        arr = np.asarray(ids, dtype=np.int64).reshape(-1)
        if arr.size and (arr.min() < 0 or arr.max() > 255):
            bad = int(arr[(arr < 0) | (arr > 255)][0])
            raise DataError(f"token id {bad} is not a byte; a byte tokenizer only decodes ids 0-255")
        return arr.astype(np.uint8).tobytes().decode("utf-8", errors="replace")

    def num_bytes(self, text: str) -> int:
        return len(text.encode("utf-8"))

    def token_bytes(self) -> np.ndarray:
        """Bytes of text each id stands for: one, but none for the end-of-sequence id."""
        counts = np.ones(self.vocab_size, dtype=np.int64)
        if self.eos_id is not None:
            counts[self.eos_id] = 0
        return counts

    def save(self, directory: str | Path) -> None:
        _write_meta(Path(directory), {"kind": self.kind, "vocab_size": self.vocab_size, "eos_id": self.eos_id})


class BPETokenizer:
    """Byte-level BPE on the ``tokenizers`` package.

    The ByteLevel pre-tokenizer maps every byte to a symbol before merging and the ByteLevel
    decoder maps back, with no normalizer in between, so ``decode(encode(t)) == t`` for every
    string.  ``backend`` is the underlying ``tokenizers.Tokenizer`` for code that wants offsets
    or batch encoding.  Any Hugging Face ``tokenizer.json`` can be wrapped, but only byte-level
    ones are guaranteed to round-trip.

    ``eos_ids`` are every id that ends a generation (a chat model ends a turn with
    ``<|im_end|>``, not ``<|endoftext|>``), first the main one; without them the tokenizer
    falls back to ``<|endoftext|>``.  ``chat_template`` is the model's Jinja chat template, if
    it has one, and ``bos_token`` the text its ``{{ bos_token }}`` renders (Llama 3, Mistral
    and Gemma templates start with it).  All are kept in ``lite_tokenizer.json``.
    """

    kind: ClassVar[str] = "bpe"

    def __init__(self, backend, eos_ids: Sequence[int] | None = None, chat_template: str | None = None) -> None:
        self.backend = backend
        self._eos_ids = tuple(dict.fromkeys(int(i) for i in eos_ids)) if eos_ids else None
        self.chat_template = chat_template or None
        self.bos_token: str | None = None

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def eos_ids(self) -> tuple[int, ...]:
        if self._eos_ids is not None:
            return self._eos_ids
        default = self.backend.token_to_id(EOS_TOKEN)
        return () if default is None else (default,)

    @eos_ids.setter
    def eos_ids(self, ids: Sequence[int]) -> None:
        self._eos_ids = tuple(dict.fromkeys(int(i) for i in ids)) or None

    @property
    def eos_id(self) -> int | None:
        ids = self.eos_ids
        return ids[0] if ids else None

    @property
    def bos_id(self) -> int | None:
        return self.backend.token_to_id(self.bos_token) if self.bos_token else None

    def encode(self, text: str) -> list[int]:
        """Plain text's ids, no special tokens: what training data and chat templates (which
        write their own ``{{ bos_token }}``) need."""
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_prompt(self, text: str) -> list[int]:
        """A plain prompt's ids as transformers' ``tokenizer(text)`` gives them: with the
        special tokens the tokenizer's post-processor adds (Llama 3's ``<|begin_of_text|>``;
        none for SmolLM2 or a tokenizer trained here)."""
        return self.backend.encode(text, add_special_tokens=True).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        # The Rust side encodes a batch on all cores; ``encode_batch_fast`` (tokenizers >= 0.21)
        # skips offset tracking, about 30% faster on code.
        encode = getattr(self.backend, "encode_batch_fast", self.backend.encode_batch)
        return [e.ids for e in encode(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_bytes(self) -> np.ndarray | None:
        """Bytes of text each id stands for, where that is exact: a byte-level BPE token's
        symbols are one byte each (special tokens none); None for other tokenizers (pieces
        with ``▁`` or ``<0x0A>`` byte fallback), whose text is counted by decoding instead."""
        if type(self.backend.decoder).__name__ != "ByteLevel":
            return None
        special = {t.content for t in self.backend.get_added_tokens_decoder().values() if t.special}
        vocab = self.backend.get_vocab(with_added_tokens=True)
        counts = np.zeros(self.vocab_size, dtype=np.int64)
        for token, i in vocab.items():
            if i < self.vocab_size and token not in special:
                counts[i] = len(token)
        return counts

    def num_bytes(self, text: str) -> int:
        return len(text.encode("utf-8"))

    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        meta: dict = {"kind": self.kind, "vocab_size": self.vocab_size, "eos_id": self.eos_id, "eos_ids": list(self.eos_ids)}
        if self.chat_template is not None:
            meta["chat_template"] = self.chat_template
        if self.bos_token is not None:
            meta["bos_token"] = self.bos_token
        _write_meta(directory, meta)
        self.backend.save(str(directory / HF_TOKENIZER_FILE))

    @classmethod
    def from_file(cls, path: str | Path) -> BPETokenizer:
        """Load a Hugging Face ``tokenizer.json``."""
        from tokenizers import Tokenizer as HFTokenizer

        path = Path(path)
        if not path.is_file():
            raise DataError(f"tokenizer file {path} does not exist")
        try:
            return cls(HFTokenizer.from_file(str(path)))
        except Exception as exc:  # the Rust parser raises a bare Exception
            raise DataError(f"{path} is not a valid tokenizer.json ({_first_line(exc)})") from exc

    @classmethod
    def train(
        cls,
        files: Sequence[Path] | None = None,
        texts: Iterable[str] | None = None,
        vocab_size: int = 4096,
        min_frequency: int = 2,
    ) -> BPETokenizer:
        """Train offline on UTF-8 files and/or strings.

        The initial alphabet is all 256 byte symbols, so every input is covered even if the
        training text never contained a byte.  ``<|endoftext|>`` is added as the end-of-document
        token.  Training may stop short of ``vocab_size`` when no pair reaches ``min_frequency``.
        """
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import decoders, models, pre_tokenizers, trainers

        minimum = 256 + 1
        if vocab_size < minimum:
            raise DataError(f"BPE vocab_size must be at least {minimum} (256 bytes plus end-of-text), not {vocab_size}")
        if files is None and texts is None:
            raise DataError("BPETokenizer.train needs files or texts to learn from")

        backend = HFTokenizer(models.BPE())
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        backend.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            special_tokens=[EOS_TOKEN],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        backend.train_from_iterator(_training_texts(files or [], texts or []), trainer=trainer)
        # Rebuild from the serialised form: the freshly trained model encodes about 2x slower
        # than the same model loaded from JSON (measured, tokenizers 0.23), and this makes a
        # trained tokenizer behave exactly like a saved-and-loaded one.
        return cls(HFTokenizer.from_str(backend.to_str()))


def _training_texts(files: Sequence[Path], texts: Iterable[str]) -> Iterator[str]:
    for f in files:
        try:
            yield Path(f).read_text(encoding="utf-8")
        except FileNotFoundError as exc:
            raise DataError(f"training file {f} does not exist") from exc
        except UnicodeDecodeError as exc:
            raise DataError(f"training file {f} is not UTF-8 text") from exc
    yield from texts


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


AnyTokenizer = Union[ByteTokenizer, BPETokenizer]


def load_tokenizer(directory: str | Path) -> AnyTokenizer:
    """Load a tokenizer saved with ``save`` (or a bare Hugging Face tokenizer folder)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise DataError(f"tokenizer folder {directory} does not exist")
    meta_path = directory / LITE_TOKENIZER_FILE
    hf_path = directory / HF_TOKENIZER_FILE
    if not meta_path.is_file():
        if hf_path.is_file():
            return BPETokenizer.from_file(hf_path)
        raise DataError(f"{directory} holds no tokenizer; expected {LITE_TOKENIZER_FILE} or {HF_TOKENIZER_FILE}")
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        kind, vocab_size = meta["kind"], int(meta["vocab_size"])
    except (ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{meta_path} is corrupt; save the tokenizer again") from exc

    if kind == "byte":
        tok: AnyTokenizer = ByteTokenizer(eos_id=meta.get("eos_id"))
    elif kind == "bpe":
        if not hf_path.is_file():
            raise DataError(f"{directory} says it holds a BPE tokenizer but {HF_TOKENIZER_FILE} is missing")
        tok = BPETokenizer.from_file(hf_path)
        # Checkpoints written before eos_ids existed record only eos_id.
        eos_ids = meta.get("eos_ids", [] if meta.get("eos_id") is None else [meta["eos_id"]])
        tok.eos_ids = [int(i) for i in eos_ids]
        tok.chat_template = meta.get("chat_template") or None
        tok.bos_token = meta.get("bos_token") if isinstance(meta.get("bos_token"), str) else None
    else:
        raise DataError(f"{meta_path} names unknown tokenizer kind {kind!r}; expected 'byte' or 'bpe'")
    if tok.vocab_size != vocab_size:
        raise DataError(f"{directory} is corrupt: it records vocab_size {vocab_size} but the tokenizer has {tok.vocab_size}")
    return tok


def render_chat(tokenizer: Tokenizer, messages: Sequence[dict], *, add_generation_prompt: bool = True) -> str:
    """The tokenizer's chat template applied to ``messages``, rendered as transformers'
    ``apply_chat_template`` does (sandboxed Jinja, ``trim_blocks``/``lstrip_blocks``,
    ``raise_exception``), so the prompt text is the one the model was tuned on."""
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        raise DataError("this tokenizer has no chat template; generate without --chat, or import the model again from a file that has one")
    try:
        from jinja2 import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise DataError("rendering a chat template needs jinja2; install it with `pip install jinja2`") from None

    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    backend = getattr(tokenizer, "backend", None)
    eos = backend.id_to_token(tokenizer.eos_id) if backend is not None and tokenizer.eos_id is not None else None
    try:
        return env.from_string(template).render(
            messages=list(messages), add_generation_prompt=add_generation_prompt, eos_token=eos, bos_token=getattr(tokenizer, "bos_token", None) or ""
        )
    except TemplateError as exc:
        raise DataError(f"the tokenizer's chat template failed to render ({_first_line(exc)}); generate without --chat") from None


def get_tokenizer(spec: str | Path) -> AnyTokenizer:
    """``"byte"`` for the byte tokenizer; otherwise a tokenizer folder or a ``tokenizer.json`` file."""
    if isinstance(spec, str) and spec == "byte":
        return ByteTokenizer()
    path = Path(spec).expanduser()
    if path.is_dir():
        return load_tokenizer(path)
    if path.is_file():
        return BPETokenizer.from_file(path)
    raise DataError(f"unknown tokenizer {str(spec)!r}; use 'byte', a tokenizer folder or a tokenizer.json file")
