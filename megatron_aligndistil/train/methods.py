"""The training methods by subcommand name (``sft``, ``dpo``, ``aligndistil``)."""


def get_method(name):
    """The method class for a subcommand name."""
    if name == "aligndistil":
        from .aligndistil import AlignDistil

        return AlignDistil
    if name == "dpo":
        from .dpo import DPO

        return DPO
    if name == "sft":
        from .sft import SFT

        return SFT
    raise ValueError(f"unknown method {name!r}")
