"""Multi-stage pipelines of real launches (quickstart, paper reproduction): each stage is a
``torchrun`` launch of the trainer or a tool, logged to a file, marked done on success so a rerun
skips it; independent stages run side by side on a small pool of workers.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field

REPO_TOOLS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools")
_print_lock = threading.Lock()


def say(msg: str, prefix: str = "pipeline") -> None:
    with _print_lock:
        print(f"[{prefix}] {msg}", flush=True)


def launch(args: list[str], log_path: str, nproc: int = 1, script: str | None = None, progress=None,
           prefix: str = "pipeline") -> None:
    """Run ``torchrun ... -m megatron_aligndistil.train -- ARGS`` (or ``torchrun SCRIPT -- ARGS``);
    output to ``log_path``. ``progress=(metrics.jsonl, total)`` drives a bar from the metrics.
    Raises RuntimeError with the log's tail on failure. A launch whose rendezvous port was taken
    between ``free_port`` and torchrun binding it (EADDRINUSE; nothing ran) is relaunched, twice
    at most, on a new port."""
    for attempt in range(3):
        try:
            return _launch_once(args, log_path, nproc, script, progress, prefix)
        except _PortTaken:  # free_port's port was taken by another launch before torchrun bound it
            if attempt == 2:
                raise RuntimeError(f"stage command failed three times on a rendezvous port taken by another "
                                   f"process (EADDRINUSE); log {log_path}") from None
            say(f"rendezvous port taken by another process (EADDRINUSE), relaunching ({attempt + 1}/2)", prefix)


class _PortTaken(RuntimeError):
    pass


def _launch_once(args, log_path, nproc, script, progress, prefix) -> None:
    from tqdm import tqdm

    from .core.parallel import free_port

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
           "--master-port", str(free_port())]
    cmd += [script] if script else ["-m", "megatron_aligndistil.train"]
    # "--" ends torchrun's own options: without it, torchrun's parser rejects "--r" as an
    # ambiguous abbreviation of its --rdzv-*/--role/--run-path flags.
    cmd += ["--"] + args
    shown = " ".join(["torchrun"] + cmd[3:])
    say(f"$ {shown}", prefix)
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
        bar = tqdm(total=progress[1], desc="  iterations", unit="it") if progress else None
        while proc.poll() is None:
            time.sleep(0.5)
            if bar is not None and os.path.exists(progress[0]):
                bar.update(sum(1 for _ in open(progress[0])) - bar.n)
        if bar is not None:
            bar.close()
    if proc.returncode:
        tail = open(log_path).read()[-3000:]
        if "EADDRINUSE" in tail:
            raise _PortTaken(tail)
        raise RuntimeError(f"stage command failed (exit {proc.returncode}), log {log_path}: {shown}\n{tail}")


@dataclass
class Job:
    """One stage: ``fn()`` runs it; it starts once every job named in ``deps`` is done."""

    name: str
    fn: object
    deps: tuple = ()
    seconds: float = field(default=0.0, init=False)


def run_jobs(jobs: list[Job], done_dir: str, workers: int = 1, prefix: str = "pipeline") -> dict[str, float]:
    """Run ``jobs`` respecting ``deps`` with up to ``workers`` at once, in list order among the
    ready ones. A job whose marker ``done_dir/<name>`` exists is skipped. Returns seconds per job
    run. The first failure stops new jobs from starting and is re-raised."""
    os.makedirs(done_dir, exist_ok=True)
    by_name = {j.name: j for j in jobs}
    for j in jobs:
        missing = [d for d in j.deps if d not in by_name]
        if missing:
            raise ValueError(f"job {j.name} depends on unknown jobs {missing}")
    done = {j.name for j in jobs if os.path.exists(os.path.join(done_dir, j.name))}
    for name in sorted(done):
        say(f"{name}: done already, skipped", prefix)
    pending = [j for j in jobs if j.name not in done]
    total = len(pending)
    timings: dict[str, float] = {}

    def run(job: Job):
        say(f"=== {job.name} ===", prefix)
        t0 = time.time()
        job.fn()
        timings[job.name] = time.time() - t0
        with open(os.path.join(done_dir, job.name), "w") as f:
            f.write(f"{timings[job.name]:.1f}\n")
        say(f"{job.name}: done in {timings[job.name]:.0f} s ({len(timings)}/{total} stages)", prefix)
        return job.name

    with ThreadPoolExecutor(max_workers=workers) as pool:
        running = {}
        while pending or running:
            for job in [j for j in pending if all(d in done for d in j.deps)][: workers - len(running)]:
                pending.remove(job)
                running[pool.submit(run, job)] = job
            if not running:
                raise RuntimeError(f"jobs can never start (dependency cycle?): {[j.name for j in pending]}")
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for fut in finished:
                running.pop(fut)
                done.add(fut.result())  # re-raises a failed job's error
    return timings
