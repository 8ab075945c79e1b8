"""Logprobs as OpenAI's two formats show them, from the engine's :class:`~.engine.TokenLogprob`.

Completions (the legacy format)::

    {"tokens": [...], "token_logprobs": [...], "top_logprobs": [{text: logprob}, ...], "text_offset": [...]}

``top_logprobs`` holds the ``logprobs`` likeliest tokens and the sampled one (so up to n + 1
entries, as OpenAI says); with ``echo`` the prompt's tokens come first, the first of them
with ``None`` for its logprob and its top.  Chat::

    {"content": [{"token", "logprob", "bytes", "top_logprobs": [{"token", "logprob", "bytes"}]}]}

What is shown, and the choices made:

* values are the model's raw log-softmax in float32 (before logit bias, penalties,
  temperature and filters: vLLM's default), clamped at -9999 as vLLM does (JSON has no -inf);
* there is one entry per generated token — ``usage.completion_tokens`` of them — including
  the end-of-sequence token and the tokens of a stop string, whose text is not in the reply
  (vLLM counts them too);
* a token's text is what the tokenizer decodes it to alone (a piece of a multi-byte
  character decodes to U+FFFD); its ``bytes`` are its exact bytes where the tokenizer says
  (byte tokenizers, byte-level BPE, SentencePiece's ``<0xNN>`` byte tokens), else its text's;
* ``text_offset`` of a token is the length of the text the tokens before it decode to (after
  the echoed prompt, with echo): where its text starts, except that a piece of a multi-byte
  character points past the replacement character its unfinished prefix decodes to; a token
  after a stop string's start points past the cut text;
* streamed, each chunk carries the entries of the tokens sampled since the previous chunk: a
  token whose text is held back (a possible stop-string prefix, an unfinished character)
  rides with the chunk that sends that text, and the tokens that make no text (the end of
  sequence, a stop string) with the next chunk, the finishing one at the latest.  The chunks'
  entries together are the whole response's, in order.
"""

from __future__ import annotations

import codecs
import json
import re
from typing import Any, Sequence

from .engine import TokenLogprob

FLOOR = -9999.0  # vLLM's floor for logprobs in its answers: -inf is not JSON
_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-to-symbol table, inverted: the symbol a byte-level BPE writes for each byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1), *range(ord("\u00ae"), ord("\u00ff") + 1)]
    symbols = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            symbols.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, symbols)}


def _decoder_kinds(spec: Any) -> set[str]:
    """Every decoder type named in a ``tokenizer.json`` decoder spec (through Sequences)."""
    if isinstance(spec, dict):
        kinds = {str(spec.get("type"))}
        for inner in spec.get("decoders") or ():
            kinds |= _decoder_kinds(inner)
        return kinds
    return set()


class TokenTexts:
    """Each token id's shown text and bytes, and the bytes it adds to a reply's text; cached."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self._mode: str | None = None
        self._special: set[int] = set()
        self._cache: dict[int, tuple[str, bytes, bytes | None]] = {}

    def _setup(self) -> str:
        if self._mode is None:
            if getattr(self.tokenizer, "kind", "") == "byte":
                self._mode = "byte"
            else:
                backend = getattr(self.tokenizer, "backend", None)
                kinds: set[str] = set()
                if backend is not None:
                    try:
                        kinds = _decoder_kinds(json.loads(backend.to_str()).get("decoder"))
                        self._special = {i for i, t in backend.get_added_tokens_decoder().items() if t.special}
                    except Exception:  # an unusual backend: fall back to decoding
                        kinds = set()
                self._mode = "byte_level" if "ByteLevel" in kinds else ("pieces" if kinds & {"Metaspace", "ByteFallback"} else "decode")
        return self._mode

    @property
    def exact(self) -> bool:
        """Whether a reply's text is its tokens' :meth:`text_bytes` decoded as UTF-8."""
        return self._setup() in ("byte", "byte_level")

    def _entry(self, token: int) -> tuple[str, bytes, bytes | None]:
        hit = self._cache.get(token)
        if hit is not None:
            return hit
        mode = self._setup()
        if mode == "byte":
            raw = bytes([token]) if 0 <= token < 256 else b""
            shown, in_text = raw.decode("utf-8", errors="replace"), raw
            entry = (shown, raw, raw if token not in getattr(self.tokenizer, "eos_ids", ()) else b"")
        else:
            shown = self.tokenizer.decode([token])
            raw, in_text = shown.encode("utf-8"), None
            piece = self.tokenizer.backend.id_to_token(token) if hasattr(self.tokenizer, "backend") else None
            if token in self._special:
                in_text = b""
            elif piece is not None and mode == "byte_level":
                table = _BYTE_LEVEL
                if all(c in table for c in piece):
                    raw = in_text = bytes(table[c] for c in piece)
                    shown = raw.decode("utf-8", errors="replace")
                else:  # a non-special added token: its text as written
                    in_text = raw
            elif piece is not None and mode == "pieces":
                byte = _BYTE_TOKEN.fullmatch(piece)
                raw = bytes([int(byte.group(1), 16)]) if byte else piece.replace("\u2581", " ").encode("utf-8")
                shown = raw.decode("utf-8", errors="replace")
            entry = (shown, raw, in_text)
        self._cache[token] = entry
        return entry

    def text(self, token: int) -> str:
        return self._entry(token)[0]

    def bytes(self, token: int) -> bytes:
        return self._entry(token)[1]

    def text_bytes(self, token: int) -> bytes:
        """The bytes ``token`` adds to a reply's text (none for special tokens); only when :attr:`exact`."""
        return self._entry(token)[2] or b""


_BYTE_LEVEL = _byte_level_alphabet()


class _Offsets:
    """Character offsets of successive tokens in the text they decode to, from ``start``."""

    def __init__(self, texts: TokenTexts, start: int) -> None:
        self.texts, self.start = texts, start
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace") if texts.exact else None
        self._chars = 0
        self._ids: list[int] = []

    def next(self, token: int) -> int:
        if self._decoder is not None:  # the emitted characters, and those the bytes still pending would end as
            offset = self.start + self._chars + len(self._decoder.getstate()[0].decode("utf-8", errors="replace"))
            self._chars += len(self._decoder.decode(self.texts.text_bytes(token)))
            return offset
        # other tokenizers: the decoded prefix's length (quadratic, but exact for any tokenizer)
        offset = self.start + len(self.texts.tokenizer.decode(self._ids, skip_special_tokens=True)) if self._ids else self.start
        self._ids.append(token)
        return offset


def _lp(value: float) -> float:
    return max(value, FLOOR)


class LogprobFormat:
    """One response's logprobs, chunk by chunk (offsets carry on across chunks).

    ``top`` is how many of the likeliest tokens each entry lists; ``text_start`` is where the
    generated text starts in the reply (the echoed prompt's length)."""

    def __init__(self, texts: TokenTexts, *, chat: bool, top: int, text_start: int = 0) -> None:
        self.texts, self.chat, self.top = texts, chat, top
        self._offsets = _Offsets(texts, text_start)

    def render(self, generated: Sequence[TokenLogprob], prompt: Sequence[TokenLogprob] | None = None) -> dict:
        """The ``logprobs`` object for these entries: the echoed prompt's first (completions)."""
        if self.chat:
            return {"content": [self._chat(e) for e in generated]}
        out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        if prompt:
            offsets = _Offsets(self.texts, 0)
            for entry in prompt:
                self._legacy(out, entry, offsets)
        for entry in generated:
            self._legacy(out, entry, self._offsets)
        return out

    def _legacy(self, out: dict[str, list], entry: TokenLogprob, offsets: _Offsets) -> None:
        text = self.texts.text
        out["tokens"].append(text(entry.token))
        out["text_offset"].append(offsets.next(entry.token))
        if entry.logprob is None:
            out["token_logprobs"].append(None)
            out["top_logprobs"].append(None)
            return
        out["token_logprobs"].append(_lp(entry.logprob))
        top: dict[str, float] = {}
        for token, value in entry.top or ():
            top.setdefault(text(token), _lp(value))  # two ids with one text: the likelier's
        top.setdefault(text(entry.token), _lp(entry.logprob))
        out["top_logprobs"].append(top)

    def _chat(self, entry: TokenLogprob) -> dict:
        def one(token: int, value: float) -> dict:
            return {"token": self.texts.text(token), "logprob": _lp(value), "bytes": list(self.texts.bytes(token))}

        return {**one(entry.token, entry.logprob), "top_logprobs": [one(t, v) for t, v in entry.top or ()]}
