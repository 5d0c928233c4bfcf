"""The whole AlignDistil pipeline on one CPU machine, no download (README's first command).

    python -m megatron_aligndistil.quickstart [--run-dir runs/quickstart] [--nproc 4] [--short]

Stages, each under the run directory and skipped when already done (delete ``.done/<stage>`` to
redo one): synthetic preference data and a tiny chat tokenizer -> a tiny random Qwen2 model ->
conversion to Megatron -> tokenization -> SFT -> DPO and reverse-DPO teachers -> reward accuracy
of the DPO and contrastive rewards on held-out pairs -> AlignDistil off-policy and on-policy at
TP2 PP2 ->
export to HF -> generation with transformers -> plots -> summary. Every training stage is a real
``torchrun ... -m megatron_aligndistil.train`` launch, printed before it runs.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

REPO_TOOLS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools")

FULL = {"records": 384, "heldout": 64, "sft_iters": 200, "dpo_iters": 30, "ad_iters": 30, "onp_iters": 15,
        "batch": 16}
SHORT = {"records": 48, "heldout": 16, "sft_iters": 3, "dpo_iters": 3, "ad_iters": 3, "onp_iters": 2, "batch": 8}


class Pipeline:
    def __init__(self, run_dir: str, nproc: int, sizes: dict):
        self.run = os.path.abspath(run_dir)
        self.nproc = nproc
        self.sizes = sizes
        self.timings: dict[str, float] = {}
        os.makedirs(os.path.join(self.run, ".done"), exist_ok=True)

    def path(self, *parts) -> str:
        return os.path.join(self.run, *parts)

    def stage(self, name: str, fn) -> None:
        marker = self.path(".done", name)
        if os.path.exists(marker):
            print(f"[quickstart] {name}: done already, skipped")
            return
        print(f"\n[quickstart] === {name} ===", flush=True)
        t0 = time.time()
        fn()
        self.timings[name] = time.time() - t0
        open(marker, "w").write(f"{self.timings[name]:.1f}\n")

    def launch(self, args: list[str], nproc: int | None = None, script=None, progress=None):
        """Run ``torchrun ... -m megatron_aligndistil.train -- ARGS`` (or a tool script); its
        output goes to logs/. ``progress=(metrics.jsonl, total)`` drives a bar from the metrics."""
        from tqdm import tqdm

        from .parallel import free_port

        nproc = nproc or self.nproc
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
               "--master-port", str(free_port())]
        cmd += [script] if script else ["-m", "megatron_aligndistil.train"]
        # "--" ends torchrun's own options: without it, torchrun's parser rejects "--r" as an
        # ambiguous abbreviation of its --rdzv-*/--role/--run-path flags.
        cmd += ["--"] + args
        shown = " ".join(["torchrun"] + cmd[3:])
        print(f"[quickstart] $ {shown}", flush=True)
        env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
        log_path = self.path("logs", f"{len(os.listdir(self.path('logs'))):02d}.log")
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
            raise RuntimeError(f"stage command failed (exit {proc.returncode}), log {log_path}: {shown}\n{tail}")

    # ------------------------------------------------------------------ stages
    def make_data(self):
        from .data.synthetic import corpus, preference_records, train_tokenizer

        os.makedirs(self.path("data"), exist_ok=True)
        records = preference_records(self.sizes["records"] + self.sizes["heldout"], seed=0)
        train, heldout = records[: self.sizes["records"]], records[self.sizes["records"]:]
        for name, recs in (("train", train), ("heldout", heldout)):
            with open(self.path("data", f"{name}_text.jsonl"), "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in recs)
        train_tokenizer(corpus(train), vocab_size=512).save_pretrained(self.path("tokenizer"))

    def make_base(self):
        import torch
        from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

        from .convert.hf import convert_hf_to_megatron

        tok = AutoTokenizer.from_pretrained(self.path("tokenizer"))
        torch.manual_seed(0)
        cfg = Qwen2Config(vocab_size=576, hidden_size=128, intermediate_size=352, num_hidden_layers=4,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                          rope_theta=1e6, rms_norm_eps=1e-6, tie_word_embeddings=True,
                          eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        Qwen2ForCausalLM(cfg).save_pretrained(self.path("hf_base"))
        tok.save_pretrained(self.path("hf_base"))
        convert_hf_to_megatron(self.path("hf_base"), self.path("mcore", "base"), tp=2, pp=2, progress=False,
                               overwrite=True)

    def tokenize(self):
        from transformers import AutoTokenizer

        from .data.preprocess import load_records, preprocess

        tok = AutoTokenizer.from_pretrained(self.path("tokenizer"))
        for name in ("train", "heldout"):
            report = preprocess(load_records(self.path("data", f"{name}_text.jsonl")), tok,
                                self.path("data", name), max_prompt_length=128, max_length=256, progress=False)
            print(f"[quickstart] {name}: {report.summary()['kept']} records kept, dropped {dict(report.dropped)}")

    def _train(self, method, save, load, extra, iters, tp="2", pp="1"):
        s = self.sizes
        self.launch(progress=(os.path.join(save, "metrics.jsonl"), iters), args=[method, "--tensor-model-parallel-size", tp, "--pipeline-model-parallel-size", pp,
                     "--load", load, "--save", save, "--global-batch-size", str(s["batch"]),
                     "--micro-batch-size", "2", "--seq-length", "128", "--train-iters", str(iters),
                     "--lr-warmup-fraction", "0.1", "--use-distributed-optimizer", "--save-interval",
                     str(max(10, iters)), "--no-progress", *extra])

    def sft(self):
        self._train("sft", self.path("runs", "sft"), self.path("mcore", "base"),
                    ["--data-path", self.path("data", "train_chosen.jsonl"), "--lr", "3e-3", "--min-lr", "3e-4"],
                    self.sizes["sft_iters"])

    def dpo(self, reverse: bool):
        name = "rev" if reverse else "dpo"
        self._train("dpo", self.path("runs", name), self.path("runs", "sft"),
                    ["--data-path", self.path("data", "train_pairs.jsonl"), "--lr", "3e-4", "--min-lr", "3e-5",
                     "--dpo-beta", "0.1"] + (["--reverse"] if reverse else []), self.sizes["dpo_iters"])

    def evaluate(self):
        heldout = self.path("data", "heldout_pairs.jsonl")
        for name, args in (("dpo_vs_sft", ["--dpo-load", self.path("runs", "dpo"), "--ref-load", self.path("runs", "sft"),
                                           "--rev-load", self.path("runs", "rev")]),
                           ("rev_vs_sft", ["--dpo-load", self.path("runs", "rev"), "--ref-load", self.path("runs", "sft")])):
            self.launch(args + ["--data-path", heldout, "--tensor-model-parallel-size", "2",
                                "--out", self.path("eval", f"{name}.json")],
                        script=os.path.join(REPO_TOOLS, "eval_reward.py"))

    def aligndistil(self):
        self._train("aligndistil", self.path("runs", "aligndistil"), self.path("runs", "sft"),
                    ["--data-path", self.path("data", "train_chosen.jsonl"), "--lr", "5e-4", "--min-lr", "5e-5",
                     "--dpo-load", self.path("runs", "dpo"), "--rev-load", self.path("runs", "rev"),
                     "--r", "15", "--beta0", "0.1"], self.sizes["ad_iters"], tp="2", pp="2")

    def aligndistil_on_policy(self):
        self._train("aligndistil", self.path("runs", "aligndistil_onpolicy"), self.path("runs", "sft"),
                    ["--rollout", "on-policy", "--data-path", self.path("data", "train_prompts.jsonl"),
                     "--max-new-tokens", "32", "--lr", "5e-4", "--min-lr", "5e-5",
                     "--dpo-load", self.path("runs", "dpo"), "--rev-load", self.path("runs", "rev"),
                     "--r", "15", "--beta0", "0.1"], self.sizes["onp_iters"], tp="2", pp="2")

    def export(self):
        from .convert.hf import convert_megatron_to_hf

        for name in ("sft", "aligndistil"):
            convert_megatron_to_hf(self.path("runs", name, "release"), self.path("hf", name), progress=False,
                                   overwrite=True)

    def generate(self):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tok = AutoTokenizer.from_pretrained(self.path("hf", "aligndistil"))
        heldout = [json.loads(line) for line in open(self.path("data", "heldout_text.jsonl"))][:4]
        out = []
        for name in ("sft", "aligndistil"):
            model = AutoModelForCausalLM.from_pretrained(self.path("hf", name), dtype=torch.float32).eval()
            for rec in heldout:
                ids = tok.apply_chat_template(rec["chosen"][:-1], add_generation_prompt=True, return_tensors="pt",
                                              return_dict=True)["input_ids"]
                with torch.no_grad():
                    gen = model.generate(ids, max_new_tokens=24, do_sample=False, eos_token_id=tok.eos_token_id,
                                         pad_token_id=tok.pad_token_id)
                text = tok.decode(gen[0, ids.shape[1]:], skip_special_tokens=True)
                out.append({"generator": name, "instruction": rec["prompt"], "output": text})
        with open(self.path("generations.json"), "w") as f:
            json.dump(out, f, indent=2)

    def plots(self):
        from .train.plots import plot_runs

        plot_runs({"aligndistil": self.path("runs", "aligndistil", "metrics.jsonl")},
                  self.path("plots", "aligndistil.png"), "AlignDistil off-policy, TP2 PP2")
        plot_runs({"on-policy": self.path("runs", "aligndistil_onpolicy", "metrics.jsonl")},
                  self.path("plots", "aligndistil_onpolicy.png"), "AlignDistil on-policy, TP2 PP2")
        plot_runs({"dpo": self.path("runs", "dpo", "metrics.jsonl"), "reverse dpo": self.path("runs", "rev", "metrics.jsonl")},
                  self.path("plots", "dpo.png"), "DPO and reverse-DPO teachers")

    def summary(self) -> dict:
        from .train.metrics import read_metrics

        ev = {n: json.load(open(self.path("eval", f"{n}.json"))) for n in ("dpo_vs_sft", "rev_vs_sft")}
        ad = read_metrics(self.path("runs", "aligndistil", "metrics.jsonl"))
        onp = read_metrics(self.path("runs", "aligndistil_onpolicy", "metrics.jsonl"))
        gens = json.load(open(self.path("generations.json")))
        out = {
            "dpo_reward_accuracy_heldout": ev["dpo_vs_sft"]["dpo_reward"]["reward_accuracy"],
            "contrastive_reward_accuracy_heldout": ev["dpo_vs_sft"]["contrastive_reward"]["reward_accuracy"],
            "reverse_dpo_reward_accuracy_heldout": ev["rev_vs_sft"]["dpo_reward"]["reward_accuracy"],
            "aligndistil_loss_first": ad[0]["loss"], "aligndistil_loss_last": ad[-1]["loss"],
            "aligndistil_kl_first": ad[0]["kl"], "aligndistil_kl_last": ad[-1]["kl"],
            "aligndistil_alpha_mean": sum(m["alpha_mean"] for m in ad) / len(ad),
            "onpolicy_kl_first": onp[0]["kl"], "onpolicy_kl_last": onp[-1]["kl"],
            "onpolicy_rollout_share": sum(m["rollout_s"] for m in onp) / sum(m["elapsed_s"] for m in onp),
            "onpolicy_eos_rate": onp[-1]["eos_rate"],
            "generations": gens,
        }
        with open(self.path("summary.json"), "w") as f:
            json.dump(out, f, indent=2)
        return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run-dir", default="runs/quickstart")
    ap.add_argument("--nproc", type=int, default=4, help="processes per training stage (TP2 x DP or PP)")
    ap.add_argument("--short", action="store_true", help="a few iterations per stage (used by the tests)")
    args = ap.parse_args(argv)
    p = Pipeline(args.run_dir, args.nproc, SHORT if args.short else FULL)
    os.makedirs(p.path("logs"), exist_ok=True)
    t0 = time.time()
    p.stage("data", p.make_data)
    p.stage("base_model", p.make_base)
    p.stage("tokenize", p.tokenize)
    p.stage("sft", p.sft)
    p.stage("dpo", lambda: p.dpo(False))
    p.stage("reverse_dpo", lambda: p.dpo(True))
    p.stage("reward_accuracy", p.evaluate)
    p.stage("aligndistil", p.aligndistil)
    p.stage("aligndistil_on_policy", p.aligndistil_on_policy)
    p.stage("export_hf", p.export)
    p.stage("generate", p.generate)
    p.stage("plots", p.plots)
    s = p.summary()
    print("\n[quickstart] summary (run dir: %s, %.0f s)" % (p.run, time.time() - t0))
    rows = [
        ("DPO reward accuracy (held-out pairs)", f"{s['dpo_reward_accuracy_heldout']:.3f}"),
        ("contrastive reward accuracy (DPO vs reverse DPO)", f"{s['contrastive_reward_accuracy_heldout']:.3f}"),
        ("reverse-DPO reward accuracy (same pairs)", f"{s['reverse_dpo_reward_accuracy_heldout']:.3f}"),
        ("AlignDistil loss, first -> last iteration", f"{s['aligndistil_loss_first']:.4f} -> {s['aligndistil_loss_last']:.4f}"),
        ("AlignDistil KL, first -> last iteration", f"{s['aligndistil_kl_first']:.4f} -> {s['aligndistil_kl_last']:.4f}"),
        ("AlignDistil mean alpha", f"{s['aligndistil_alpha_mean']:.3f}"),
        ("on-policy KL, first -> last iteration", f"{s['onpolicy_kl_first']:.4f} -> {s['onpolicy_kl_last']:.4f}"),
        ("on-policy: share of time in rollouts, EOS rate", f"{s['onpolicy_rollout_share']:.2f}, {s['onpolicy_eos_rate']:.2f}"),
        ("plots", p.path("plots", "aligndistil.png") + ", " + p.path("plots", "dpo.png")),
        ("exported HF model", p.path("hf", "aligndistil")),
    ]
    width = max(len(r[0]) for r in rows)
    for k, v in rows:
        print(f"  {k:<{width}}  {v}")
    print("  greedy generations (HF transformers, exported models):")
    for g in s["generations"]:
        print(f"    {g['generator']:>11} | {g['instruction'][:48]:<48} -> {g['output'][:60]!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
