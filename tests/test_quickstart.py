"""Issues 9 and 14: a shortened run of the README's quickstart pipeline on the gold world, end to
end (gold rate with intervals for SFT, DPO, AlignDistil off- and on-policy), then a re-run that
skips every finished stage."""

import json
import os
import subprocess
import sys


def test_short_quickstart_runs_end_to_end_and_resumes(tmp_path):
    run = tmp_path / "qs"
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    cmd = [sys.executable, "-m", "megatron_aligndistil.quickstart", "--short", "--run-dir", str(run)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "[quickstart] summary" in r.stdout and "gold rate, AlignDistil on-policy" in r.stdout
    res = json.load(open(run / "results.json"))
    assert [row["row"] for row in res["rows"]] == ["sft", "dpo", "ad_off", "ad_on"]
    for row in res["rows"]:
        g = row["gold"]
        assert 0 <= g["lo"] <= g["mean"] <= g["hi"] <= 1 and g["n"] > 50  # clusters = held-out prompts
        assert row["kl_from_ref"] == row["kl_from_ref"] and 0 <= row["eos_rate"] <= 1
    assert abs(next(r for r in res["rows"] if r["row"] == "sft")["kl_from_ref"]) < 1e-4  # SFT vs itself
    for k in ("dpo_reward", "contrastive_reward"):
        assert 0 <= res["reward_accuracy"][k]["mean"] <= 1
    for png in ("aligndistil.png", "dpo.png", "gold_rate.png"):
        assert (run / "plots" / png).read_bytes()[:4] == b"\x89PNG"
    ad = [json.loads(line) for line in open(run / "seed1" / "ad_off" / "metrics.jsonl")]
    assert [m["iteration"] for m in ad] == [1, 2, 3] and all("alpha_mean" in m for m in ad)
    args = json.load(open(run / "seed1" / "ad_off" / "args.json"))
    assert args["tensor_model_parallel_size"] == 2 and args["pipeline_model_parallel_size"] == 2
    assert args["plausibility_threshold"] == 0.1
    onp = [json.loads(line) for line in open(run / "seed1" / "ad_on" / "metrics.jsonl")]
    assert len(onp) == 3 and all("rollout_s" in m for m in onp)
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(run / "hf" / "ad_off")
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert again.returncode == 0
    assert again.stdout.count("done already, skipped") == 12
    # decoding straight from the teacher: alpha 0 is the DPO model itself, same seeded samples
    tool = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools", "teacher_decoding.py")
    td = subprocess.run([sys.executable, tool, "--run-dir", str(run), "--samples-per-prompt", "1", "--max-new-tokens",
                         "4", "--constant-alphas", "0", "1", "--r", "5", "--thresholds", "0.1"],
                        capture_output=True, text=True, timeout=300, env=env)
    assert td.returncode == 0, td.stderr[-3000:]
    gold = json.load(open(run / "teacher_decoding_seed1.json"))["gold"]
    assert gold["constant alpha 0.0"] == gold["DPO (alpha 0)"]
    assert all(0 <= g <= 1 for g in gold.values()) and "adaptive r 5, guard 0.1" in gold
