"""Where training state goes (weights come through :mod:`megatron_aligndistil.core.weights`).

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
import json
import os
import shutil

import torch

from ..core.store import CheckpointError
from ..core.weights import LATEST, iteration_of, previous_checkpoint_hint, checkpoint_problem, export_release
from ..models import qwen
from .arguments import flag_name

RUN_FILE = "run.json"  # in each iter_ directory: the run's identity and layout (check_resumable)


# flags a resumed run must share with the run that saved the checkpoint. The trainer's identity
# (Trainer.run_identity) comes from the typed configs; this list reads args.json of checkpoints
# written before run.json existed
_IDENTITY_PATHS = ("load", "data_path", "dpo_load", "rev_load", "ref_load")
_IDENTITY_VALUES = ("method", "reverse", "rollout", "tensor_model_parallel_size", "pipeline_model_parallel_size",
                    "use_distributed_optimizer")
LAYOUT_FIELDS = ("tensor_model_parallel_size", "pipeline_model_parallel_size", "num_layers_per_virtual_pipeline_stage",
                 "expert_model_parallel_size", "expert_tensor_parallel_size",
                 "num_virtual_stages_per_pipeline_rank", "use_distributed_optimizer")
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
        what = ("its optimizer state resumes only at the saved TP/PP, virtual stages and optimizer (any "
                "data-parallel size); "
                "relaunch with the saved layout")
    elif all(k in SCHEDULE_FIELDS for k in refused):
        what = ("to change the learning-rate schedule on purpose, add --override-opt_param-scheduler (Megatron-LM's "
                "flag; the change is recorded in args.json); otherwise relaunch with the saved values")
    else:
        what = "this launch is a different run; give a new --save directory (or the flags of the saved run)"
    raise CheckpointError(f"--save {save} holds {ckpt_dir} of another run: {names}. {what}")


def export_training_checkpoint(ckpt_dir: str, out: str) -> str:
    """One process: write the policy of the training checkpoint ``ckpt_dir`` (an ``iter_``
    directory) to ``out`` in the converted format, with the tokenizer and HF config of the run's
    ``--load``. Holds the whole model in host memory once."""
    from ..core import parallel

    parallel.init_distributed()
    parallel.init_model_parallel(parallel.Layout(1, 1))
    try:
        arch = qwen.read_arch(ckpt_dir)
        model = qwen.load_model(ckpt_dir, arch)
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


def model_state(chunks: list) -> dict:
    """The sharded state dict of the policy's model chunks, keyed as Megatron-LM keys them:
    ``model`` for one chunk, ``model0``, ``model1``, ... with virtual pipeline stages. Tensors are
    named by global layer, so the weights load at any layout (:func:`core.weights.load_weights`)."""
    if len(chunks) == 1:
        return {"model": chunks[0].sharded_state_dict()}
    return {f"model{v}": chunk.sharded_state_dict() for v, chunk in enumerate(chunks)}


def save_training_state(save: str, iteration: int, consumed: int, chunks: list, optimizer, scheduler,
                        identity: dict | None = None) -> str:
    """Collective: write ``<save>/iter_XXXXXXX`` atomically and point the latest file at it.
    ``chunks``: the policy's model chunks on this rank (:func:`model_state`).
    ``identity`` (``run_identity`` + layout) is stored as ``run.json`` for resume checks. A complete
    checkpoint of the same iteration is kept as it is (never deleted while the latest file may name it)."""
    from megatron.core import dist_checkpointing

    final = os.path.join(save, f"iter_{iteration:07d}")
    tmp = final + ".tmp"
    if checkpoint_problem(final) is None:  # same iteration, same state: nothing to write
        torch.distributed.barrier()
        return final
    if torch.distributed.get_rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    torch.distributed.barrier()
    model_sd = model_state(chunks)
    state = {
        **model_sd,
        "optimizer": optimizer.sharded_state_dict(model_sd, metadata=_OPT_METADATA),
        "scheduler": scheduler.state_dict(),
        "iteration": iteration,
        "consumed_samples": consumed,
    }
    dist_checkpointing.save(state, tmp)
    os.makedirs(os.path.join(tmp, "rng"), exist_ok=True)
    torch.save({"world": torch.distributed.get_world_size(), "state": _rng_state()},
               os.path.join(tmp, "rng", f"rank{torch.distributed.get_rank():05d}.pt"))
    torch.distributed.barrier()
    if torch.distributed.get_rank() == 0:
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
    torch.distributed.barrier()
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
def load_training_state(ckpt_dir: str, chunks: list, optimizer, scheduler) -> dict:
    """Collective: restore the policy's model ``chunks``, optimizer, scheduler (and RNG when the
    world size matches)."""
    from megatron.core import dist_checkpointing

    _init_torch_adam_state(optimizer)
    model_sd = model_state(chunks)
    template = {
        **model_sd,
        "optimizer": optimizer.sharded_state_dict(model_sd, is_loading=True, metadata=_OPT_METADATA),
    }
    try:
        state = dist_checkpointing.load(template, ckpt_dir)
    except Exception as exc:  # noqa: BLE001 - the metadata looked complete; name the checkpoint and the cause
        raise CheckpointError(f"{ckpt_dir}: the training checkpoint does not load ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0][:300]}); "
                              + previous_checkpoint_hint(os.path.dirname(ckpt_dir), iteration_of(ckpt_dir))) from exc
    for key, chunk in zip(model_sd, chunks):
        chunk.load_state_dict(state[key])
    optimizer.load_state_dict(state["optimizer"])
    _restore_adam_steps(optimizer, state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    rng = os.path.join(ckpt_dir, "rng", f"rank{torch.distributed.get_rank():05d}.pt")
    if os.path.exists(rng):
        saved = torch.load(rng, weights_only=False)
        if saved["world"] == torch.distributed.get_world_size():
            _set_rng_state(saved["state"])
    return {"iteration": int(state["iteration"]), "consumed_samples": int(state["consumed_samples"])}


