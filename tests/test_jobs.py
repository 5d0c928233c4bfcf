"""The stage runner behind the quickstart and the benchmark: order, skipping, failures."""

import threading
import time

import pytest
import torch

from megatron_aligndistil.jobs import Job, run_jobs


def test_jobs_run_after_their_dependencies_and_are_skipped_once_done(tmp_path):
    log, lock = [], threading.Lock()

    def step(name, wait=0.0):
        def fn():
            time.sleep(wait)
            with lock:
                log.append(name)
        return fn

    jobs = [Job("data", step("data")), Job("slow", step("slow", 0.3), ("data",)),
            Job("fast", step("fast"), ("data",)), Job("eval", step("eval"), ("slow", "fast"))]
    timings = run_jobs(jobs, str(tmp_path / "done"), workers=2)
    assert log[0] == "data" and log[-1] == "eval" and set(log) == {"data", "slow", "fast", "eval"}
    assert log.index("fast") < log.index("slow")  # ran side by side: the fast one finished first
    assert set(timings) == {"data", "slow", "fast", "eval"}
    assert run_jobs(jobs, str(tmp_path / "done"), workers=2) == {}  # everything skipped
    assert len(log) == 4


def test_a_failure_stops_new_jobs_and_is_raised(tmp_path):
    ran = []

    def boom():
        raise RuntimeError("stage command failed")

    jobs = [Job("a", boom), Job("b", lambda: ran.append("b"), ("a",))]
    with pytest.raises(RuntimeError, match="stage command failed"):
        run_jobs(jobs, str(tmp_path / "done"), workers=2)
    assert ran == [] and not (tmp_path / "done" / "a").exists()  # not marked done: rerun retries it
    with pytest.raises(ValueError, match="unknown jobs"):
        run_jobs([Job("x", lambda: None, ("nope",))], str(tmp_path / "done"))


def test_base_models_made_in_parallel_threads_are_reproducible(tmp_path):
    """The reproduction makes each seed's base model in a pipeline thread; torch's global RNG is
    shared by threads, so without a lock the draws of two seeds interleave and a rerun trains
    from other weights (seen: three runs, three different SFT iteration-1 losses)."""
    import glob
    from concurrent.futures import ThreadPoolExecutor

    from safetensors.torch import load_file

    from hf_fixtures import tiny_tokenizer
    from megatron_aligndistil.eval.reproduce import FULL, Reproduction

    def weights(run, seed):
        return load_file(glob.glob(run.path(f"seed{seed}", "hf_base", "*.safetensors"))[0])

    runs = []
    for attempt in range(3):
        run = Reproduction(str(tmp_path / f"run{attempt}"), FULL)
        tiny_tokenizer().save_pretrained(run.path("tokenizer"))
        with ThreadPoolExecutor(max_workers=2) as pool:
            list(pool.map(run.make_base, (1, 2)))
        runs.append(run)
    first = {seed: weights(runs[0], seed) for seed in (1, 2)}
    assert any(not torch.equal(first[1][k], first[2][k]) for k in first[1])  # the seeds differ
    for run in runs[1:]:
        for seed in (1, 2):
            again = weights(run, seed)
            assert all(torch.equal(first[seed][k], again[k]) for k in first[seed]), (seed, run.run)


def test_a_launch_whose_rendezvous_port_is_taken_is_relaunched_on_another(tmp_path, monkeypatch, capsys):
    """free_port picks a port, another process binds it before torchrun does: torchrun fails with
    EADDRINUSE before anything runs. The stage is relaunched on a new port (twice at most)."""
    import socket

    from megatron_aligndistil.core import parallel
    from megatron_aligndistil import jobs

    script = tmp_path / "stage.py"
    script.write_text("import sys\nopen(sys.argv[-1], 'a').write('ran\\n')\n")
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    taken = holder.getsockname()[1]
    real = parallel.free_port
    ports = iter([taken, taken])
    monkeypatch.setattr(parallel, "free_port", lambda: next(ports, None) or real())
    out = tmp_path / "ran.txt"
    try:
        jobs.launch([str(out)], str(tmp_path / "log.txt"), script=str(script))
        assert out.read_text() == "ran\n"  # ran once, on the third port
        assert capsys.readouterr().out.count("relaunching") == 2
        ports = iter([taken] * 3)
        monkeypatch.setattr(parallel, "free_port", lambda: next(ports))
        with pytest.raises(RuntimeError, match="failed three times on a rendezvous port taken"):
            jobs.launch([str(out)], str(tmp_path / "log.txt"), script=str(script))
    finally:
        holder.close()
