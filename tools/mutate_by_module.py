"""Mutation testing with a per-module test map (docs/testing.md): the picks of
``../shared/tools/mutate_diff.py`` (its functions, seed 0, same order), each mutant judged by the tests
of its module in two phases, unit-level files first, the slower ones only for mutants those leave
alive; a failing test or a timeout kills. Run it in a separate worktree (it edits files in place):

    PYTHONPATH=$PWD python tools/mutate_by_module.py BASE START MAX [PATHS,COMMA,SEPARATED]

START (1-based) resumes a run; EXTRA2 (environment) adds tests to every second phase."""
import os, random, subprocess, sys, time
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "tools"))
sys.path.insert(0, os.environ.get("MUTATE_DIFF_DIR", ""))
import mutate_diff as m

base, start, mx = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
paths = sys.argv[4].split(",") if len(sys.argv) > 4 else ["megatron_aligndistil"]
PY = os.environ.get("MUTATION_PYTHON", sys.executable)
UNIT = "tests/test_edges.py tests/test_config.py tests/test_resume_identity.py"
SLOW_VLLM = ("tests/test_rollout_vllm.py::test_engines_that_disagree_stop_the_run "
             "tests/test_rollout_vllm.py::test_evaluator_with_vllm_resyncs_for_each_policy "
             "tests/test_rollout_vllm.py::test_vllm_engine_matches_megatron_sampler")
# the tests of each module (a narrower selection than the whole suite: a lower bound on kills)
BY_FILE = {
    "hub.py": ("", "tests/test_user_errors.py"),
    "core/errors.py": ("", "tests/test_user_errors.py"),
    "core/weights.py": ("", "tests/test_user_errors.py tests/test_real_vocab.py"),
    "core/": ("tests/test_layering.py tests/test_packing.py", "tests/test_parallel_gpt.py tests/test_user_errors.py"),
    "config.py": ("tests/test_data.py", "tests/test_user_errors.py"),
    "platform.py": ("tests/test_platform.py", SLOW_VLLM),
    "models/qwen.py": ("", "tests/test_real_configs.py"),
    "data/preprocess.py": ("tests/test_preprocess.py tests/test_qwen3_chat.py", "tests/test_user_errors.py"),
    "data/indexed.py": ("tests/test_indexed_data.py tests/test_data.py tests/test_preprocess.py", ""),
    "data/records.py": ("tests/test_indexed_data.py tests/test_data.py", ""),
    "data/batching.py": ("tests/test_data.py", "tests/test_packing.py"),
    "convert/": ("tests/test_convert_mapping.py", "tests/test_convert_tools.py tests/test_user_errors.py"),
    "rollout/": ("tests/test_platform.py", SLOW_VLLM),
    "eval/": ("tests/test_eval_policy.py tests/test_world.py", "tests/test_user_errors.py " + SLOW_VLLM),
    "train/checkpointing.py": ("", "tests/test_user_errors.py tests/test_real_vocab.py"),
    "train/arguments.py": ("tests/test_data.py", "tests/test_user_errors.py"),
    "train/loop.py": ("tests/test_platform.py", "tests/test_user_errors.py "
                      "tests/test_train_aligndistil.py::test_degenerate_teachers_are_refused " + SLOW_VLLM),
    "train/__init__.py": ("", "tests/test_user_errors.py"),
    "train/statistics.py": ("tests/test_statistics.py", ""),
    "train/": ("tests/test_platform.py", "tests/test_user_errors.py "
               "tests/test_train_aligndistil.py::test_degenerate_teachers_are_refused"),
}


def phases_of(path):
    for key, (fast, slow) in BY_FILE.items():
        if key in path:
            return ["-W ignore " + UNIT + " " + fast, ("-n 2 --dist loadfile -W ignore " + slow) if slow else ""]
    raise SystemExit(f"no tests mapped for {path}")


lines = m.changed_lines(base, paths)
rng = random.Random(0)
by_line, masks = [], {}
for path, i in lines:
    text = open(path).read()
    if path not in masks:
        masks[path] = m.masks_of(text)
    code, spans = masks[path]
    src = text.splitlines(keepends=True)
    if i - 1 < len(src) and i in code:
        ms = m.mutants_of(src[i - 1], spans.get(i, ()))
        if ms:
            by_line.append((path, i, src[i - 1], ms))
rng.shuffle(by_line)
picked = []
while by_line and len(picked) < mx:
    for entry in list(by_line):
        path, i, orig, ms = entry
        picked.append((path, i, orig, ms.pop(rng.randrange(len(ms)))))
        if not ms:
            by_line.remove(entry)
        if len(picked) >= mx:
            break
print(f"{len(lines)} changed lines, {len(picked)} mutants; running {start}..{len(picked)}", flush=True)
for k, (path, i, orig, mut) in enumerate(picked, 1):
    if k < start:
        continue
    src = open(path).read()
    ls = src.splitlines(keepends=True)
    ls[i - 1] = mut
    new = "".join(ls)
    try:
        compile(new, path, "exec")
    except SyntaxError:
        print(f"[{k}/{len(picked)}] SKIPPED (no compile) {path}:{i}", flush=True)
        continue
    t = time.time()
    verdict = "SURVIVED"
    try:
        open(path, "w").write(new)
        for n, phase in enumerate(phases_of(path), 1):
            if not phase:
                continue
            try:
                p = subprocess.run([PY, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *phase.split()],
                                   capture_output=True, text=True, timeout=900)
            except subprocess.TimeoutExpired:
                verdict = f"KILLED (timeout, phase {n})"
                break
            if p.returncode != 0:
                failed = [l for l in p.stdout.splitlines() if l.startswith("FAILED") or l.startswith("ERROR")]
                verdict = f"KILLED (phase {n}: {failed[0][:90] if failed else 'rc ' + str(p.returncode)})"
                break
    finally:
        open(path, "w").write(src)
    print(f"[{k}/{len(picked)}] {verdict} {path}:{i}  {orig.strip()[:60]!r} -> {mut.strip()[:60]!r} ({time.time() - t:.0f} s)",
          flush=True)
