"""Weights and checkpoint I/O that training, rollouts, evaluation and the tools share.

* Where a model's weights are: a converted directory (``tools/convert_hf_to_megatron.py``), a
  run's ``release/`` export, or one of a run's ``iter_XXXXXXX`` training checkpoints
  (:func:`weights_dir`, :func:`latest_checkpoint`, :func:`checkpoint_problem`).
* Loading this rank's slices of them at any TP/PP (:func:`load_weights`) and writing the policy
  back in the converted format (:func:`export_release`).
* What a checkpoint says about its tokenizer: the ids that carry probability
  (:func:`tokenizer_vocab_size`), the stop ids (:func:`stop_token_ids`), and whether two
  checkpoints can run side by side (:func:`check_compatible`).

The architecture object (``models.qwen.QwenArch``) is passed in, never imported: this module
sits below the model definitions.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil

import torch

from . import sharding
from .errors import UserError
from .store import CheckpointError, SafetensorsFileWriter, TensorStore

ARCH_FILE = "qwen_arch.json"  # the architecture, next to every checkpoint this package writes
HF_CONFIG_COPY = "hf_config.json"  # the original HF config.json, kept for the export back to HF
# copied verbatim both ways so the exported directory tokenizes and generates like the original
SIDE_FILES = ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "vocab.json",
              "merges.txt", "special_tokens_map.json", "added_tokens.json", "chat_template.jinja")

LATEST = "latest_checkpointed_iteration.txt"


RELEASE = "release"


def iteration_of(ckpt_dir: str) -> int | None:
    name = os.path.basename(os.path.normpath(ckpt_dir))
    return int(name[5:]) if name.startswith("iter_") and name[5:].isdigit() else None


def weights_dir(path: str) -> str:
    """A converted-format directory: ``path`` itself or ``path/release``."""
    if os.path.exists(os.path.join(path, ARCH_FILE)) and not os.path.exists(os.path.join(path, LATEST)):
        return path  # a converted checkpoint, a release/ export, or a training iter_ directory
    if os.path.exists(os.path.join(path, RELEASE, ARCH_FILE)):
        return os.path.join(path, RELEASE)
    raise CheckpointError(
        f"{path}: no weights found (expected a converted checkpoint with {ARCH_FILE}, a run "
        f"directory with {RELEASE}/, or one of a run's iter_XXXXXXX checkpoints; convert HF weights with "
        "tools/convert_hf_to_megatron.py)"
    )


def latest_checkpoint(save: str) -> str | None:
    """``<save>/iter_XXXXXXX`` named by the latest file, checked complete; None: start fresh.
    A damaged checkpoint is refused with the name of the previous complete one."""
    path = os.path.join(save, LATEST)
    if not os.path.exists(path):
        return None
    text = open(path).read().strip()
    if not text.isdigit():
        raise CheckpointError(f"{path}: expected an iteration number, found {text[:40]!r}; "
                              + previous_checkpoint_hint(save, None))
    it = int(text)
    d = os.path.join(save, f"iter_{it:07d}")
    problem = checkpoint_problem(d)
    if problem:
        raise CheckpointError(f"{d} (named by {path}) is damaged: {problem}; " + previous_checkpoint_hint(save, it))
    return d


def _iterations(save: str) -> list[int]:
    """Iterations of the ``iter_XXXXXXX`` directories in ``save``, ascending."""
    return sorted(it for name in os.listdir(save) if os.path.isdir(os.path.join(save, name))
                  and (it := iteration_of(name)) is not None)


def previous_checkpoint_hint(save: str, before: int | None) -> str:
    """Which earlier checkpoint is complete, and how to resume from it."""
    for it in reversed(_iterations(save)):
        if (before is None or it < before) and not checkpoint_problem(os.path.join(save, f"iter_{it:07d}")):
            return (f"the latest complete checkpoint is {os.path.join(save, f'iter_{it:07d}')}: write {it} into "
                    f"{os.path.join(save, LATEST)} to resume from it")
    return f"no complete checkpoint is left in {save}: start a new run (another --save) from --load"


def checkpoint_problem(ckpt_dir: str) -> str | None:
    """Why ``ckpt_dir`` is not a complete training checkpoint (missing / truncated files), or None.
    Reads only the checkpoint's metadata, identically on every rank (no collective)."""
    if not os.path.isdir(ckpt_dir):
        return "the directory is missing"
    for name in ("common.pt", "metadata.json", ".metadata"):
        if not os.path.isfile(os.path.join(ckpt_dir, name)):
            return f"{name} is missing"
    try:
        from torch.distributed.checkpoint import FileSystemReader

        storage = FileSystemReader(ckpt_dir).read_metadata().storage_data
    except Exception as exc:  # noqa: BLE001 - any unreadable metadata is a damaged checkpoint
        return f".metadata is unreadable ({type(exc).__name__}: {str(exc)[:120]})"
    need = {}
    for info in storage.values():
        need[info.relative_path] = max(need.get(info.relative_path, 0), info.offset + info.length)
    for rel, size in sorted(need.items()):
        f = os.path.join(ckpt_dir, rel)
        if not os.path.isfile(f):
            return f"{rel} is missing"
        if os.path.getsize(f) < size:
            return f"{rel} is truncated ({os.path.getsize(f)} of at least {size} bytes)"
    return None


def tokenizer_file(path: str) -> str | None:
    """``tokenizer.json`` of the checkpoint at ``path`` (for a run's ``iter_`` directory: its
    ``--load``'s, as the export does); None when there is none."""
    d = weights_dir(path)
    f = os.path.join(d, "tokenizer.json")
    if os.path.exists(f):
        return f
    args_json = os.path.join(os.path.dirname(os.path.abspath(d)), "args.json")
    if is_training_checkpoint(d) and os.path.exists(args_json):
        load = json.load(open(args_json)).get("load")
        if load and os.path.isdir(load) and os.path.abspath(load) != os.path.abspath(path):
            return tokenizer_file(load)
    return None


def tokenizer_digest(path: str) -> str | None:
    """sha256 of the checkpoint's tokenizer.json (None when it has none)."""
    f = tokenizer_file(path)
    return hashlib.sha256(open(f, "rb").read()).hexdigest() if f else None


def tokenizer_vocab_size(arch, path: str) -> int:
    """The ids of the model at ``path`` that carry probability: ``[0, n)``, n = the tokenizer's
    size (largest id of ``tokenizer.json``, added tokens included, + 1); ``arch.vocab_size``
    when the checkpoint has no tokenizer.json.

    Checkpoints pad the embedding past the tokenizer: Qwen's 151,669 ids sit in a vocab_size
    of 151,936 or 152,064, itself padded to 152,576 rows here. Rows past n are excluded from
    every softmax of this package (loss, log-probs, sampling, the vLLM engine), so ids the
    tokenizer cannot produce never carry mass. Raises when the tokenizer outgrows the model."""
    f = tokenizer_file(path)
    if f is None:
        return arch.vocab_size
    from tokenizers import Tokenizer

    try:
        n = max(Tokenizer.from_file(f).get_vocab(with_added_tokens=True).values()) + 1
    except Exception as exc:  # noqa: BLE001 - the tokenizers library raises plain Exceptions
        raise UserError(f"{f}: not a readable tokenizer ({exc})") from exc
    if n > arch.vocab_size:
        raise UserError(f"{f}: the tokenizer has ids up to {n - 1}, past the model's vocab_size "
                        f"{arch.vocab_size} ({path}): ids without an embedding row")
    return n


def check_compatible(arch, policy_path: str, other_path: str, role: str) -> None:
    """The frozen model ``role`` must share the policy's architecture and tokenizer.

    Its ``vocab_size`` may differ from the policy's (151,936 vs 152,064, or an HF trainer's
    ``resize_token_embeddings(len(tokenizer))``) when the shared tokenizer fits both: the models
    are compared over the tokenizer's ids only, and the frozen model is built with the policy's
    vocab rows (``load_weights(..., vocab_rows=True)``)."""
    other_dir = weights_dir(other_path)
    other = type(arch).from_json_file(os.path.join(other_dir, ARCH_FILE))
    flag = {"dpo": "--dpo-load", "rev": "--rev-load", "ref": "--ref-load"}.get(role, role)
    if other.vocab_size != arch.vocab_size:
        sizes = (f"{flag} {other_path}: vocab_size {other.vocab_size} differs from the policy's "
                 f"{arch.vocab_size} (--load {policy_path})")
        if tokenizer_file(policy_path) is None or tokenizer_file(other_path) is None:
            raise UserError(f"{sizes}, and without both tokenizer.json files the ids the models share "
                            "are unknown; give models of one vocab_size")
        n = tokenizer_vocab_size(arch, policy_path)
        tokenizer_vocab_size(other, other_path)  # the tokenizer fits the frozen model too
        if other.padded_vocab_size != arch.padded_vocab_size and is_training_checkpoint(other_dir):
            raise UserError(f"{sizes}: compared over the tokenizer's {n} ids this works from a converted "
                            f"checkpoint or a run's release/ export, not from a training checkpoint "
                            f"({other.padded_vocab_size} vs {arch.padded_vocab_size} padded rows)")
    diff = {k: (getattr(arch, k), getattr(other, k)) for k in arch.__dataclass_fields__
            if getattr(arch, k) != getattr(other, k) and k not in ("torch_dtype", "vocab_size")}
    if diff:
        raise UserError(f"{flag} {other_path}: architecture differs from the policy's (policy, {role}): {diff}")
    mine, theirs = tokenizer_digest(policy_path), tokenizer_digest(other_path)
    if mine and theirs and mine != theirs:
        raise UserError(f"{flag} {other_path}: tokenizer.json differs from the policy's")


def check_stop_ids(stop_ids, vocab_size: int, path: str) -> None:
    """Stop ids must be ids of the tokenizer (``[0, vocab_size)``): one outside can never be
    sampled, so it would never end a response."""
    bad = [i for i in stop_ids if not 0 <= i < vocab_size]
    if bad:
        raise UserError(f"--stop-token-ids {' '.join(map(str, bad))}: outside the {vocab_size} ids of the tokenizer of "
                        f"{path} (ids past it are never sampled, so the response would never stop there)")


def stop_token_ids(path: str, explicit=None, required: bool = False) -> list[int]:
    """``explicit`` (``--stop-token-ids``), else the eos_token_id(s) of the checkpoint's
    generation/HF config; ``required`` (on-policy rollouts): an error when there is none."""
    if explicit:
        return list(explicit)
    src = weights_dir(path)
    if os.path.exists(os.path.join(path, HF_CONFIG_COPY)):
        src = path
    for name in ("generation_config.json", HF_CONFIG_COPY):
        f = os.path.join(src, name)
        if os.path.exists(f):
            eos = json.load(open(f)).get("eos_token_id")
            if eos is not None:
                return list(eos) if isinstance(eos, list) else [eos]
    if required:
        raise UserError(f"{path}: no eos_token_id in its configs; give --stop-token-ids for on-policy rollouts")
    return []


def is_training_checkpoint(path: str) -> bool:
    """A trainer's ``iter_XXXXXXX`` directory (Megatron-Core distributed checkpoint)."""
    return os.path.isfile(os.path.join(path, ".metadata")) and os.path.isfile(os.path.join(path, "common.pt"))


def load_weights(model, path: str, vocab_rows: bool = False) -> None:
    """Collective when ``path`` is a training checkpoint: load this rank's slices of the weights
    from a converted directory / ``release/`` export, or the policy weights of an ``iter_``
    checkpoint (at any TP/PP: Megatron reshards them). ``vocab_rows``: a converted checkpoint's
    embedding / output rows may differ in number from the model's (:func:`check_compatible`)."""
    d = weights_dir(path)
    if is_training_checkpoint(d):
        from megatron.core import dist_checkpointing

        problem = checkpoint_problem(d)
        if problem:
            raise CheckpointError(f"{d}: {problem}")
        state = dist_checkpointing.load({"model": model.sharded_state_dict()}, d)
        model.load_state_dict(state["model"])
        return
    with TensorStore(d) as store:
        sharding.load_from_store(model, store, vocab_rows=vocab_rows)


@torch.no_grad()
def export_release(policy, arch, load: str, out: str) -> None:
    """Collective: write the policy (this rank's pipeline stage, or its list of model chunks) in
    the converted format to ``out`` (loadable at any layout, exportable to HF). Each pipeline
    rank's TP-rank-0/DP-rank-0 writes its own tensors one at a time, a tensor split on its first
    dimension one TP shard at a time (extra memory: one shard, or one full tensor split on its
    last dimension; never the stage), and each
    expert-parallel rank's experts are written by their expert-TP-rank-0 / expert-DP-rank-0; rank
    0 writes the index and publishes the directory atomically."""
    from megatron.core import parallel_state

    # one writer per tensor: TP rank 0 of data-parallel replica 0; for a routed expert (held by
    # one expert-parallel rank) expert-TP rank 0 of its expert-data-parallel replica 0
    dense_writer = (parallel_state.get_tensor_model_parallel_rank() == 0
                    and parallel_state.get_data_parallel_rank() == 0)
    expert_writer = (parallel_state.get_expert_tensor_parallel_rank() == 0
                     and parallel_state.get_expert_data_parallel_rank() == 0)
    stage = parallel_state.get_pipeline_model_parallel_rank()
    files = {False: f"model-stage{stage:03d}.safetensors",
             True: f"model-stage{stage:03d}-experts{parallel_state.get_expert_model_parallel_rank():03d}.safetensors"}
    tmp = out + ".tmp"
    if torch.distributed.get_rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    torch.distributed.barrier()
    dtype = getattr(torch, arch.torch_dtype)
    writers = {}  # by is-expert: this rank's files, opened at their first tensor
    chunks = policy if isinstance(policy, (list, tuple)) else [policy]
    try:
        for chunk, local_name, param in ((c, n, p) for c in chunks for n, p in c.named_parameters()):
            name = sharding.full_name(chunk, local_name)
            if local_name.startswith("output_layer") and name == sharding.EMBEDDING:
                continue  # tied copy on the last stage: the first stage writes the embedding
            # cast, then gather: exact (elementwise), and half the bytes of an fp32 gather for bf16;
            # a tensor split on its first dimension comes one TP shard at a time, each on disk before
            # the next (the writer never holds the full tensor, nor the stage)
            pieces = sharding.tensor_parallel_pieces(name, param, param.data.to(dtype))
            expert = sharding.is_expert(name)
            if expert_writer if expert else dense_writer:
                if expert not in writers:
                    writers[expert] = SafetensorsFileWriter(os.path.join(tmp, files[expert]))
                writers[expert].add_pieces(name, dtype, sharding.full_shape(name, param), pieces)
            else:
                for _ in pieces:  # the collective, on ranks that do not write
                    pass
    except BaseException:
        for writer in writers.values():
            writer.abort()
        raise
    for writer in writers.values():
        writer.close()
    weight_map = {name: files[expert] for expert, writer in writers.items() for name in writer.names()}
    maps = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(maps, weight_map)
    if torch.distributed.get_rank() == 0:
        merged = {k: v for m in maps for k, v in (m or {}).items()}
        with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {}, "weight_map": dict(sorted(merged.items()))}, f, indent=2)
        with open(os.path.join(tmp, ARCH_FILE), "w") as f:
            f.write(arch.to_json())
        src = weights_dir(load)
        for name in (HF_CONFIG_COPY,) + SIDE_FILES:
            if os.path.exists(os.path.join(src, name)):
                shutil.copy(os.path.join(src, name), os.path.join(tmp, name))
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
    torch.distributed.barrier()
