"""The paper's comparisons (Tables 1-3) on the gold world, end to end, several seeds, one command.

    python -m megatron_aligndistil.eval.reproduce [--quick] [--run-dir runs/paper] [--seeds 1 2 3]

Per seed: a random tiny Qwen2 (4 layers, 128 wide) -> SFT on mixed correct / subtly wrong answers
-> DPO (beta 0.1 and 0.01) and reverse DPO on preference pairs -> reward accuracy of the DPO and
contrastive rewards on held-out pairs -> AlignDistil off-policy and on-policy (adaptive alpha),
constant alpha, and the vanilla teacher (DPO + reference) -> every policy judged on held-out
prompts (:mod:`.policy_eval`). Every stage is a real ``torchrun`` launch of the trainer or a tool;
two run side by side. Writes ``<run-dir>/results.{json,md}`` and ``<run-dir>/plots/``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from dataclasses import asdict, dataclass, field, replace

from ..pipeline import REPO_TOOLS, Job, launch, run_jobs, say
from ..train.metrics import read_metrics
from .stats import fmt_ci, mean_ci
from .world import WorldConfig

PREFIX = "reproduce"
_GLOBAL_RNG = threading.Lock()  # held while a stage seeds and draws from torch's global RNG


@dataclass
class Settings:
    """Sizes and hyper-parameters of one reproduction (FULL and QUICK below)."""

    seeds: tuple = (1, 2, 3)
    rows: tuple = ("sft", "dpo", "dpo_beta0.01", "dpo_long", "ad_off", "ad_on", "ad_off_noguard", "ad_on_noguard",
                   "ad_const1.0", "ad_const1.5", "ad_const2.0", "ad_vanilla")
    world: WorldConfig = field(default_factory=WorldConfig)  # the gold-judged data (eval/world.py)
    batch: int = 32
    seq_length: int = 48
    sft_iters: int = 768
    sft_lr: float = 1e-3
    dpo_epochs: float = 1.0
    dpo_lr: float = 2e-4
    dpo_beta: float = 0.1
    ad_epochs: float = 3.0
    ad_lr: float = 5e-4
    r: float = 15.0
    beta0: float = 0.1
    plausibility_threshold: float = 0.1  # AlignDistil rows except *_noguard (0: off everywhere)
    max_new_tokens: int = 16
    samples_per_prompt: int = 8
    workers: int = 2
    extra_ad_flags: tuple = ()
    ad_tp: int = 1  # layout of the AlignDistil runs (the quickstart shows TP2 PP2)
    ad_pp: int = 1
    on_policy_layout: tuple | None = None  # (TP, PP) of on-policy runs (None: ad_tp, ad_pp)

    def iters(self, records: int, epochs: float) -> int:
        return max(1, round(records * epochs / self.batch))


FULL = Settings()
QUICK = replace(FULL, seeds=(1,), rows=("sft", "dpo", "dpo_beta0.01", "dpo_long", "ad_off", "ad_on", "ad_off_noguard",
                                       "ad_const1.0", "ad_vanilla"), samples_per_prompt=4)

MODEL = dict(vocab_size=512, hidden_size=128, intermediate_size=352, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256, rope_theta=1e6, rms_norm_eps=1e-6,
             tie_word_embeddings=True)


def row_label(row: str) -> str:
    return {"sft": "SFT", "dpo": "DPO (beta 0.1)", "dpo_beta0.01": "DPO (beta 0.01)",
            "dpo_long": "DPO (beta 0.1), AlignDistil's budget",
            "ad_off": "AlignDistil off-policy", "ad_on": "AlignDistil on-policy",
            "ad_off_noguard": "AlignDistil off-policy, no guard (paper)",
            "ad_on_noguard": "AlignDistil on-policy, no guard (paper)",
            "ad_const1.0": "constant alpha 1.0", "ad_const1.5": "constant alpha 1.5",
            "ad_const2.0": "constant alpha 2.0", "ad_vanilla": "vanilla teacher (DPO + ref)"}.get(row, row)


class Reproduction:
    prefix = PREFIX  # of the lines it prints

    def __init__(self, run_dir: str, s: Settings):
        self.run, self.s = os.path.abspath(run_dir), s

    def path(self, *parts) -> str:
        return os.path.join(self.run, *parts)

    def _launch(self, args, name, script=None, nproc=1):
        launch(args, self.path("logs", f"{name}.log"), nproc=nproc, script=script, prefix=self.prefix)

    # ----------------------------------------------------------------- shared data
    def make_data(self):
        from transformers import AutoTokenizer

        from ..data.preprocess import load_records, preprocess
        from ..data.synthetic import train_tokenizer
        from .world import corpus, write_world

        s = self.s
        paths = write_world(s.world, self.path("data"))
        train_tokenizer(corpus(), vocab_size=MODEL["vocab_size"]).save_pretrained(self.path("tokenizer"))
        tok = AutoTokenizer.from_pretrained(self.path("tokenizer"))
        for name in ("sft", "pairs", "heldout_pairs"):
            report = preprocess(load_records(paths[name]), tok, self.path("data", "tok", name),
                                max_prompt_length=s.seq_length, max_length=s.seq_length, progress=False)
            if report.kept != report.total:
                raise RuntimeError(f"{name}: dropped {dict(report.dropped)} records (raise seq_length)")

    def make_base(self, seed: int):
        import torch
        from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

        from ..convert.hf import convert_hf_to_megatron

        tok = AutoTokenizer.from_pretrained(self.path("tokenizer"))
        cfg = Qwen2Config(**MODEL, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        hf = self.path(f"seed{seed}", "hf_base")
        # the stages run in threads and the init draws from torch's global RNG: without the lock
        # two seeds' bases interleave their draws and neither is reproducible
        with _GLOBAL_RNG:
            torch.manual_seed(seed)
            model = Qwen2ForCausalLM(cfg)
        model.save_pretrained(hf)
        tok.save_pretrained(hf)
        convert_hf_to_megatron(hf, self.path(f"seed{seed}", "base"), progress=False, overwrite=True)

    # ----------------------------------------------------------------- training stages
    def _train(self, seed, name, method, load, data, iters, lr, extra, tp=1, pp=1):
        s = self.s
        save = self.path(f"seed{seed}", name)
        layout = ["--tensor-model-parallel-size", str(tp), "--pipeline-model-parallel-size", str(pp)]
        self._launch([method, *layout, "--load", load, "--save", save, "--data-path", data, "--global-batch-size",
                      str(s.batch), "--micro-batch-size", str(s.batch), "--seq-length", str(s.seq_length),
                      "--train-iters", str(iters), "--lr", str(lr), "--min-lr", str(lr / 10),
                      "--lr-warmup-fraction", "0.1", "--seed", str(seed), "--save-interval", str(iters),
                      "--no-progress", *extra], f"seed{seed}_{name}", nproc=tp * pp)

    def sft(self, seed):
        s = self.s
        self._train(seed, "sft", "sft", self.path(f"seed{seed}", "base"), self.path("data", "tok", "sft_chosen.jsonl"),
                    s.sft_iters, s.sft_lr, [])

    def dpo(self, seed, name, beta, reverse=False, long=False):
        """``long``: DPO with AlignDistil's training budget (epochs, lr): a baseline, not a teacher."""
        s = self.s
        epochs, lr = (s.ad_epochs, s.ad_lr) if long else (s.dpo_epochs, s.dpo_lr)
        self._train(seed, name, "dpo", self.path(f"seed{seed}", "sft"), self.path("data", "tok", "pairs_pairs.jsonl"),
                    s.iters(s.world.pair_records, epochs), lr, ["--dpo-beta", str(beta)] + (["--reverse"] if reverse else []))

    def aligndistil(self, seed, name, extra, on_policy=False):
        s = self.s
        d = self.path(f"seed{seed}")
        data = "pairs_prompts.jsonl" if on_policy else "pairs_chosen.jsonl"
        flags = ["--dpo-load", os.path.join(d, "dpo"), "--tvd-scale", str(s.r), "--beta0", str(s.beta0), *s.extra_ad_flags]
        if s.plausibility_threshold > 0 and not name.endswith("_noguard"):
            flags += ["--plausibility-threshold", str(s.plausibility_threshold)]
        if "--ref-load" not in extra:
            flags += ["--rev-load", os.path.join(d, "rev")]
        if on_policy:
            flags += ["--rollout", "on-policy", "--max-new-tokens", str(s.max_new_tokens)]
        tp, pp = s.on_policy_layout if on_policy and s.on_policy_layout else (s.ad_tp, s.ad_pp)
        self._train(seed, name, "aligndistil", os.path.join(d, "sft"), self.path("data", "tok", data),
                    s.iters(s.world.pair_records, s.ad_epochs), s.ad_lr, flags + list(extra), tp=tp, pp=pp)

    def reward_accuracy(self, seed):
        d = self.path(f"seed{seed}")
        self._launch(["--dpo-load", os.path.join(d, "dpo"), "--ref-load", os.path.join(d, "sft"),
                      "--rev-load", os.path.join(d, "rev"), "--data-path", self.path("data", "tok", "heldout_pairs_pairs.jsonl"),
                      "--dpo-beta", str(self.s.dpo_beta), "--micro-batch-size", "32",
                      "--out", self.path("eval", f"reward_seed{seed}.json")],
                     f"seed{seed}_reward", script=os.path.join(REPO_TOOLS, "eval_reward.py"))

    def evaluate(self, seed):
        s = self.s
        d = self.path(f"seed{seed}")
        policies = [f"--policy={row}={os.path.join(d, row)}" for row in s.rows]
        self._launch(policies + ["--prompts", self.path("data", "heldout_prompts.jsonl"),
                                 "--ref-load", os.path.join(d, "sft"), "--dpo-load", os.path.join(d, "dpo"),
                                 "--samples-per-prompt", str(s.samples_per_prompt), "--temperature", "1",
                                 "--max-new-tokens", str(s.max_new_tokens), "--seed", str(seed),
                                 "--out", self.path("eval", f"policies_seed{seed}.json")],
                     f"seed{seed}_eval", script=os.path.join(REPO_TOOLS, "eval_policy.py"))

    def jobs(self) -> list[Job]:
        s = self.s
        jobs = [Job("data", self.make_data)]
        variants = {  # row -> (job function, deps)
            "dpo": (lambda sd: self.dpo(sd, "dpo", s.dpo_beta), ("sft",)),
            "dpo_beta0.01": (lambda sd: self.dpo(sd, "dpo_beta0.01", 0.01), ("sft",)),
            "dpo_long": (lambda sd: self.dpo(sd, "dpo_long", s.dpo_beta, long=True), ("sft",)),
            "ad_off": (lambda sd: self.aligndistil(sd, "ad_off", []), ("dpo", "rev")),
            "ad_on": (lambda sd: self.aligndistil(sd, "ad_on", [], on_policy=True), ("dpo", "rev")),
            "ad_off_noguard": (lambda sd: self.aligndistil(sd, "ad_off_noguard", []), ("dpo", "rev")),
            "ad_on_noguard": (lambda sd: self.aligndistil(sd, "ad_on_noguard", [], on_policy=True), ("dpo", "rev")),
            "ad_vanilla": (lambda sd: self.aligndistil(sd, "ad_vanilla", ["--ref-load", os.path.join(
                self.path(f"seed{sd}"), "sft"), "--constant-alpha", "1.0"]), ("dpo",)),
        }
        for a in ("1.0", "1.5", "2.0"):
            variants[f"ad_const{a}"] = (lambda sd, a=a: self.aligndistil(sd, f"ad_const{a}", ["--constant-alpha", a]),
                                        ("dpo", "rev"))
        for seed in s.seeds:
            def n(x, seed=seed):
                return f"seed{seed}_{x}"

            jobs += [Job(n("base"), lambda sd=seed: self.make_base(sd), ("data",)),
                     Job(n("sft"), lambda sd=seed: self.sft(sd), (n("base"),)),
                     Job(n("rev"), lambda sd=seed: self.dpo(sd, "rev", s.dpo_beta, reverse=True), (n("sft"),))]
            if "dpo" not in s.rows:
                raise ValueError("rows must include dpo (the teacher)")
            for row in s.rows:
                if row == "sft":
                    continue
                fn, deps = variants[row]
                jobs.append(Job(n(row), lambda sd=seed, fn=fn: fn(sd), tuple(n(d) for d in deps)))
            jobs.append(Job(n("reward"), lambda sd=seed: self.reward_accuracy(sd), (n("dpo"), n("rev"))))
            jobs.append(Job(n("eval"), lambda sd=seed: self.evaluate(sd), tuple(n(r) for r in s.rows)))
        # the order jobs are listed in is the order ready jobs start: teachers of every seed first
        return sorted(jobs, key=lambda j: (0 if j.name == "data" else 1 if not j.name.endswith(("eval", "reward"))
                                           and "ad_" not in j.name else 2 if "ad_" in j.name else 3))

    # ----------------------------------------------------------------- results
    def results(self) -> dict:
        s = self.s
        per_seed = {sd: {r["name"]: r for r in json.load(open(self.path("eval", f"policies_seed{sd}.json")))["policies"]}
                    for sd in s.seeds}
        rewards = {sd: json.load(open(self.path("eval", f"reward_seed{sd}.json"))) for sd in s.seeds}
        rows = []
        for row in s.rows:
            runs = [per_seed[sd][row] for sd in s.seeds]
            clusters = [g for r in runs for g in r["per_prompt_gold"]]
            out = {"row": row, "label": row_label(row), "gold": mean_ci(clusters),
                   "gold_by_seed": [r["gold_rate"] for r in runs],
                   "greedy_gold": sum(r["greedy_gold_rate"] for r in runs) / len(runs)}
            for key in ("response_len_mean", "eos_rate", "kl_from_ref", "kl_from_dpo"):
                out[key] = sum(r[key] for r in runs) / len(runs)
            fams = runs[0]["gold_by_family"].keys()
            out["gold_by_family"] = {f: sum(r["gold_by_family"][f] for r in runs) / len(runs) for f in fams}
            rows.append(out)
        reward_acc = {k: mean_ci([rewards[sd][k]["reward_accuracy"] for sd in s.seeds])
                      for k in ("dpo_reward", "contrastive_reward")}
        train_stats = {}
        for row in s.rows:
            if row.startswith("ad_"):
                ms = [read_metrics(self.path(f"seed{sd}", row, "metrics.jsonl")) for sd in s.seeds]
                train_stats[row] = {k: sum(sum(m[k] for m in run) / len(run) for run in ms) / len(ms)
                                    for k in ("alpha_mean", "tvd_mean", "kl")}
        return {"settings": asdict(s), "rows": rows, "reward_accuracy": reward_acc, "train_stats": train_stats}

    def write_results(self, res: dict, wall_s: float) -> str:
        res["wall_s"] = wall_s
        with open(self.path("results.json"), "w") as f:
            json.dump(res, f, indent=1)
        text = markdown(res)
        with open(self.path("results.md"), "w") as f:
            f.write(text)
        plot_results(res, self.path("plots", "gold_rate.png"))
        return text


def markdown(res: dict) -> str:
    """The results table (gold rate, length, EOS, KL; reward accuracy; teacher statistics)."""
    sft = next(r for r in res["rows"] if r["row"] == "sft")
    lines = ["| policy | gold rate [95% CI] | per seed | greedy | length (x SFT) | EOS | KL from SFT | KL from DPO |",
             "|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        seeds = " ".join(f"{g:.2f}" for g in r["gold_by_seed"])
        lines.append(f"| {r['label']} | {fmt_ci(r['gold'])} | {seeds} | {r['greedy_gold']:.3f} | "
                     f"{r['response_len_mean']:.2f} ({r['response_len_mean'] / sft['response_len_mean']:.2f}) | "
                     f"{r['eos_rate']:.2f} | {r['kl_from_ref']:.2f} | {r['kl_from_dpo']:.2f} |")
    ra = res["reward_accuracy"]
    lines += ["", "| reward on held-out pairs | accuracy [95% CI over seeds] |", "|---|---|",
              f"| DPO reward (DPO vs SFT reference) | {fmt_ci(ra['dpo_reward'])} |",
              f"| contrastive reward (DPO vs reverse DPO) | {fmt_ci(ra['contrastive_reward'])} |"]
    if res["train_stats"]:
        lines += ["", "| AlignDistil run | mean alpha | mean TVD | mean KL to teacher |", "|---|---|---|---|"]
        for row, st in res["train_stats"].items():
            lines.append(f"| {row_label(row)} | {st['alpha_mean']:.2f} | {st['tvd_mean']:.3f} | {st['kl']:.3f} |")
    fam_rows = res["rows"]
    fams = list(fam_rows[0]["gold_by_family"])
    lines += ["", "| policy | " + " | ".join(fams) + " |", "|---|" + "---|" * len(fams)]
    for r in fam_rows:
        lines.append(f"| {r['label']} | " + " | ".join(f"{r['gold_by_family'][f]:.2f}" for f in fams) + " |")
    return "\n".join(lines) + "\n"


def plot_results(res: dict, out_png: str) -> None:
    from .report import plot

    os.makedirs(os.path.dirname(out_png), exist_ok=True)
    plot([{"name": r["label"], "gold": r["gold"]} for r in res["rows"]], out_png,
         f"gold rate, {len(res['settings']['seeds'])} seed(s), 95% CI")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run-dir", default="runs/paper")
    ap.add_argument("--quick", action="store_true", help="one seed, fewer rows and samples (about 10 minutes)")
    ap.add_argument("--seeds", type=int, nargs="+", default=None)
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                    help="override a Settings field, e.g. --set r=5 --set ad_lr=1e-4")
    args = ap.parse_args(argv)
    s = QUICK if args.quick else FULL
    for item in args.set:
        key, _, value = item.partition("=")
        if key not in Settings.__dataclass_fields__:
            ap.error(f"--set {item}: no setting {key!r} (have {sorted(Settings.__dataclass_fields__)})")
        current = getattr(s, key)
        try:
            if isinstance(current, tuple):
                value = tuple(type(current[0])(v) for v in value.split(",")) if current else tuple(value.split(","))
            elif isinstance(current, bool):
                value = {"true": True, "1": True, "false": False, "0": False}[value.lower()]
            else:
                value = type(current)(value)
        except (KeyError, ValueError):
            kind = f"comma-separated {type(current[0]).__name__}s" if isinstance(current, tuple) and current else \
                type(current).__name__
            ap.error(f"--set {item}: {key} takes {kind} (now {current!r})")
        s = replace(s, **{key: value})
    if args.seeds:
        s = replace(s, seeds=tuple(args.seeds))
    rep = Reproduction(args.run_dir, s)
    os.makedirs(rep.path("eval"), exist_ok=True)
    with open(rep.path("settings.json"), "w") as f:
        json.dump(asdict(s), f, indent=1)
    t0 = time.time()
    run_jobs(rep.jobs(), rep.path(".done"), workers=s.workers, prefix=rep.prefix)
    text = rep.write_results(rep.results(), time.time() - t0)
    say(f"results ({time.time() - t0:.0f} s; {rep.path('results.md')}):\n\n{text}", PREFIX)
    return 0


if __name__ == "__main__":
    sys.exit(main())
