"""Tokenized records in Megatron's mmap'd indexed-dataset format (``megatron.core.datasets.indexed_dataset``).

``PREFIX.bin`` holds the token ids, ``PREFIX.idx`` the sequence lengths, byte offsets and document
boundaries. Each record is one *document* whose sequences are its fields in the JSONL order
(:data:`~megatron_aligndistil.data.records.KINDS`)::

    distillation / SFT : [prompt, response]            (``<prefix>_chosen``)
    DPO                : [prompt, chosen, rejected]    (``<prefix>_pairs``)
    on-policy          : [prompt]                      (``<prefix>_prompts``; any document's first
                                                        sequence serves as a prompt)

``--data-path PREFIX`` (no extension) selects this format. Nothing is read whole: every rank maps
both files, validates them with vectorised passes over the index and one streamed pass over the
ids, and reads a record's ids only when a batch needs them, so its resident memory does not grow
with the dataset (``docs/training.md`` has the measurements). Damaged files are refused with the
file named: a truncated ``.bin``, an ``.idx`` of another ``.bin``, documents of the wrong shape,
empty fields, records past ``--seq-length``, ids outside the tokenizer's vocabulary.
"""

from __future__ import annotations

import os
import struct
from collections import Counter

import numpy as np

from .records import KINDS, DataError, Dataset

HEADER = b"MMIDIDX\x00\x00"  # megatron.core.datasets.indexed_dataset._INDEX_HEADER
_FIXED = 9 + 8 + 1 + 8 + 8  # header, version, dtype code, sequence count, document count
_DTYPES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 6: np.float64, 7: np.float32,
           8: np.uint16}  # Megatron's DType codes (its float codes hold no token ids: refused)
_SCAN_TOKENS = 1 << 22  # ids read per step of the vocabulary scan (16 MiB of int32)


def indexed_prefix(path: str) -> str | None:
    """The indexed-dataset prefix ``path`` names (``PREFIX``, ``PREFIX.bin`` or ``PREFIX.idx``),
    or None when it names something else (a JSONL file)."""
    for suffix in (".bin", ".idx"):
        if path.endswith(suffix):
            return path[: -len(suffix)]
    if os.path.isfile(path):
        return None
    return path if os.path.exists(path + ".idx") or os.path.exists(path + ".bin") else None


class IndexedWriter:
    """Write records of ``kind`` to ``PREFIX.bin``/``PREFIX.idx`` (both published together on
    :meth:`commit`: a crash leaves no half-written pair). ``vocab_size`` picks the id dtype
    (uint16 below 65,500 ids, else int32, as Megatron's preprocessing does)."""

    def __init__(self, prefix: str, kind: str, vocab_size: int):
        from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

        self.prefix, self.fields, self.vocab_size = prefix, KINDS[kind], vocab_size
        self.dtype = DType.optimal_dtype(vocab_size)
        self._builder = IndexedDatasetBuilder(prefix + ".bin.tmp", dtype=self.dtype)

    def add(self, record: dict) -> None:
        seqs = [record[name] for name in self.fields]
        try:
            ids = np.fromiter((t for s in seqs for t in s), dtype=self.dtype)
        except OverflowError:
            info = np.iinfo(self.dtype)
            bad = next(t for s in seqs for t in s if not info.min <= t <= info.max)
            raise DataError(f"token id {bad} does not fit the {np.dtype(self.dtype).name} ids of {self.prefix}.bin "
                            f"(vocabulary of {self.vocab_size} ids): the vocabulary size given to the writer is "
                            "smaller than the tokenizer's largest id + 1") from None
        self._builder.add_document(ids, [len(s) for s in seqs])

    def commit(self) -> None:
        self._builder.finalize(self.prefix + ".idx.tmp")
        os.replace(self.prefix + ".bin.tmp", self.prefix + ".bin")
        os.replace(self.prefix + ".idx.tmp", self.prefix + ".idx")

    def abort(self) -> None:
        self._builder.data_file.close()
        for suffix in (".bin.tmp", ".idx.tmp"):
            if os.path.exists(self.prefix + suffix):
                os.remove(self.prefix + suffix)


def _check_files(prefix: str) -> tuple[type, int, int]:
    """Header and sizes of the pair, before Megatron's reader (which asserts) sees it."""
    idx, bin_ = prefix + ".idx", prefix + ".bin"
    for f in (idx, bin_):
        if not os.path.isfile(f):
            raise DataError(f"{f} not found: --data-path {prefix} names an indexed dataset, which is "
                            f"{prefix}.idx and {prefix}.bin (tools/preprocess_data.py writes both)")
    size = os.path.getsize(idx)
    with open(idx, "rb") as f:
        head = f.read(_FIXED)
    if len(head) < _FIXED or head[:9] != HEADER:
        raise DataError(f"{idx}: not a Megatron indexed-dataset index (no {HEADER!r} header)")
    version, code, n_seq, n_doc = struct.unpack("<QBQQ", head[9:])
    if version != 1 or code not in _DTYPES:
        raise DataError(f"{idx}: unsupported index (version {version}, dtype code {code})")
    if np.dtype(_DTYPES[code]).kind == "f":
        raise DataError(f"{idx}: token ids stored as {np.dtype(_DTYPES[code]).name}: an index of ids has an integer "
                        "dtype (tools/preprocess_data.py writes uint16 or int32)")
    expected = _FIXED + 12 * n_seq + 8 * n_doc  # lengths int32, pointers int64, document indices int64
    if size < expected:
        raise DataError(f"{idx}: truncated ({size} bytes; its header announces {n_seq} sequences "
                        f"in {n_doc - 1} documents)")
    if size > expected:  # a multimodal index (modes per sequence) or another file appended: not ours
        raise DataError(f"{idx}: {size} bytes, {size - expected} more than its header announces ({n_seq} sequences "
                        f"in {n_doc - 1} documents): a multimodal index or a damaged file")
    return _DTYPES[code], n_seq, n_doc


class _IndexedRecords:
    """``records[i]``: a dict of id lists, read from the mapped ``.bin`` on demand."""

    def __init__(self, dataset, fields: tuple, kept: np.ndarray | None):
        self._dataset, self._fields, self._kept = dataset, fields, kept
        self._first = dataset.document_indices  # first sequence of each document

    def __len__(self):
        return len(self._first) - 1 if self._kept is None else len(self._kept)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        doc = int(i) if self._kept is None else int(self._kept[i])
        if not 0 <= doc < len(self._first) - 1:
            raise IndexError(i)
        first = int(self._first[doc])
        return {name: self._dataset[first + k].tolist() for k, name in enumerate(self._fields)}


def _bad_tokens(prefix: str, dtype, pointers: np.ndarray, lengths: np.ndarray, vocab_size: int):
    """Sequence indices holding an id outside ``[0, vocab_size)`` with the first such id of each:
    one streamed pass over the ``.bin`` in ``_SCAN_TOKENS`` blocks (read, not mapped, so the scan
    leaves no pages resident)."""
    bad_pos, bad_ids = [], []
    with open(prefix + ".bin", "rb") as f:
        start = 0
        while True:
            block = np.fromfile(f, dtype=dtype, count=_SCAN_TOKENS)
            if not block.size:
                break
            # negative ids read as unsigned are huge: one comparison, one temporary
            wrong = (block.view(block.dtype.str.replace("i", "u")) if block.dtype.kind == "i" else block) >= vocab_size
            if wrong.any():
                where = np.flatnonzero(wrong)
                bad_pos.append(where + start)
                bad_ids.append(block[where])
            start += block.size
    if not bad_pos:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    pos, ids = np.concatenate(bad_pos), np.concatenate(bad_ids).astype(np.int64)
    token_start = pointers // np.dtype(dtype).itemsize
    seq = np.searchsorted(token_start, pos, side="right") - 1
    seq_first, first = np.unique(seq, return_index=True)
    return seq_first, ids[first]


def read_indexed(prefix: str, kind: str, vocab_size: int, max_tokens: int | None = None,
                 skip_bad: bool = False) -> Dataset:
    """The :class:`~megatron_aligndistil.data.records.Dataset` of ``PREFIX.bin/.idx`` with the
    checks of ``read_jsonl`` (``max_tokens``, ``skip_bad``); errors name the file and the record
    (0-based document number)."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    fields = KINDS[kind]
    dtype, n_seq, n_doc = _check_files(prefix)
    bin_bytes = os.path.getsize(prefix + ".bin")
    dataset = IndexedDataset(prefix, mmap=True)
    lengths = dataset.sequence_lengths
    pointers = dataset.index.sequence_pointers
    first = dataset.document_indices
    described = int(lengths.sum(dtype=np.int64)) * np.dtype(dtype).itemsize
    if bin_bytes != described:
        raise DataError(f"{prefix}.bin: {bin_bytes} bytes, but {prefix}.idx describes {described} "
                        f"({'a truncated .bin' if bin_bytes < described else 'not the .bin of this .idx'}; "
                        "rerun tools/preprocess_data.py)")
    expected_pointers = np.zeros(n_seq, dtype=np.int64)  # one temporary of 8 bytes a sequence
    np.cumsum(lengths[:-1], out=expected_pointers[1:])
    expected_pointers *= np.dtype(dtype).itemsize
    if not np.array_equal(pointers, expected_pointers) or first[0] != 0 or first[-1] != n_seq or (
            np.diff(first) < 0).any():
        raise DataError(f"{prefix}.idx: inconsistent index (sequence offsets or document boundaries)")
    per_doc = np.diff(first)
    shape_ok = per_doc >= 1 if kind == "prompt" else per_doc == len(fields)
    if not shape_ok.all():
        doc = int(np.flatnonzero(~shape_ok)[0])
        named = {1: "prompts", 2: "prompt/response (distillation, SFT)", 3: "prompt/chosen/rejected (DPO)"}
        raise DataError(f"{prefix}.idx: record {doc} has {per_doc[doc]} sequences, but {kind} data has "
                        f"{len(fields)} ({', '.join(fields)}); this file holds "
                        f"{named.get(int(per_doc[doc]), 'another layout')}")
    dropped = np.zeros(n_doc - 1, dtype=bool)
    skipped = Counter()

    def mark(docs: np.ndarray, message) -> None:
        """Refuse (or with ``skip_bad`` drop and count, as ``read_jsonl`` does) records ``docs``."""
        docs = docs[~dropped[docs]]
        if not docs.size:
            return
        if not skip_bad:
            raise DataError(f"{prefix}: record {int(docs[0])}: {message(int(docs[0]))}")
        dropped[docs] = True
        for d in docs.tolist():
            skipped[message(d).split(" (")[0]] += 1

    seq_lengths = [lengths[first[:-1] + k] for k in range(len(fields))]
    for k, name in enumerate(fields):
        empty = np.flatnonzero(seq_lengths[k] == 0)
        mark(empty, lambda d, name=name: f"field {name!r} is empty")
    if max_tokens is not None:
        total = seq_lengths[0].astype(np.int64) + (np.maximum.reduce(seq_lengths[1:]) if len(fields) > 1 else 0)
        long_ = np.flatnonzero(total > max_tokens)
        mark(long_, lambda d: f"{int(total[d])} tokens (prompt + response) exceed the limit of {max_tokens} "
                              "(--seq-length + 1)")
    del expected_pointers
    bad_seq, bad_id = _bad_tokens(prefix, dtype, pointers, lengths, vocab_size)
    if bad_seq.size:
        doc_of = np.searchsorted(first, bad_seq, side="right") - 1
        in_fields = (bad_seq - first[doc_of]) < len(fields)  # prompt data: later sequences are unused
        for field_index in range(len(fields)):
            sel = in_fields & (bad_seq - first[doc_of] == field_index)
            order = {int(d): int(t) for d, t in zip(doc_of[sel], bad_id[sel])}
            mark(np.unique(doc_of[sel]), lambda d, name=fields[field_index]: (
                f"field {name!r} has token id {order[d]} outside the vocabulary [0, {vocab_size})"))
    kept = None
    if dropped.any():
        kept = np.flatnonzero(~dropped)
        if not kept.size:
            raise DataError(f"{prefix}: no usable {kind} records ({int(dropped.sum())} skipped)")
    if n_doc - 1 == 0:
        raise DataError(f"{prefix}: no usable {kind} records")
    return Dataset(prefix, kind, records=_IndexedRecords(dataset, fields, kept), skipped=skipped)
