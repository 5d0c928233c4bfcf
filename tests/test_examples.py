"""Issue 8 (part): every launch recipe passes --dry-run for every method; bad layouts are refused."""

import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPES = ["qwen2.5-1.5b", "qwen2.5-7b", "qwen2.5-32b", "qwen2.5-72b"]
METHODS = ["dpo", "rev", "aligndistil", "aligndistil-onpolicy"]


def _dry(recipe, method, **env):
    venv_bin = os.path.dirname(sys.executable)
    e = dict(os.environ, DRY_RUN="1", PYTHONWARNINGS="ignore", PATH=venv_bin + os.pathsep + os.environ["PATH"], **env)
    return subprocess.run(["bash", os.path.join(REPO, "examples", f"{recipe}.sh"), method], capture_output=True,
                          text=True, env=e, timeout=120, cwd=REPO)


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipes_pass_dry_run(recipe):
    for method in METHODS:
        r = _dry(recipe, method)
        assert r.returncode == 0, (method, r.stderr[-1500:])
        assert "parallel plan (dry run, nothing allocated)" in r.stdout


def test_dry_run_refuses_a_layout_that_does_not_fit():
    r = _dry("qwen2.5-72b", "aligndistil", NNODES="1")  # 8 GPUs cannot hold TP8 x PP4
    assert r.returncode == 2 and ("world size 8 is not divisible by --tensor-model-parallel-size 8 x "
                                  "--pipeline-model-parallel-size 4 = 32") in r.stderr, r.stderr


def test_single_node_32b_recipe_offloads_the_teachers():
    r = _dry("qwen2.5-32b", "aligndistil", NNODES="1")
    assert r.returncode == 0, r.stderr[-1500:]
    plan = dict(line.split(None, 1) for line in r.stdout.splitlines()[1:] if line.strip())
    assert plan["frozen_models_offloaded"].strip() == "True" and plan["pipeline_parallel"].strip() == "1"
    assert float(plan["planned_gb_per_gpu"]) < 80 - 6  # fits an 80 GB GPU with the planner's reserve


@pytest.mark.parametrize("recipe,nodes,ep,planned_gb", [("qwen3-30b-a3b", "1", 8, 94.2), ("qwen3-30b-a3b", "2", 8, 48.8),
                                                        ("qwen3-235b-a22b", "16", 64, 50.2),
                                                        ("qwen3-235b-a22b", "8", 32, 69.9)])
def test_moe_recipes_dry_run_with_their_expert_layout(recipe, nodes, ep, planned_gb):
    """Qwen3-30B-A3B (one node of >= 100 GB GPUs, or two of 80 GB with PP2) and Qwen3-235B-A22B
    (16 nodes; 8 with the teachers offloaded): the plan's expert layout and the memory the
    recipe's comment states."""
    r = _dry(recipe, "aligndistil", NNODES=nodes)
    assert r.returncode == 0, r.stderr[-1500:]
    plan = {k: v.strip() for k, v in (line.split(None, 1) for line in r.stdout.splitlines()[1:] if line.strip())}
    assert int(plan["expert_parallel"]) == ep and int(plan["expert_tensor_parallel"]) == 1
    assert float(plan["planned_gb_per_gpu"]) == planned_gb


SBATCH = {"qwen2.5-7b": 1, "qwen2.5-32b": 2, "qwen2.5-72b": 4}


@pytest.mark.parametrize("recipe", sorted(SBATCH))
def test_slurm_scripts_start_one_recipe_per_node_with_slurms_rendezvous(recipe, tmp_path):
    """examples/slurm/*.sbatch under a stand-in Slurm (srun runs the task once per node with its
    SLURM_NODEID; scontrol lists the hosts): every node runs the recipe's dry run with NNODES, its
    own NODE_RANK and the first host as MASTER_ADDR, and plans the job's whole world."""
    nodes = SBATCH[recipe]
    text = open(os.path.join(REPO, "examples", "slurm", f"{recipe}.sbatch")).read()
    assert f"#SBATCH --nodes={nodes}\n" in text and "#SBATCH --ntasks-per-node=1\n" in text
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "scontrol").write_text("#!/bin/bash\n[ \"$1 $2\" = 'show hostnames' ] && printf 'gpu%s\\n' 07 08 09 10\n")
    # srun --nodes N ... bash -c CMD: CMD once per node, as Slurm's tasks would run it
    (fake / "srun").write_text("#!/bin/bash\nn=$2; cmd=${@: -1}\nfor ((i = 0; i < n; i++)); do "
                               "SLURM_NODEID=$i bash -c \"$cmd\" || exit 1; done\n")
    for f in ("scontrol", "srun"):
        os.chmod(fake / f, 0o755)
    venv_bin = os.path.dirname(sys.executable)
    env = dict(os.environ, DRY_RUN="1", PYTHONWARNINGS="ignore", SLURM_SUBMIT_DIR=REPO, SLURM_JOB_ID="42",
               SLURM_JOB_NUM_NODES=str(nodes), SLURM_JOB_NODELIST="gpu[07-10]",
               PATH=os.pathsep.join([str(fake), venv_bin, os.environ["PATH"]]))
    r = subprocess.run(["bash", os.path.join(REPO, "examples", "slurm", f"{recipe}.sbatch"), "aligndistil"],
                       capture_output=True, text=True, env=env, timeout=300, cwd=REPO)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"[slurm] job 42: {nodes} node(s), rendezvous gpu07:29500, recipe {recipe} aligndistil" in r.stdout
    assert [line.split()[2] for line in r.stdout.splitlines() if line.startswith("[slurm] node")] == \
        [str(i) for i in range(nodes)]
    plans = [line.split()[1] for line in r.stdout.splitlines() if line.strip().startswith("world_size")]
    assert plans == [str(8 * nodes)] * nodes
