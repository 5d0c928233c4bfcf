"""megatron-aligndistil: AlignDistil (arXiv 2503.02832) on Megatron-Core under TP, PP and DP."""

__version__ = "0.1.0"
