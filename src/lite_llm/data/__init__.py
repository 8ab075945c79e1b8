"""Data: corpora, tokenizers, prepared token files and reproducible batches.

The path from text to a training batch::

    from lite_llm.data import ByteTokenizer, TokenData, prepare_data
    prepare_data({"code": "stdlib-code", "prose": "stdlib-docs"}, "data/std", ByteTokenizer())
    data = TokenData("data/std")
    batch, domains = data.sample_batch("train", {"code": 0.7, "prose": 0.3}, 8, 256, seed=0, step=0)

Nothing here touches the network: corpora are the user's files or what ships with Python.
"""

from .loader import TokenData
from .prepare import prepare_data
from .sources import BUILTIN_SOURCES, resolve_source
from .tokenizer import BPETokenizer, ByteTokenizer, get_tokenizer, load_tokenizer

__all__ = [
    "BPETokenizer",
    "BUILTIN_SOURCES",
    "ByteTokenizer",
    "TokenData",
    "get_tokenizer",
    "load_tokenizer",
    "prepare_data",
    "resolve_source",
]
