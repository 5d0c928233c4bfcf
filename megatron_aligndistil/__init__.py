"""megatron-aligndistil: AlignDistil (arXiv 2503.02832) on Megatron-Core under TP, PP and DP."""

__version__ = "0.1.0"

from . import platform as _platform  # noqa: E402,F401  (its warning filters precede any Megatron import)
