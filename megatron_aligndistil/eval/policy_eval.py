"""Judge policies on their own samples: gold rate with a 95% interval, length, EOS, KL.

For each policy (a converted checkpoint, a run directory, or an HF directory, converted on the
fly), under any TP/PP (the remaining ranks split the prompts):

* K samples per held-out prompt at temperature T, and one greedy response, from the project's
  own sampler (:mod:`megatron_aligndistil.generation`: the same tokens at any layout);
* a judge scores each (prompt, response text): the gold world's exact rule
  (:func:`megatron_aligndistil.eval.world.judge`) or any callable; a reward model is applied
  afterwards by :mod:`megatron_aligndistil.eval.reward_model` (win rates);
* KL of the policy from a reference (SFT) and from the DPO model, estimated on the policy's own
  samples: ``mean_y [log pi(y|x) - log ref(y|x)]`` over sampled responses (nats per response; an
  unbiased estimate of KL(pi || ref) when T = 1), log-probs summed over response tokens through
  the vocab-parallel log-prob helper, the reference models running in lockstep with the policy.

Gold rate is the mean of per-prompt means, its interval over prompts (:mod:`.stats`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace

import torch

from ..core import parallel
from ..core.errors import UserError
from ..config import SamplingParams
from .stats import mean_ci, per_cluster_means


@dataclass
class EvalSettings:
    """``sampling``: how the K samples per prompt are drawn (greedy responses use temperature 0;
    stop ids come from each evaluated checkpoint)."""

    samples_per_prompt: int = 4
    sampling: SamplingParams = field(default_factory=lambda: SamplingParams(max_new_tokens=32))
    batch_size: int = 64  # sequences per generation / scoring batch on one DP rank
    greedy: bool = True  # also one greedy response per prompt
    chat_template_kwargs: dict = field(default_factory=dict)
    engine: str = "megatron"  # the rollout engine that samples (rollout/: megatron or vllm)


def load_prompts(path: str) -> list[dict]:
    """``{"instruction": str, ...}`` items from a JSON list or JSONL file (AlpacaEval layout; extra
    keys such as ``family`` are kept). Errors name the file and line."""
    text = open(path).read().strip()
    if text.startswith("["):
        items = json.loads(text)
        where = [f"{path}: item {i}" for i in range(len(items))]
    else:
        items, where = [], []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                items.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise UserError(f"{path}:{n}: invalid JSON ({exc.msg})") from None
            where.append(f"{path}:{n}")
    for item, loc in zip(items, where):
        if not isinstance(item, dict) or not isinstance(item.get("instruction"), str) or not item["instruction"]:
            raise UserError(f"{loc}: needs a non-empty string field 'instruction'")
    if not items:
        raise UserError(f"{path}: no prompts")
    return items


def render_prompts(items: list[dict], tokenizer, chat_template_kwargs: dict | None = None) -> list[list[int]]:
    """Prompt ids through the tokenizer's chat template, with the generation prompt."""
    kwargs = chat_template_kwargs or {}
    return [tokenizer.apply_chat_template([{"role": "user", "content": it["instruction"]}], add_generation_prompt=True,
                                          tokenize=True, return_dict=True, **kwargs)["input_ids"]
            for it in items]


def resolve_checkpoint(path: str, scratch: str) -> str:
    """A loadable converted directory for ``path``: converted/run directories as they are; an HF
    directory (``config.json`` without ``qwen_arch.json``) converted into ``scratch`` by rank 0."""
    from ..models import qwen
    from ..core.weights import weights_dir

    is_hf = (os.path.exists(os.path.join(path, "config.json"))
             and not os.path.exists(os.path.join(path, qwen.ARCH_FILE))
             and not os.path.exists(os.path.join(path, "release", qwen.ARCH_FILE)))
    if not is_hf:
        return weights_dir(path)
    out = os.path.join(scratch, os.path.basename(os.path.normpath(path)) + "-converted")
    if torch.distributed.get_rank() == 0:
        from ..convert.hf import convert_hf_to_megatron

        convert_hf_to_megatron(path, out, progress=False, overwrite=True)
    torch.distributed.barrier()
    return out


class PolicyEvaluator:
    """Holds the layout, tokenizer and reference models; :meth:`evaluate` judges one policy.

    Collective over all ranks: build it and call :meth:`evaluate` on every rank.
    """

    def __init__(self, items: list[dict], judge, settings: EvalSettings, tokenizer_path: str,
                 ref_load: str | None = None, dpo_load: str | None = None, tp: int = 1, pp: int = 1,
                 scratch: str | None = None):
        """``scratch``: where HF checkpoints are converted (None: a temporary directory made by
        rank 0 and shared with every rank, which must see the same filesystem)."""
        from transformers import AutoTokenizer

        parallel.init_model_parallel(parallel.Layout(tp, pp), seed=settings.sampling.seed)
        if scratch is None:
            import tempfile

            box = [tempfile.mkdtemp(prefix="eval_policy_") if torch.distributed.get_rank() == 0 else None]
            torch.distributed.broadcast_object_list(box, src=0)
            scratch = box[0]
        self.items, self.judge, self.settings, self.scratch = items, judge, settings, scratch
        from ..core.weights import tokenizer_digest

        self.tokenizer_dir = resolve_checkpoint(tokenizer_path, scratch)
        self.tokenizer = AutoTokenizer.from_pretrained(self.tokenizer_dir)
        self._tokenizer_digest = tokenizer_digest(self.tokenizer_dir)  # hashed once, compared per model
        from ..data.preprocess import warn_unread_template_kwargs

        warn_unread_template_kwargs(self.tokenizer, settings.chat_template_kwargs)  # rank 0 prints
        self.prompts = render_prompts(items, self.tokenizer, settings.chat_template_kwargs)
        self.arch = None
        self.references = {}  # name -> frozen GPTModel (KL estimates)
        self._engine = self._engine_model = self._checkpoint = None
        for name, path in (("ref", ref_load), ("dpo", dpo_load)):
            if path:
                self.references[name] = self._build(resolve_checkpoint(path, scratch))

    def _build(self, path: str):
        from ..models import qwen
        from ..core import weights

        arch = qwen.read_arch(path)
        mine, theirs = self._tokenizer_digest, weights.tokenizer_digest(path)
        if mine and theirs and mine != theirs:  # prompts are rendered and responses decoded with one tokenizer
            raise UserError(f"{path}: tokenizer.json differs from {self.tokenizer_dir}'s, whose tokenizer renders the "
                            "prompts and decodes every response; evaluate models of one tokenizer together")
        if self.arch is None:
            self.arch, self._checkpoint = arch, path
            self.vocab_size = weights.tokenizer_vocab_size(arch, path)  # ids that carry probability
        elif self.settings.engine != "megatron" and arch != self.arch:
            raise UserError(f"{path}: its architecture differs from {self._checkpoint}'s; one "
                            f"--rollout-engine {self.settings.engine} samples models of one architecture")
        elif arch.vocab_size != self.arch.vocab_size and (
                arch.padded_vocab_size != self.arch.padded_vocab_size
                or weights.tokenizer_vocab_size(arch, path) != self.vocab_size):
            # the same tokenizer in the same number of embedding rows compares over its ids
            raise UserError(f"{path}: vocab_size {arch.vocab_size} differs from {self._checkpoint}'s "
                             f"{self.arch.vocab_size}, and their tokenizers or embedding rows differ")
        for i, p in enumerate(self.prompts):
            if p and max(p) >= self.vocab_size:
                raise UserError(f"prompt {i}: token id {max(p)} is outside the vocabulary of {path}'s tokenizer "
                                f"({self.vocab_size} ids)")
        return qwen.load_model(path, arch)

    def _stop_ids(self, path: str) -> list[int]:
        from ..core.weights import stop_token_ids

        ids = stop_token_ids(path)
        return ids or ([self.tokenizer.eos_token_id] if self.tokenizer.eos_token_id is not None else [])

    def _engine_for(self, model, params: SamplingParams):
        """The evaluator's one rollout engine (a vLLM engine lives once per process), sampling
        from ``model`` with ``params``: built on first use, re-synced when the model changes."""
        from ..config import RolloutConfig
        from ..rollout import make_engine

        if self._engine is None:
            self._engine = make_engine(RolloutConfig(self.settings.engine, params), model, self.arch, self.vocab_size,
                                       max_model_len=max(map(len, self.prompts)) + params.max_new_tokens,
                                       checkpoint=self._checkpoint)
        elif self._engine_model is not model:
            self._engine.sync_weights(model)
        self._engine_model = model
        self._engine.params = params
        return self._engine

    def _sample(self, model, jobs: list[tuple[int, int]], temperature: float, stop_ids) -> dict:
        """``jobs``: (prompt index, sample index); DP ranks split them. Returns the same
        ``{job: {"response_ids", "stopped"}}`` on every rank."""
        from megatron.core import parallel_state

        s = self.settings
        engine = self._engine_for(model, replace(s.sampling, temperature=temperature, stop_ids=tuple(stop_ids)))
        dp, rank = parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank()
        mine = jobs[rank::dp]
        out = {}
        k_max = max(1, s.samples_per_prompt)
        for b in range(0, len(mine), s.batch_size):
            batch = mine[b: b + s.batch_size]
            res = engine.generate([self.prompts[i] for i, _ in batch], sequence_ids=[i * k_max + k for i, k in batch])
            out.update((job, {"response_ids": r.response_ids, "stopped": r.stopped}) for job, r in zip(batch, res))
        return _all_gather_dict(out)

    def _sequence_logprobs(self, model, pairs: list[tuple[list[int], list[int]]]) -> torch.Tensor:
        """``[1 + len(references), n]``: summed log-probs of each response under the policy and
        each reference, every rank gets all (DP ranks split the pairs). One schedule call: the
        pipeline stages overlap over the micro-batches."""
        from megatron.core import parallel_state

        from ..data.batching import make_micro_batch
        from ..loss import vocab_parallel_logprobs
        from ..loss.objectives import sequence_sums
        from ..core.lockstep import LockstepStage
        from ..core.schedule import drive, pipeline_rows, sum_over_replicas

        stage = LockstepStage(model, self.references)
        dp, rank = parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank()
        idx = list(range(rank, len(pairs), dp))
        size = self.settings.batch_size
        chunks = [idx[b: b + size] for b in range(0, len(idx), size)]
        seq_len = max((len(pairs[i][0]) + len(pairs[i][1]) - 1 for i in idx), default=1)
        # every micro-batch has the same rows (one pipeline shape): the last one is topped up
        batches = [make_micro_batch([pairs[i] for i in c] + [pairs[c[0]]] * (size - len(c)), seq_len) for c in chunks]

        def score(logits, batch):
            labels = batch.labels.to(logits["policy"].device)
            return torch.stack([sequence_sums(vocab_parallel_logprobs(z, labels, vocab_size=self.vocab_size), batch)
                                for z in logits.values()]).double()

        got = drive(stage, batches, score, forward_only=True, seq_length=seq_len,
                    rows=pipeline_rows(size, stage.num_models)) if batches else []
        sums = torch.zeros(stage.num_models, len(pairs), dtype=torch.float64)
        for chunk, value in zip(chunks, got):  # one writer per pair: its replica's last stage
            sums[:, chunk] = value[:, :len(chunk)].cpu()
        return sum_over_replicas(sums)

    @torch.no_grad()
    def evaluate(self, name: str, path: str) -> dict:
        """Judge one policy; the same result dict on every rank."""
        s = self.settings
        path = resolve_checkpoint(path, self.scratch)
        model = self._build(path)
        stop_ids = self._stop_ids(path)
        n = len(self.items)
        result = {"name": name, "path": path, "prompts": n, "samples_per_prompt": s.samples_per_prompt,
                  "temperature": s.sampling.temperature}
        if s.greedy:
            greedy = self._sample(model, [(i, 0) for i in range(n)], 0.0, stop_ids)
            texts = [self._text(greedy[(i, 0)]["response_ids"], stop_ids) for i in range(n)]
            scores = [self.judge(it["instruction"], t) for it, t in zip(self.items, texts)]
            result["greedy_gold_rate"] = sum(scores) / n
            result["greedy_examples"] = [{"instruction": it["instruction"], "output": t, "gold": g}
                                         for it, t, g in list(zip(self.items, texts, scores))[:8]]
            result["greedy_outputs"] = texts
        if s.samples_per_prompt > 0:
            jobs = [(i, k) for i in range(n) for k in range(s.samples_per_prompt)]
            samples = self._sample(model, jobs, s.sampling.temperature, stop_ids)
            texts = [self._text(samples[j]["response_ids"], stop_ids) for j in jobs]
            gold = [self.judge(self.items[i]["instruction"], t) for (i, _), t in zip(jobs, texts)]
            result["gold"] = mean_ci(per_cluster_means(gold, [i for i, _ in jobs]))
            result["gold_rate"] = result["gold"]["mean"]
            fams = {}
            for (i, _), g in zip(jobs, gold):
                fams.setdefault(self.items[i].get("family", "all"), []).append(g)
            result["gold_by_family"] = {f: sum(v) / len(v) for f, v in sorted(fams.items())}
            result["response_len_mean"] = sum(len(samples[j]["response_ids"]) for j in jobs) / len(jobs)
            result["eos_rate"] = sum(samples[j]["stopped"] for j in jobs) / len(jobs)
            result["per_prompt_gold"] = per_cluster_means(gold, [i for i, _ in jobs])
            result["sample_outputs"] = texts
            result["sample_response_ids"] = [samples[j]["response_ids"] for j in jobs]
            if self.references:
                logp = self._sequence_logprobs(model, [(self.prompts[i], samples[(i, k)]["response_ids"])
                                                       for i, k in jobs])
                for row, ref_name in enumerate(self.references, start=1):
                    diff = (logp[0] - logp[row]).tolist()
                    result[f"kl_from_{ref_name}"] = sum(diff) / len(diff)
                    result[f"per_prompt_kl_from_{ref_name}"] = per_cluster_means(diff, [i for i, _ in jobs])
        del model
        return result

    def _text(self, ids: list[int], stop_ids) -> str:
        stops = set(stop_ids)
        return self.tokenizer.decode([t for t in ids if t not in stops], skip_special_tokens=True)


def _all_gather_dict(local: dict) -> dict:
    parts = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(parts, local)
    return {k: v for p in parts for k, v in p.items()}
