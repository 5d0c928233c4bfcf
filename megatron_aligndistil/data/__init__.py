"""Tokenized records (validated: ``records`` for JSON lines, ``indexed`` for Megatron's indexed
format), deterministic sampling, and micro-batches with loss masks (``batching``)."""

from __future__ import annotations

from .indexed import indexed_prefix, read_indexed
from .records import Dataset, read_jsonl


def read_records(path: str, kind: str, vocab_size: int, max_tokens: int | None = None,
                 skip_bad: bool = False) -> Dataset:
    """``--data-path``: a JSONL file, or the prefix of an indexed dataset (``PREFIX.bin`` and
    ``PREFIX.idx``; ``data.indexed``). Same checks and errors for both."""
    prefix = indexed_prefix(path)
    if prefix is not None:
        return read_indexed(prefix, kind, vocab_size, max_tokens=max_tokens, skip_bad=skip_bad)
    return read_jsonl(path, kind, vocab_size, max_tokens=max_tokens, skip_bad=skip_bad)
