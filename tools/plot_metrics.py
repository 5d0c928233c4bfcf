#!/usr/bin/env python
"""Plot metrics.jsonl curves (loss, KL, alpha, TVD, reward accuracy, grad norm, lr) to a PNG.

    python tools/plot_metrics.py runs/aligndistil/metrics.jsonl --out curves.png
    python tools/plot_metrics.py dpo=runs/dpo/metrics.jsonl rev=runs/rev/metrics.jsonl --out dpo.png
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("metrics", nargs="+", help="metrics.jsonl files, optionally LABEL=PATH")
    ap.add_argument("--out", required=True, help="output PNG")
    ap.add_argument("--title", default=None)
    args = ap.parse_args(argv)
    from megatron_aligndistil.train.plots import plot_runs

    runs = {}
    for item in args.metrics:
        label, _, path = item.rpartition("=")
        runs[label or os.path.basename(os.path.dirname(os.path.abspath(path))) or path] = path
    keys = plot_runs(runs, args.out, args.title)
    print(f"wrote {args.out} ({', '.join(keys)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
