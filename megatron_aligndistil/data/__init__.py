"""Tokenized JSONL records (validated), deterministic sampling, and micro-batches with loss masks."""
