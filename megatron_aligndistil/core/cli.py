"""Running a command-line entry point: a user error becomes one ``error:`` line and exit code 2
(:mod:`~megatron_aligndistil.core.errors`), and the process groups are torn down on every way
out, so no communication thread is left running at interpreter exit."""

from __future__ import annotations

import os
import sys

from .errors import PATH_ERRORS, UserError, report


def run_tool(fn) -> int:
    """Run ``fn()``; user errors print ``error: ...`` (once per launch) and return 2.
    ``ALIGNDISTIL_DEBUG=1`` re-raises them with their traceback."""
    try:
        fn()
    except (UserError,) + PATH_ERRORS as exc:
        if os.environ.get("ALIGNDISTIL_DEBUG"):
            raise
        report(exc)
        shutdown(meet=False)
        return 2
    shutdown()
    return 0


def shutdown(meet: bool = True) -> None:
    """Tear down Megatron's groups and the process group. ``meet`` (after success): every rank
    meets first. Without the teardown, a communication thread left running at interpreter exit
    aborted 1 in 5 exits with "terminate called without an active exception" (after success, of
    ``tools/generate.py``; after a user error, of the trainer). After a user error the ranks do not
    meet: the others may never reach the barrier (torchrun stops them)."""
    if "torch.distributed" not in sys.modules:
        return
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        if meet:
            dist.barrier()
        from .parallel import destroy

        destroy()
