#!/usr/bin/env python
"""Tokenize preference data (UltraFeedback-binarized layout) into the trainers' JSONL files.

    python tools/preprocess_data.py --input HuggingFaceH4/ultrafeedback_binarized --split train_prefs \\
        --tokenizer Qwen/Qwen2.5-1.5B-Instruct --output-prefix data/uf
    python tools/preprocess_data.py --input prefs.jsonl --tokenizer ckpt/policy --output-prefix data/tiny

Writes <prefix>_pairs.jsonl (DPO), <prefix>_chosen.jsonl (off-policy AlignDistil / SFT),
<prefix>_prompts.jsonl (on-policy) and <prefix>_report.json (kept / dropped with reasons), and the
same records as Megatron indexed datasets <prefix>_{pairs,chosen,prompts}.bin/.idx, which the
trainers map instead of reading (--data-path <prefix>_pairs, no extension; docs/training.md).
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from megatron_aligndistil.core.errors import UserError
from megatron_aligndistil.core.cli import run_tool


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--input", required=True, help="JSON/JSONL/Parquet file, save_to_disk dir, or hub name")
    ap.add_argument("--split", default="train_prefs", help="split of a dataset dict or hub dataset")
    ap.add_argument("--tokenizer", required=True, help="HF tokenizer dir or hub name (with a chat template)")
    ap.add_argument("--output-prefix", required=True)
    ap.add_argument("--max-prompt-length", type=int, default=1024)
    ap.add_argument("--max-length", type=int, default=2048, help="prompt + longest response, tokens")
    ap.add_argument("--strict", action="store_true", help="fail on the first bad record")
    ap.add_argument("--chat-template-kwargs", default=None,
                    help='JSON for the chat template, e.g. \'{"enable_thinking": false}\' (Qwen3 without '
                         "thinking); recorded in <prefix>_report.json (docs/training.md)")
    args = ap.parse_args(argv)

    def run():
        from transformers import AutoTokenizer

        from megatron_aligndistil.data.preprocess import RecordError, load_records, preprocess, template_kwargs_arg

        if (os.sep in args.tokenizer or args.tokenizer.startswith(".")) and not os.path.isdir(args.tokenizer):
            raise UserError(f"--tokenizer {args.tokenizer}: no such directory")
        try:
            tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
        except (OSError, ValueError) as exc:
            raise UserError(f"--tokenizer {args.tokenizer}: cannot load a tokenizer "
                            f"({str(exc).strip().splitlines()[0][:200]})") from None
        if not tokenizer.chat_template:
            raise UserError(f"--tokenizer {args.tokenizer} has no chat template")
        template_kwargs = template_kwargs_arg(args.chat_template_kwargs)
        try:
            report = preprocess(load_records(args.input, args.split), tokenizer, args.output_prefix,
                                args.max_prompt_length, args.max_length, strict=args.strict,
                                chat_template_kwargs=template_kwargs)
        except RecordError as exc:
            raise UserError(f"{args.input}: {exc}") from None
        print(json.dumps(report.summary(), indent=2))

    return run_tool(run)


if __name__ == "__main__":
    sys.exit(main())
