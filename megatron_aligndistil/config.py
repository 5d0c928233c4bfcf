"""Typed configuration, built once from the command line and validated where it is built.

``TrainingConfig`` holds what the shared trainer reads (layout, batch, optimizer, data,
checkpoints, logging); ``AlignDistilLossConfig``, ``DPOConfig`` and ``RolloutConfig`` what each
method and the rollout engine read. Each has ``from_args`` (the argparse namespace of
``train/arguments.py``; field names are the flags' dests) and checks itself in ``__post_init__``,
so the Python API gets the same checks as the command line. Nothing reads environment variables.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from .core.errors import UserError

TOKEN_WEIGHTS = ("beta_t", "vanilla", "none", "constant")
DIRECTIONS = ("reverse", "forward")
TRANSFORMER_IMPLS = ("auto", "local", "transformer_engine")
ROLLOUT_ENGINES = ("megatron", "vllm")
MISMATCH_ACTIONS = ("error", "warn")


class ConfigError(UserError):
    """An inconsistent configuration; the message names the field (the flag of the same name)."""


def _from_args(cls, args, **overrides):
    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}
    return cls(**(values | overrides))


def _tristate(value: str | None) -> bool | None:
    return {"on": True, "off": False}.get(value)


@dataclass
class AlignDistilLossConfig:
    """The AlignDistil loss (SPEC section 2; ``loss/aligndistil.py``). ``r``/``eps``: alpha =
    r * TVD + eps; ``tvd_half=False`` is the released code's TVD (no 1/2); ``compile``: fuse the
    chunk kernels with torch.compile (None: on with CUDA); ``chunk_size``: tokens per chunk (None:
    per device)."""

    r: float = 15.0
    eps: float = 1e-3
    beta0: float = 0.1
    token_weight: str = "beta_t"
    direction: str = "reverse"
    constant_alpha: float | None = None
    tvd_half: bool = True
    plausibility_threshold: float | None = None
    chunk_size: int | None = None
    compile: bool | None = None

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
        return {"r": self.r, "eps": self.eps, "beta0": self.beta0, "token_weight": self.token_weight,
                "kl_direction": self.direction, "constant_alpha": self.constant_alpha,
                "tvd_without_half": not self.tvd_half, "plausibility_threshold": self.plausibility_threshold}

    @classmethod
    def from_args(cls, args) -> "AlignDistilLossConfig":
        return _from_args(cls, args, direction=args.kl_direction, tvd_half=not args.tvd_without_half,
                          compile=_tristate(args.loss_compile))


@dataclass
class DPOConfig:
    """DPO (``train/dpo.py``): ``beta`` of the implicit reward; ``reverse`` swaps chosen and rejected."""

    beta: float = 0.1
    reverse: bool = False

    def __post_init__(self):
        if not self.beta > 0:
            raise ConfigError(f"dpo_beta must be > 0, got {self.beta}")

    def identity(self) -> dict:
        return {"dpo_beta": self.beta, "reverse": self.reverse}

    @classmethod
    def from_args(cls, args) -> "DPOConfig":
        return cls(beta=args.dpo_beta, reverse=args.reverse)


@dataclass
class SamplingParams:
    """How responses are sampled: ``temperature`` 0 is greedy; ``top_p`` in (0, 1]; ``top_k`` 0 is
    off; a response ends at one of ``stop_ids`` (kept) or after ``max_new_tokens``. ``seed`` with a
    sequence's global index and step number seeds each draw (layout-independent sampling)."""

    max_new_tokens: int = 1024
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    stop_ids: tuple = ()
    seed: int = 1234

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

    engine: str = "megatron"
    sampling: SamplingParams = field(default_factory=SamplingParams)
    gpu_memory_utilization: float = 0.5  # vLLM's share of each GPU while it samples
    max_logp_diff: float | None = None
    mismatch_action: str = "error"

    def __post_init__(self):
        if self.engine not in ROLLOUT_ENGINES:
            raise ConfigError(f"rollout engine must be one of {ROLLOUT_ENGINES}, got {self.engine!r}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ConfigError(f"vllm gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.max_logp_diff is not None and not self.max_logp_diff > 0:
            raise ConfigError(f"max_logp_diff must be > 0, got {self.max_logp_diff}")
        if self.mismatch_action not in MISMATCH_ACTIONS:
            raise ConfigError(f"mismatch_action must be one of {MISMATCH_ACTIONS}, got {self.mismatch_action!r}")

    def identity(self) -> dict:
        """What the responses depend on (the seed is the trainer's), keyed by flag dests."""
        p = self.sampling
        return {"rollout_engine": self.engine, "max_new_tokens": p.max_new_tokens, "temperature": p.temperature,
                "top_p": p.top_p, "top_k": p.top_k, "stop_token_ids": list(p.stop_ids)}

    @classmethod
    def from_args(cls, args, stop_ids) -> "RolloutConfig":
        return cls(engine=args.rollout_engine, sampling=SamplingParams(
            max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
            top_k=args.top_k, stop_ids=tuple(stop_ids), seed=args.seed),
            gpu_memory_utilization=args.vllm_gpu_memory_utilization, max_logp_diff=args.max_rollout_logp_diff,
            mismatch_action=args.rollout_mismatch or "error")


@dataclass
class TrainingConfig:
    """What the shared trainer reads (flags of ``train/arguments.py``, same names)."""

    load: str
    save: str
    data_path: str
    global_batch_size: int
    seq_length: int
    lr: float
    micro_batch_size: int = 1
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    num_layers_per_virtual_pipeline_stage: int | None = None
    num_virtual_stages_per_pipeline_rank: int | None = None
    sequence_parallel: bool = False
    use_distributed_optimizer: bool = False
    recompute_granularity: str | None = None
    recompute_method: str = "uniform"
    recompute_num_layers: int = 1
    transformer_impl: str = "auto"
    pack_sequences: bool = False
    train_iters: int | None = None
    seed: int = 1234
    no_shuffle: bool = False
    min_lr: float = 0.0
    lr_warmup_fraction: float = 0.0
    lr_decay_style: str = "cosine"
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    bf16: bool = False
    offload_frozen_models: bool = False
    skip_bad_records: bool = False
    save_interval: int | None = None
    exit_interval: int | None = None
    no_export: bool = False
    log_interval: int = 1
    tensorboard_dir: str | None = None
    no_progress: bool = False
    override_opt_param_scheduler: bool = False

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
        if self.transformer_impl not in TRANSFORMER_IMPLS:
            raise ConfigError(f"--transformer-impl must be one of {TRANSFORMER_IMPLS}, got {self.transformer_impl!r}")

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
        import os

        fields = {f: getattr(self, f) for f in TRAINING_IDENTITY}
        return fields | {"load": os.path.realpath(self.load), "data_path": os.path.realpath(self.data_path)}

    @classmethod
    def from_args(cls, args) -> "TrainingConfig":
        return _from_args(cls, args)


# TrainingConfig fields of the run identity (besides the load and data paths)
TRAINING_IDENTITY = ("global_batch_size", "seq_length", "seed", "no_shuffle", "skip_bad_records", "lr", "min_lr",
                     "lr_warmup_fraction", "lr_decay_style", "weight_decay", "adam_beta1", "adam_beta2", "adam_eps",
                     "clip_grad", "bf16", "train_iters", "tensor_model_parallel_size",
                     "pipeline_model_parallel_size", "num_layers_per_virtual_pipeline_stage",
                     "num_virtual_stages_per_pipeline_rank", "use_distributed_optimizer")
