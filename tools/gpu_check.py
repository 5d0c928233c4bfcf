#!/usr/bin/env python
"""The first-GPU check: the project's GPU code paths, timed and compared with CPU references.

    bash scripts/gpu_check.sh --out DIR                   # one GPU, at most 8 minutes (docs/gpu_check.md)
    bash scripts/gpu_check.sh --cpu-rehearsal --out DIR   # the same code at tiny shapes on CPU (CI runs it)
    python tools/gpu_check.py --out DIR --only loss_float64 train_3_iters

Writes ``DIR/results.json`` (``{"checks": [{"name", "ok", "seconds", ...numbers}], ...}``) and
``DIR/results.md``; exits 1 when a check is not ok. A check that cannot run here (no
TransformerEngine) is ``ok`` with ``skipped`` giving the reason. Checks:

- ``loss_float64``: the AlignDistil loss and its gradient against the float64 dense reference,
  fp32 and bf16 logits, eager and compiled, at vocab 151,936.
- ``loss_vs_megatron_ce``: forward+backward time of the loss against Megatron's
  ``vocab_parallel_cross_entropy``, bf16, 4,096 tokens x 151,936 (rehearsal: 256 tokens).
- ``train_3_iters``: 3 iterations of SFT, DPO, AlignDistil off-policy and on-policy (Megatron
  sampler) of a tiny tied Qwen3, on this device (NCCL on a GPU) with ``--bf16`` (on-policy: fp32,
  so the sampled tokens can be held equal), against the same runs in fp32 on the CPU (gloo):
  per-iteration loss within 3% (bf16) / 0.1% (fp32).
- ``step_1p5b``: a Qwen2.5-1.5B-shaped AlignDistil step and SFT step (bf16, seq 2048,
  micro-batch 1), with and without full recompute: step time, tokens/s, model TFLOP/s, MFU,
  peak memory against the planner, AlignDistil / SFT ratio (rehearsal: a tiny shape).
- ``sampler``: the Megatron sampler's tokens/s at that shape.
- ``transformer_engine``: off-policy AlignDistil with TE layers and packed THD sequences against
  the local layers; skipped without TransformerEngine.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform as host
import statistics
import subprocess
import sys
import tempfile
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

import torch  # noqa: E402

PEAK_BF16_TFLOPS = {"H100": 989.4, "H200": 989.4, "H800": 989.4, "A100": 312.0}  # dense, per GPU
BF16_RTOL = 3e-2  # loss of a bf16 run against the fp32 run, per iteration
FP32_RTOL = 1e-3  # an fp32 run on the device against the CPU's (TF32 off, as torch's default for matmuls)


# ---------------------------------------------------------------- helpers
def _random_checkpoint(arch, out: str, seed: int = 0, std: float = 0.02) -> str:
    """A converted checkpoint of ``arch`` with random weights (norms 1), written tensor by tensor:
    no HF model is built, so a 1.5B-shaped one takes seconds."""
    from megatron_aligndistil.convert.hf import FORMAT, FORMAT_FILE
    from megatron_aligndistil.convert.mapping import hf_tensor_shapes, hf_to_megatron
    from megatron_aligndistil.core.store import ShardedWriter
    from megatron_aligndistil.core.weights import ARCH_FILE

    shapes = hf_tensor_shapes(arch)
    dtype = getattr(torch, arch.torch_dtype)
    position = {name: i for i, name in enumerate(sorted(shapes))}  # each tensor's own seed

    def make(name):
        g = torch.Generator().manual_seed(seed * 100_003 + position[name])
        if "norm" in name:
            return torch.ones(shapes[name], dtype=dtype)
        return (torch.randn(shapes[name], generator=g) * std).to(dtype)

    writer = ShardedWriter(out, overwrite=True)
    for name, tensor in hf_to_megatron(arch, make):
        writer.add(name, tensor)
    writer.write_json(ARCH_FILE, json.loads(arch.to_json()))
    writer.write_json(FORMAT_FILE, FORMAT)
    return writer.commit()


def _tiny_setup(root: str, vocab: int = 1001) -> dict:
    """A tiny tied Qwen3 (q/k norm) policy and two teachers from transformers, converted, and data
    for every method (token ids, no tokenizer)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from megatron_aligndistil.convert.hf import convert_hf_to_megatron

    paths = {}
    for seed, role in enumerate(("policy", "dpo", "rev")):
        torch.manual_seed(seed)
        cfg = Qwen3Config(vocab_size=vocab, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
                          tie_word_embeddings=True, eos_token_id=vocab - 1, torch_dtype="float32")
        Qwen3ForCausalLM(cfg).save_pretrained(os.path.join(root, f"hf_{role}"))
        paths[role] = convert_hf_to_megatron(os.path.join(root, f"hf_{role}"), os.path.join(root, role),
                                             progress=False)
    g = torch.Generator().manual_seed(0)

    def ids(lo, hi, n_lo=2, n_hi=8):
        return torch.randint(lo, hi, (int(torch.randint(n_lo, n_hi, (1,), generator=g)),), generator=g).tolist()

    for name, make in (("distill", lambda: {"prompt_ids": ids(0, vocab - 1), "response_ids": ids(0, vocab - 1)}),
                       ("pairs", lambda: {"prompt_ids": ids(0, vocab - 1), "chosen_ids": ids(0, vocab // 2),
                                          "rejected_ids": ids(vocab // 2, vocab - 1)}),
                       ("prompts", lambda: {"prompt_ids": ids(0, vocab - 1)})):
        paths[name] = os.path.join(root, f"{name}.jsonl")
        with open(paths[name], "w") as f:
            f.writelines(json.dumps(make()) + "\n" for _ in range(32))
    return paths


def _train_device(argv: list[str]) -> dict:
    """A run_distributed rank: train with ``argv`` on this machine's device; peak memory."""
    from megatron_aligndistil.testing import measure_training

    out = measure_training(argv, full=True)
    if torch.cuda.is_available():
        out["cuda_max_allocated"] = torch.cuda.max_memory_allocated()
    return out


def _run_on_device(argv: list[str]) -> dict:
    from megatron_aligndistil.testing import run_distributed

    return run_distributed(_train_device, 1, args=(argv,), timeout=1800)[0]


def _run_on_cpu_fp32(argv: list[str]) -> None:
    """The trainer as a user runs it, one process with CUDA hidden: gloo, fp32."""
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHONPATH=ROOT)
    r = subprocess.run([sys.executable, "-m", "megatron_aligndistil.train", *argv], env=env,
                       capture_output=True, text=True, timeout=1800)
    if r.returncode:
        raise RuntimeError(f"CPU reference run failed ({r.returncode}): {r.stderr[-2000:]}")


def _field(save: str, key: str) -> list:
    from megatron_aligndistil.train.metrics import read_metrics

    return [m.get(key) for m in read_metrics(os.path.join(save, "metrics.jsonl"))]


def _losses(save: str) -> list[float]:
    return _field(save, "loss")


# ---------------------------------------------------------------- checks
def check_env(ctx) -> dict:
    import megatron.core
    import transformers

    out = {"torch": torch.__version__, "cuda": torch.version.cuda, "transformers": transformers.__version__,
           "megatron_core": megatron.core.__version__, "python": host.python_version(),
           "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}
    try:
        import transformer_engine

        out["transformer_engine"] = transformer_engine.__version__
    except ImportError:
        out["transformer_engine"] = None
    return out


def check_loss_float64(ctx) -> dict:
    from megatron_aligndistil.loss import vocab_parallel_aligndistil
    from megatron_aligndistil.loss.reference import dense_aligndistil
    from megatron_aligndistil.loss.vocab_parallel import compile_failures

    vocab, tokens = 151_936, (8 if ctx.rehearsal else 512)
    g = torch.Generator().manual_seed(0)
    base = [torch.randn(tokens, vocab, generator=g) * 3 for _ in range(3)]
    out, worst = {}, 0.0
    for dtype in (torch.float32, torch.bfloat16):
        logits = [z.to(dtype).to(ctx.device) for z in base]
        zp = logits[0].double().requires_grad_(True)
        ref = dense_aligndistil(zp, logits[1].double(), logits[2].double())
        ref["loss"].sum().backward()
        for compiled in (False, True):
            policy = logits[0].detach().clone().requires_grad_(True)
            got = vocab_parallel_aligndistil(policy, logits[1], logits[2], vocab_size=vocab, compile=compiled)
            got.loss.sum().backward()
            loss_err = float(((got.loss.double() - ref["loss"]).abs() / (1 + ref["loss"].abs())).max())
            grad_err = float((policy.grad.double() - zp.grad).abs().max() / zp.grad.abs().max())
            key = f"{str(dtype)[6:]}_{'compiled' if compiled else 'eager'}"
            out[f"{key}_loss_rel_err"], out[f"{key}_grad_rel_err"] = loss_err, grad_err
            tol = 1e-4 if dtype == torch.float32 else 2e-2  # bf16: the gradient is returned in bf16
            worst = max(worst, loss_err / 1e-4, grad_err / tol)
    out["compile_failures"] = compile_failures()
    out["ok"] = worst <= 1.0 and not out["compile_failures"]
    return out


def check_loss_vs_megatron_ce(ctx) -> dict:
    sys.path.insert(0, HERE)
    from bench_loss import bench_rank

    from megatron_aligndistil.core.parallel import Layout
    from megatron_aligndistil.testing import run_distributed

    tokens, vocab, reps = (256, 151_936, 2) if ctx.rehearsal else (4096, 151_936, 10)
    res = {impl: run_distributed(bench_rank, 1, args=(impl, tokens, vocab, "bfloat16", reps), layout=Layout(),
                                 timeout=900)[0] for impl in ("aligndistil", "megatron_ce")}
    ad, ce = res["aligndistil"]["time_s"], res["megatron_ce"]["time_s"]
    return {"tokens": tokens, "vocab": vocab, "aligndistil_ms": ad * 1e3, "megatron_ce_ms": ce * 1e3,
            "ratio": ad / ce, "aligndistil_peak_extra_mib": res["aligndistil"]["peak_extra_bytes"] / 2**20,
            "megatron_ce_peak_extra_mib": res["megatron_ce"]["peak_extra_bytes"] / 2**20}


def check_train_3_iters(ctx) -> dict:
    paths = _tiny_setup(os.path.join(ctx.work, "tiny"))
    common = ["--global-batch-size", "4", "--micro-batch-size", "2", "--seq-length", "16", "--lr", "1e-3",
              "--train-iters", "3", "--no-progress", "--no-export", "--no-shuffle"]
    ad = ["--dpo-load", paths["dpo"], "--rev-load", paths["rev"]]
    runs = {"sft": ["sft", "--data-path", paths["distill"]],
            "dpo": ["dpo", "--data-path", paths["pairs"], "--dpo-beta", "0.1"],
            "aligndistil": ["aligndistil", "--data-path", paths["distill"], *ad],
            "aligndistil_on_policy": ["aligndistil", "--data-path", paths["prompts"], *ad, "--rollout", "on-policy",
                                      "--max-new-tokens", "6", "--rollout-engine", "megatron"]}
    from megatron_aligndistil.models.qwen import read_arch

    policy = read_arch(paths["policy"])  # what the runs exercise: tied embeddings and q/k norm
    out, worst = {"tied_embeddings": policy.tie_word_embeddings, "qk_layernorm": policy.qk_layernorm}, 0.0
    for name, argv in runs.items():
        argv = argv[:1] + ["--load", paths["policy"]] + argv[1:] + common
        # on-policy runs in fp32 on the device too: bf16 probabilities move the draws' boundaries
        # and one changed token changes the rest of its response, so only fp32 can be held to the
        # CPU's tokens (the sampler's uniforms are the same numbers on every device)
        on_policy = "--rollout" in argv
        precision, tol = ("fp32", FP32_RTOL) if on_policy else ("bf16", BF16_RTOL)
        dev_save, cpu_save = (os.path.join(ctx.work, f"{name}_{where}") for where in ("device", "cpu"))
        _run_on_device(argv + ["--save", dev_save] + ([] if on_policy else ["--bf16"]))
        _run_on_cpu_fp32(argv + ["--save", cpu_save])
        dev, cpu = _losses(dev_save), _losses(cpu_save)
        rel = max(abs(a - b) / max(abs(b), 1e-2) for a, b in zip(dev, cpu))
        out[name] = {"device_precision": precision, "device_loss": dev, "cpu_fp32_loss": cpu, "max_rel_diff": rel,
                     "tolerance": tol}
        if on_policy:
            out[name]["response_len_mean"] = {where: _field(save, "response_len_mean")
                                              for where, save in (("device", dev_save), ("cpu", cpu_save))}
        worst = max(worst, rel / tol if len(dev) == len(cpu) == 3 else float("inf"))
    out["ok"] = worst <= 1.0
    return out


def _flops_per_token(arch, seq: int) -> float:
    """Model FLOPs of one forward per token (causal attention: half the score matrix)."""
    from megatron_aligndistil.memory import layer_params

    attn = 2 * 2 * (seq / 2) * arch.num_attention_heads * arch.head_dim  # QK^T and AV
    return arch.num_layers * (2 * layer_params(arch) + attn) + 2 * arch.hidden_size * arch.vocab_size


def _shape_arch():
    from megatron_aligndistil.models.qwen import QwenArch

    cfg = json.load(open(os.path.join(ROOT, "examples", "configs", "qwen2.5-1.5b-instruct.json")))
    return QwenArch.from_hf_config(cfg)


def check_step_1p5b(ctx) -> dict:
    from megatron_aligndistil.train.arguments import parse_args
    from megatron_aligndistil.train.metrics import read_metrics
    from megatron_aligndistil.train.plan import make_plan

    arch = _shape_arch()
    seq, iters, gbs = 2048, 4, 2
    if ctx.rehearsal:
        arch = dataclasses.replace(arch, num_layers=2, hidden_size=64, ffn_hidden_size=160, num_attention_heads=4,
                                   num_query_groups=2, head_dim=16, vocab_size=1024)
        seq = 64
    arch = dataclasses.replace(arch, torch_dtype="bfloat16")
    ckpt = _random_checkpoint(arch, os.path.join(ctx.work, "shape"))
    rev = _random_checkpoint(arch, os.path.join(ctx.work, "shape_rev"), seed=1)  # the teachers must differ
    data = os.path.join(ctx.work, "shape.jsonl")
    g = torch.Generator().manual_seed(0)
    with open(data, "w") as f:
        for _ in range(gbs * iters):
            f.write(json.dumps({"prompt_ids": torch.randint(0, arch.vocab_size, (seq // 4,), generator=g).tolist(),
                                "response_ids": torch.randint(0, arch.vocab_size, (seq - seq // 4 + 1,),
                                                              generator=g).tolist()}) + "\n")
    peak_tflops = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in ctx.device_name), None)
    out = {"layers": arch.num_layers, "hidden": arch.hidden_size, "seq": seq, "micro_batch": 1,
           "global_batch": gbs, "peak_bf16_tflops": peak_tflops}
    fwd = _flops_per_token(arch, seq)
    for recompute in (False, True):
        for method in ("sft", "aligndistil"):
            key = f"{method}{'_recompute' if recompute else ''}"
            save = os.path.join(ctx.work, key)
            argv = [method, "--load", ckpt, "--data-path", data, "--save", save, "--global-batch-size", str(gbs),
                    "--micro-batch-size", "1", "--seq-length", str(seq), "--lr", "1e-6", "--train-iters", str(iters),
                    "--no-progress", "--no-export", "--no-shuffle", "--bf16"]
            if method == "aligndistil":
                argv += ["--dpo-load", ckpt, "--rev-load", rev]
            if recompute:
                argv += ["--recompute-granularity", "full", "--recompute-method", "uniform",
                         "--recompute-num-layers", "1"]
            mem = _run_on_device(argv)
            step = statistics.median(m["elapsed_s"] for m in read_metrics(os.path.join(save, "metrics.jsonl"))[1:])
            tokens = gbs * seq
            flops = tokens * fwd * (3 + (2 if method == "aligndistil" else 0))  # + two teacher forwards
            planned = make_plan(parse_args(argv), 1)["planned_bytes_per_gpu"]
            measured = mem.get("cuda_max_allocated", mem["peak_anon_above_base"])
            ran_with = json.load(open(os.path.join(save, "args.json")))["recompute_granularity"]
            out[key] = {"recompute": ran_with, "step_s": step, "tokens_per_s": tokens / step,
                        "model_tflops": flops / step / 1e12,
                        "mfu": flops / step / 1e12 / peak_tflops if peak_tflops else None,
                        "peak_gib": measured / 2**30, "planned_gib": planned / 2**30,
                        "planner_error": planned / measured - 1,
                        "memory": "torch.cuda.max_memory_allocated" if torch.cuda.is_available()
                        else "peak anonymous RSS above start (CPU, fp32 main params)"}
        suffix = "_recompute" if recompute else ""
        out[f"aligndistil_over_sft{suffix}"] = out[f"aligndistil{suffix}"]["step_s"] / out[f"sft{suffix}"]["step_s"]
    # the runs trained as labelled (the trainer's own record of its flags)
    out["ok"] = all(out[k]["recompute"] == want for k, want in (("sft", None), ("aligndistil", None),
                                                                ("sft_recompute", "full"),
                                                                ("aligndistil_recompute", "full")))
    if torch.cuda.is_available():
        out["planner_within_10pct"] = all(abs(out[k]["planner_error"]) <= 0.10 for k in
                                          ("sft", "aligndistil", "sft_recompute", "aligndistil_recompute"))
    ctx.shape_checkpoint, ctx.shape_arch = ckpt, arch
    return out


def _sample_rank(arch_fields, ckpt, batch, prompt, new):
    from megatron_aligndistil.config import RolloutConfig, SamplingParams
    from megatron_aligndistil.core import weights
    from megatron_aligndistil.models import qwen
    from megatron_aligndistil.rollout import make_engine

    arch = qwen.QwenArch(**arch_fields)
    bf16 = torch.cuda.is_available()
    model = qwen.build_model(arch, qwen.transformer_config(arch, params_dtype=torch.bfloat16 if bf16 else torch.float32,
                                                           bf16=bf16))
    weights.load_weights(model, ckpt)
    model.eval()
    engine = make_engine(RolloutConfig("megatron", SamplingParams(max_new_tokens=new, temperature=1.0, seed=0)),
                         model, arch, arch.vocab_size, max_model_len=prompt + new)
    prompts = torch.randint(0, arch.vocab_size, (batch, prompt), generator=torch.Generator().manual_seed(0)).tolist()
    engine.generate(prompts[:2], max_new_tokens=[4, 4])  # warm-up
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    rollouts = engine.generate(prompts, sequence_ids=list(range(batch)))
    secs = time.perf_counter() - t0
    made = sum(len(r.response_ids) for r in rollouts)
    return {"batch": batch, "prompt": prompt, "new_tokens": made, "seconds": secs, "tokens_per_s": made / secs,
            "dtype": "bfloat16" if bf16 else "float32"}


def check_sampler(ctx) -> dict:
    from megatron_aligndistil.core.parallel import Layout
    from megatron_aligndistil.testing import run_distributed

    if getattr(ctx, "shape_checkpoint", None) is None:
        check_step_1p5b(ctx)
    batch, prompt, new = (4, 8, 8) if ctx.rehearsal else (32, 128, 128)
    return run_distributed(_sample_rank, 1, args=(dataclasses.asdict(ctx.shape_arch), ctx.shape_checkpoint, batch,
                                                  prompt, new), layout=Layout(), timeout=900)[0]


def check_transformer_engine(ctx) -> dict:
    try:
        import transformer_engine  # noqa: F401
    except ImportError as exc:
        return {"skipped": f"TransformerEngine is not importable here ({exc}); carry a transformer_engine "
                           "wheel (docs/gpu_check.md) to run TE layers and packed THD sequences"}
    paths = _tiny_setup(os.path.join(ctx.work, "tiny_te"))
    out = {}
    for name, extra in (("local", ["--transformer-impl", "local"]),
                        ("te_packed", ["--transformer-impl", "transformer_engine", "--pack-sequences"])):
        save = os.path.join(ctx.work, f"te_{name}")
        _run_on_device(["aligndistil", "--load", paths["policy"], "--dpo-load", paths["dpo"], "--rev-load",
                        paths["rev"], "--data-path", paths["distill"], "--save", save, "--global-batch-size", "4",
                        "--micro-batch-size", "2", "--seq-length", "16", "--lr", "1e-3", "--train-iters", "3",
                        "--no-progress", "--no-export", "--no-shuffle", "--bf16", *extra])
        out[name] = _losses(save)
    out["max_rel_diff"] = max(abs(a - b) / max(abs(b), 1e-2) for a, b in zip(out["te_packed"], out["local"]))
    out["ok"] = out["max_rel_diff"] <= BF16_RTOL
    return out


CHECKS = {"env": check_env, "loss_float64": check_loss_float64, "loss_vs_megatron_ce": check_loss_vs_megatron_ce,
          "train_3_iters": check_train_3_iters, "step_1p5b": check_step_1p5b, "sampler": check_sampler,
          "transformer_engine": check_transformer_engine}


# ---------------------------------------------------------------- report
def _markdown(report: dict) -> str:
    lines = [f"# GPU check ({'CPU rehearsal' if report['cpu_rehearsal'] else report['device']})", "",
             f"{report['started']}, {report['seconds']:.0f} s in all", "", "| check | ok | seconds | result |",
             "|---|---|---|---|"]
    for c in report["checks"]:
        body = {k: v for k, v in c.items() if k not in ("name", "ok", "seconds")}
        text = json.dumps(body, default=str)
        lines.append(f"| {c['name']} | {'yes' if c['ok'] else '**NO**'} | {c['seconds']:.1f} | "
                     f"{text[:1500].replace('|', '/')} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="directory for results.json and results.md")
    ap.add_argument("--cpu-rehearsal", action="store_true", help="tiny shapes on CPU (what CI runs)")
    ap.add_argument("--only", nargs="+", choices=list(CHECKS), help="run only these checks")
    args = ap.parse_args(argv)
    if not args.cpu_rehearsal and not torch.cuda.is_available():
        print("gpu_check: no CUDA device; run with --cpu-rehearsal on a CPU machine", file=sys.stderr)
        return 2
    os.makedirs(args.out, exist_ok=True)
    ctx = argparse.Namespace(rehearsal=args.cpu_rehearsal,
                             device=torch.device("cuda" if torch.cuda.is_available() else "cpu"),
                             device_name=torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu")
    report = {"cpu_rehearsal": args.cpu_rehearsal, "device": ctx.device_name,
              "started": time.strftime("%Y-%m-%d %H:%M:%S"), "checks": []}
    t_all = time.time()
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as work:
        ctx.work = work
        for name in args.only or list(CHECKS):
            t0 = time.time()
            try:
                result = CHECKS[name](ctx)
                result = {"ok": result.pop("ok", True), **result}
            except Exception as exc:  # noqa: BLE001 - a failed check is reported, the others still run
                result = {"ok": False, "error": f"{type(exc).__name__}: {exc}"[:4000],
                          "traceback": traceback.format_exc()[-4000:]}
            report["checks"].append({"name": name, **result, "seconds": time.time() - t0})
            print(f"gpu_check: {name}: {'ok' if result['ok'] else 'FAILED'} ({time.time() - t0:.1f} s)"
                  + (f" {result.get('error', '')[:300]}" if not result["ok"] else ""), flush=True)
            with open(os.path.join(args.out, "results.json"), "w") as f:  # partial results survive a timeout
                json.dump(report | {"seconds": time.time() - t_all}, f, indent=2, default=str)
    report["seconds"] = time.time() - t_all
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(report, f, indent=2, default=str)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(_markdown(report))
    return 0 if all(c["ok"] for c in report["checks"]) else 1


if __name__ == "__main__":
    sys.exit(main())
