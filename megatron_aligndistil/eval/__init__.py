"""Evidence that a policy aligned: the gold-judged world (world.py), the policy evaluator
(policy_eval.py, tools/eval_policy.py), reward-model win rates (reward_model.py), intervals
(stats.py), tables and plots (report.py), and the paper's comparisons in one command
(reproduce.py, examples/reproduce_paper.sh)."""
