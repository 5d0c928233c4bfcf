#!/usr/bin/env python
"""A Qwen2.5-0.5B-shaped AlignDistil run at TP2 PP2 on 4 CPU processes, against the memory planner.

    python tools/bench_real_shape.py                 # about 25 min on 2 cores, 14 GB of RAM, 30 GB of disk
    python tools/bench_real_shape.py --iters 4 --seq-length 256

1. Makes three random models of Qwen2.5-0.5B's shape (24 layers, hidden 896, 14 heads, 2 KV
   groups, FFN 4864, vocab 151,936, tied embeddings; fp32) as policy, DPO and reverse-DPO teacher,
   saved as HF checkpoints with the real Qwen3 tokenizer, and converts them.
2. Tokenizes chat conversations with the real tokenizer (``QWEN3_TOKENIZER_DIR`` or
   ``../shared/data/qwen3-tokenizer``) into records of exactly ``--seq-length`` input positions,
   written as a Megatron indexed dataset.
3. Trains, each at TP2 PP2 (4 ranks), for ``--iters`` iterations: AlignDistil, AlignDistil with
   ``--offload-frozen-models``, and SFT (the policy alone, same batches). Per rank: peak anonymous
   memory above the start of model building (sampled every ms, ``MALLOC_MMAP_THRESHOLD_=65536``
   so RSS follows live tensors) next to the planner's prediction for that rank's pipeline stage;
   step time = median ``elapsed_s`` of iterations 2..N.
4. Exports the AlignDistil run's last training checkpoint to HF (``tools/convert_megatron_to_hf.py``)
   and checks the HF model's logits against Megatron's logits of the same weights at TP2 PP2.
All runs pass ``--no-export``: the measured peak is training's (the end-of-run export of the
policy gathers a pipeline stage's full tensors on one rank; docs/scaling.md).

Prints markdown tables (docs/scaling.md has the recorded ones) and writes ``results.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

QWEN25_05B = dict(vocab_size=151_936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                  num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768, rope_theta=1e6,
                  rms_norm_eps=1e-6, tie_word_embeddings=True)
TP, PP = 2, 2


def tokenizer_dir() -> str:
    here = os.path.dirname(os.path.abspath(__file__))
    for d in (os.environ.get("QWEN3_TOKENIZER_DIR", ""), os.path.join(here, "..", "..", "shared", "data",
                                                                        "qwen3-tokenizer")):
        if d and os.path.isfile(os.path.join(d, "tokenizer.json")):
            return d
    sys.exit("the real Qwen3 tokenizer is needed: set QWEN3_TOKENIZER_DIR (tokenizer.json + tokenizer_config.json)")


def make_models(root: str, tok) -> dict:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from megatron_aligndistil.convert.hf import convert_hf_to_megatron

    paths = {}
    for seed, role in enumerate(("policy", "dpo", "rev")):
        out = os.path.join(root, role)
        if not os.path.exists(os.path.join(out, "qwen_arch.json")):
            t0 = time.time()
            torch.manual_seed(seed)
            hf_dir = os.path.join(root, f"hf_{role}")
            Qwen2ForCausalLM(Qwen2Config(**QWEN25_05B, torch_dtype="float32")).save_pretrained(hf_dir)
            tok.save_pretrained(hf_dir)
            convert_hf_to_megatron(hf_dir, out, tp=TP, pp=PP, progress=False)
            shutil.rmtree(hf_dir)  # the converted directory is all the runs need
            print(f"{role}: made and converted in {time.time() - t0:.0f} s", flush=True)
        paths[role] = out
    return paths


def make_data(root: str, tok, n: int, positions: int) -> str:
    """``n`` records of ``positions + 1`` real token ids each (chat-templated, thinking off)."""
    from megatron_aligndistil.data.indexed import IndexedWriter
    from megatron_aligndistil.data.preprocess import split_conversation
    from megatron_aligndistil.data.synthetic import preference_records

    prefix = os.path.join(root, "data")
    writer = IndexedWriter(prefix, "distill", len(tok))
    prompt_len = positions // 4
    for i, rec in enumerate(preference_records(n, seed=1)):
        user, answer = rec["chosen"][0]["content"], rec["chosen"][1]["content"]
        messages = [{"role": "user", "content": " ".join([user] * 40)},
                    {"role": "assistant", "content": " ".join([answer] * 80)}]
        prompt, response = split_conversation(tok, messages, {"enable_thinking": False})
        writer.add({"prompt_ids": prompt[-prompt_len:], "response_ids": response[: positions + 1 - prompt_len]})
    writer.commit()
    return prefix


def train(name: str, method: str, paths: dict, root: str, args, *extra) -> dict:
    from megatron_aligndistil.testing import measure_training, run_distributed
    from megatron_aligndistil.train.metrics import read_metrics

    save = os.path.join(root, f"run_{name}")
    shutil.rmtree(save, ignore_errors=True)
    teachers = ["--dpo-load", paths["dpo"], "--rev-load", paths["rev"]] if method == "aligndistil" else []
    argv = [method, "--load", paths["policy"], *teachers, "--data-path", paths["data"], "--save", save,
            "--global-batch-size", str(args.global_batch_size), "--micro-batch-size", "1",
            "--seq-length", str(args.seq_length), "--lr", "1e-5", "--train-iters", str(args.iters),
            "--tensor-model-parallel-size", str(TP), "--pipeline-model-parallel-size", str(PP),
            "--no-progress", *extra]
    t0 = time.time()
    memory = run_distributed(measure_training, TP * PP, args=(argv,), kwargs={"full": True}, timeout=7200)
    wall = time.time() - t0
    metrics = read_metrics(os.path.join(save, "metrics.jsonl"))
    step = statistics.median(m["elapsed_s"] for m in metrics[1:]) if len(metrics) > 1 else metrics[0]["elapsed_s"]
    result = {"name": name, "wall_s": wall, "step_s": step, "memory": memory,
              "first": {k: metrics[0].get(k) for k in ("loss", "kl", "alpha_mean", "tvd_mean", "grad_norm")}}
    print(f"{name}: step {step:.1f} s (wall {wall:.0f} s), peak anon MiB per rank "
          f"{[round(m['peak_anon_above_base'] / 2**20) for m in memory]}, first {result['first']}", flush=True)
    if name != "aligndistil":  # optimizer checkpoints are several GB; the AlignDistil one is exported below
        for sub in os.listdir(save):
            if sub.startswith("iter_"):
                shutil.rmtree(os.path.join(save, sub))
    return result


def predictions(arch, args, **flags) -> list[dict]:
    """The planner's terms for each rank's pipeline stage (ranks are TP-fastest: stage = rank // TP)."""
    from megatron_aligndistil.loss.vocab_parallel import CPU_CHUNK_ELEMENTS
    from megatron_aligndistil.memory import Layout, host_bytes_per_gpu, plan_memory

    lay = Layout(tp=TP, pp=PP, dp=1, micro_batch=1, global_batch=args.global_batch_size, seq_length=args.seq_length,
                 bf16=False, distributed_optimizer=False, flash_attention=False, chunk_elements=CPU_CHUNK_ELEMENTS,
                 fused_optimizer=False, **flags)
    out = []
    for rank in range(TP * PP):
        terms = plan_memory(arch, lay, stage=rank // TP)
        # on a CPU the offloaded frozen weights are host memory of the same process
        terms["host"] = host_bytes_per_gpu(arch, lay, stage=rank // TP)
        out.append(terms)
    return out


def check_export(root: str, tok) -> dict:
    """The AlignDistil run's last training checkpoint -> HF (tools/convert_megatron_to_hf.py, as a
    user exports an iter_ directory); HF's logits against Megatron's at TP2 PP2 of the same
    weights (the HF directory converted back)."""
    import subprocess

    import torch
    from transformers import AutoModelForCausalLM

    from megatron_aligndistil.convert.hf import convert_hf_to_megatron
    from megatron_aligndistil.models.qwen import read_arch
    from megatron_aligndistil.core.parallel import Layout
    from megatron_aligndistil.testing import megatron_logits, run_distributed
    from megatron_aligndistil.core.weights import latest_checkpoint

    run = os.path.join(root, "run_aligndistil")
    hf_out, back = os.path.join(root, "hf_aligndistil"), os.path.join(root, "aligndistil_back")
    for d in (hf_out, back):
        shutil.rmtree(d, ignore_errors=True)
    t0 = time.time()
    subprocess.run([sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), "convert_megatron_to_hf.py"),
                    "--load", latest_checkpoint(run), "--save", hf_out], check=True)
    export_s = time.time() - t0
    convert_hf_to_megatron(hf_out, back, progress=False)
    arch = read_arch(back)
    text = "<|im_start|>user\nWhich word is last: cat, red, owl?<|im_end|>\n<|im_start|>assistant\n"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    tokens = torch.tensor([ids, list(reversed(ids))])
    got = [r for r in run_distributed(megatron_logits, TP * PP, args=(dataclasses.asdict(arch), back, tokens),
                                      layout=Layout(tp=TP, pp=PP)) if r is not None]
    hf = AutoModelForCausalLM.from_pretrained(hf_out, dtype=torch.float32).eval()
    with torch.no_grad():
        expected = hf(tokens).logits
    diffs = [float((g[..., : arch.vocab_size] - expected).abs().max()) for g in got]
    out = {"max_abs_diff": max(diffs), "logit_scale": float(expected.abs().max()), "stages_checked": len(got),
           "hf_vocab": hf.config.vocab_size, "export_s": export_s}
    print(f"export: iter checkpoint -> HF in {export_s:.0f} s; HF vs Megatron TP{TP} PP{PP} logits, max |diff| "
          f"{out['max_abs_diff']:.2e} (largest |logit| {out['logit_scale']:.2f})", flush=True)
    for sub in os.listdir(run):
        if sub.startswith("iter_"):
            shutil.rmtree(os.path.join(run, sub))
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default=os.path.join(tempfile.gettempdir(), "aligndistil_real_shape"))
    ap.add_argument("--seq-length", type=int, default=128)
    ap.add_argument("--global-batch-size", type=int, default=4, help="micro-batch 1, so this many micro-batches")
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--runs", nargs="+", default=["aligndistil", "aligndistil_offload", "sft"],
                    help="which runs to (re)do; the others are read from an earlier results.json in --dir")
    args = ap.parse_args(argv)
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")  # before the ranks start
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    from transformers import AutoTokenizer

    from megatron_aligndistil.models.qwen import read_arch

    tok = AutoTokenizer.from_pretrained(tokenizer_dir())
    os.makedirs(args.dir, exist_ok=True)
    paths = make_models(args.dir, tok)
    paths["data"] = make_data(args.dir, tok, args.global_batch_size * args.iters, args.seq_length)
    arch = read_arch(paths["policy"])
    runs = [("aligndistil", "aligndistil", ["--no-export"], {}),
            ("aligndistil_offload", "aligndistil", ["--no-export", "--offload-frozen-models"], {"offload_frozen": True}),
            ("sft", "sft", ["--no-export"], {"frozen_models": 0})]
    results_file = os.path.join(args.dir, "results.json")
    results = {"runs": {}}
    if os.path.exists(results_file):
        results = json.load(open(results_file))
    results.update(arch=dataclasses.asdict(arch), seq_length=args.seq_length, global_batch_size=args.global_batch_size,
                   iters=args.iters)
    for name, method, extra, plan_flags in runs:
        if name in args.runs:
            r = train(name, method, paths, args.dir, args, *extra)
            r["predicted"] = predictions(arch, args, **plan_flags)
            results["runs"][name] = r
            if name == "aligndistil":
                results["export"] = check_export(args.dir, tok)
        with open(results_file, "w") as f:
            json.dump(results, f, indent=2)

    mib = 2**20
    print(f"\nQwen2.5-0.5B shape, TP{TP} PP{PP}, fp32, seq {args.seq_length}, micro-batch 1, global batch "
          f"{args.global_batch_size}; per rank: peak anonymous memory above model building vs the planner\n")
    print("| run | rank (stage) | measured MiB | predicted MiB | error | peak RSS of the process MiB |")
    print("|---|---|---|---|---|---|")
    for name, r in results["runs"].items():
        for rank, (m, p) in enumerate(zip(r["memory"], r["predicted"])):
            measured, predicted = m["peak_anon_above_base"], p["total"] + p["host"]
            print(f"| {name} | {rank} ({rank // TP}) | {measured / mib:.0f} | {predicted / mib:.0f} | "
                  f"{predicted / measured - 1:+.1%} | {m['vm_hwm'] / mib:.0f} |")
    ad, sft = results["runs"]["aligndistil"]["step_s"], results["runs"]["sft"]["step_s"]
    off = results["runs"]["aligndistil_offload"]["step_s"]
    print("\n| run | step s | vs SFT |\n|---|---|---|")
    for name, s in (("sft", sft), ("aligndistil", ad), ("aligndistil_offload", off)):
        print(f"| {name} | {s:.1f} | {s / sft:.2f}x |")


if __name__ == "__main__":
    main()
