"""User errors: the types, and how one is reported (one clear line on stderr, once per launch).

Code that rejects a user's input (a flag, a file, a record, a checkpoint) raises :class:`UserError`
(or a subclass: ``DataError``, ``CheckpointError``, ``ArchitectureError``, ``TrainingDiverged``)
with a message naming the flag, file, line or field. Missing / unreadable paths (``OSError`` with a
file name) count as user errors too. Anything else is a bug and keeps its traceback.

Exit codes (:func:`~megatron_aligndistil.core.cli.run_tool`): a tool or ``python -m
megatron_aligndistil.train`` exits 2 on a user error. Under ``torchrun`` the failing rank exits 2,
torchrun stops the other ranks and itself exits 1 after its own failure summary; the ``error:``
line is printed once per launch (by the first rank that hits it on each node), above that summary.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import sys
import tempfile
import zlib


class UserError(ValueError):
    """Bad input from the user; the message says what and where (flag, file, line, field)."""


PATH_ERRORS = (FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError, PermissionError)

# write failures that are the output location's fault, not the program's
_WRITE_FAILURES = {errno.ENOSPC: "no space left on the device", errno.EROFS: "read-only file system",
                   errno.EDQUOT: "disk quota exceeded", errno.EACCES: "permission denied",
                   errno.EPERM: "operation not permitted"}


# below this much free space a write that failed for no stated reason is taken as a full disk
_NEARLY_FULL_BYTES = 1 << 20


def location_fault(path: str) -> int | None:
    """The errno that explains a failed write under ``path`` (its nearest existing parent): a
    read-only file system, no write permission, or (nearly) no free space; None when it looks
    writable. For writers that lose the OS error on the way (torch's checkpoint writer reports
    "unexpected pos 704 vs 598" for a full disk)."""
    while path and not os.path.exists(path):
        path = os.path.dirname(path)
    try:
        st = os.statvfs(path or ".")
    except OSError:
        return None
    if st.f_flag & os.ST_RDONLY:
        return errno.EROFS
    if st.f_bavail * st.f_frsize < _NEARLY_FULL_BYTES:
        return errno.ENOSPC
    if not os.access(path or ".", os.W_OK):
        return errno.EACCES
    return None


@contextlib.contextmanager
def writing(flag: str, path: str, cleanup=()):
    """Writes inside this block that fail because of the output location (disk full, read-only,
    no permission) become one :class:`UserError` naming ``flag`` and ``path``; the paths in
    ``cleanup`` (temporary files or directories; glob patterns such as ``<save>/iter_*.tmp``) are
    removed first. The cause is the exception's errno, the OS error in a native writer's message
    (safetensors: "... (os error 28)"), or else :func:`location_fault` of ``path``."""
    try:
        yield
    except (KeyboardInterrupt, SystemExit, UserError):
        raise
    except BaseException as exc:  # noqa: BLE001 - torch's CheckpointException is a BaseException
        code = exc.errno if isinstance(exc, OSError) else None
        if code is None:
            found = re.search(r"os error (\d+)", str(exc))
            code = int(found.group(1)) if found else location_fault(path)
        if code not in _WRITE_FAILURES:
            raise
        import glob

        for tmp in (t for pattern in cleanup for t in glob.glob(pattern)):
            if os.path.isdir(tmp):
                shutil.rmtree(tmp, ignore_errors=True)
            elif os.path.exists(tmp):
                os.remove(tmp)
        where = getattr(exc, "filename", None) or path
        raise UserError(f"{flag} {path}: cannot write {where} ({_WRITE_FAILURES[code]}); its temporary files were "
                        "removed and nothing partial was published. Free space or choose another location") from exc


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
