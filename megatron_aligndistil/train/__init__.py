"""Training: one loop (loop.py) over the core's schedule driver (``core/schedule.py``) and thin methods
(aligndistil.py, sft.py, dpo.py; by name: methods.py) configured by the typed configs of ``config.py``.

    torchrun --nproc-per-node N -m megatron_aligndistil.train <aligndistil|dpo|sft> [flags]
"""

from .methods import get_method  # noqa: F401 - the package's public name


def build_trainer(args):
    """A set-up :class:`~megatron_aligndistil.train.loop.Trainer` for parsed flags: typed configs
    built once here, the method built from them. Collective (initialises the parallel state)."""
    from ..config import RolloutConfig, TrainingConfig
    from ..core import weights
    from .loop import Trainer

    method = get_method(args.method).from_args(args)
    rollout = None
    if method.on_policy:
        rollout = RolloutConfig.from_args(args, weights.stop_token_ids(args.load, args.stop_token_ids, required=True))
        if rollout.engine == "vllm":  # a missing extra stops the run here, before any model is built
            from ..rollout.vllm import import_vllm

            import_vllm()
    return Trainer(TrainingConfig.from_args(args), method, rollout=rollout, flags=args).setup()


def main(argv=None):
    """Entry point: parse flags, build the trainer, train. User errors: one line, exit code 2."""
    from ..core.cli import run_tool
    from .arguments import parse_args

    args = parse_args(argv)

    if args.dry_run:
        import os

        from .plan import make_plan, print_plan

        return run_tool(lambda: print_plan(make_plan(args, args.world_size or int(os.environ.get("WORLD_SIZE", "1")))))

    import os

    from ..core.errors import writing

    def train():
        # a full or read-only --save stops with one line; half-written checkpoints are removed
        # (the latest-iteration file still names the last complete one)
        with writing("--save", args.save, cleanup=[os.path.join(args.save, "iter_*.tmp"),
                                                   os.path.join(args.save, "release.tmp")]):
            build_trainer(args).train()

    return run_tool(train)
