"""Issues 9 and 14: a shortened run of the README's quickstart pipeline on the gold world, end to
end (gold rate with intervals for SFT, DPO, AlignDistil off- and on-policy), then a re-run that
skips every finished stage."""

import json
import os
import subprocess
import sys

from megatron_aligndistil.core.parallel import free_port


def test_short_quickstart_runs_end_to_end_and_resumes(tmp_path):
    run = tmp_path / "qs"
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    cmd = [sys.executable, "-m", "megatron_aligndistil.quickstart", "--short", "--run-dir", str(run)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "[quickstart] summary" in r.stdout and "gold rate, AlignDistil on-policy, --recipe guarded, teachers from the best-tuned DPO" in r.stdout
    res = json.load(open(run / "results.json"))
    assert [row["row"] for row in res["rows"]] == ["sft", "dpo", "guarded_best_off", "guarded_best_on", "dpo_best"]
    assert [row["chosen"] for row in res["rows"]][1:] == [["e0.75_lr1x"]] * 3 + [["dpo/e0.75_lr1x"]]
    for row in res["rows"]:
        g = row["gold"]
        assert 0 <= g["lo"] <= g["mean"] <= g["hi"] <= 1 and g["n"] > 50  # clusters = held-out prompts
        assert row["kl_from_ref"] == row["kl_from_ref"] and 0 <= row["eos_rate"] <= 1
    assert abs(next(r for r in res["rows"] if r["row"] == "sft")["kl_from_ref"]) < 1e-4  # SFT vs itself
    for k in ("dpo_reward", "contrastive_reward"):
        assert 0 <= res["reward_accuracy"][k]["mean"] <= 1
    for png in ("aligndistil.png", "dpo.png", "gold_rate.png"):
        assert (run / "plots" / png).read_bytes()[:4] == b"\x89PNG"
    ad = [json.loads(line) for line in open(run / "seed1" / "guarded_best_off" / "e0.75_lr1x" / "metrics.jsonl")]
    assert [m["iteration"] for m in ad] == [1, 2, 3] and all("alpha_mean" in m for m in ad)
    args = json.load(open(run / "seed1" / "guarded_best_off" / "e0.75_lr1x" / "args.json"))
    assert args["tensor_model_parallel_size"] == 2 and args["pipeline_model_parallel_size"] == 2
    assert args["recipe"] == "guarded" and args["plausibility_threshold"] == 0.1 and args["r"] == 5.0
    # teachers from the best-tuned DPO cell (the grid's one cell here), the reverse model at that cell
    assert args["dpo_load"].endswith("dpo/e0.75_lr1x") and args["rev_load"].endswith("rev_best/e0.75_lr1x")
    rev = json.load(open(run / "seed1" / "rev_best" / "e0.75_lr1x" / "args.json"))
    assert rev["reverse"] and rev["train_iters"] == 3 and rev["lr"] == 2e-4
    onp = [json.loads(line) for line in open(run / "seed1" / "guarded_best_on" / "e0.75_lr1x" / "metrics.jsonl")]
    assert len(onp) == 3 and all("rollout_s" in m for m in onp)
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(run / "hf" / "guarded_best_off")
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert again.returncode == 0
    assert again.stdout.count("done already, skipped") == 23
    # the teacher pre-flight on the quickstart's teachers (validation prompts)
    tool = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools", "teacher_preflight.py")

    def preflight(nproc, out, *flags):
        # one process runs without torchrun (which reports a rank's exit status 3 as 1)
        launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-port",
                    str(free_port())] if nproc > 1 else [sys.executable]
        cmd = launcher + [tool, "--", "--dpo-load", str(run / "seed1" / "dpo" / "e1_lr1x"), "--rev-load",
               str(run / "seed1" / "rev"), "--prompts", str(run / "data" / "validation_prompts.jsonl"),
               "--samples-per-prompt", "2", "--max-new-tokens", "6", "--out", str(out), *flags]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)

    # alpha 0: z* is the DPO model, so the teacher samples the DPO model's tokens (same seeds; the
    # teacher decodes without a KV cache, the DPO model with one). A length limit of 0.5x fails: exit 3
    p = preflight(1, tmp_path / "a0.json", "--constant-alpha", "0", "--max-length-ratio", "0.5")
    assert p.returncode == 3 and "verdict: fail" in p.stdout and "as long as the DPO model's" in p.stdout, \
        p.stdout[-2000:] + p.stderr[-2000:]
    a0 = json.load(open(tmp_path / "a0.json"))
    assert a0["teacher"]["sample_outputs"] == a0["dpo"]["sample_outputs"] and a0["verdict"] == "fail"
    assert a0["teacher_minus_dpo"]["mean"] == 0 and a0["token_stats"]["alpha_mean"] == 0
    # the guarded recipe at TP1 and TP2: the same samples and the same teacher statistics
    outs = []
    for nproc in (1, 2):
        p = preflight(nproc, tmp_path / f"g{nproc}.json", "--recipe", "guarded", "--target-alpha", "0.6",
                      "--tensor-model-parallel-size", str(nproc))
        assert p.returncode in (0, 3) and "verdict:" in p.stdout, p.stdout[-2000:] + p.stderr[-2000:]
        outs.append(json.load(open(tmp_path / f"g{nproc}.json")))
    one, two = outs
    assert one["settings"]["r"] == 5.0 and one["settings"]["plausibility_threshold"] == 0.1
    assert one["teacher"]["sample_outputs"] == two["teacher"]["sample_outputs"]
    assert one["dpo"]["sample_outputs"] == two["dpo"]["sample_outputs"]
    st1, st2 = one["token_stats"], two["token_stats"]
    assert st1["tokens"] == st2["tokens"] > 0 and abs(st1["tvd_mean"] - st2["tvd_mean"]) < 1e-5
    assert abs(st1["alpha_mean"] - (5.0 * st1["tvd_mean"] + 1e-3)) < 1e-5
    assert abs(one["r_for_target_alpha"] - (0.6 - 1e-3) / st1["tvd_mean"]) < 1e-6
