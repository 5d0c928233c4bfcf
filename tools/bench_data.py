#!/usr/bin/env python
"""Start-up time and resident memory of the trainer's data, JSONL vs Megatron indexed datasets.

    python tools/bench_data.py                        # 100k and 1M records, 2 ranks
    python tools/bench_data.py --records 1000000 --nproc 8

Writes synthetic distillation records (prompt and response ids from the real Qwen vocabulary size,
151,669 ids; lengths uniform in [--min-len, --max-len]) once per size in both formats, then starts
``--nproc`` fresh processes side by side, as the ranks of one node. Each does what a trainer rank
does with ``--data-path``: ``read_records`` (validation included) and the first global batch of
``--global-batch-size`` records. Reported per rank: seconds to read, peak resident memory
(VmHWM), and at the end the resident memory split into anonymous (the process's own) and
file-backed (mapped pages of the .bin/.idx, shared between ranks and reclaimable).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

VOCAB = 151_669


def write(prefix: str, n: int, lo: int, hi: int) -> None:
    import numpy as np

    from megatron_aligndistil.data.indexed import IndexedWriter

    if os.path.exists(prefix + ".jsonl") and os.path.exists(prefix + ".idx"):
        return
    rng = np.random.default_rng(0)
    writer = IndexedWriter(prefix, "distill", VOCAB)
    t0 = time.time()
    with open(prefix + ".jsonl.tmp", "w") as f:
        for _ in range(n):
            p, r = rng.integers(lo, hi + 1, 2)
            rec = {"prompt_ids": rng.integers(0, VOCAB, p).tolist(), "response_ids": rng.integers(0, VOCAB, r).tolist()}
            f.write(json.dumps(rec) + "\n")
            writer.add(rec)
    writer.commit()
    os.replace(prefix + ".jsonl.tmp", prefix + ".jsonl")
    print(f"wrote {n} records in {time.time() - t0:.0f} s: {prefix}.jsonl "
          f"{os.path.getsize(prefix + '.jsonl') / 2**20:.0f} MiB, .bin {os.path.getsize(prefix + '.bin') / 2**20:.0f} MiB, "
          f".idx {os.path.getsize(prefix + '.idx') / 2**20:.1f} MiB", flush=True)


def _status() -> dict:
    """This process's memory from /proc/self/status, MiB."""
    from megatron_aligndistil.testing import memory_status

    return {k: v / 2**20 for k, v in memory_status().items()}


def rank(path: str, global_batch: int, max_tokens: int) -> None:
    """One rank: read the data as the trainer does, take the first global batch; print JSON."""
    # imported by the trainer before it reads its data; not counted below
    import megatron.core.datasets.indexed_dataset  # noqa: F401
    import torch  # noqa: F401

    from megatron_aligndistil.data.batching import global_batch_indices
    from megatron_aligndistil.data import read_records

    base = _status()
    t0 = time.time()
    data = read_records(path, "distill", VOCAB, max_tokens=max_tokens)
    read_s = time.time() - t0
    batch = [data.records[i] for i in global_batch_indices(len(data), 0, global_batch, 1234)]
    first_batch_s = time.time() - t0 - read_s
    assert len(batch) == global_batch
    end = _status()
    print(json.dumps({"records": len(data), "read_s": read_s, "first_batch_s": first_batch_s,
                      "peak_mib": end["VmHWM"] - base["VmRSS"], "anon_mib": end["RssAnon"] - base["RssAnon"],
                      "file_mib": end["RssFile"] - base["RssFile"]}), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--records", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--nproc", type=int, default=2, help="ranks reading side by side")
    ap.add_argument("--min-len", type=int, default=8)
    ap.add_argument("--max-len", type=int, default=56)
    ap.add_argument("--global-batch-size", type=int, default=128)
    ap.add_argument("--formats", nargs="+", choices=["JSONL", "indexed"], default=["JSONL", "indexed"])
    ap.add_argument("--dir", default=os.path.join(tempfile.gettempdir(), "aligndistil_bench_data"))
    ap.add_argument("--rank", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.rank:
        return rank(args.rank[0], int(args.rank[1]), int(args.rank[2]))
    os.makedirs(args.dir, exist_ok=True)
    rows = []
    for n in args.records:
        prefix = os.path.join(args.dir, f"distill_{n}")
        write(prefix, n, args.min_len, args.max_len)
        for fmt, path in (("JSONL", prefix + ".jsonl"), ("indexed", prefix)):
            if fmt not in args.formats:
                continue
            env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
            procs = [subprocess.Popen([sys.executable, __file__, "--rank", path, str(args.global_batch_size),
                                       str(2 * args.max_len)], stdout=subprocess.PIPE, text=True, env=env)
                     for _ in range(args.nproc)]
            results = [json.loads(p.communicate()[0].strip().splitlines()[-1]) for p in procs]
            assert all(p.returncode == 0 for p in procs)
            worst = max(results, key=lambda r: r["peak_mib"])
            rows.append((n, fmt, max(r["read_s"] for r in results), max(r["first_batch_s"] for r in results),
                         worst["peak_mib"], worst["anon_mib"], worst["file_mib"]))
            print(f"{n} records, {fmt}: " + json.dumps(results), flush=True)
    print(f"\n{args.nproc} ranks side by side; per rank (the worst of them), memory above the process before "
          "reading (torch and megatron.core imported, as in the trainer)\n")
    print("| records | format | read + validate s | first global batch s | peak RSS MiB | anonymous MiB | file-backed MiB |")
    print("|---|---|---|---|---|---|---|")
    for n, fmt, read_s, batch_s, peak, anon, file_ in rows:
        print(f"| {n:,} | {fmt} | {read_s:.2f} | {batch_s:.3f} | {peak:.0f} | {anon:.0f} | {file_:.0f} |")


if __name__ == "__main__":
    main()
