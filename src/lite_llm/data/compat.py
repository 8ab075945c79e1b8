"""Whether a prepared dataset fits a model: tokenized by the model's own tokenizer.

A dataset holds token ids, not text.  Scored by a model with another tokenizer, ids beyond
its vocabulary crash the embedding, and ids within it are other words: the loss and bits per
byte come out as plausible numbers that mean nothing; trained on them, a model learns other
words under its old ids.  So every evaluation, and every training run that starts from a
checkpoint, compares the two tokenizers before the first batch.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import DataError

# The parts of a tokenizer.json that decide which ids a text becomes; padding, truncation,
# the post-processor (special tokens added at encode time, which data preparation does not
# ask for) and the decoder do not change the ids of prepared data.
_ENCODING_PARTS = ("normalizer", "pre_tokenizer", "model", "added_tokens")


def _encoding(tokenizer: Any) -> tuple[Any, ...]:
    """What decides a tokenizer's ids: its kind and vocabulary size, and for BPE the parts of
    its ``tokenizer.json`` listed in ``_ENCODING_PARTS``."""
    backend = getattr(tokenizer, "backend", None)
    if backend is None:
        return (tokenizer.kind, tokenizer.vocab_size)
    spec = json.loads(backend.to_str())
    return (tokenizer.kind, tokenizer.vocab_size, *(json.dumps(spec.get(part), sort_keys=True) for part in _ENCODING_PARTS))


def same_encoding(a: Any, b: Any) -> bool:
    """Whether tokenizers ``a`` and ``b`` turn text into the same ids (a distillation teacher
    and its student must: their distributions are compared id by id)."""
    return _encoding(a) == _encoding(b)


def check_data_tokenizer(data_tokenizer: Any, data_dir: str | Path, model_tokenizer: Any, vocab_size: int, checkpoint: object) -> None:
    """Refuse to score or train ``checkpoint`` on data tokenized by another tokenizer than its own
    (``model_tokenizer``; None when the checkpoint has none, and then only the vocabulary
    size can be checked)."""
    fix = f"prepare the data again with the checkpoint's tokenizer (lite-llm data prepare ... --tokenizer {checkpoint}/tokenizer)"
    if data_tokenizer.vocab_size > vocab_size:
        raise DataError(
            f"the data in {data_dir} was tokenized with {data_tokenizer.vocab_size} token ids but checkpoint {checkpoint} has {vocab_size}; {fix}"
        )
    if model_tokenizer is not None and not same_encoding(data_tokenizer, model_tokenizer):
        raise DataError(
            f"the data in {data_dir} was tokenized by another tokenizer ({data_tokenizer.kind}, {data_tokenizer.vocab_size} tokens) than "
            f"checkpoint {checkpoint}'s ({model_tokenizer.kind}, {model_tokenizer.vocab_size} tokens), so its scores and training would mean nothing; {fix}"
        )
