"""Side-by-side tables and plots of policy evaluations (:mod:`.policy_eval` results)."""

from __future__ import annotations

from .stats import fmt_ci

COLUMNS = [  # (header, key, format)
    ("gold rate [95% CI]", "gold", "ci"),
    ("greedy gold", "greedy_gold_rate", ".3f"),
    ("win rate [95% CI]", "win", "ci"),
    ("length", "response_len_mean", ".1f"),
    ("EOS rate", "eos_rate", ".2f"),
    ("KL from SFT", "kl_from_ref", ".2f"),
    ("KL from DPO", "kl_from_dpo", ".2f"),
]


def table(results: list[dict]) -> str:
    """A fixed-width table, one row per policy, the columns any result has."""
    cols = [c for c in COLUMNS if any(c[1] in r for r in results)]
    rows = [["policy"] + [c[0] for c in cols]]
    for r in results:
        row = [r["name"]]
        for _, key, fmt in cols:
            v = r.get(key)
            row.append("-" if v is None else fmt_ci(v) if fmt == "ci" else format(v, fmt))
        rows.append(row)
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def plot(results: list[dict], out_png: str, title: str | None = None) -> None:
    """Bars of gold rate (or win rate) with 95% intervals, one per policy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key = "gold" if any("gold" in r for r in results) else "win"
    shown = [r for r in results if key in r]
    if not shown:
        return
    names = [r["name"] for r in shown]
    means = [r[key]["mean"] for r in shown]
    err = [[m - r[key]["lo"] for m, r in zip(means, shown)], [r[key]["hi"] - m for m, r in zip(means, shown)]]
    fig, ax = plt.subplots(figsize=(max(4, 1.1 * len(shown)), 3.2))
    ax.bar(range(len(shown)), means, yerr=err, capsize=4, color="#4c72b0")
    ax.set_xticks(range(len(shown)), names, rotation=30, ha="right")
    ax.set_ylabel("gold rate" if key == "gold" else "win rate")
    ax.set_ylim(0, 1)
    ax.set_title(title or f"{'gold' if key == 'gold' else 'win'} rate with 95% CI")
    fig.tight_layout()
    fig.savefig(out_png, dpi=110)
    plt.close(fig)


def add_win_rates(results: list[dict], items: list[dict], reward_model: str, baseline: str) -> None:
    """Score every policy's samples with ``reward_model``; add ``reward_mean`` and ``win`` (against
    the ``baseline`` policy, slot by slot on the same prompts) to each result."""
    from .reward_model import RewardModelJudge, win_rate

    rm = RewardModelJudge(reward_model)
    k = results[0]["samples_per_prompt"]
    prompts = [it["instruction"] for it in items for _ in range(k)]
    index = [i for i in range(len(items)) for _ in range(k)]
    scores = {}
    for r in results:
        scores[r["name"]] = rm.scores(prompts, r["sample_outputs"])
        r["reward_mean"] = sum(scores[r["name"]]) / len(prompts)
    for r in results:
        r["win"] = win_rate(scores[r["name"]], scores[baseline], index)
