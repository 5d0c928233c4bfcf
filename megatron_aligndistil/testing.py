"""Run a function in N real processes (torchrun-style env, gloo on CPU) and collect per-rank results.

Used by the tests and the benchmarks::

    results = run_distributed(check_fn, world_size=4, layout=Layout(tp=2, pp=2), args=(...,))

``check_fn`` must be importable (a module-level function). Each rank gets the same ``args``; the
process group and, if ``layout`` is given, Megatron's parallel state exist when it runs. The
return value of every rank is saved with ``torch.save`` and returned as a list indexed by rank. If
any rank raises, all ranks are killed and :class:`DistributedError` carries that rank's
traceback; if the job exceeds ``timeout`` seconds (a hung collective), all ranks are killed too.
"""

from __future__ import annotations

import multiprocessing
import os
import tempfile
import time
import traceback

import torch


class DistributedError(RuntimeError):
    """A rank of a :func:`run_distributed` job failed or the job timed out."""


def _worker(rank, world_size, port, outdir, fn, args, kwargs, layout, seed):
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
        OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
    )
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    try:
        from . import parallel

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
    from .parallel import free_port

    ctx = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="aligndistil-dist-") as outdir:
        port = free_port()
        procs = [
            ctx.Process(
                target=_worker,
                args=(r, world_size, port, outdir, fn, tuple(args), dict(kwargs or {}), layout, seed),
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
