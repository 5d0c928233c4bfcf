"""Tokenized records (SPEC section 3), validated with errors that name file, line and field.

    distillation / SFT : {"prompt_ids": [...], "response_ids": [...]}
    DPO                : {"prompt_ids": [...], "chosen_ids": [...], "rejected_ids": [...]}
    on-policy          : {"prompt_ids": [...]}

JSON lines are the readable format, read whole into every rank; the same records in Megatron's
indexed format (``data.indexed``) are mapped, not read. ``data.read_records`` takes either.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field

from ..core.errors import UserError

KINDS = {
    "distill": ("prompt_ids", "response_ids"),
    "dpo": ("prompt_ids", "chosen_ids", "rejected_ids"),
    "prompt": ("prompt_ids",),
}


class DataError(UserError):
    """A record is malformed; the message names the file, the line and the field."""


@dataclass
class Dataset:
    """Validated records (dicts of id lists) and what was skipped, by reason."""

    path: str
    kind: str
    records: list = field(default_factory=list)  # a list (JSONL) or a lazy sequence (indexed)
    lines: list = field(default_factory=list)  # JSONL: 1-based source line of each record
    skipped: Counter = field(default_factory=Counter)

    def __len__(self):
        return len(self.records)


def parse_json_object(text: str, where: str, not_object: str, error=None) -> dict:
    """``text`` as a JSON object, or ``error`` (default :class:`DataError`) with ``where``:
    ``<where>: malformed JSON (...)`` or ``<where>: <not_object>``."""
    error = error or DataError
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise error(f"{where}: malformed JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(obj, dict):
        raise error(f"{where}: {not_object}")
    return obj


def _check_ids(value, where: str, field_name: str, vocab_size: int, allow_empty: bool):
    if not isinstance(value, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in value):
        raise DataError(f"{where}: field {field_name!r} must be a list of integer token ids")
    if not value and not allow_empty:
        raise DataError(f"{where}: field {field_name!r} is empty")
    bad = [t for t in value if t < 0 or t >= vocab_size]
    if bad:
        raise DataError(f"{where}: field {field_name!r} has token id {bad[0]} outside the vocabulary "
                        f"[0, {vocab_size})")


def read_jsonl(path: str, kind: str, vocab_size: int, max_tokens: int | None = None,
               skip_bad: bool = False) -> Dataset:
    """Read and validate ``path``. ``max_tokens`` bounds prompt + longest response (the model sees
    ``max_tokens - 1`` input positions). With ``skip_bad`` bad records are counted, not fatal."""
    if kind not in KINDS:
        raise ValueError(f"unknown data kind {kind!r}; one of {sorted(KINDS)}")
    fields = KINDS[kind]
    ds = Dataset(path, kind)
    try:
        f = open(path)
    except FileNotFoundError:
        raise DataError(f"{path}: data file not found (--data-path)") from None
    with f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                obj = parse_json_object(line, where, "a record must be a JSON object")
                for name in fields:
                    if name not in obj:
                        raise DataError(f"{where}: missing field {name!r} (a {kind} record has {list(fields)})")
                    _check_ids(obj[name], where, name, vocab_size, allow_empty=False)
                total = len(obj["prompt_ids"]) + max((len(obj[n]) for n in fields[1:]), default=0)
                if max_tokens is not None and total > max_tokens:
                    raise DataError(f"{where}: {total} tokens (prompt + response) exceed the limit of "
                                    f"{max_tokens} (--seq-length + 1)")
            except DataError as exc:
                if not skip_bad:
                    raise
                ds.skipped[str(exc).split(": ", 1)[1].split(" (")[0]] += 1
                continue
            ds.records.append({name: obj[name] for name in fields})
            ds.lines.append(lineno)
    if not ds.records:
        raise DataError(f"{path}: no usable {kind} records"
                        + (f" ({sum(ds.skipped.values())} skipped)" if ds.skipped else ""))
    return ds
