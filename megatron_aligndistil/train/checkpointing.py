"""Where weights come from and where training state goes.

* Weights of the policy at start and of every frozen model: a converted checkpoint directory
  (``tools/convert_hf_to_megatron.py``) or a run directory that has one in ``release/``. Loaded
  slice by slice, at any TP/PP.
* Training state (``--save``): Megatron-Core distributed checkpoints ``<save>/iter_0000010``
  holding the policy, the optimizer (``dp_reshardable``: resumable at the same TP/PP, any DP),
  the LR scheduler, the data position and iteration, plus per-rank RNG states. Written into
  ``iter_XXXXXXX.tmp`` and renamed when complete; ``latest_checkpointed_iteration.txt`` is replaced
  atomically afterwards, so a run killed mid-save resumes from the previous checkpoint.
* At the end, the policy is exported to ``<save>/release`` in the converted format, which
  ``tools/convert_megatron_to_hf.py`` turns into an HF directory and other runs use as a teacher.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil

import torch

from ..convert.hf import HF_CONFIG_COPY, SIDE_FILES
from ..convert.io import CheckpointError, TensorStore
from ..models import qwen, sharding
from ..cli_errors import UserError
from .arguments import flag_name

LATEST = "latest_checkpointed_iteration.txt"
RELEASE = "release"
RUN_FILE = "run.json"  # in each iter_ directory: the run's identity and layout (check_resumable)


def _iteration_of(ckpt_dir: str) -> int | None:
    name = os.path.basename(os.path.normpath(ckpt_dir))
    return int(name[5:]) if name.startswith("iter_") and name[5:].isdigit() else None


def _rank() -> int:
    return torch.distributed.get_rank()


def _barrier():
    torch.distributed.barrier()


def weights_dir(path: str) -> str:
    """A converted-format directory: ``path`` itself or ``path/release``."""
    if os.path.exists(os.path.join(path, qwen.ARCH_FILE)) and not os.path.exists(os.path.join(path, LATEST)):
        return path  # a converted checkpoint, a release/ export, or a training iter_ directory
    if os.path.exists(os.path.join(path, RELEASE, qwen.ARCH_FILE)):
        return os.path.join(path, RELEASE)
    raise CheckpointError(
        f"{path}: no weights found (expected a converted checkpoint with {qwen.ARCH_FILE}, a run "
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
                              + _previous_hint(save, None))
    it = int(text)
    d = os.path.join(save, f"iter_{it:07d}")
    problem = checkpoint_problem(d)
    if problem:
        raise CheckpointError(f"{d} (named by {path}) is damaged: {problem}; " + _previous_hint(save, it))
    return d


def _iterations(save: str) -> list[int]:
    """Iterations of the ``iter_XXXXXXX`` directories in ``save``, ascending."""
    return sorted(it for name in os.listdir(save) if os.path.isdir(os.path.join(save, name))
                  and (it := _iteration_of(name)) is not None)


def _previous_hint(save: str, before: int | None) -> str:
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


# flags a resumed run must share with the run that saved the checkpoint. The trainer's identity
# (Trainer.run_identity) comes from the typed configs; this list reads args.json of checkpoints
# written before run.json existed
_IDENTITY_PATHS = ("load", "data_path", "dpo_load", "rev_load", "ref_load")
_IDENTITY_VALUES = ("method", "reverse", "rollout", "tensor_model_parallel_size", "pipeline_model_parallel_size",
                    "use_distributed_optimizer")
LAYOUT_FIELDS = ("tensor_model_parallel_size", "pipeline_model_parallel_size", "use_distributed_optimizer")
# what Megatron-LM's --override-opt_param-scheduler lets a resumed run change on purpose
SCHEDULE_FIELDS = ("lr", "min_lr", "lr_warmup_fraction", "lr_decay_style", "weight_decay", "train_iters")


def run_identity(args) -> dict:
    """The identity of a run from its flags (``args.json`` of old checkpoints): method, inputs
    (absolute paths), layout of the optimizer state."""
    ident = {k: getattr(args, k, None) for k in _IDENTITY_VALUES}
    ident.update({k: os.path.realpath(getattr(args, k)) if getattr(args, k, None) else None for k in _IDENTITY_PATHS})
    return ident


def _saved_identity(ckpt_dir: str) -> dict:
    path = os.path.join(ckpt_dir, RUN_FILE)
    if os.path.exists(path):
        saved = json.load(open(path))
    else:  # checkpoints written before run.json: the run directory's args.json
        args_json = os.path.join(os.path.dirname(ckpt_dir), "args.json")
        saved = run_identity(argparse.Namespace(**json.load(open(args_json)))) if os.path.exists(args_json) else {}
    if saved.get("method") == "dpo" and saved.get("ref_load") is None and saved.get("load"):
        saved["ref_load"] = saved["load"]  # written before the identity named DPO's default reference
    return saved


def check_resumable(identity: dict, save: str, ckpt_dir: str, override_schedule: bool = False) -> dict:
    """Refuse to resume ``ckpt_dir`` when a field of ``identity`` (the trainer's
    ``run_identity``: every flag that changes the trajectory, and the TP/PP layout) differs from
    the saved run's, naming each flag with its saved and current value. Fields the saved identity
    lacks (older checkpoints) are not compared. With ``override_schedule``
    (``--override-opt_param-scheduler``) the :data:`SCHEDULE_FIELDS` may change: returns those
    changes, ``{field: [saved, now]}``."""
    saved = _saved_identity(ckpt_dir)
    mine = json.loads(json.dumps(identity))  # the types the saved copy went through (tuples are lists)
    diff = {k: [saved[k], mine[k]] for k in mine if k in saved and saved[k] != mine[k]}
    allowed = {k: v for k, v in diff.items() if override_schedule and k in SCHEDULE_FIELDS}
    refused = {k: v for k, v in diff.items() if k not in allowed}
    if not refused:
        return allowed
    names = "; ".join(f"{flag_name(k)} {old} (saved) vs {new} (now)" for k, (old, new) in refused.items())
    if all(k in LAYOUT_FIELDS for k in refused):
        what = ("its optimizer state resumes only at the saved TP/PP and optimizer (any data-parallel size); "
                "relaunch with the saved layout")
    elif all(k in SCHEDULE_FIELDS for k in refused):
        what = ("to change the learning-rate schedule on purpose, add --override-opt_param-scheduler (Megatron-LM's "
                "flag; the change is recorded in args.json); otherwise relaunch with the saved values")
    else:
        what = "this launch is a different run; give a new --save directory (or the flags of the saved run)"
    raise CheckpointError(f"--save {save} holds {ckpt_dir} of another run: {names}. {what}")


def _tokenizer_file(path: str) -> str | None:
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
            return _tokenizer_file(load)
    return None


def tokenizer_digest(path: str) -> str | None:
    """sha256 of the checkpoint's tokenizer.json (None when it has none)."""
    f = _tokenizer_file(path)
    return hashlib.sha256(open(f, "rb").read()).hexdigest() if f else None


def tokenizer_vocab_size(arch: qwen.QwenArch, path: str) -> int:
    """The ids of the model at ``path`` that carry probability: ``[0, n)``, n = the tokenizer's
    size (largest id of ``tokenizer.json``, added tokens included, + 1); ``arch.vocab_size``
    when the checkpoint has no tokenizer.json.

    Checkpoints pad the embedding past the tokenizer: Qwen's 151,669 ids sit in a vocab_size
    of 151,936 or 152,064, itself padded to 152,576 rows here. Rows past n are excluded from
    every softmax of this package (loss, log-probs, sampling, the vLLM engine), so ids the
    tokenizer cannot produce never carry mass. Raises when the tokenizer outgrows the model."""
    f = _tokenizer_file(path)
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


def check_compatible(arch: qwen.QwenArch, policy_path: str, other_path: str, role: str) -> None:
    """The frozen model ``role`` must share the policy's architecture and tokenizer.

    Its ``vocab_size`` may differ from the policy's (151,936 vs 152,064, or an HF trainer's
    ``resize_token_embeddings(len(tokenizer))``) when the shared tokenizer fits both: the models
    are compared over the tokenizer's ids only, and the frozen model is built with the policy's
    vocab rows (``load_weights(..., vocab_rows=True)``)."""
    other_dir = weights_dir(other_path)
    other = qwen.read_arch(other_dir)
    flag = {"dpo": "--dpo-load", "rev": "--rev-load", "ref": "--ref-load"}.get(role, role)
    if other.vocab_size != arch.vocab_size:
        sizes = (f"{flag} {other_path}: vocab_size {other.vocab_size} differs from the policy's "
                 f"{arch.vocab_size} (--load {policy_path})")
        if _tokenizer_file(policy_path) is None or _tokenizer_file(other_path) is None:
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


def export_training_checkpoint(ckpt_dir: str, out: str) -> str:
    """One process: write the policy of the training checkpoint ``ckpt_dir`` (an ``iter_``
    directory) to ``out`` in the converted format, with the tokenizer and HF config of the run's
    ``--load``. Holds the whole model in host memory once."""
    from .. import parallel

    parallel.init_distributed()
    parallel.init_model_parallel(parallel.Layout(1, 1))
    try:
        arch = qwen.read_arch(ckpt_dir)
        model = qwen.build_model(arch, qwen.transformer_config(arch))
        load_weights(model, ckpt_dir)
        args_json = os.path.join(os.path.dirname(os.path.abspath(ckpt_dir)), "args.json")
        side = json.load(open(args_json)).get("load") if os.path.exists(args_json) else None
        export_release(model, arch, side if side and os.path.isdir(side) else ckpt_dir, out)
    finally:
        parallel.destroy()
    return out


def write_run_files(args, arch: qwen.QwenArch, load: str, resumed_at: int | None = None,
                    overrides: dict | None = None) -> None:
    """Rank 0: the run directory describes itself (args, architecture, tokenizer for export).
    ``args.json`` holds this launch's flags; a resume (``resumed_at``: its iteration) appends to
    its ``resume_history`` the flags that changed since the previous launch and the identity
    fields overridden on purpose (``overrides``, from :func:`check_resumable`)."""
    os.makedirs(args.save, exist_ok=True)
    path = os.path.join(args.save, "args.json")
    now = json.loads(json.dumps(vars(args), default=str))
    history = []
    if resumed_at is not None and os.path.exists(path):
        before = json.load(open(path))
        history = before.pop("resume_history", [])
        changed = {k: [before.get(k), v] for k, v in now.items() if before.get(k) != v}
        history.append({"iteration": resumed_at, "changed_flags": changed, "overridden_identity": overrides or {}})
    with open(path + ".tmp", "w") as f:
        json.dump(now | {"resume_history": history}, f, indent=2, sort_keys=True)
    os.replace(path + ".tmp", path)
    with open(os.path.join(args.save, qwen.ARCH_FILE), "w") as f:
        f.write(arch.to_json())


def _rng_state() -> dict:
    from megatron.core import tensor_parallel

    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
            "tracker": tensor_parallel.get_cuda_rng_tracker().get_states()}


def _set_rng_state(state: dict) -> None:
    from megatron.core import tensor_parallel

    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


_OPT_METADATA = {"distrib_optim_sharding_type": "dp_reshardable"}


def save_training_state(save: str, iteration: int, consumed: int, stage, optimizer, scheduler,
                        identity: dict | None = None) -> str:
    """Collective: write ``<save>/iter_XXXXXXX`` atomically and point the latest file at it.
    ``identity`` (``run_identity`` + layout) is stored as ``run.json`` for resume checks. A complete
    checkpoint of the same iteration is kept as it is (never deleted while the latest file may name it)."""
    from megatron.core import dist_checkpointing

    final = os.path.join(save, f"iter_{iteration:07d}")
    tmp = final + ".tmp"
    if checkpoint_problem(final) is None:  # same iteration, same state: nothing to write
        _barrier()
        return final
    if _rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    _barrier()
    model_sd = stage.policy.sharded_state_dict()
    state = {
        "model": model_sd,
        "optimizer": optimizer.sharded_state_dict(model_sd, metadata=_OPT_METADATA),
        "scheduler": scheduler.state_dict(),
        "iteration": iteration,
        "consumed_samples": consumed,
    }
    dist_checkpointing.save(state, tmp)
    os.makedirs(os.path.join(tmp, "rng"), exist_ok=True)
    torch.save({"world": torch.distributed.get_world_size(), "state": _rng_state()},
               os.path.join(tmp, "rng", f"rank{_rank():05d}.pt"))
    _barrier()
    if _rank() == 0:
        shutil.copy(os.path.join(save, qwen.ARCH_FILE), os.path.join(tmp, qwen.ARCH_FILE))
        if identity is not None:
            with open(os.path.join(tmp, RUN_FILE), "w") as f:
                json.dump(identity, f, indent=2, sort_keys=True)
        if os.path.exists(final):  # a damaged copy (checked above): out of the way first
            shutil.rmtree(final + ".damaged", ignore_errors=True)
            os.replace(final, final + ".damaged")
        os.replace(tmp, final)
        with open(os.path.join(save, LATEST + ".tmp"), "w") as f:
            f.write(str(iteration))
        os.replace(os.path.join(save, LATEST + ".tmp"), os.path.join(save, LATEST))
    _barrier()
    return final


def _init_torch_adam_state(optimizer) -> None:
    """Give torch's (Adam|AdamW) an empty state *with* its ``step`` before loading into it.

    Megatron's DistributedOptimizer reads ``step`` from the inner optimizer's state when it builds
    the sharded state dict to load into; its own ``init_state_fn`` (for TE/apex Adam) does not
    create it, so a fresh torch AdamW (the fallback without TE/apex) would fail the load.
    """
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        if not isinstance(inner, (torch.optim.Adam, torch.optim.AdamW)):
            continue
        for group in inner.param_groups:
            for p in group["params"]:
                state = inner.state[p]
                if not state:
                    state["exp_avg"] = torch.zeros_like(p.data)
                    state["exp_avg_sq"] = torch.zeros_like(p.data)
                    state["step"] = torch.zeros((), dtype=torch.float32)


def _saved_adam_steps(obj) -> set:
    """Every ``step`` under a ``param_groups`` list of a (possibly chained) optimizer state dict."""
    steps = set()
    if isinstance(obj, dict):
        for group in obj.get("param_groups", []) if isinstance(obj.get("param_groups"), list) else []:
            if "step" in group:
                steps.add(float(group["step"]))
        for value in obj.values():
            steps |= _saved_adam_steps(value)
    return steps


def _restore_adam_steps(optimizer, saved_state) -> None:
    """Set torch-Adam's per-parameter ``step`` from the checkpoint, one tensor per parameter.

    With torch's AdamW (no TE/apex) Megatron's DistributedOptimizer stores the step in its
    param groups, but its ``dp_reshardable`` parameter-state load then copies the *template's*
    step (0) back over it, and its ``load_state_dict`` would share one step tensor between all
    parameters (torch increments each in place). Either corrupts Adam's bias correction after a
    resume, so the step is restored here explicitly.
    """
    steps = _saved_adam_steps(saved_state)
    if not steps:
        return
    if len(steps) != 1:
        raise RuntimeError(f"optimizer checkpoint holds several Adam steps {sorted(steps)}")
    step = steps.pop()
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        if isinstance(inner, (torch.optim.Adam, torch.optim.AdamW)):
            for state in inner.state.values():
                if "step" in state:
                    state["step"] = torch.tensor(step, dtype=torch.float32)


@torch.no_grad()
def load_training_state(ckpt_dir: str, stage, optimizer, scheduler) -> dict:
    """Collective: restore policy, optimizer, scheduler (and RNG when the world size matches)."""
    from megatron.core import dist_checkpointing

    _init_torch_adam_state(optimizer)
    model_sd = stage.policy.sharded_state_dict()
    template = {
        "model": model_sd,
        "optimizer": optimizer.sharded_state_dict(model_sd, is_loading=True, metadata=_OPT_METADATA),
    }
    try:
        state = dist_checkpointing.load(template, ckpt_dir)
    except Exception as exc:  # noqa: BLE001 - the metadata looked complete; name the checkpoint and the cause
        raise CheckpointError(f"{ckpt_dir}: the training checkpoint does not load ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0][:300]}); "
                              + _previous_hint(os.path.dirname(ckpt_dir), _iteration_of(ckpt_dir))) from exc
    stage.policy.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    _restore_adam_steps(optimizer, state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    rng = os.path.join(ckpt_dir, "rng", f"rank{_rank():05d}.pt")
    if os.path.exists(rng):
        saved = torch.load(rng, weights_only=False)
        if saved["world"] == torch.distributed.get_world_size():
            _set_rng_state(saved["state"])
    return {"iteration": int(state["iteration"]), "consumed_samples": int(state["consumed_samples"])}


@torch.no_grad()
def export_release(policy, arch: qwen.QwenArch, load: str, out: str) -> None:
    """Collective: write the policy in the converted format to ``out`` (loadable at any layout,
    exportable to HF). Each pipeline stage's TP-rank-0/DP-rank-0 gathers and writes its own
    tensors, one at a time; rank 0 writes the index and publishes the directory atomically."""
    from megatron.core import parallel_state

    writer_rank = (parallel_state.get_tensor_model_parallel_rank() == 0
                   and parallel_state.get_data_parallel_rank() == 0)
    stage = parallel_state.get_pipeline_model_parallel_rank()
    tmp = out + ".tmp"
    if _rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    _barrier()
    tensors = {}
    for local_name, param in policy.named_parameters():
        name = sharding.full_name(policy, local_name)
        if local_name.startswith("output_layer") and name == sharding.EMBEDDING:
            continue  # tied copy on the last stage: the first stage writes the embedding
        full = sharding.gather_tensor_parallel(name, param, param.data)
        if writer_rank:
            tensors[name] = full.to(getattr(torch, arch.torch_dtype)).cpu()
    weight_map = {}
    if writer_rank and tensors:
        from safetensors.torch import save_file

        fname = f"model-stage{stage:03d}.safetensors"
        save_file(tensors, os.path.join(tmp, fname), metadata={"format": "pt"})
        weight_map = {k: fname for k in tensors}
    maps = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(maps, weight_map)
    if _rank() == 0:
        merged = {k: v for m in maps for k, v in (m or {}).items()}
        with open(os.path.join(tmp, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {}, "weight_map": dict(sorted(merged.items()))}, f, indent=2)
        with open(os.path.join(tmp, qwen.ARCH_FILE), "w") as f:
            f.write(arch.to_json())
        src = weights_dir(load)
        for name in (HF_CONFIG_COPY,) + SIDE_FILES:
            if os.path.exists(os.path.join(src, name)):
                shutil.copy(os.path.join(src, name), os.path.join(tmp, name))
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
    _barrier()
