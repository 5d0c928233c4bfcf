"""PNG curves of metrics.jsonl: loss, KL, alpha, TVD (AlignDistil), reward accuracy (DPO), lr."""

from __future__ import annotations

import os

from .metrics import read_metrics

PANELS = [("loss", "loss"), ("kl", "KL (nats/token)"), ("alpha_mean", "alpha (mean)"),
          ("tvd_mean", "TVD (mean)"), ("reward_accuracy", "reward accuracy"),
          ("grad_norm", "grad norm"), ("lr", "learning rate")]


def plot_runs(runs: dict, out_png: str, title: str | None = None) -> list[str]:
    """``runs``: label -> metrics.jsonl path. Draws every panel some run has; returns panel keys."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = {label: read_metrics(path) for label, path in runs.items()}
    keys = [k for k, _ in PANELS if any(k in m for rows in data.values() for m in rows)]
    if not keys:
        raise ValueError(f"no plottable fields in {list(runs.values())}")
    cols = min(3, len(keys))
    rows = -(-len(keys) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        for label, rows_ in data.items():
            pts = [(m["iteration"], m[key]) for m in rows_ if m.get(key) is not None]
            if pts:
                ax.plot(*zip(*pts), marker="." if len(pts) < 50 else None, label=label)
        ax.set_title(dict(PANELS)[key])
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
        if len(data) > 1:
            ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out_png)), exist_ok=True)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return keys
