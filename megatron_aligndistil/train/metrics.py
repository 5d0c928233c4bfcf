"""metrics.jsonl (one JSON object per iteration, iterations from 1), TensorBoard scalars and, with
``--wandb-project``, a Weights & Biases run of the same fields."""

from __future__ import annotations

import json
import math
import os
import secrets


class MetricsWriter:
    """Appends to ``<save>/metrics.jsonl``; on resume, drops lines past the resumed iteration so a
    killed-and-resumed run has exactly one line per iteration."""

    def __init__(self, save: str, tensorboard_dir: str | None, enabled: bool, resume_iteration: int = 0,
                 wandb: dict | None = None):
        """``wandb``: ``{"project", "name", "dir", "config"}`` for a W&B run (rank 0), None without."""
        self.enabled = enabled
        self.path = os.path.join(save, "metrics.jsonl")
        self.tb = self.wandb = None
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
        if wandb:
            self.wandb = _wandb_run(save, **wandb)

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
        if self.wandb is not None:
            self.wandb.log({f"train/{k}": v for k, v in metrics.items() if k != "iteration"},
                           step=metrics["iteration"])

    def close(self) -> None:
        if self.tb is not None:
            self.tb.flush()
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def _wandb_run(save: str, project: str, name: str | None, dir: str | None, config: dict):
    """A W&B run for ``save``: the same run again on resume (its id kept in ``<save>/wandb_run_id``),
    so a killed and resumed job is one run; steps are iterations."""
    from ..core.errors import UserError

    try:
        import wandb
    except ImportError:
        raise UserError(f"--wandb-project {project} needs wandb: pip install wandb (scripts/setup_env.sh "
                        "installs it)") from None
    id_file = os.path.join(save, "wandb_run_id")
    run_id = open(id_file).read().strip() if os.path.exists(id_file) else secrets.token_hex(4)
    with open(id_file, "w") as f:
        f.write(run_id)
    directory = dir or save  # W&B writes into its wandb/ folder there
    os.makedirs(directory, exist_ok=True)
    return wandb.init(project=project, name=name, dir=directory, id=run_id, resume="allow", config=config)


def read_metrics(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
