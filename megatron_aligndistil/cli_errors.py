"""User errors: one clear line on stderr, exit code 2, no traceback; printed once per launch.

Code that rejects a user's input (a flag, a file, a record, a checkpoint) raises :class:`UserError`
(or a subclass: ``DataError``, ``CheckpointError``, ``ArchitectureError``, ``TrainingDiverged``)
with a message naming the flag, file, line or field. Missing / unreadable paths (``OSError`` with a
file name) count as user errors too. Anything else is a bug and keeps its traceback.

Exit codes: a tool or ``python -m megatron_aligndistil.train`` exits 2 on a user error. Under
``torchrun`` the failing rank exits 2, torchrun stops the other ranks and itself exits 1 after its
own failure summary; the ``error:`` line is printed once per launch (by the first rank that hits
it on each node), above that summary.
"""

from __future__ import annotations

import os
import sys
import tempfile
import zlib


class UserError(ValueError):
    """Bad input from the user; the message says what and where (flag, file, line, field)."""


_PATH_ERRORS = (FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError, PermissionError)


def _first_to_report() -> bool:
    """True in one process per launch (and node): the first rank that reports. A single process
    always reports. Uses an exclusive-create marker named after the launch's rendezvous."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return True
    launch = "-".join(os.environ.get(k, "") for k in ("TORCHELASTIC_RUN_ID", "MASTER_ADDR", "MASTER_PORT"))
    marker = os.path.join(tempfile.gettempdir(), f"aligndistil-error-{zlib.crc32(launch.encode()):08x}"
                                                 f"-{os.getppid()}")  # same agent (parent) on a node
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    except OSError:
        return True  # no writable temp dir: better twice than never
    return True


def report(exc: BaseException) -> None:
    msg = exc
    if isinstance(exc, OSError) and exc.filename is not None:
        msg = f"{exc.filename}: {exc.strerror or exc}"
    if _first_to_report():
        print(f"error: {msg}", file=sys.stderr, flush=True)


def run_tool(fn) -> int:
    """Run ``fn()``; user errors print ``error: ...`` (once per launch) and return 2.
    ``ALIGNDISTIL_DEBUG=1`` re-raises them with their traceback."""
    try:
        fn()
    except (UserError,) + _PATH_ERRORS as exc:
        if os.environ.get("ALIGNDISTIL_DEBUG"):
            raise
        report(exc)
        return 2
    shutdown()
    return 0


def shutdown() -> None:
    """After success: every rank meets, then Megatron's groups and the process group are torn down,
    so no communication thread is left running at interpreter exit (which aborted 1 in 5 exits of
    ``tools/generate.py`` with "terminate called without an active exception")."""
    if "torch.distributed" not in sys.modules:
        return
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        from .parallel import destroy

        destroy()
