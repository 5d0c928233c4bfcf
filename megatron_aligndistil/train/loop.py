"""The one training loop shared by every method (AlignDistil, SFT, DPO): models, schedule,
optimizer, LR schedule, clipping, rollouts, checkpoints, metrics. A method (``train/method.py``)
only says which frozen models it needs, which sequences a record holds, its per-token terms and
its per-sequence reduction.

Reduction: :func:`~megatron_aligndistil.train.method.score_micro_batch` returns, per micro-batch,
the *sum* over its examples (sequences, or DPO pairs) of each example's loss and the number of
examples. Megatron's schedule (``calculate_per_token_loss``) then divides the gradients by the
number of examples of the whole global batch (all micro-batches and DP ranks), so the optimised
loss is the mean over the global batch of the per-example loss, whatever the TP/PP/DP/micro-batch
layout and however records are packed into rows. The logged loss is reduced the same way.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import time

import torch

from ..core import parallel
from .. import platform
from ..core.errors import UserError
from ..config import RolloutConfig, TrainingConfig
from ..data.batching import build_micro_batch, global_batch_indices
from ..data import read_records
from ..models import qwen
from ..rollout import MISMATCH_MAXES, MISMATCH_SUMS, logprob_mismatch, mismatch_metrics
from ..core import weights
from . import checkpointing
from .method import Method, score_micro_batch
from .metrics import MetricsWriter
from .statistics import MAX, REPLICA, SHARD, StepStatistics
from ..core.schedule import drive, pipeline_rows


class TrainingDiverged(UserError):
    """Non-finite loss or gradients. ``before_step``: found before the optimizer step (weights intact)."""

    def __init__(self, iteration: int, detail: str, before_step: bool = True, what: str = "non-finite gradients"):
        state = ("stopped before the optimizer step, so the weights and the last checkpoint are intact"
                 if before_step else "the in-memory weights may be damaged; the last checkpoint is intact")
        super().__init__(
            f"iteration {iteration}: {what} ({detail.strip()}); {state}. Check the data and the "
            "--load / teacher checkpoints for NaN, or lower --lr, then resume from the last checkpoint.")


# the flag that loads each model role, for messages
ROLE_FLAGS = {"policy": "--load", "dpo": "--dpo-load", "rev": "--rev-load", "ref": "--ref-load"}


def _refuse_identical_frozen_models(models, specs) -> None:
    """Two frozen models of different roles with the same weights (e.g. --rev-load a copy of the
    DPO teacher) make the method degenerate: refused, naming both flags. Each rank compares its own
    shards; one all-reduce over the model-parallel group (DP replicas hold the same weights)."""
    from megatron.core import parallel_state

    if len(models) < 2:
        return
    pairs = [(i, j) for i in range(len(models)) for j in range(i + 1, len(models))]
    differ = torch.tensor([float(any(not torch.equal(a, b) for a, b in zip(models[i].parameters(),
                                                                          models[j].parameters())))
                           for i, j in pairs], device=platform.device())
    torch.distributed.all_reduce(differ, group=parallel_state.get_model_parallel_group())
    for (i, j), d in zip(pairs, differ.tolist()):
        if not d:
            a, b = specs[i], specs[j]
            raise UserError(f"{ROLE_FLAGS.get(a.role, a.role)} {a.path} and {ROLE_FLAGS.get(b.role, b.role)} {b.path} "
                            f"hold the same weights: the {a.role} and {b.role} models must differ (AlignDistil's "
                            "teacher extrapolates from their difference)")


class Trainer:
    """``config``: the shared training options; ``method``: what is trained; ``rollout``: the
    on-policy engine's config (on-policy methods only); ``flags``: the parsed command line, written
    to the run directory and compared on resume (default: the config's fields)."""

    def __init__(self, config: TrainingConfig, method: Method, rollout: RolloutConfig | None = None, flags=None):
        if method.on_policy and rollout is None:
            raise ValueError(f"{method.name} samples on-policy: give a RolloutConfig")
        self.cfg = config
        self.method = method
        self.rollout_config = rollout
        self.flags = flags or argparse.Namespace(method=method.name, **dataclasses.asdict(config))

    # ---------------------------------------------------------------- setup
    def setup(self):
        from megatron.core import parallel_state

        cfg = self.cfg
        # the architecture first (a file read): the layout's virtual stages depend on its layers
        self.resume_dir = weights.latest_checkpoint(cfg.save)
        policy_source = self.resume_dir or cfg.load
        self.arch = qwen.read_arch(policy_source)
        self.layout = parallel.Layout(cfg.tensor_model_parallel_size, cfg.pipeline_model_parallel_size,
                                      cfg.sequence_parallel, vpp=cfg.virtual_stages(self.arch.num_layers),
                                      ep=cfg.expert_model_parallel_size, etp=cfg.expert_tensor_parallel_size)
        self.arch.check_layout(self.layout.tp, self.layout.pp, self.layout.vpp, self.layout.ep,
                               sequence_parallel=cfg.sequence_parallel)
        parallel.init_model_parallel(self.layout, seed=cfg.seed)
        if self.arch.is_moe and cfg.moe_token_dispatcher_type != "allgather" and platform.backend() != "nccl":
            raise UserError(f"--moe-token-dispatcher-type {cfg.moe_token_dispatcher_type} needs NCCL (GPUs); this "
                            f"run's backend is {platform.backend()}: use --moe-token-dispatcher-type allgather")
        if self.rollout_config is not None and self.rollout_config.engine == "vllm":
            from ..rollout.vllm import check_supported

            check_supported(self.arch)
        self.dp_rank = parallel_state.get_data_parallel_rank()
        self.dp_size = parallel_state.get_data_parallel_world_size()
        per_step = cfg.micro_batch_size * self.dp_size
        if cfg.global_batch_size % per_step:
            raise UserError(f"--global-batch-size {cfg.global_batch_size} is not divisible by "
                            f"--micro-batch-size {cfg.micro_batch_size} x data-parallel size {self.dp_size}")
        self.rows = cfg.micro_batch_size * self.method.sequences_per_record  # rows of a micro-batch
        self.thd = qwen.use_transformer_engine(cfg.transformer_impl)
        if self.thd and cfg.pack_sequences and self.rows != 1:
            raise UserError("--pack-sequences with TransformerEngine layers (the THD format) takes one row per "
                            "micro-batch: use --micro-batch-size 1 (not available for DPO, two rows per pair), "
                            "or --transformer-impl local")
        self.overrides = {}
        if self.resume_dir:  # the same run, at the same layout, or a clear refusal
            self.overrides = checkpointing.check_resumable(self.run_identity(), cfg.save, self.resume_dir,
                                                           cfg.override_opt_param_scheduler)
        if cfg.seq_length > self.arch.max_position_embeddings:
            raise UserError(f"--seq-length {cfg.seq_length} exceeds the model's max_position_embeddings "
                            f"{self.arch.max_position_embeddings} ({policy_source})")
        # ids [0, vocab_size) carry probability; the rest of the embedding rows are padding
        self.vocab_size = weights.tokenizer_vocab_size(self.arch, cfg.load)
        if self.vocab_size < self.arch.padded_vocab_size and torch.distributed.get_rank() == 0:
            print(f"vocabulary: {self.vocab_size} tokenizer ids of {self.arch.padded_vocab_size} embedding rows "
                  f"(config vocab_size {self.arch.vocab_size}); the other rows carry no probability", flush=True)
        if self.rollout_config is not None:
            weights.check_stop_ids(self.rollout_config.sampling.stop_ids, self.vocab_size, cfg.load)
        self._load_data()  # a bad record fails in seconds, before any model is built
        frozen = self.method.frozen_models()
        self.role_paths = [("policy", policy_source)] + [(spec.role, spec.path) for spec in frozen]
        self.roles = [role for role, _ in self.role_paths]
        for spec in frozen:
            weights.check_compatible(self.arch, policy_source, spec.path, spec.role)
        self.transformer_config = qwen.transformer_config(
            self.arch, params_dtype=torch.bfloat16 if cfg.bf16 else torch.float32, bf16=cfg.bf16,
            sequence_parallel=cfg.sequence_parallel, recompute_granularity=cfg.recompute_granularity,
            recompute_method=cfg.recompute_method if cfg.recompute_granularity == "full" else None,
            recompute_num_layers=cfg.recompute_num_layers if cfg.recompute_granularity == "full" else None,
            vpp=self.layout.vpp, moe_options=cfg.moe_options(),
        )
        self.transformer_config.calculate_per_token_loss = True
        # frozen models route like the policy but add no load-balancing loss
        self.frozen_config = dataclasses.replace(self.transformer_config, moe_router_load_balancing_type="none",
                                                 moe_aux_loss_coeff=0.0) if self.arch.is_moe else self.transformer_config
        self.model = self._build_models(frozen, policy_source)
        self.routing = None  # MoE: the policy's routing metrics
        if self.arch.is_moe:
            from .routing import RoutingStatistics

            self.routing = RoutingStatistics(self.policy_chunks, self.arch.moe_layers, self.arch.num_experts,
                                             cfg.sequence_parallel, self._balancing_type())
        self.optimizer = self._build_optimizer()
        self.train_iters = cfg.train_iters or max(1, len(self.data) // cfg.global_batch_size)
        self._build_scheduler()
        self._resume()
        self.engine, self.mismatch = None, False
        if self.method.on_policy:  # after _resume: an engine with weights of its own syncs the resumed policy
            from ..rollout import make_engine

            # the engine samples from all the policy's chunks (virtual stages: around the ring of chunks)
            self.engine = make_engine(self.rollout_config, self.policy_chunks, self.arch, self.vocab_size,
                                      max_model_len=cfg.seq_length + 1, checkpoint=policy_source,
                                      optimizer=self.optimizer)
            self.mismatch = self.engine.reports_logprobs  # rollout_logp_* metrics
        is_rank0 = torch.distributed.get_rank() == 0
        wandb = None
        if cfg.wandb_project:
            wandb = {"project": cfg.wandb_project, "name": cfg.wandb_exp_name, "dir": cfg.wandb_save_dir,
                     "config": {k: v for k, v in vars(self.flags).items() if not k.startswith("_")}}
        self.metrics = MetricsWriter(cfg.save, cfg.tensorboard_dir, enabled=is_rank0, resume_iteration=self.iteration,
                                     wandb=wandb)
        if is_rank0:
            checkpointing.write_run_files(self.flags, self.arch, cfg.load,
                                          resumed_at=self.iteration if self.resume_dir else None,
                                          overrides=self.overrides)
        return self

    def _load_data(self):
        cfg = self.cfg
        self.data = read_records(cfg.data_path, self.method.data_kind, self.vocab_size,
                               max_tokens=cfg.seq_length if self.method.on_policy else cfg.seq_length + 1,
                               skip_bad=cfg.skip_bad_records)
        if self.data.skipped and torch.distributed.get_rank() == 0:
            reasons = ", ".join(f"{n} {reason}" for reason, n in self.data.skipped.most_common())
            print(f"--skip-bad-records: skipped {sum(self.data.skipped.values())} of "
                  f"{sum(self.data.skipped.values()) + len(self.data)} records of {cfg.data_path} ({reasons})",
                  flush=True)

    def _resume(self):
        self.iteration, self.consumed = 0, 0
        if self.resume_dir:
            state = checkpointing.load_training_state(self.resume_dir, self.policy_chunks, self.optimizer,
                                                      self.scheduler)
            self.iteration, self.consumed = state["iteration"], state["consumed_samples"]
            if self.cfg.override_opt_param_scheduler:  # the restored param groups carry the old lr bounds
                for group in self.optimizer.param_groups:
                    group.update(max_lr=self.cfg.lr, min_lr=self.cfg.min_lr)
                self.scheduler.step(increment=0)
            if torch.distributed.get_rank() == 0:
                print(f"resuming from iteration {self.iteration} ({self.resume_dir})", flush=True)

    def _build_models(self, frozen, policy_source):
        """This rank's model chunks (one per virtual pipeline stage; one without them), each a
        LockstepStage of the policy's and every frozen model's layers of that chunk, wrapped for
        Megatron (Float16Module in bf16, DistributedDataParallel). Returns the wrapped chunks."""
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
        from megatron.core.transformer.module import Float16Module

        from ..core.lockstep import LockstepStage

        impl = self.cfg.transformer_impl
        policy = qwen.build_chunks(self.arch, self.transformer_config, impl)
        frozen_models = {spec.role: qwen.build_chunks(self.arch, self.frozen_config, impl) for spec in frozen}
        if not self.resume_dir:
            for chunk in policy:
                weights.load_weights(chunk, policy_source)
        for spec in frozen:
            for chunk in frozen_models[spec.role]:
                weights.load_weights(chunk, spec.path, vocab_rows=True)
        _refuse_identical_frozen_models([torch.nn.ModuleList(frozen_models[spec.role]) for spec in frozen], frozen)
        self.stages = [LockstepStage(chunk, {role: chunks[v] for role, chunks in frozen_models.items()})
                       for v, chunk in enumerate(policy)]
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, overlap_grad_reduce=False,
            use_distributed_optimizer=self.cfg.use_distributed_optimizer,
            check_for_nan_in_grad=True,  # as Megatron-LM's --check-for-nan-in-loss-and-grad (default on)
        )
        wrapped = [Float16Module(self.transformer_config, stage) if self.cfg.bf16 else stage for stage in self.stages]
        model = [DistributedDataParallel(config=self.transformer_config, ddp_config=ddp_config, module=module,
                                         disable_bucketing=v > 0)  # as Megatron-LM: one bucket for later chunks
                 for v, module in enumerate(wrapped)]
        self.frozen_streamers = []  # --offload-frozen-models: one per frozen model chunk
        if self.cfg.offload_frozen_models:  # after Float16Module cast them to bf16
            from ..models.offload import offload_frozen_models

            self.frozen_streamers = offload_frozen_models([m for chunks in frozen_models.values() for m in chunks])
        no_sync = [chunk.no_sync for chunk in model]
        self.transformer_config.no_sync_func = no_sync if len(model) > 1 else no_sync[0]
        from megatron.core.distributed import finalize_model_grads

        def check_loss_then_finalize(*args, **kwargs):
            # every rank runs this once per step after its last backward: the step's statistics are
            # reduced here, so a non-finite loss stops all ranks together, naming the model, before
            # Megatron's gradient reduction (and its own NaN check) and before the optimizer step
            self._reduce_statistics()
            return finalize_model_grads(*args, **kwargs)

        self.transformer_config.finalize_model_grads_func = check_loss_then_finalize
        return model

    @property
    def policy_chunks(self) -> list:
        """The policy's model chunks on this rank, in pipeline order."""
        return [stage.policy for stage in self.stages]

    def _build_optimizer(self):
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

        a = self.cfg
        opt_config = OptimizerConfig(
            optimizer="adam", lr=a.lr, min_lr=a.min_lr, weight_decay=a.weight_decay,
            adam_beta1=a.adam_beta1, adam_beta2=a.adam_beta2, adam_eps=a.adam_eps,
            clip_grad=a.clip_grad, bf16=a.bf16, params_dtype=torch.float32,
            use_distributed_optimizer=a.use_distributed_optimizer,
        )
        optimizer = get_megatron_optimizer(opt_config, self.model)
        self.transformer_config.grad_scale_func = optimizer.scale_loss
        return optimizer

    def _build_scheduler(self):
        from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

        a = self.cfg
        warmup = int(a.lr_warmup_fraction * self.train_iters)
        self.scheduler = OptimizerParamScheduler(
            self.optimizer, init_lr=0.0, max_lr=a.lr, min_lr=a.min_lr, lr_warmup_steps=warmup,
            lr_decay_steps=self.train_iters, lr_decay_style=a.lr_decay_style,
            start_wd=a.weight_decay, end_wd=a.weight_decay, wd_incr_steps=self.train_iters,
            wd_incr_style="constant", override_opt_param_scheduler=a.override_opt_param_scheduler,
            use_checkpoint_opt_param_scheduler=not a.override_opt_param_scheduler,
        )

    # ---------------------------------------------------------------- one iteration
    def _local_micro_batches(self):
        """This DP rank's micro-batches of the next global batch, their row length, and rollout
        metrics (on-policy). One row length for the whole pipeline replica (DP replicas may
        differ: no forward crosses DP)."""
        cfg = self.cfg
        idx = global_batch_indices(len(self.data), self.consumed, cfg.global_batch_size, cfg.seed,
                                   shuffle=not cfg.no_shuffle)
        per_rank = cfg.global_batch_size // self.dp_size
        lo = self.dp_rank * per_rank
        mine = [self.data.records[i] for i in idx[lo: lo + per_rank]]
        rollout = {}
        if self.method.on_policy:
            mine, rollout = self._rollout(mine, first_sample=self.consumed + lo)
        multiple = cfg.tensor_model_parallel_size if cfg.sequence_parallel else 1
        pack_length = cfg.seq_length if cfg.pack_sequences else None
        batches, seq_len = self.method.micro_batches(mine, self.rows, multiple, pack_length=pack_length)
        if cfg.expert_model_parallel_size > 1:
            # expert-parallel ranks (other data-parallel replicas) exchange their tokens in every MoE
            # layer: one row length for all of them, the longest, and as many micro-batches (packed
            # steps have as many as their tokens need): a rank with fewer runs empty ones (all
            # padding: no loss, no example, no routed-token count)
            from megatron.core import parallel_state

            shape = torch.tensor([seq_len, len(batches)], device=platform.device())
            torch.distributed.all_reduce(shape, op=torch.distributed.ReduceOp.MAX,
                                         group=parallel_state.get_expert_tensor_and_model_parallel_group())
            longest, count = shape.tolist()
            if longest > seq_len:
                batches, seq_len = self.method.micro_batches(mine, self.rows, multiple, pack_length=pack_length,
                                                             at_least=longest)
            batches += [build_micro_batch([[] for _ in range(self.rows)], seq_len, packed=pack_length is not None)
                        for _ in range(count - len(batches))]
        return batches, seq_len, rollout

    def _rollout(self, prompts, first_sample: int):
        """Responses to ``prompts`` from the current policy through the rollout engine (paper:
        temperature 1, top-p 1); rollout metrics averaged over the global batch."""
        from megatron.core import parallel_state

        t0 = time.time()
        # each sequence may fill the model's input up to --seq-length (+1: the last token is only a target)
        limits = [min(self.rollout_config.sampling.max_new_tokens, self.cfg.seq_length + 1 - len(r["prompt_ids"]))
                  for r in prompts]
        out = self.engine.generate([r["prompt_ids"] for r in prompts],
                                   sequence_ids=list(range(first_sample, first_sample + len(prompts))),
                                   max_new_tokens=limits)
        self.engine.offload()  # frees an engine's own memory (vLLM on GPUs) until the next weight sync
        records = [{"prompt_ids": r["prompt_ids"], "response_ids": o.response_ids} for r, o in zip(prompts, out)]
        if self.mismatch:  # the trainer recomputes them (forward_backward): training-inference mismatch
            for rec, o in zip(records, out):
                rec["sampler_logprobs"] = o.logprobs
        stats = torch.tensor([len(out), sum(len(o.response_ids) for o in out), sum(o.stopped for o in out)],
                             dtype=torch.float64, device=platform.device())
        torch.distributed.all_reduce(stats, group=parallel_state.get_data_parallel_group())
        n, length, stopped = stats.cpu().tolist()
        return records, {"rollout_s": time.time() - t0, "response_len_mean": length / n, "eos_rate": stopped / n}

    def _balancing_type(self) -> str | None:
        """The policy routers' load-balancing loss (``--moe-router-load-balancing-type``), None without one."""
        return self.cfg.balancing_loss_type() if self.arch.is_moe else None

    def _set_balancing_loss_weight(self, batches) -> None:
        """With a MoE router load-balancing loss: weight it for this step.

        Megatron's router adds ``coeff x aux_mb x T_mb`` per micro-batch (T_mb its non-padding
        tokens, as ``calculate_per_token_loss`` expects) and the gradients are divided by the
        global example count N (here records, not tokens). The coefficient it reads is therefore
        set to ``coeff x N / T``, T the global batch's non-padding input tokens: the loss added is
        ``coeff x`` the token-weighted mean of the micro-batches' balancing losses, summed over
        layers (Megatron-LM's per-token semantics). One all-reduce of one number per step."""
        cfg = self.cfg
        if self._balancing_type() is None:
            return
        from megatron.core import parallel_state

        tokens = torch.tensor([float(sum(int((b.seq_index >= 0).sum()) for b in batches))], device=platform.device())
        torch.distributed.all_reduce(tokens, group=parallel_state.get_data_parallel_group())
        self.transformer_config.moe_aux_loss_coeff = cfg.moe_aux_loss_coeff * cfg.global_batch_size / max(
            float(tokens), 1.0)

    def forward_backward(self, batches, seq_len: int) -> dict:
        """Forward and backward over this rank's micro-batches (one schedule call); gradients
        reduced over DP and divided by the global example count. Returns the step's global sums
        of the statistics (``loss``, ``sequences``, the method's ``stat_names``)."""
        vocab_size = self.vocab_size

        def score(outputs, batch):
            loss, n_examples, vec, bad = score_micro_batch(self.method, outputs, batch, vocab_size)
            self._statistics.add(terms=vec, nonfinite=bad)
            if batch.sampler_logprobs is not None:
                sums, maxes = logprob_mismatch(outputs["policy"], batch, vocab_size)
                self._statistics.add(mismatch=sums, mismatch_max=maxes)
            return loss, n_examples

        for chunk in self.model:
            chunk.zero_grad_buffer()
        self.optimizer.zero_grad()
        groups = {"terms": (("loss", "sequences") + tuple(self.method.stat_names), REPLICA),
                  "nonfinite": (tuple(self.roles), SHARD)}
        if self.mismatch:  # the training-inference mismatch of this step's rollouts
            groups |= {"mismatch": (MISMATCH_SUMS, REPLICA), "mismatch_max": (MISMATCH_MAXES, MAX)}
        if self.routing:
            groups |= self.routing.groups()
        self._statistics, self._step_sums = StepStatistics(groups), None
        try:
            self._set_balancing_loss_weight(batches)
            drive(self.model, batches, score, forward_only=False, seq_length=seq_len,
                  rows=pipeline_rows(self.rows, self.stages[0].num_models), thd=self.thd,
                  model_kwargs={"fp32_output": False} if self.cfg.bf16 else None, padding_mask=self.arch.is_moe)  # routers count no padding
        except RuntimeError as exc:  # Megatron's DDP check (check_for_nan_in_grad) found NaN / Inf
            if "found NaN" in str(exc) or "found Inf" in str(exc):
                raise TrainingDiverged(self.iteration + 1, str(exc)) from exc
            raise
        return self._step_sums

    def train_step(self):
        """One optimizer step on the next global batch; returns the metrics of this iteration."""
        batches, seq_len, rollout = self._local_micro_batches()
        sums = self.forward_backward(batches, seq_len)
        if self.iteration == 0:
            self.method.check_first_step(sums)
        if self.mismatch:  # before the update: a step on another model's samples is not taken
            self._check_rollout_mismatch(mismatch_metrics(*self._mismatch_sums))
        ok, grad_norm, _ = self.optimizer.step()
        if not ok or (grad_norm is not None and not math.isfinite(grad_norm)):
            raise TrainingDiverged(self.iteration + 1, f"gradient norm {grad_norm}", before_step=False)
        if self.method.on_policy:
            t0 = time.time()
            self.engine.sync_weights(self.policy_chunks)
            rollout["weight_sync_s"] = time.time() - t0
        self.scheduler.step(increment=1)
        self.iteration += 1
        self.consumed += self.cfg.global_batch_size
        metrics = {
            "iteration": self.iteration,
            "loss": sums["loss"] / max(sums["sequences"], 1.0),
            "grad_norm": float(grad_norm) if grad_norm is not None else None,
            "sequences": int(sums["sequences"]),
        }
        metrics.update(self.method.metrics(sums))
        metrics.update(rollout)
        if self.routing:
            metrics.update(self.routing.metrics(self._routing_sums))
        if self.mismatch:
            metrics.update(mismatch_metrics(*self._mismatch_sums))
        return metrics

    def _check_rollout_mismatch(self, mismatch: dict) -> None:
        """Stop (or warn, ``--rollout-mismatch warn``) when this step's responses were sampled by an
        engine whose log-probs are ``--max-rollout-logp-diff`` (mean nats per token) away from the
        policy's. Every rank holds the same global values, so all stop together."""
        from ..rollout.agreement import EngineDisagreement, tolerance

        cfg = self.rollout_config
        limit = cfg.max_logp_diff or tolerance(torch.bfloat16 if self.cfg.bf16 else torch.float32)
        got = mismatch["rollout_logp_diff_mean"]
        if got <= limit:
            return
        text = (f"iteration {self.iteration + 1}: the {cfg.engine} rollout engine's responses have log-probs "
                f"{got:.3g} nats/token (mean; max {mismatch['rollout_logp_diff_max']:.3g}) away from the policy's, "
                f"past --max-rollout-logp-diff {limit:g}")
        if cfg.mismatch_action == "error":
            raise EngineDisagreement(f"{text}; stopped before the optimizer step, so the weights and the last "
                                     "checkpoint are intact. --rollout-mismatch warn trains on")
        if torch.distributed.get_rank() == 0:
            import sys

            print(f"warning: {text} (--rollout-mismatch warn: training on)", file=sys.stderr, flush=True)

    def _reduce_statistics(self):
        """Collective (all ranks, once per step): the step's statistics summed over the world into
        ``self._step_sums`` (and the rollout mismatch into ``self._mismatch_sums``); raise
        :class:`TrainingDiverged` on a non-finite loss, naming the models whose logits were NaN/inf
        at response positions."""
        if self.routing:
            self.routing.add_to(self._statistics)
        reduced = self._statistics.reduce()
        self._routing_sums = reduced if self.routing else None
        if self.mismatch:
            self._mismatch_sums = (reduced["mismatch"], reduced["mismatch_max"])
        self._step_sums = reduced["terms"]
        bad = {role for role, n in reduced["nonfinite"].items() if n}
        if not math.isfinite(self._step_sums["loss"]):
            models = ", ".join(f"{role} ({ROLE_FLAGS.get(role, role)} {path})" for role, path in self.role_paths
                               if role in bad) or "none: every logit is finite, the loss itself overflowed"
            raise TrainingDiverged(self.iteration + 1, f"NaN/inf logits at response positions from: {models}",
                                   what="non-finite loss")

    # ---------------------------------------------------------------- the loop
    def train(self):
        from tqdm import tqdm

        a = self.cfg
        is_rank0 = torch.distributed.get_rank() == 0
        # the bar on a terminal; plain log lines every --log-interval otherwise (or with --no-progress)
        bar = tqdm(total=self.train_iters, initial=self.iteration, disable=not is_rank0 or a.no_progress,
                   desc=f"{self.method.name}", unit="it", dynamic_ncols=True)
        start = time.time()
        steps_this_run = 0
        last = None
        if self.iteration >= self.train_iters and is_rank0:
            print(f"the run in {a.save} is complete (iteration {self.iteration} of {self.train_iters}); "
                  "nothing to train", flush=True)
        while self.iteration < self.train_iters:
            t0 = time.time()
            lr_used = self.optimizer.param_groups[0]["lr"]  # set by the scheduler for this step
            m = self.train_step()
            m["lr"] = lr_used
            m["elapsed_s"] = time.time() - t0
            m["wall_s"] = time.time() - start
            if torch.cuda.is_available():  # rank 0's peak so far, as Megatron-LM's memory report
                m["mem_max_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
            self.metrics.write(m)
            last = m
            bar.update(1)
            bar.set_postfix(loss=f"{m['loss']:.4f}", lr=f"{m['lr']:.2e}")
            steps_this_run += 1
            if (bar.disable and is_rank0 and (self.iteration % a.log_interval == 0
                                              or self.iteration == self.train_iters)):
                print(self._log_line(m), flush=True)
            exiting = bool(a.exit_interval) and steps_this_run >= a.exit_interval
            # a checkpoint at every --save-interval, at the end, and at --exit-interval (Megatron-LM
            # saves there too, so a chained job continues where this one stopped)
            if ((a.save_interval and self.iteration % a.save_interval == 0) or exiting
                    or self.iteration == self.train_iters):
                checkpointing.save_training_state(a.save, self.iteration, self.consumed, self.policy_chunks,
                                                  self.optimizer, self.scheduler, self.layout_record())
            if exiting:
                break
        bar.close()
        release = os.path.join(a.save, weights.RELEASE)
        if self.iteration >= self.train_iters and not a.no_export and (steps_this_run or not os.path.isdir(release)):
            weights.export_release(self.policy_chunks, self.arch, a.load, release)
        self.metrics.close()
        return last

    def run_identity(self) -> dict:
        """Every setting that changes the trajectory, from the typed configs (the Python API and
        the command line alike): training, method (teachers included), rollouts."""
        ident = {"method": self.method.name} | self.cfg.identity() | self.method.identity()
        if self.rollout_config is not None:
            ident |= self.rollout_config.identity()
        return ident

    def layout_record(self) -> dict:
        """What a checkpoint of this run must be resumed with (checked by ``check_resumable``)."""
        return self.run_identity() | {"data_parallel_size": self.dp_size}

    def _log_line(self, m: dict) -> str:
        keys = ("loss", "kl", "alpha_mean", "tvd_mean", "reward_accuracy", "grad_norm", "lr", "elapsed_s")
        fields = " | ".join(f"{k} {m[k]:.4g}" for k in keys if isinstance(m.get(k), (int, float)))
        return f"{self.method.name} iteration {m['iteration']}/{self.train_iters} | {fields}"
