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
import re
import sys
import threading
import time
from dataclasses import asdict, dataclass, field, replace

from ..jobs import REPO_TOOLS, Job, launch, run_jobs, say
from ..train.metrics import read_metrics
from .stats import fmt_ci, mean_ci
from .world import WORLDS, WorldConfig

PREFIX = "reproduce"
_GLOBAL_RNG = threading.Lock()  # held while a stage seeds and draws from torch's global RNG

# rows -> what they train. "ad_*": the paper's loss (r 15, no guard); "guarded_*": --recipe guarded with
# the default teachers; "guarded_best_*": --recipe guarded with teachers from the best-tuned DPO cell.
ROWS = ("sft", "dpo", "dpo_beta0.01", "ad_off", "ad_on", "guarded_off", "guarded_on", "ad_const1.0", "ad_vanilla",
        "guarded_best_off", "guarded_best_on")
DPO_ROWS = ("dpo", "dpo_beta0.01")


@dataclass
class Settings:
    """Sizes and hyper-parameters of one reproduction (FULL and QUICK below).

    Every row but SFT is trained at each cell of the grid ``grid_epochs x grid_lr_scales``
    (epochs over the preference data, learning rate ``base_lr * scale``, cosine to a tenth),
    judged on the world's validation prompts, and the cell with the highest validation gold rate
    (the first in grid order on a tie) is judged on the test prompts, per seed. The teachers
    (DPO beta ``dpo_beta`` and reverse DPO) are trained once, at ``teacher_epochs`` and ``base_lr``.
    """

    seeds: tuple = (1, 2, 3)
    rows: tuple = ROWS
    world: WorldConfig = field(default_factory=WorldConfig)  # the gold-judged data (eval/world.py)
    batch: int = 32
    seq_length: int = 48
    sft_iters: int = 768
    sft_lr: float = 1e-3
    base_lr: float = 2e-4
    grid_epochs: tuple = (1.0, 3.0)
    grid_lr_scales: tuple = (1.0, 2.5)
    teacher_epochs: float = 1.0
    dpo_beta: float = 0.1
    r: float = 15.0  # the paper's rows (ad_*); the guarded rows take --recipe guarded's
    beta0: float = 0.1
    max_new_tokens: int = 16
    samples_per_prompt: int = 8  # test prompts
    validation_samples_per_prompt: int = 4
    workers: int = 2
    extra_ad_flags: tuple = ()
    ad_tp: int = 1  # layout of the AlignDistil runs (the quickstart shows TP2 PP2)
    ad_pp: int = 1
    on_policy_layout: tuple | None = None  # (TP, PP) of on-policy runs (None: ad_tp, ad_pp)

    def iters(self, records: int, epochs: float) -> int:
        return max(1, round(records * epochs / self.batch))

    @property
    def cells(self) -> list[tuple[float, float]]:
        """(epochs, lr scale) of every grid cell, in grid order."""
        return [(e, x) for e in self.grid_epochs for x in self.grid_lr_scales]


def cell_name(epochs: float, scale: float) -> str:
    return f"e{epochs:g}_lr{scale:g}x"


FULL = Settings()
QUICK = replace(FULL, seeds=(1,), rows=("sft", "dpo", "ad_off", "guarded_best_off", "guarded_best_on"), samples_per_prompt=4)
# each world's sizes: the steps world's answers are 13-30 tokens, the trap's longer wrong ones up to 11
WORLD_SETTINGS = {
    "rules": {},
    "steps": dict(world=replace(WORLDS["steps"], heldout_prompts_per_family=48, validation_prompts_per_family=24),
                  seq_length=72, max_new_tokens=40),
    "trap": dict(world=WORLDS["trap"], max_new_tokens=24),
}


def for_world(s: Settings, kind: str) -> Settings:
    """``s`` with world ``kind``'s data and sizes (:data:`WORLD_SETTINGS`)."""
    if kind not in WORLD_SETTINGS:
        raise ValueError(f"no world {kind!r} (have {sorted(WORLD_SETTINGS)})")
    return replace(s, **(WORLD_SETTINGS[kind] or {"world": WORLDS[kind]}))


MODEL = dict(vocab_size=512, hidden_size=128, intermediate_size=352, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256, rope_theta=1e6, rms_norm_eps=1e-6,
             tie_word_embeddings=True)


def row_label(row: str) -> str:
    return {"sft": "SFT", "dpo": "DPO (beta 0.1)", "dpo_beta0.01": "DPO (beta 0.01)", "dpo_best": "DPO, best-tuned",
            "ad_off": "AlignDistil off-policy (paper)", "ad_on": "AlignDistil on-policy (paper)",
            "guarded_off": "AlignDistil off-policy, --recipe guarded",
            "guarded_on": "AlignDistil on-policy, --recipe guarded",
            "ad_const1.0": "constant alpha 1.0 (paper loss)",
            "guarded_best_off": "AlignDistil off-policy, --recipe guarded, teachers from the best-tuned DPO",
            "guarded_best_on": "AlignDistil on-policy, --recipe guarded, teachers from the best-tuned DPO",
            "ad_vanilla": "vanilla teacher (DPO + ref, paper loss)"}.get(row, row)


class Reproduction:
    prefix = PREFIX  # of the lines it prints

    def __init__(self, run_dir: str, s: Settings, tag: str = ""):
        """``tag``: prefix of this reproduction's job names (one per world when several run together)."""
        self.run, self.s, self.tag = os.path.abspath(run_dir), s, tag

    def path(self, *parts) -> str:
        return os.path.join(self.run, *parts)

    def _launch(self, args, name, script=None, nproc=1):
        launch(args, self.path("logs", f"{name}.log"), nproc=nproc, script=script, prefix=self.prefix)

    def teacher_cell(self, seed: int, best: bool = False) -> tuple[float, float]:
        """(epochs, lr scale) of the teachers: the teachers' budget, or (``best``) the DPO row's cell
        chosen on validation prompts (the best-tuned DPO beta 0.1)."""
        if not best:
            return self.s.teacher_epochs, 1.0
        name = self.chosen(seed, ("dpo",))["dpo"]
        return next(c for c in self.s.cells if cell_name(*c) == name)

    def teacher(self, seed: int, best: bool = False) -> str:
        """The DPO teacher: the DPO row's run at :meth:`teacher_cell`."""
        return self.path(f"seed{seed}", "dpo", cell_name(*self.teacher_cell(seed, best)))

    def reverse_teacher(self, seed: int, best: bool = False) -> str:
        """The reverse-DPO teacher, at the same budget as :meth:`teacher`."""
        return self.path(f"seed{seed}", "rev_best", cell_name(*self.teacher_cell(seed, True))) if best else \
            self.run_path(seed, "rev")

    def cells(self, row: str) -> list[tuple[float, float]]:
        """The grid cells trained for ``row`` (DPO beta 0.1 also at the teachers' budget)."""
        if row == "sft":
            return []
        cells = list(self.s.cells)
        if row == "dpo" and (self.s.teacher_epochs, 1.0) not in cells:
            cells.append((self.s.teacher_epochs, 1.0))
        return cells

    def run_path(self, seed: int, row: str, cell=None) -> str:
        return self.path(f"seed{seed}", row) if cell is None else self.path(f"seed{seed}", row, cell_name(*cell))

    # ----------------------------------------------------------------- shared data
    def make_data(self):
        from transformers import AutoTokenizer

        from ..data.preprocess import load_records, preprocess
        from ..data.synthetic import train_tokenizer
        from .world import corpus, write_world

        s = self.s
        paths = write_world(s.world, self.path("data"))
        train_tokenizer(corpus(s.world.families), vocab_size=MODEL["vocab_size"]).save_pretrained(self.path("tokenizer"))
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
    def _train(self, seed, save, method, load, data, iters, lr, extra, tp=1, pp=1):
        s = self.s
        layout = ["--tensor-model-parallel-size", str(tp), "--pipeline-model-parallel-size", str(pp)]
        name = os.path.relpath(save, self.run).replace(os.sep, "_")
        self._launch([method, *layout, "--load", load, "--save", save, "--data-path", data, "--global-batch-size",
                      str(s.batch), "--micro-batch-size", str(s.batch), "--seq-length", str(s.seq_length),
                      "--train-iters", str(iters), "--lr", str(lr), "--min-lr", str(lr / 10),
                      "--lr-warmup-fraction", "0.1", "--seed", str(seed), "--save-interval", str(iters),
                      "--no-progress", *extra], name, nproc=tp * pp)

    def sft(self, seed):
        s = self.s
        self._train(seed, self.run_path(seed, "sft"), "sft", self.path(f"seed{seed}", "base"),
                    self.path("data", "tok", "sft_chosen.jsonl"), s.sft_iters, s.sft_lr, [])

    def dpo(self, seed, save, beta, epochs, lr, reverse=False):
        s = self.s
        self._train(seed, save, "dpo", self.run_path(seed, "sft"), self.path("data", "tok", "pairs_pairs.jsonl"),
                    s.iters(s.world.pair_records, epochs), lr, ["--dpo-beta", str(beta)] + (["--reverse"] if reverse else []))

    def reverse_dpo(self, seed, best: bool = False):
        """The reverse-DPO teacher at the teachers' budget, or (``best``) at the best-tuned DPO's cell."""
        s = self.s
        epochs, scale = self.teacher_cell(seed, best)
        self.dpo(seed, self.reverse_teacher(seed, best), s.dpo_beta, epochs, s.base_lr * scale, reverse=True)

    def aligndistil(self, seed, row, cell):
        """One AlignDistil row (:data:`ROWS`) at one grid cell."""
        s = self.s
        on_policy = row.endswith("_on")
        best = row.startswith("guarded_best")
        flags = ["--dpo-load", self.teacher(seed, best), "--beta0", str(s.beta0), *s.extra_ad_flags]
        if row.startswith("guarded"):
            flags += ["--recipe", "guarded"]
        else:
            flags += ["--tvd-scale", str(s.r)]
        if row == "ad_vanilla":
            flags += ["--ref-load", self.run_path(seed, "sft"), "--constant-alpha", "1.0"]
        else:
            flags += ["--rev-load", self.reverse_teacher(seed, best)]
        if row.startswith("ad_const"):
            flags += ["--constant-alpha", row[len("ad_const"):]]
        if on_policy:
            flags += ["--rollout", "on-policy", "--max-new-tokens", str(s.max_new_tokens)]
        tp, pp = s.on_policy_layout if on_policy and s.on_policy_layout else (s.ad_tp, s.ad_pp)
        data = "pairs_prompts.jsonl" if on_policy else "pairs_chosen.jsonl"
        epochs, scale = cell
        self._train(seed, self.run_path(seed, row, cell), "aligndistil", self.run_path(seed, "sft"),
                    self.path("data", "tok", data), s.iters(s.world.pair_records, epochs), s.base_lr * scale, flags,
                    tp=tp, pp=pp)

    def train_cell(self, seed, row, cell):
        s = self.s
        if row in DPO_ROWS:
            beta = s.dpo_beta if row == "dpo" else float(row.split("beta")[1])
            self.dpo(seed, self.run_path(seed, row, cell), beta, cell[0], s.base_lr * cell[1])
        else:
            self.aligndistil(seed, row, cell)

    def reward_accuracy(self, seed):
        self._launch(["--dpo-load", self.teacher(seed), "--ref-load", self.run_path(seed, "sft"),
                      "--rev-load", self.run_path(seed, "rev"),
                      "--data-path", self.path("data", "tok", "heldout_pairs_pairs.jsonl"),
                      "--dpo-beta", str(self.s.dpo_beta), "--micro-batch-size", "32",
                      "--out", self.path("eval", f"reward_seed{seed}.json")],
                     f"seed{seed}_reward", script=os.path.join(REPO_TOOLS, "eval_reward.py"))

    def preflight(self, seed, recipe: str):
        """The teacher pre-flight (tools/teacher_preflight.py) on the validation prompts: ``recipe``
        paper (r ``s.r``, no guard), guarded, or guarded_best (teachers from the best-tuned DPO)."""
        s = self.s
        best = recipe == "guarded_best"
        flags = ["--recipe", "paper", "--tvd-scale", str(s.r)] if recipe == "paper" else ["--recipe", "guarded"]
        self._launch(["--dpo-load", self.teacher(seed, best), "--rev-load", self.reverse_teacher(seed, best),
                      "--sft-load", self.run_path(seed, "sft"),
                      "--prompts", self.path("data", "validation_prompts.jsonl"), *flags,
                      "--samples-per-prompt", str(s.validation_samples_per_prompt), "--max-new-tokens",
                      str(s.max_new_tokens), "--seed", str(seed), "--target-alpha", "0.6", "--warn-only",
                      "--out", self.path("eval", f"preflight_{recipe}_seed{seed}.json")],
                     f"seed{seed}_preflight_{recipe}", script=os.path.join(REPO_TOOLS, "teacher_preflight.py"))

    def preflight_recipes(self) -> list[str]:
        return ["paper", "guarded"] + (["guarded_best"] if any(r.startswith("guarded_best") for r in self.s.rows) else [])

    def _evaluate(self, seed, policies: dict, prompts: str, samples: int, out: str, greedy: bool):
        self._launch([f"--policy={name}={path}" for name, path in policies.items()]
                     + ["--prompts", self.path("data", prompts), "--ref-load", self.run_path(seed, "sft"),
                        "--dpo-load", self.teacher(seed), "--samples-per-prompt", str(samples), "--temperature", "1",
                        "--max-new-tokens", str(self.s.max_new_tokens), "--seed", str(seed), "--out", out]
                     + ([] if greedy else ["--no-greedy"]),
                     os.path.basename(out).replace(".json", ""), script=os.path.join(REPO_TOOLS, "eval_policy.py"))

    def validate(self, seed, row):
        """Every trained cell of ``row`` on the validation prompts."""
        policies = {f"{row}/{cell_name(*c)}": self.run_path(seed, row, c) for c in self.cells(row)}
        self._evaluate(seed, policies, "validation_prompts.jsonl", self.s.validation_samples_per_prompt,
                       self.path("eval", f"validation_{row}_seed{seed}.json"), greedy=False)

    def validation(self, seed, rows) -> dict:
        """"row/cell" -> validation gold rate (per-row files; a run of the earlier one-file layout too)."""
        out = {}
        for row in rows:
            path = self.path("eval", f"validation_{row}_seed{seed}.json")
            if not os.path.exists(path):
                path = self.path("eval", f"validation_seed{seed}.json")
            out.update({r["name"]: r["gold_rate"] for r in json.load(open(path))["policies"]
                        if r["name"].startswith(row + "/")})
        return out

    def chosen(self, seed, rows=None) -> dict:
        """row -> the grid cell name with the best validation gold rate (first in grid order on a tie)."""
        rows = [r for r in (rows or self.s.rows) if r != "sft"]
        val = self.validation(seed, rows)
        names = [cell_name(*c) for c in self.s.cells]
        return {row: max(names, key=lambda n: (val[f"{row}/{n}"], -names.index(n))) for row in rows}

    def test(self, seed, row):
        """``row``'s chosen cell (SFT: its run) on the test prompts."""
        path = self.run_path(seed, row) if row == "sft" else os.path.join(self.run_path(seed, row), self.chosen(seed, (row,))[row])
        self._evaluate(seed, {row: path}, "heldout_prompts.jsonl", self.s.samples_per_prompt,
                       self.path("eval", f"test_{row}_seed{seed}.json"), greedy=True)

    def test_results(self, seed) -> dict:
        """row -> its test evaluation (per-row files; a run of the earlier one-file layout too)."""
        out = {}
        for row in self.s.rows:
            path = self.path("eval", f"test_{row}_seed{seed}.json")
            if not os.path.exists(path):
                path = self.path("eval", f"policies_seed{seed}.json")
            out[row] = next(r for r in json.load(open(path))["policies"] if r["name"] == row)
        return out

    def jobs(self) -> list[Job]:
        s = self.s
        if "dpo" not in s.rows:
            raise ValueError("rows must include dpo (the teacher)")
        unknown = [r for r in s.rows if r not in ROWS]
        if unknown:
            raise ValueError(f"unknown rows {unknown} (have {ROWS})")

        def n(x):
            return f"{self.tag}{x}"

        teacher_cell = cell_name(s.teacher_epochs, 1.0)
        jobs = [Job(n("data"), self.make_data)]
        for seed in s.seeds:
            sd = f"seed{seed}_"
            jobs += [Job(n(sd + "base"), lambda seed=seed: self.make_base(seed), (n("data"),)),
                     Job(n(sd + "sft"), lambda seed=seed: self.sft(seed), (n(sd + "base"),)),
                     Job(n(sd + "rev"), lambda seed=seed: self.reverse_dpo(seed), (n(sd + "sft"),))]
            dpo_cell = n(f"{sd}dpo_{teacher_cell}")
            for row in s.rows:
                if row == "sft":  # every evaluation also scores its samples under the SFT and DPO teacher models
                    jobs.append(Job(n(f"{sd}test_sft"), lambda seed=seed: self.test(seed, "sft"), (n(sd + "sft"), dpo_cell)))
                    continue
                if row in DPO_ROWS:
                    deps = (n(sd + "sft"),)
                elif row.startswith("guarded_best"):
                    deps = (n(sd + "rev_best"),)
                else:
                    deps = (n(sd + "sft"), n(sd + "rev"), dpo_cell)
                names = []
                for cell in self.cells(row):
                    names.append(n(f"{sd}{row}_{cell_name(*cell)}"))
                    jobs.append(Job(names[-1], lambda seed=seed, row=row, cell=cell: self.train_cell(seed, row, cell), deps))
                jobs.append(Job(n(f"{sd}validate_{row}"), lambda seed=seed, row=row: self.validate(seed, row),
                                tuple(names) + (dpo_cell,)))
                jobs.append(Job(n(f"{sd}test_{row}"), lambda seed=seed, row=row: self.test(seed, row),
                                (n(f"{sd}validate_{row}"),)))
            if any(r.startswith("guarded_best") for r in s.rows):
                jobs.append(Job(n(sd + "rev_best"), lambda seed=seed: self.reverse_dpo(seed, best=True),
                                (n(f"{sd}validate_dpo"),)))
            jobs.append(Job(n(sd + "reward"), lambda seed=seed: self.reward_accuracy(seed), (n(sd + "rev"), dpo_cell)))
            for recipe in self.preflight_recipes():
                deps = (n(sd + "rev_best"),) if recipe == "guarded_best" else (n(sd + "rev"), dpo_cell)
                jobs.append(Job(n(f"{sd}preflight_{recipe}"), lambda seed=seed, recipe=recipe: self.preflight(seed, recipe),
                                deps))
        return jobs

    # ----------------------------------------------------------------- results
    def results(self) -> dict:
        s = self.s
        per_seed = {sd: self.test_results(sd) for sd in s.seeds}
        chosen = {sd: self.chosen(sd) for sd in s.seeds}
        val = {sd: self.validation(sd, [r for r in s.rows if r != "sft"]) for sd in s.seeds}
        # the best-tuned DPO of each seed: the DPO row (beta) whose chosen cell is best on validation
        for sd in s.seeds:
            dpo_rows = [r for r in DPO_ROWS if r in s.rows]
            best = max(dpo_rows, key=lambda r: (val[sd][f"{r}/{chosen[sd][r]}"], -dpo_rows.index(r)))
            per_seed[sd]["dpo_best"] = dict(per_seed[sd][best], name="dpo_best")
            chosen[sd]["dpo_best"] = f"{best}/{chosen[sd][best]}"
        rewards = {sd: json.load(open(self.path("eval", f"reward_seed{sd}.json"))) for sd in s.seeds}
        rows = []
        for row in list(s.rows) + ["dpo_best"]:
            runs = [per_seed[sd][row] for sd in s.seeds]
            clusters = [g for r in runs for g in r["per_prompt_gold"]]
            out = {"row": row, "label": row_label(row), "gold": mean_ci(clusters),
                   "gold_by_seed": [r["gold_rate"] for r in runs], "per_prompt_gold": [r["per_prompt_gold"] for r in runs],
                   "greedy_gold": sum(r["greedy_gold_rate"] for r in runs) / len(runs),
                   "chosen": [chosen[sd].get(row, "") for sd in s.seeds],
                   "validation_gold": [val[sd][c if "/" in c else f"{row}/{c}"] if (c := chosen[sd].get(row)) else None
                                       for sd in s.seeds]}
            for key in ("response_len_mean", "eos_rate", "kl_from_ref", "kl_from_dpo"):
                out[key] = sum(r[key] for r in runs) / len(runs)
            out["len_by_seed"] = [r["response_len_mean"] for r in runs]
            fams = runs[0]["gold_by_family"].keys()
            out["gold_by_family"] = {f: sum(r["gold_by_family"][f] for r in runs) / len(runs) for f in fams}
            rows.append(out)
        reward_acc = {k: mean_ci([rewards[sd][k]["reward_accuracy"] for sd in s.seeds])
                      for k in ("dpo_reward", "contrastive_reward")}
        train_stats = {}
        for row in s.rows:
            if row.startswith(("ad_", "guarded_")):
                ms = [read_metrics(os.path.join(self.run_path(sd, row), chosen[sd][row], "metrics.jsonl"))
                      for sd in s.seeds]
                train_stats[row] = {k: sum(sum(m[k] for m in run) / len(run) for run in ms) / len(ms)
                                    for k in ("alpha_mean", "tvd_mean", "kl")}
        preflight = {recipe: [self._preflight_summary(sd, recipe) for sd in s.seeds] for recipe in self.preflight_recipes()}
        return {"settings": asdict(s), "rows": rows, "reward_accuracy": reward_acc, "train_stats": train_stats,
                "preflight": preflight,
                "versus_dpo": versus(rows, "dpo_best")}

    def _preflight_summary(self, seed, recipe) -> dict:
        r = json.load(open(self.path("eval", f"preflight_{recipe}_seed{seed}.json")))
        return {"seed": seed, "verdict": r["verdict"], "reasons": r["reasons"], "dpo_gold": r["dpo"]["gold_rate"],
                "teacher_gold": r["teacher"]["gold_rate"], "diff": r["teacher_minus_dpo"],
                "length_ratio": r["teacher"]["response_len_mean"] / max(r["sft"]["response_len_mean"], 1e-9),
                "teacher_eos": r["teacher"]["eos_rate"], "dpo_eos": r["dpo"]["eos_rate"], "sft_eos": r["sft"]["eos_rate"],
                "sft_gold": r["sft"]["gold_rate"],
                "tvd_mean": r["token_stats"]["tvd_mean"], "alpha_mean": r["token_stats"]["alpha_mean"],
                "r_for_alpha_0.6": r["r_for_target_alpha"]}

    def write_results(self, res: dict, wall_s: float) -> str:
        res["wall_s"] = wall_s
        with open(self.path("results.json"), "w") as f:
            json.dump(res, f, indent=1)
        text = markdown(res)
        with open(self.path("results.md"), "w") as f:
            f.write(text)
        plot_results(res, self.path("plots", "gold_rate.png"))
        return text


def versus(rows: list[dict], baseline: str) -> dict:
    """Each AlignDistil row minus ``baseline`` on the same test prompts: per seed, and pooled with
    a 95% interval over (seed, prompt) clusters of the paired per-prompt differences."""
    base = next(r for r in rows if r["row"] == baseline)
    out = {}
    for r in rows:
        if r["row"].startswith(("ad_", "guarded_")):
            diffs = [a - b for pa, pb in zip(r["per_prompt_gold"], base["per_prompt_gold"]) for a, b in zip(pa, pb)]
            out[r["row"]] = {"diff": mean_ci(diffs, bounds=(-1.0, 1.0)),
                             "by_seed": [a - b for a, b in zip(r["gold_by_seed"], base["gold_by_seed"])]}
    return out


def markdown(res: dict) -> str:
    """The results tables: test gold rate of each row's validation-chosen cell (with the cells), the
    AlignDistil rows minus the best-tuned DPO, reward accuracy, teacher statistics, families."""
    sft = next(r for r in res["rows"] if r["row"] == "sft")
    lines = ["| policy | chosen cell per seed | test gold rate [95% CI] | per seed | greedy | length (x SFT) | EOS "
             "| KL from SFT | KL from DPO |", "|---|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        seeds = " ".join(f"{g:.2f}" for g in r["gold_by_seed"])
        cells = ", ".join(r["chosen"]) if any(r["chosen"]) else "-"
        lines.append(f"| {r['label']} | {cells} | {fmt_ci(r['gold'])} | {seeds} | {r['greedy_gold']:.3f} | "
                     f"{r['response_len_mean']:.2f} ({r['response_len_mean'] / sft['response_len_mean']:.2f}) | "
                     f"{r['eos_rate']:.2f} | {r['kl_from_ref']:.2f} | {r['kl_from_dpo']:.2f} |")
    lines += ["", "| AlignDistil row | minus best-tuned DPO [95% CI] | per seed | length x SFT per seed |",
              "|---|---|---|---|"]
    for row, v in res["versus_dpo"].items():
        r = next(x for x in res["rows"] if x["row"] == row)
        ratio = " ".join(f"{a / b:.2f}" for a, b in zip(r["len_by_seed"], sft["len_by_seed"]))
        d = v["diff"]
        lines.append(f"| {row_label(row)} | {d['mean']:+.3f} [{d['lo']:+.3f}, {d['hi']:+.3f}] | "
                     + " ".join(f"{x:+.2f}" for x in v["by_seed"]) + f" | {ratio} |")
    ra = res["reward_accuracy"]
    lines += ["", "| reward on held-out pairs | accuracy [95% CI over seeds] |", "|---|---|",
              f"| DPO reward (DPO vs SFT reference) | {fmt_ci(ra['dpo_reward'])} |",
              f"| contrastive reward (DPO vs reverse DPO) | {fmt_ci(ra['contrastive_reward'])} |"]
    if res["train_stats"]:
        lines += ["", "| AlignDistil run (chosen cells) | mean alpha | mean TVD | mean KL to teacher |", "|---|---|---|---|"]
        for row, st in res["train_stats"].items():
            lines.append(f"| {row_label(row)} | {st['alpha_mean']:.2f} | {st['tvd_mean']:.3f} | {st['kl']:.3f} |")
    lines += ["", "| teacher pre-flight (validation prompts) | seed | SFT gold | DPO gold | teacher gold | teacher - DPO "
              "[95% CI] | length x SFT | EOS teacher / DPO / SFT | mean TVD | verdict |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for recipe, runs in res.get("preflight", {}).items():
        for p in runs:
            d = p["diff"]
            lines.append(f"| {recipe} | {p['seed']} | {p['sft_gold']:.3f} | {p['dpo_gold']:.3f} | {p['teacher_gold']:.3f} "
                         f"| {d['mean']:+.3f} [{d['lo']:+.3f}, {d['hi']:+.3f}] | {p['length_ratio']:.2f} | "
                         f"{p['teacher_eos']:.2f} / {p['dpo_eos']:.2f} / {p['sft_eos']:.2f} | {p['tvd_mean']:.3f} | "
                         f"{p['verdict']} |")
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


def summary_markdown(by_world: dict) -> str:
    """One line per world and AlignDistil row: minus the best-tuned DPO (pooled, per seed), against
    SFT, and length: the verdict table across worlds."""
    lines = ["| world | AlignDistil row | gold | best-tuned DPO | minus DPO [95% CI] | per seed | min over seeds of "
             "(row - SFT) | max length x SFT |", "|---|---|---|---|---|---|---|---|"]
    for world, res in by_world.items():
        rows = {r["row"]: r for r in res["rows"]}
        for row, v in res["versus_dpo"].items():
            r, d = rows[row], v["diff"]
            above_sft = min(a - b for a, b in zip(r["gold_by_seed"], rows["sft"]["gold_by_seed"]))
            ratio = max(a / b for a, b in zip(r["len_by_seed"], rows["sft"]["len_by_seed"]))
            lines.append(f"| {world} | {row_label(row)} | {r['gold']['mean']:.3f} | {rows['dpo_best']['gold']['mean']:.3f} "
                         f"| {d['mean']:+.3f} [{d['lo']:+.3f}, {d['hi']:+.3f}] | "
                         + " ".join(f"{x:+.2f}" for x in v["by_seed"]) + f" | {above_sft:+.2f} | {ratio:.2f} |")
    return "\n".join(lines) + "\n"


def _seed_of(job_name: str) -> int:
    m = re.search(r"seed(\d+)_", job_name)
    return int(m.group(1)) if m else 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run-dir", default="runs/paper")
    ap.add_argument("--quick", action="store_true", help="one seed, one world, fewer rows and samples")
    ap.add_argument("--worlds", nargs="+", choices=list(WORLD_SETTINGS), default=None,
                    help="gold worlds to run (default: all; --quick: rules); each in <run-dir>/<world>")
    ap.add_argument("--seeds", type=int, nargs="+", default=None)
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                    help="override a Settings field in every world, e.g. --set r=5 --set base_lr=1e-4")
    args = ap.parse_args(argv)
    base = QUICK if args.quick else FULL
    worlds = args.worlds or (["rules"] if args.quick else list(WORLD_SETTINGS))
    overrides = {}
    for item in args.set:
        key, _, value = item.partition("=")
        if key not in Settings.__dataclass_fields__ or key == "world":
            ap.error(f"--set {item}: no setting {key!r} (have {sorted(set(Settings.__dataclass_fields__) - {'world'})})")
        current = getattr(base, key)
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
        overrides[key] = value
    if args.seeds:
        overrides["seeds"] = tuple(args.seeds)
    reps = {}
    for kind in worlds:
        s = replace(for_world(base, kind), **overrides)
        reps[kind] = Reproduction(os.path.join(args.run_dir, kind), s, tag=f"{kind}.")
        os.makedirs(reps[kind].path("eval"), exist_ok=True)
        with open(reps[kind].path("settings.json"), "w") as f:
            json.dump(asdict(s), f, indent=1)
    # the stages run in threads: import transformers' lazy modules once here, as two threads doing
    # it at once can see a half-initialised module ("cannot import name 'AutoTokenizer'")
    from transformers import AutoTokenizer, Qwen2ForCausalLM  # noqa: F401

    # seed by seed across worlds, so the first seeds of every world finish first
    jobs = sorted((j for rep in reps.values() for j in rep.jobs()), key=lambda j: _seed_of(j.name))
    t0 = time.time()
    run_jobs(jobs, os.path.join(args.run_dir, ".done"), workers=base.workers, prefix=PREFIX)
    by_world = {}
    for kind, rep in reps.items():
        by_world[kind] = rep.results()
        text = rep.write_results(by_world[kind], time.time() - t0)
        say(f"{kind} world ({rep.path('results.md')}):\n\n{text}", PREFIX)
    summary = summary_markdown(by_world)
    with open(os.path.join(args.run_dir, "summary.md"), "w") as f:
        f.write(summary)
    say(f"every world ({time.time() - t0:.0f} s; {os.path.join(args.run_dir, 'summary.md')}):\n\n{summary}", PREFIX)
    return 0


if __name__ == "__main__":
    sys.exit(main())
