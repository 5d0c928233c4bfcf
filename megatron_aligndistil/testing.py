"""Run a function in N real processes (torchrun-style env, gloo on CPU) and collect per-rank results.

Used by the tests and the benchmarks::

    results = run_distributed(check_fn, world_size=4, layout=Layout(tp=2, pp=2), args=(...,))

Rank functions ride along: :func:`megatron_logits` (a model's full logits at any layout),
:func:`measure_training` (a training run's peak memory) and :func:`measure_export` (the policy
export's).

``check_fn`` must be importable (a module-level function). Each rank gets the same ``args``; the
process group and, if ``layout`` is given, Megatron's parallel state exist when it runs. The
return value of every rank is saved with ``torch.save`` and returned as a list indexed by rank. If
any rank raises, all ranks are killed and :class:`DistributedError` carries that rank's
traceback; if the job exceeds ``timeout`` seconds (a hung collective), all ranks are killed too.
"""

from __future__ import annotations

import contextlib
import math
import multiprocessing
import os
import tempfile
import time
import traceback

import torch


class DistributedError(RuntimeError):
    """A rank of a :func:`run_distributed` job failed or the job timed out."""


# Ranks start from a fork server that has imported these once per calling process (the server
# is single-threaded after them): each rank skips ~10 s of imports on a 2-core machine. Every
# rank gets the caller's current environment. ALIGNDISTIL_START_METHOD=spawn starts each rank as
# a fresh interpreter instead.
_PRELOAD = ["torch", "numpy", "megatron.core.parallel_state", "megatron.core.models.gpt",
            "megatron.core.optimizer", "megatron.core.pipeline_parallel",
            "megatron.core.dist_checkpointing.strategies.filesystem_async", "transformers",
            "transformers.models.qwen2.modeling_qwen2", "transformers.models.qwen3.modeling_qwen3"]


def _context():
    method = os.environ.get("ALIGNDISTIL_START_METHOD", "forkserver")
    ctx = multiprocessing.get_context(method)
    if method == "forkserver":
        ctx.set_forkserver_preload(_PRELOAD)
    return ctx


def _in_process_checkpoint_queue() -> None:
    """Megatron's checkpoint writer reports its write results through a queue that it makes, once
    per process, from a ``Manager`` started with ``spawn``: a fresh interpreter per rank, ~2-3 s of
    a 2-core machine, most of a tiny test run's time. The saves here are synchronous: the rank
    itself gathers its forked writers' results, puts them in that queue and reads them back, which
    an in-process queue serves the same way (its ``put`` is immediate, as a Manager queue's; a
    multiprocessing queue's is not). Ranks of :func:`run_distributed` only; ``torchrun`` launches
    keep Megatron's own queue."""
    import queue

    from megatron.core.dist_checkpointing.strategies import filesystem_async

    filesystem_async._results_queue = queue.Queue()


def _worker(rank, world_size, port, outdir, fn, args, kwargs, layout, seed, env):
    _in_process_checkpoint_queue()
    os.environ.clear()
    os.environ.update(env)  # the caller's environment now, not the fork server's at its start
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
        OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
    )
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    try:
        from .core import parallel

        parallel.init_distributed(timeout_s=600)
        if layout is not None:
            parallel.init_model_parallel(layout, seed=seed)
        result = fn(*args, **kwargs)
        torch.save(result, os.path.join(outdir, f"rank{rank}.pt"))
    except BaseException:  # noqa: BLE001 - report every failure, including SystemExit
        with open(os.path.join(outdir, f"rank{rank}.err"), "w") as f:
            f.write(traceback.format_exc())
        os._exit(1)
    try:
        parallel.destroy()
    except Exception:  # noqa: BLE001 - results are already saved
        pass


def run_distributed(fn, world_size: int, args=(), kwargs=None, layout=None, seed: int = 1234,
                    timeout: float = 300.0):
    """Run ``fn(*args, **kwargs)`` on ``world_size`` spawned ranks; return the list of results."""
    from .core.parallel import free_port

    ctx = _context()
    with tempfile.TemporaryDirectory(prefix="aligndistil-dist-") as outdir:
        port = free_port()
        procs = [
            ctx.Process(
                target=_worker,
                args=(r, world_size, port, outdir, fn, tuple(args), dict(kwargs or {}), layout, seed,
                      dict(os.environ)),
                daemon=False,
            )
            for r in range(world_size)
        ]
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout
        failed = None
        try:
            while any(p.is_alive() for p in procs):
                for r, p in enumerate(procs):
                    if not p.is_alive() and p.exitcode not in (0, None):
                        failed = r
                        break
                if failed is not None:
                    break
                if time.monotonic() > deadline:
                    alive = [r for r, p in enumerate(procs) if p.is_alive()]
                    raise DistributedError(
                        f"{fn.__name__}: timed out after {timeout:.0f}s; ranks still running: {alive}"
                    )
                time.sleep(0.05)
            if failed is None:
                failed = next((r for r, p in enumerate(procs) if p.exitcode != 0), None)
            if failed is not None:
                # the first rank to fail holds the cause; others usually fail on a closed connection
                errs = sorted(
                    (os.path.getmtime(e), r, e) for r in range(world_size)
                    if os.path.exists(e := os.path.join(outdir, f"rank{r}.err"))
                )
                if errs:
                    _, rank, path = errs[0]
                    text = f"rank {rank}:\n" + open(path).read()
                else:
                    text = f"rank {failed} exited with code {procs[failed].exitcode} and no traceback"
                raise DistributedError(f"{fn.__name__} failed on a rank of {world_size}: {text}")
            return [
                torch.load(os.path.join(outdir, f"rank{r}.pt"), weights_only=False)
                for r in range(world_size)
            ]
        finally:
            for p in procs:
                if p.is_alive():
                    p.kill()
            for p in procs:
                p.join(timeout=10)


def megatron_logits(arch_fields: dict, full, tokens: torch.Tensor):
    """One rank: load a full Megatron state dict (or a converted checkpoint directory) at the
    current layout and run ``tokens`` ``[b, s]``; returns the TP-gathered logits ``[b, s, padded
    vocab]`` on the last stage, None elsewhere."""
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from .models import qwen
    from .core import sharding

    arch = qwen.QwenArch(**arch_fields)
    if isinstance(full, str):
        model = qwen.load_model(full, arch)
    else:
        model = qwen.build_model(arch, qwen.transformer_config(arch))
        sharding.load_full_state_dict(model, full)
        model.eval()
    seq = tokens.shape[1]

    def forward_step(data_iter, model):
        batch = next(data_iter)
        out = model(batch, torch.arange(seq).unsqueeze(0).expand_as(batch), None)

        def collect(logits):
            tp = parallel_state.get_tensor_model_parallel_world_size()
            parts = [torch.empty_like(logits) for _ in range(tp)]
            torch.distributed.all_gather(parts, logits.contiguous(),
                                         group=parallel_state.get_tensor_model_parallel_group())
            return torch.zeros(()), {"logits": torch.cat(parts, -1)}

        return out, collect

    with torch.no_grad():
        out = get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter([tokens]), model=[model],
            num_microbatches=1, seq_length=seq, micro_batch_size=tokens.shape[0], forward_only=True,
        )
    return out[0]["logits"] if out else None


def memory_status() -> dict:
    """This process's resident memory from /proc/self/status, bytes: RssAnon, VmHWM, VmRSS."""
    out = {}
    for line in open("/proc/self/status"):
        key, _, value = line.partition(":")
        if key in ("RssAnon", "VmHWM", "VmRSS", "RssFile"):
            out[key] = int(value.split()[0]) * 1024
    return out


@contextlib.contextmanager
def sampled_peak(fields=("RssAnon",)):
    """Yields a dict whose ``"above_base"`` is, after the block, the peak of the sum of ``fields``
    of /proc/self/status (default: anonymous memory; add ``RssFile`` for memory-mapped files) above
    its level at entry, in bytes (sampled every millisecond). Allocations above 64 KiB are mmap'd
    from here on (glibc ``mallopt``, as ``MALLOC_MMAP_THRESHOLD_=65536`` at start-up), so RSS
    follows live tensors."""
    import ctypes
    import threading

    ctypes.CDLL("libc.so.6").mallopt(-3, 65536)  # M_MMAP_THRESHOLD

    def now():
        status = memory_status()
        return sum(status[f] for f in fields)

    base = now()
    result = {"base": base, "above_base": 0}
    peak = [base]
    done = [False]

    def sample():
        while not done[0]:
            peak[0] = max(peak[0], now())
            time.sleep(0.001)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    try:
        yield result
    finally:
        done[0] = True
        t.join()
        result["above_base"] = max(peak[0], now()) - base


def measure_training(argv: list[str], full: bool = False):
    """One rank: train with ``argv`` (the trainer's command line) and return the peak anonymous
    memory above the start of model building, in bytes (:func:`sampled_peak`). ``full``:
    a dict instead, with also the process's peak RSS (``VmHWM``) and the baseline."""
    import megatron.core.models.gpt  # noqa: F401 - imports outside the measurement
    import megatron.core.optimizer  # noqa: F401

    from .train import build_trainer
    from .train.arguments import parse_args

    args = parse_args(argv)
    with sampled_peak() as peak:
        trainer = build_trainer(args)
        trainer.train()
    if not full:
        return peak["above_base"]
    return {"peak_anon_above_base": peak["above_base"], "base_anon": peak["base"],
            "vm_hwm": memory_status()["VmHWM"]}


def measure_export(arch_fields: dict, out: str, full: dict | None = None) -> dict:
    """One rank: build a policy of ``arch_fields`` at the current layout (random, or loaded from
    the full state dict ``full``) and write it with ``core.weights.export_release`` to ``out``.
    Returns the peak anonymous memory of the export above its start (bytes), and the largest
    full tensor and this rank's stage, in the export's dtype (bytes)."""
    from .core import sharding, weights
    from .models import qwen

    arch = qwen.QwenArch(**arch_fields)
    model = qwen.build_model(arch, qwen.transformer_config(arch))
    if full is not None:
        sharding.load_full_state_dict(model, full)
    itemsize = getattr(torch, arch.torch_dtype).itemsize
    full_bytes = []
    for local_name, param in model.named_parameters():
        name = sharding.full_name(model, local_name)
        if not (local_name.startswith("output_layer") and name == sharding.EMBEDDING):  # the export skips it
            full_bytes.append(math.prod(sharding.full_shape(name, param)) * itemsize)
    source = out + ".source"  # what a run's --load would be: the export copies its side files
    if torch.distributed.get_rank() == 0:
        os.makedirs(source, exist_ok=True)
        with open(os.path.join(source, weights.ARCH_FILE), "w") as f:
            f.write(arch.to_json())
    torch.distributed.barrier()
    with sampled_peak() as peak:
        weights.export_release(model, arch, source, out)
    return {"peak_above_start": peak["above_base"], "largest_tensor": max(full_bytes), "stage": sum(full_bytes)}
