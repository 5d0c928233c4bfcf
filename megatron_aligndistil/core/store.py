"""Streaming safetensors I/O: a lazy reader over a (possibly sharded) directory, and writers that
put each tensor's bytes on disk as it arrives (memory: that one tensor, never a shard). Errors
name the file and tensor.

Layout (the HF convention, used for HF and Megatron directories alike)::

    DIR/model.safetensors                                  (one file), or
    DIR/model-00001-of-00003.safetensors ... + DIR/model.safetensors.index.json
"""

from __future__ import annotations

import json
import math
import os
import shutil
import struct
from contextlib import ExitStack

import torch

from .errors import UserError

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
DEFAULT_MAX_SHARD_BYTES = 5 * 2**30  # HF's default shard size


class CheckpointError(UserError):
    """A checkpoint file is missing, truncated, or lacks a tensor (named in the message)."""


class TensorStore:
    """Read tensors by name from DIR, one at a time (memory: the tensor asked for, or a slice of it).

    Use as a context manager so the files are closed::

        with TensorStore(path) as store:
            t = store.get("model.norm.weight")
            part = store.get_slice("lm_head.weight", dim=0, start=0, stop=1024)
    """

    def __init__(self, path: str):
        from safetensors import safe_open

        self.path = path
        index_path = os.path.join(path, INDEX)
        if os.path.exists(index_path):
            try:
                with open(index_path) as f:
                    weight_map = json.load(f)["weight_map"]
            except (json.JSONDecodeError, KeyError) as exc:
                raise CheckpointError(f"{index_path}: not a valid safetensors index ({exc})") from exc
        elif os.path.exists(os.path.join(path, SINGLE)):
            weight_map = None
        else:
            raise CheckpointError(f"{path}: no {SINGLE} and no {INDEX}")
        files = sorted(set(weight_map.values())) if weight_map else [SINGLE]
        self._stack = ExitStack()
        self._handles = {}
        for name in files:
            fpath = os.path.join(path, name)
            if not os.path.exists(fpath):
                raise CheckpointError(f"{fpath}: shard listed in {INDEX} is missing")
            try:
                self._handles[name] = self._stack.enter_context(safe_open(fpath, "pt"))
            except Exception as exc:  # safetensors raises its own error type for bad headers
                raise CheckpointError(f"{fpath}: unreadable or truncated safetensors file ({exc})") from exc
        if weight_map is None:
            weight_map = {k: SINGLE for k in self._handles[SINGLE].keys()}
        else:
            for key, fname in weight_map.items():
                if key not in self._handles[fname].keys():
                    raise CheckpointError(f"{os.path.join(path, fname)}: tensor {key!r} listed in {INDEX} is absent")
        self.weight_map = weight_map

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        self._stack.close()

    def keys(self):
        return self.weight_map.keys()

    def __contains__(self, name):
        return name in self.weight_map

    def _handle(self, name):
        if name not in self.weight_map:
            raise CheckpointError(f"{self.path}: tensor {name!r} not found")
        return self._handles[self.weight_map[name]]

    def get(self, name: str) -> torch.Tensor:
        return self._handle(name).get_tensor(name)

    def shape(self, name: str) -> list[int]:
        return list(self._handle(name).get_slice(name).get_shape())

    def get_slice(self, name: str, dim: int, start: int, stop: int) -> torch.Tensor:
        """``tensor.narrow(dim, start, stop - start)`` read from disk without loading the rest."""
        sl = self._handle(name).get_slice(name)
        index = tuple([slice(None)] * dim + [slice(start, stop)])
        return sl[index]


# safetensors' dtype names (https://github.com/huggingface/safetensors, format spec)
_SAFETENSORS_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                       torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
                       torch.uint8: "U8", torch.bool: "BOOL", torch.float8_e4m3fn: "F8_E4M3",
                       torch.float8_e5m2: "F8_E5M2"}
_COPY_CHUNK = 64 << 20


class SafetensorsFileWriter:
    """One safetensors file written tensor by tensor: each tensor's bytes go to disk when it is
    added, so memory holds one tensor (and its CPU copy), never the file's contents.

    The format puts a JSON header (names, dtypes, shapes, byte offsets) before the data, so the
    writer leaves ``reserve`` bytes for it and fills them on :meth:`close`, padded with spaces as
    the format allows. A header that outgrows the reservation, or a file whose data is small
    next to it, is rewritten compactly (header, then the data copied in 64 MiB chunks).
    :attr:`header_bytes` is the header's size, for sizing the next file's reservation."""

    def __init__(self, path: str, reserve: int = 256 << 10, metadata: dict | None = None):
        self.path, self.reserve = path, reserve
        self.metadata = {"format": "pt"} if metadata is None else metadata
        self._entries: dict[str, dict] = {}
        self.data_bytes = 0
        self.header_bytes = 0
        self._file = open(path, "wb")
        self._file.seek(8 + reserve)

    def add(self, name: str, tensor: torch.Tensor) -> None:
        self.add_pieces(name, tensor.dtype, list(tensor.shape), [tensor])

    def add_pieces(self, name: str, dtype: torch.dtype, shape: list[int], pieces) -> None:
        """One tensor of ``dtype`` and ``shape`` whose row-major bytes are the concatenation of
        ``pieces`` (tensors of ``dtype``, on any device), each written as it comes: memory holds
        one piece. Refused when the pieces do not add up to the shape."""
        if name in self._entries:
            raise ValueError(f"{self.path}: tensor {name!r} added twice")
        if dtype not in _SAFETENSORS_DTYPES:
            raise TypeError(f"{self.path}: tensor {name!r} has dtype {dtype}, which safetensors cannot hold")
        start = self.data_bytes
        for piece in pieces:
            if piece.dtype != dtype:
                raise TypeError(f"{self.path}: a piece of tensor {name!r} has dtype {piece.dtype}, not {dtype}")
            data = piece.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
            self._file.write(data.numpy().data)  # the piece's own memory, no bytes copy
            self.data_bytes += data.numel()
        want = math.prod(shape) * dtype.itemsize
        if self.data_bytes - start != want:
            raise ValueError(f"{self.path}: tensor {name!r} of shape {list(shape)} needs {want} bytes, its pieces "
                             f"held {self.data_bytes - start}")
        self._entries[name] = {"dtype": _SAFETENSORS_DTYPES[dtype], "shape": list(shape),
                               "data_offsets": [start, self.data_bytes]}

    def __len__(self) -> int:
        return len(self._entries)

    def names(self) -> list[str]:
        return list(self._entries)

    def close(self) -> None:
        header = json.dumps({"__metadata__": self.metadata, **self._entries}, separators=(",", ":")).encode()
        header += b" " * (-len(header) % 8)  # 8-byte alignment of the data, as safetensors writes it
        self.header_bytes = len(header)
        if len(header) <= self.reserve and self.data_bytes >= 16 * self.reserve:
            self._file.seek(0)
            self._file.write(struct.pack("<Q", self.reserve) + header.ljust(self.reserve, b" "))
            self._file.close()
            return
        self._file.close()
        compact = self.path + ".compact"
        with open(self.path, "rb") as src, open(compact, "wb") as dst:
            dst.write(struct.pack("<Q", len(header)) + header)
            src.seek(8 + self.reserve)
            shutil.copyfileobj(src, dst, _COPY_CHUNK)
        os.replace(compact, self.path)

    def abort(self) -> None:
        """Close without a header (after an error: the file is not valid safetensors)."""
        self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close() if exc[0] is None else self.abort()


class ShardedWriter:
    """Write tensors one by one into ``DIR.tmp`` (each tensor on disk as it arrives; shards of at
    most ``max_shard_bytes`` unless one tensor is larger), then publish atomically as DIR (rename)
    on :meth:`commit`. A crash leaves DIR untouched.
    """

    def __init__(self, path: str, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, overwrite: bool = False):
        self.path = os.path.abspath(path)
        if os.path.exists(self.path) and os.listdir(self.path) and not overwrite:
            raise FileExistsError(f"{self.path} exists and is not empty (pass --overwrite to replace it)")
        self.tmp = self.path + ".tmp"
        shutil.rmtree(self.tmp, ignore_errors=True)
        os.makedirs(self.tmp)
        self.max_shard_bytes = max_shard_bytes
        self._shard: SafetensorsFileWriter | None = None
        self._reserve = 256 << 10
        self._files: list[tuple[str, list[str]]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self._shard is not None and len(self._shard) and self._shard.data_bytes + nbytes > self.max_shard_bytes:
            self._flush()
        if self._shard is None:
            fname = f"part-{len(self._files) + 1:05d}.safetensors"
            self._shard = SafetensorsFileWriter(os.path.join(self.tmp, fname), self._reserve)
        self._shard.add(name, tensor)
        self.total_bytes += nbytes

    def _flush(self) -> None:
        shard, self._shard = self._shard, None
        shard.close()
        self._reserve = max(self._reserve, 2 * shard.header_bytes)  # the next shard's header fits in place
        self._files.append((os.path.basename(shard.path), shard.names()))

    def write_json(self, name: str, obj) -> None:
        with open(os.path.join(self.tmp, name), "w") as f:
            json.dump(obj, f, indent=2, sort_keys=True)
            f.write("\n")

    def copy_file(self, src: str, name: str | None = None) -> None:
        shutil.copy2(src, os.path.join(self.tmp, name or os.path.basename(src)))

    def commit(self) -> str:
        """Finish the last shard, write names (HF style) and the index, and publish atomically."""
        if self._shard is not None:
            self._flush()
        n = len(self._files)
        weight_map = {}
        for i, (old, keys) in enumerate(self._files, 1):
            new = SINGLE if n == 1 else f"model-{i:05d}-of-{n:05d}.safetensors"
            os.replace(os.path.join(self.tmp, old), os.path.join(self.tmp, new))
            weight_map.update({k: new for k in keys})
        if n > 1:
            self.write_json(INDEX, {"metadata": {"total_size": self.total_bytes},
                                    "weight_map": dict(sorted(weight_map.items()))})
        old = None
        if os.path.exists(self.path):
            old = self.path + ".old"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(self.path, old)
        os.replace(self.tmp, self.path)
        if old:
            shutil.rmtree(old, ignore_errors=True)
        return self.path
