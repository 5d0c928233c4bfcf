"""metrics.jsonl (one JSON object per iteration, iterations from 1) and TensorBoard scalars."""

from __future__ import annotations

import json
import math
import os


class MetricsWriter:
    """Appends to ``<save>/metrics.jsonl``; on resume, drops lines past the resumed iteration so a
    killed-and-resumed run has exactly one line per iteration."""

    def __init__(self, save: str, tensorboard_dir: str | None, enabled: bool, resume_iteration: int = 0):
        self.enabled = enabled
        self.path = os.path.join(save, "metrics.jsonl")
        self.tb = None
        if not enabled:
            return
        os.makedirs(save, exist_ok=True)
        kept = []
        if os.path.exists(self.path):
            with open(self.path) as f:
                for line in f:
                    try:
                        if json.loads(line)["iteration"] <= resume_iteration:
                            kept.append(line)
                    except (json.JSONDecodeError, KeyError):
                        continue  # a line cut by a kill
        with open(self.path, "w") as f:
            f.writelines(kept)
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(tensorboard_dir or os.path.join(save, "tensorboard"))
        except ImportError:  # tensorboard is optional
            self.tb = None

    def write(self, metrics: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(metrics) + "\n")
        if self.tb is not None:
            step = metrics["iteration"]
            for key, value in metrics.items():
                if key != "iteration" and isinstance(value, (int, float)) and math.isfinite(value):
                    self.tb.add_scalar(f"train/{key}", value, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.flush()
            self.tb.close()


def read_metrics(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
