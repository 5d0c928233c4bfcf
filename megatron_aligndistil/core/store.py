"""Streaming safetensors I/O: a lazy reader over a (possibly sharded) directory, and a writer that
keeps at most one shard's bytes in memory. Both name the file and tensor in every error.

Layout (the HF convention, used for HF and Megatron directories alike)::

    DIR/model.safetensors                                  (one file), or
    DIR/model-00001-of-00003.safetensors ... + DIR/model.safetensors.index.json
"""

from __future__ import annotations

import json
import os
import shutil
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


class ShardedWriter:
    """Write tensors one by one into ``DIR.tmp``, at most ``max_shard_bytes`` held at a time, then
    publish atomically as DIR (rename) on :meth:`commit`. A crash leaves DIR untouched.
    """

    def __init__(self, path: str, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, overwrite: bool = False):
        self.path = os.path.abspath(path)
        if os.path.exists(self.path) and os.listdir(self.path) and not overwrite:
            raise FileExistsError(f"{self.path} exists and is not empty (pass --overwrite to replace it)")
        self.tmp = self.path + ".tmp"
        shutil.rmtree(self.tmp, ignore_errors=True)
        os.makedirs(self.tmp)
        self.max_shard_bytes = max_shard_bytes
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._files: list[tuple[str, list[str]]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + nbytes > self.max_shard_bytes:
            self._flush()
        self._pending[name] = tensor.contiguous()
        self._pending_bytes += nbytes
        self.total_bytes += nbytes

    def _flush(self) -> None:
        from safetensors.torch import save_file

        fname = f"part-{len(self._files) + 1:05d}.safetensors"
        save_file(self._pending, os.path.join(self.tmp, fname), metadata={"format": "pt"})
        self._files.append((fname, list(self._pending)))
        self._pending, self._pending_bytes = {}, 0

    def write_json(self, name: str, obj) -> None:
        with open(os.path.join(self.tmp, name), "w") as f:
            json.dump(obj, f, indent=2, sort_keys=True)
            f.write("\n")

    def copy_file(self, src: str, name: str | None = None) -> None:
        shutil.copy2(src, os.path.join(self.tmp, name or os.path.basename(src)))

    def commit(self) -> str:
        """Finish the last shard, write names (HF style) and the index, and publish atomically."""
        if self._pending:
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
