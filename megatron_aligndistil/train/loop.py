"""The one training loop shared by every method (AlignDistil, DPO): models, schedule, optimizer,
LR schedule, clipping, checkpoints, metrics. A method (``train/aligndistil.py``, ``train/dpo.py``)
only says which frozen models it needs, how records become micro-batches, and the loss.

Reduction: a method's loss function returns, per micro-batch, the *sum* over its sequences of each
sequence's loss and the number of sequences. Megatron's schedule (``calculate_per_token_loss``)
then divides the gradients by the number of sequences of the whole global batch (all micro-batches
and DP ranks), so the optimised loss is the mean over the global batch of the per-sequence loss,
whatever the TP/PP/DP/micro-batch layout. The logged loss is reduced the same way.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass

import torch

from .. import parallel, platform
from ..cli_errors import UserError
from ..data.batching import global_batch_indices, padded_length
from ..data.records import read_jsonl
from ..models import qwen
from . import checkpointing
from .metrics import MetricsWriter


@dataclass
class FrozenSpec:
    role: str  # e.g. "dpo", "rev", "ref"
    path: str


class Method:
    """What a training method supplies to :class:`Trainer` (see aligndistil.py, dpo.py)."""

    name = "method"
    data_kind = "distill"
    sequences_per_record = 1  # sequences a record puts in a micro-batch (DPO: chosen + rejected)
    stat_names: tuple = ()  # summed statistics the loss reports besides loss and sequence count

    def __init__(self, args):
        self.args = args

    def frozen_models(self) -> list[FrozenSpec]:
        raise NotImplementedError

    def record_length(self, record) -> int:
        """Model input positions this record needs."""
        raise NotImplementedError

    def micro_batch(self, records, seq_len: int):
        """A micro-batch object with ``tokens``/``positions`` ``[b', s]`` for the given records."""
        raise NotImplementedError

    def loss(self, logits: list, batch, vocab_size: int):
        """``logits``: policy then frozen models, ``[b', s, V/TP]``. Returns (sum over the batch's
        examples of the per-example loss, differentiable; number of examples; dict of summed
        stats). An example is a sequence (AlignDistil, SFT) or a preference pair (DPO)."""
        raise NotImplementedError

    def metrics(self, sums: dict) -> dict:
        """metrics.jsonl fields from global sums of ``stat_names`` (plus loss, sequences)."""
        return {}


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


def score_micro_batch(method: Method, logits: list, batch, vocab_size: int):
    """The loss of one micro-batch and its statistics, on the logits' device.

    Returns ``(loss, n_examples, stats, bad)``: ``loss`` (0-dim, differentiable) is the method's
    summed loss, or 0 with zero gradient if it is not finite (the caller stops the run before the
    optimizer step); ``n_examples`` a 0-dim int tensor (Megatron's ``num_tokens``); ``stats`` the
    float32 vector [loss, examples, *method.stat_names]; ``bad`` float32 ``[len(logits)]``: per
    model, the response positions whose logits hold NaN or inf (counted only when the loss is not
    finite, as this needs a pass over the logits).
    """
    loss_sum, n_seq, stats = method.loss(logits, batch, vocab_size)
    dev = loss_sum.device
    finite = torch.isfinite(loss_sum)
    bad = torch.zeros(len(logits), dtype=torch.float32, device=dev)
    if dev.type != "meta" and not bool(finite):  # one host sync per micro-batch (Megatron checks its loss too)
        rows = batch.loss_mask.to(dev).reshape(-1) > 0
        for i, z in enumerate(logits):
            bad[i] = (~torch.isfinite(z.reshape(-1, z.shape[-1])[rows])).any(-1).sum()
    vec = torch.stack([loss_sum.detach().float(), torch.tensor(float(n_seq), device=dev)]
                      + [stats[k].detach().float().to(dev) for k in method.stat_names])
    loss = torch.where(finite, loss_sum, torch.zeros_like(loss_sum))  # zero gradient if not finite
    return loss, torch.tensor(n_seq, dtype=torch.int, device=dev), vec, bad


class Trainer:
    def __init__(self, args, method: Method):
        self.args = args
        self.method = method
        self.layout = parallel.Layout(args.tensor_model_parallel_size, args.pipeline_model_parallel_size,
                                      args.sequence_parallel)

    # ---------------------------------------------------------------- setup
    def setup(self):
        from megatron.core import parallel_state

        args = self.args
        parallel.init_model_parallel(self.layout, seed=args.seed)
        self.dp_rank = parallel_state.get_data_parallel_rank()
        self.dp_size = parallel_state.get_data_parallel_world_size()
        per_step = args.micro_batch_size * self.dp_size
        if args.global_batch_size % per_step:
            raise UserError(f"--global-batch-size {args.global_batch_size} is not divisible by "
                             f"--micro-batch-size {args.micro_batch_size} x data-parallel size {self.dp_size}")
        self.num_microbatches = args.global_batch_size // per_step

        is_rank0 = torch.distributed.get_rank() == 0
        self.resume_dir = checkpointing.latest_checkpoint(args.save)
        if self.resume_dir:  # the same run, at the same layout, or a clear refusal
            checkpointing.check_resumable(args, self.resume_dir)
        policy_source = self.resume_dir or args.load
        self.arch = qwen.read_arch(policy_source)
        if args.seq_length > self.arch.max_position_embeddings:
            raise UserError(f"--seq-length {args.seq_length} exceeds the model's max_position_embeddings "
                            f"{self.arch.max_position_embeddings} ({policy_source})")
        # data first: a bad record fails in seconds, before any model is built
        on_policy = getattr(self.method, "on_policy", False)
        self.stop_ids = checkpointing.stop_token_ids(args.load, args)
        self.data = read_jsonl(args.data_path, self.method.data_kind, self.arch.vocab_size,
                               max_tokens=args.seq_length if on_policy else args.seq_length + 1,
                               skip_bad=args.skip_bad_records)
        if self.data.skipped and is_rank0:
            reasons = ", ".join(f"{n} {reason}" for reason, n in self.data.skipped.most_common())
            print(f"--skip-bad-records: skipped {sum(self.data.skipped.values())} of "
                  f"{sum(self.data.skipped.values()) + len(self.data)} records of {args.data_path} ({reasons})",
                  flush=True)
        frozen = self.method.frozen_models()
        self.role_paths = [("policy", policy_source)] + [(spec.role, spec.path) for spec in frozen]
        self.roles = [role for role, _ in self.role_paths]
        for spec in frozen:
            checkpointing.check_compatible(self.arch, policy_source, spec.path, spec.role)
        self.config = qwen.transformer_config(
            self.arch, params_dtype=torch.bfloat16 if args.bf16 else torch.float32, bf16=args.bf16,
            sequence_parallel=args.sequence_parallel, recompute_granularity=args.recompute_granularity,
            recompute_method=args.recompute_method if args.recompute_granularity == "full" else None,
            recompute_num_layers=args.recompute_num_layers if args.recompute_granularity == "full" else None,
        )
        self.config.calculate_per_token_loss = True
        self.model = self._build_models(frozen, policy_source)
        self.optimizer = self._build_optimizer()
        self.train_iters = args.train_iters or max(1, len(self.data) // args.global_batch_size)
        self._build_scheduler()
        self.iteration, self.consumed = 0, 0
        if self.resume_dir:
            state = checkpointing.load_training_state(self.resume_dir, self.stage, self.optimizer,
                                                      self.scheduler)
            self.iteration, self.consumed = state["iteration"], state["consumed_samples"]
            if is_rank0:
                print(f"resuming from iteration {self.iteration} ({self.resume_dir})", flush=True)
        self.metrics = MetricsWriter(args.save, args.tensorboard_dir, enabled=is_rank0,
                                     resume_iteration=self.iteration)
        if is_rank0:
            checkpointing.write_run_files(args, self.arch, args.load)
        return self

    def _build_models(self, frozen, policy_source):
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
        from megatron.core.transformer.module import Float16Module

        from ..models.lockstep import LockstepStage

        policy = qwen.build_model(self.arch, self.config)
        frozen_models = [qwen.build_model(self.arch, self.config) for _ in frozen]
        if not self.resume_dir:
            checkpointing.load_weights(policy, policy_source)
        for model, spec in zip(frozen_models, frozen):
            checkpointing.load_weights(model, spec.path)
        self.stage = LockstepStage(policy, frozen_models)
        module = Float16Module(self.config, self.stage) if self.args.bf16 else self.stage
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, overlap_grad_reduce=False,
            use_distributed_optimizer=self.args.use_distributed_optimizer,
            check_for_nan_in_grad=True,  # as Megatron-LM's --check-for-nan-in-loss-and-grad (default on)
        )
        model = DistributedDataParallel(config=self.config, ddp_config=ddp_config, module=module)
        self.frozen_streamers = []  # --offload-frozen-models: one per frozen model
        if self.args.offload_frozen_models:  # after Float16Module cast them to bf16
            from ..models.offload import offload_frozen_models

            self.frozen_streamers = offload_frozen_models(frozen_models)
        self.config.no_sync_func = model.no_sync
        from megatron.core.distributed import finalize_model_grads

        def check_loss_then_finalize(*args, **kwargs):
            # every rank runs this once per step after its last backward: the step's statistics are
            # reduced here, so a non-finite loss stops all ranks together, naming the model, before
            # Megatron's gradient reduction (and its own NaN check) and before the optimizer step
            self._reduce_statistics()
            return finalize_model_grads(*args, **kwargs)

        self.config.finalize_model_grads_func = check_loss_then_finalize
        return model

    def _build_optimizer(self):
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

        a = self.args
        opt_config = OptimizerConfig(
            optimizer="adam", lr=a.lr, min_lr=a.min_lr, weight_decay=a.weight_decay,
            adam_beta1=a.adam_beta1, adam_beta2=a.adam_beta2, adam_eps=a.adam_eps,
            clip_grad=a.clip_grad, bf16=a.bf16, params_dtype=torch.float32,
            use_distributed_optimizer=a.use_distributed_optimizer,
        )
        optimizer = get_megatron_optimizer(opt_config, [self.model])
        self.config.grad_scale_func = optimizer.scale_loss
        return optimizer

    def _build_scheduler(self):
        from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

        a = self.args
        warmup = int(a.lr_warmup_fraction * self.train_iters)
        self.scheduler = OptimizerParamScheduler(
            self.optimizer, init_lr=0.0, max_lr=a.lr, min_lr=a.min_lr, lr_warmup_steps=warmup,
            lr_decay_steps=self.train_iters, lr_decay_style=a.lr_decay_style,
            start_wd=a.weight_decay, end_wd=a.weight_decay, wd_incr_steps=self.train_iters,
            wd_incr_style="constant",
        )

    # ---------------------------------------------------------------- one iteration
    def _local_micro_batches(self):
        """This DP rank's micro-batches of the next global batch, and rollout metrics (on-policy)."""
        a = self.args
        idx = global_batch_indices(len(self.data), self.consumed, a.global_batch_size, a.seed,
                                   shuffle=not a.no_shuffle)
        per_rank = a.global_batch_size // self.dp_size
        lo = self.dp_rank * per_rank
        mine = [self.data.records[i] for i in idx[lo: lo + per_rank]]
        rollout = {}
        if getattr(self.method, "on_policy", False):
            mine, rollout = self._rollout(mine, first_sample=self.consumed + lo)
        multiple = a.tensor_model_parallel_size if a.sequence_parallel else 1
        # one length for the whole pipeline replica (DP replicas may differ: no cross-DP forward)
        seq_len = padded_length([self.method.record_length(r) for r in mine], multiple)
        mbs = a.micro_batch_size
        return [self.method.micro_batch(mine[i: i + mbs], seq_len) for i in range(0, per_rank, mbs)], seq_len, rollout

    def _rollout(self, prompts, first_sample: int):
        """Sample responses to ``prompts`` from the current policy (paper: temperature 1, top-p 1)."""
        from megatron.core import parallel_state

        from ..generation import SamplingParams, generate

        a = self.args
        t0 = time.time()
        params = SamplingParams(max_new_tokens=a.max_new_tokens, temperature=a.temperature, top_p=a.top_p,
                                top_k=a.top_k, stop_ids=tuple(self.stop_ids), seed=a.seed)
        # each sequence may fill the model's input up to --seq-length (+1: the last token is only a target)
        limits = [min(a.max_new_tokens, a.seq_length + 1 - len(r["prompt_ids"])) for r in prompts]
        out = generate(self.stage.policy, [r["prompt_ids"] for r in prompts], params, self.arch.vocab_size,
                       sequence_ids=list(range(first_sample, first_sample + len(prompts))), max_new_tokens=limits)
        self.stage.policy.train()
        records = [{"prompt_ids": r["prompt_ids"], "response_ids": o["response_ids"]} for r, o in zip(prompts, out)]
        stats = torch.tensor([len(out), sum(len(o["response_ids"]) for o in out), sum(o["stopped"] for o in out)],
                             dtype=torch.float64, device=platform.device())
        torch.distributed.all_reduce(stats, group=parallel_state.get_data_parallel_group())
        n, length, stopped = stats.cpu().tolist()
        return records, {"rollout_s": time.time() - t0, "response_len_mean": length / n, "eos_rate": stopped / n}

    def train_step(self):
        """One optimizer step on the next global batch; returns the metrics of this iteration."""
        from megatron.core import parallel_state
        from megatron.core.pipeline_parallel import get_forward_backward_func

        batches, seq_len, rollout = self._local_micro_batches()
        vocab_size = self.arch.vocab_size
        method = self.method

        def forward_step(data_iter, model):
            batch = next(data_iter)
            kwargs = {"fp32_output": False} if self.args.bf16 else {}
            out = model(batch.tokens.to(platform.device()), batch.positions.to(platform.device()), None,
                        **kwargs)
            if not parallel_state.is_pipeline_last_stage():
                return out, None
            policy_logits, frozen_logits = out[0], out[1:]

            def loss_func(policy_out):
                loss, n_seq, vec, bad = score_micro_batch(method, [policy_out] + list(frozen_logits), batch,
                                                          vocab_size)
                frozen_logits.clear()  # teacher logits are released once this micro-batch is scored
                self._micro_statistics.append((vec, bad))
                return loss, n_seq, {}

            return policy_logits, loss_func

        self.model.zero_grad_buffer()
        self.optimizer.zero_grad()
        self._micro_statistics, self._step_sums = [], None
        try:
            get_forward_backward_func()(
                forward_step_func=forward_step, data_iterator=iter(batches), model=[self.model],
                num_microbatches=len(batches), seq_length=seq_len,
                micro_batch_size=self.args.micro_batch_size * self.method.sequences_per_record * self.stage.num_models,
                forward_only=False,
            )
        except RuntimeError as exc:  # Megatron's DDP check (check_for_nan_in_grad) found NaN / Inf
            if "found NaN" in str(exc) or "found Inf" in str(exc):
                raise TrainingDiverged(self.iteration + 1, str(exc)) from exc
            raise
        sums = self._step_sums
        ok, grad_norm, _ = self.optimizer.step()
        if not ok or (grad_norm is not None and not math.isfinite(grad_norm)):
            raise TrainingDiverged(self.iteration + 1, f"gradient norm {grad_norm}", before_step=False)
        self.scheduler.step(increment=1)
        self.iteration += 1
        self.consumed += self.args.global_batch_size
        metrics = {
            "iteration": self.iteration,
            "loss": sums["loss"] / max(sums["sequences"], 1.0),
            "grad_norm": float(grad_norm) if grad_norm is not None else None,
            "sequences": int(sums["sequences"]),
        }
        metrics.update(self.method.metrics(sums))
        metrics.update(rollout)
        return metrics

    def _reduce_statistics(self):
        """Collective (all ranks, once per step): sum the micro-batch statistics over the world into
        ``self._step_sums``; raise :class:`TrainingDiverged` on a non-finite loss, naming the models
        whose logits were NaN/inf at response positions."""
        from megatron.core import parallel_state

        stat_names = ("loss", "sequences") + tuple(self.method.stat_names)
        vec = torch.zeros(len(stat_names) + len(self.roles), dtype=torch.float64, device=platform.device())
        if self._micro_statistics:  # the last pipeline stage
            if parallel_state.get_tensor_model_parallel_rank() == 0:  # TP ranks hold equal stats
                vec[:len(stat_names)] = torch.stack([v for v, _ in self._micro_statistics]).sum(0).double()
            vec[len(stat_names):] = torch.stack([b for _, b in self._micro_statistics]).sum(0).double()  # per shard
        torch.distributed.all_reduce(vec)  # sums over DP; ranks off the last stage add zeros
        values = vec.cpu().tolist()
        self._step_sums = dict(zip(stat_names, values))
        bad = {role for role, n in zip(self.roles, values[len(stat_names):]) if n}
        if not math.isfinite(self._step_sums["loss"]):
            models = ", ".join(f"{role} ({ROLE_FLAGS.get(role, role)} {path})" for role, path in self.role_paths
                               if role in bad) or "none: every logit is finite, the loss itself overflowed"
            raise TrainingDiverged(self.iteration + 1, f"NaN/inf logits at response positions from: {models}",
                                   what="non-finite loss")

    # ---------------------------------------------------------------- the loop
    def train(self):
        from tqdm import tqdm

        a = self.args
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
                checkpointing.save_training_state(a.save, self.iteration, self.consumed, self.stage,
                                                  self.optimizer, self.scheduler, self.layout_record())
            if exiting:
                break
        bar.close()
        release = os.path.join(a.save, checkpointing.RELEASE)
        if self.iteration >= self.train_iters and not a.no_export and (steps_this_run or not os.path.isdir(release)):
            checkpointing.export_release(self.stage.policy, self.arch, a.load, release)
        self.metrics.close()
        return last

    def layout_record(self) -> dict:
        """What a checkpoint of this run must be resumed with (checked by ``check_resumable``)."""
        return checkpointing.run_identity(self.args) | {"data_parallel_size": self.dp_size}

    def _log_line(self, m: dict) -> str:
        keys = ("loss", "kl", "alpha_mean", "tvd_mean", "reward_accuracy", "grad_norm", "lr", "elapsed_s")
        fields = " | ".join(f"{k} {m[k]:.4g}" for k in keys if isinstance(m.get(k), (int, float)))
        return f"{self.method.name} iteration {m['iteration']}/{self.train_iters} | {fields}"
