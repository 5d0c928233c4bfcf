"""Forward-only evaluation with the trainer's models and schedule: response-level reward accuracy.

The paper's Table 2 measure on held-out preference pairs: for a DPO model pi and a reference r,
the implicit reward of a response is ``beta * (log pi(y|x) - log r(y|x))`` (summed over response
tokens); accuracy is the share of pairs whose chosen response gets the higher reward. With the
reverse-DPO model as r it is the *contrastive* reward AlignDistil's teacher is built from.
"""

from __future__ import annotations

import torch

from ..core import parallel
from ..config import DPOConfig
from ..data import read_records
from ..models import qwen
from ..core import weights
from .dpo import DPO


@torch.no_grad()
def reward_accuracy(model_path: str, ref_path: str, data_path: str, beta: float = 0.1, tp: int = 1,
                    pp: int = 1, micro_batch_size: int = 4, max_tokens: int | None = None,
                    skip_bad: bool = False) -> dict:
    """Collective over all ranks (any TP/PP; the rest is DP). Returns the same dict on every rank.
    The DPO method's own terms and reduction score the pairs, in one forward-only schedule call."""
    from megatron.core import parallel_state

    from ..core.lockstep import LockstepStage
    from .method import score_micro_batch
    from ..core.schedule import drive, pipeline_rows, sum_over_replicas

    parallel.init_model_parallel(parallel.Layout(tp, pp))
    arch = qwen.read_arch(weights.weights_dir(model_path))
    weights.check_compatible(arch, model_path, ref_path, "ref")
    vocab_size = weights.tokenizer_vocab_size(arch, model_path)  # ids that carry probability
    data = read_records(data_path, "dpo", vocab_size, max_tokens=max_tokens, skip_bad=skip_bad)
    stage = LockstepStage(qwen.load_model(model_path, arch),
                          {"ref": qwen.load_model(ref_path, arch, vocab_rows=True)}).eval()
    method = DPO(DPOConfig(beta=beta), ref_path)
    dp_rank = parallel_state.get_data_parallel_rank()
    dp_size = parallel_state.get_data_parallel_world_size()
    mine = data.records[dp_rank::dp_size]
    rows = micro_batch_size * method.sequences_per_record
    batches, seq_len = method.micro_batches(mine, rows) if mine else ([], 1)

    def score(logits, batch):
        _, _, vec, _ = score_micro_batch(method, logits, batch, vocab_size)
        return vec.double()  # [loss, pairs, tokens, correct, chosen reward, rejected reward]

    got = drive(stage, batches, score, forward_only=True, seq_length=seq_len,
                rows=pipeline_rows(rows, stage.num_models)) if batches else []
    local = torch.stack(got).sum(0).cpu() if got else torch.zeros(6, dtype=torch.float64)
    _, n, _, correct, chosen, rejected = sum_over_replicas(local).tolist()
    return {"pairs": int(n), "reward_accuracy": correct / max(n, 1), "chosen_reward": chosen / max(n, 1),
            "rejected_reward": rejected / max(n, 1), "margin": (chosen - rejected) / max(n, 1)}
