"""Issue 9: a shortened run of the README's quickstart pipeline, end to end, then a re-run that
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
    assert "[quickstart] summary" in r.stdout and "DPO reward accuracy" in r.stdout
    summary = json.load(open(run / "summary.json"))
    for key in ("dpo_reward_accuracy_heldout", "contrastive_reward_accuracy_heldout", "aligndistil_loss_first"):
        assert 0 <= summary[key] <= 1 or key == "aligndistil_loss_first"
    for png in ("aligndistil.png", "dpo.png"):
        assert (run / "plots" / png).read_bytes()[:4] == b"\x89PNG"
    ad = [json.loads(line) for line in open(run / "runs" / "aligndistil" / "metrics.jsonl")]
    assert [m["iteration"] for m in ad] == [1, 2, 3] and all("alpha_mean" in m for m in ad)
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(run / "hf" / "aligndistil")
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert again.returncode == 0
    assert again.stdout.count("done already, skipped") == 12
    onp = [json.loads(line) for line in open(run / "runs" / "aligndistil_onpolicy" / "metrics.jsonl")]
    assert len(onp) == 2 and all("rollout_s" in m for m in onp)
