"""Training: one loop (loop.py) and thin methods (aligndistil.py, dpo.py).

    torchrun --nproc-per-node N -m megatron_aligndistil.train <aligndistil|dpo> [flags]
"""

def get_method(name):
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


def main(argv=None):
    """Entry point: parse flags, build the trainer, train. User errors: one line, exit code 2."""
    from ..cli_errors import run_tool
    from .arguments import parse_args

    args = parse_args(argv)

    if args.dry_run:
        import os

        from .plan import make_plan, print_plan

        return run_tool(lambda: print_plan(make_plan(args, args.world_size or int(os.environ.get("WORLD_SIZE", "1")))))

    def run():
        from .loop import Trainer

        trainer = Trainer(args, get_method(args.method)(args)).setup()
        trainer.train()

    return run_tool(run)
