"""The stage runner behind the quickstart and the benchmark: order, skipping, failures."""

import threading
import time

import pytest

from megatron_aligndistil.pipeline import Job, run_jobs


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
