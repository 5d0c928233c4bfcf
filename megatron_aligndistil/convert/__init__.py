"""HF Qwen <-> Megatron-Core tensor mapping (one table) and, later, streaming checkpoint I/O."""
