"""Turn expected user errors into one clear line on stderr and exit code 2 (no deep traceback)."""

from __future__ import annotations

import os
import sys

from .convert.io import CheckpointError
from .models.qwen import ArchitectureError

USER_ERRORS = (CheckpointError, ArchitectureError, ValueError, FileNotFoundError, FileExistsError, KeyError)


def run_tool(fn) -> int:
    """Run ``fn()``; user errors print ``error: ...`` and return 2. ``ALIGNDISTIL_DEBUG=1`` re-raises."""
    try:
        fn()
    except USER_ERRORS as exc:
        if os.environ.get("ALIGNDISTIL_DEBUG"):
            raise
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"error: {msg}", file=sys.stderr)
        return 2
    return 0
