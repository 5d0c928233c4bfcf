#!/usr/bin/env python
"""Peak memory of writing a trained policy out: the trainer's end-of-run export
(``core.weights.export_release``) and the export to HF (``tools/convert_megatron_to_hf.py``).

    python tools/bench_export.py                       # Qwen2.5-0.5B's shape, TP2 PP2: ~3 min, 6 GB RAM
    python tools/bench_export.py --tp 1 --pp 1 --config examples/configs/qwen2.5-1.5b-instruct.json

Builds a random policy of the config's shape (fp32 parameters, exported in the config's dtype)
on TP x PP CPU processes and exports it; per rank, prints the peak anonymous memory above the
export's start (sampled every ms, ``MALLOC_MMAP_THRESHOLD_=65536`` so RSS follows live tensors)
next to the largest full tensor and the rank's whole stage. Then converts the export to HF in
one process and prints that peak (anonymous; and with the file-mapped pages of its input, which
the kernel may reclaim) against the largest tensor and one output shard. Both write
tensor by tensor (``core.store``); docs/scaling.md has the recorded numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

_CONVERT = r"""
import json, sys
from megatron_aligndistil.convert.hf import convert_megatron_to_hf
from megatron_aligndistil.testing import sampled_peak
with sampled_peak() as anon, sampled_peak(("RssAnon", "RssFile")) as both:  # safetensors maps its input
    convert_megatron_to_hf(sys.argv[1], sys.argv[2], max_shard_bytes=int(sys.argv[3]), progress=False)
print(json.dumps({"anon": anon["above_base"], "anon_and_file": both["above_base"]}))
"""


def main(argv=None) -> None:
    here = os.path.dirname(os.path.abspath(__file__))
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=os.path.join(here, "..", "examples", "configs", "qwen2.5-0.5b.json"))
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--pp", type=int, default=2)
    ap.add_argument("--max-shard-bytes", type=int, default=5 * 2**30, help="HF export shard size (HF's default)")
    ap.add_argument("--dir", default=None, help="work directory (default: a temporary one, removed)")
    args = ap.parse_args(argv)
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")

    import dataclasses

    from megatron_aligndistil.models.qwen import QwenArch
    from megatron_aligndistil.core.parallel import Layout
    from megatron_aligndistil.testing import measure_export, run_distributed

    arch = QwenArch.from_hf_config(json.load(open(args.config)))
    mib = 2**20
    with tempfile.TemporaryDirectory(prefix="bench-export-", dir=args.dir) as root:
        out = os.path.join(root, "release")
        ranks = run_distributed(measure_export, args.tp * args.pp, args=(dataclasses.asdict(arch), out),
                                layout=Layout(tp=args.tp, pp=args.pp), timeout=1800)
        print(f"export_release, {os.path.basename(args.config)} ({arch.torch_dtype}), TP{args.tp} PP{args.pp}:")
        print("| rank | peak above start | largest full tensor | stage |")
        print("|---|---|---|---|")
        for rank, r in enumerate(ranks):
            print(f"| {rank} | {r['peak_above_start'] / mib:,.0f} MiB | {r['largest_tensor'] / mib:,.0f} MiB "
                  f"| {r['stage'] / mib:,.0f} MiB |")
        proc = subprocess.run([sys.executable, "-c", _CONVERT, out, os.path.join(root, "hf"),
                               str(args.max_shard_bytes)], capture_output=True, text=True, check=False,
                              env=dict(os.environ, PYTHONPATH=os.path.join(here, "..")))
        if proc.returncode:
            sys.exit(proc.stderr)
        peak = json.loads(proc.stdout.strip().splitlines()[-1])
        largest = max(r["largest_tensor"] for r in ranks)
        print(f"convert_megatron_to_hf: peak {peak['anon'] / mib:,.0f} MiB anonymous above start "
              f"({peak['anon_and_file'] / mib:,.0f} MiB with the mapped input pages); largest tensor "
              f"{largest / mib:,.0f} MiB, shard limit {args.max_shard_bytes / mib:,.0f} MiB, model "
              f"{sum(r['stage'] for r in ranks if r['stage']) / args.tp / mib:,.0f} MiB")


if __name__ == "__main__":
    main()
