"""Measure the peak anonymous memory of a short training run on one rank (for the planner test)."""

import threading
import time


def _anon() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    return 0


def measure_training(argv):
    """Inside a run_distributed rank: peak RssAnon above the start of model building, in bytes."""
    import megatron.core.models.gpt  # noqa: F401 - imports outside the measurement
    import megatron.core.optimizer  # noqa: F401

    from megatron_aligndistil.train import build_trainer
    from megatron_aligndistil.train.arguments import parse_args

    args = parse_args(argv)
    base = _anon()
    peak = [base]
    done = [False]

    def sample():
        while not done[0]:
            peak[0] = max(peak[0], _anon())
            time.sleep(0.001)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    trainer = build_trainer(args)
    trainer.train()
    done[0] = True
    t.join()
    return peak[0] - base
