"""Vocab-parallel losses: AlignDistil (SPEC section 2) and per-token log-probabilities."""

from .aligndistil import AlignDistilOutput, teacher_logits, vocab_parallel_aligndistil
from .logprobs import vocab_parallel_logprobs

__all__ = ["AlignDistilOutput", "teacher_logits", "vocab_parallel_aligndistil", "vocab_parallel_logprobs"]
