"""Local paths and Hugging Face Hub names on the command line.

``--input`` (preprocessing), ``--reward-model`` (evaluation) and ``--hf-path`` (conversion) take a
local path or a Hub name (``org/name``): the first two are fetched by ``datasets`` /
``transformers``, the converter's by :func:`model_dir` (its cached snapshot, or a download of the
config, safetensors and tokenizer files with ``huggingface_hub``). A path that does not exist but
looks like a Hub name, on a machine that cannot reach the Hub and has no cached copy, used to
spend 35-60 s in retries before a ConnectionError: :func:`local_or_hub` refuses it at once, naming
the flag, the name and what would let it download.
"""

from __future__ import annotations

import os
import re
import threading

from .core.errors import UserError

_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")


def looks_like_hub_name(value: str) -> bool:
    """``org/name``: one slash, no leading ``.``/``/``/``~``."""
    return bool(_HUB_NAME.match(value)) and ".." not in value


def hub_offline(timeout_s: float = 3.0) -> str | None:
    """Why the Hub is unreachable (an offline variable, or its host name does not resolve within
    ``timeout_s``), or None when it may be reached."""
    for name in _OFFLINE_VARIABLES:
        if os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on"):
            return f"{name}={os.environ[name]}"
    host = re.sub(r"^https?://", "", os.environ.get("HF_ENDPOINT", "https://huggingface.co")).split("/")[0]
    result = {}

    def resolve():
        import socket

        try:
            socket.getaddrinfo(host.split(":")[0], 443)
            result["ok"] = True
        except OSError as exc:
            result["error"] = exc

    thread = threading.Thread(target=resolve, daemon=True)
    thread.start()
    thread.join(timeout_s)
    if result.get("ok"):
        return None
    return f"{host} does not resolve" + (f" ({result['error']})" if "error" in result else f" within {timeout_s:g} s")


def _cached(name: str, repo_type: str) -> bool:
    try:
        from huggingface_hub import snapshot_download

        snapshot_download(name, repo_type=repo_type, local_files_only=True)
        return True
    except Exception:  # noqa: BLE001 - any failure means no usable cached copy
        return False


def local_or_hub(value: str, flag: str, repo_type: str = "model") -> str:
    """``value`` when it is a local path, or a Hub name that can be fetched (its cache or the
    network has it). Otherwise a :class:`UserError` naming ``flag`` and the path, at once."""
    if os.path.exists(value):
        return value
    if not looks_like_hub_name(value):
        raise UserError(f"{flag} {value}: no such file or directory")
    if _cached(value, repo_type):
        return value
    offline = hub_offline()
    if offline:
        allow = (f"unset {offline.split('=')[0]} to allow downloads" if "=" in offline.split()[0]
                 else "set HF_ENDPOINT to a Hub mirror this machine reaches")
        raise UserError(f"{flag} {value}: no such file or directory, and as a Hugging Face Hub name it cannot be "
                        f"fetched: the Hub is unreachable ({offline}; {allow}) and no cached copy exists. Give a "
                        f"local path, or download it where the Hub is reachable (huggingface-cli download {value}"
                        f"{' --repo-type dataset' if repo_type == 'dataset' else ''})")
    return value


# what a conversion reads from a Hub model: config, weights (+ index), tokenizer, chat template
MODEL_FILES = ["*.json", "*.safetensors", "*.txt", "*.jinja", "*.model"]


def model_dir(value: str, flag: str) -> str:
    """A local directory holding the model ``value`` names: ``value`` itself when it exists; for
    a Hub name, its cached snapshot, else a download of :data:`MODEL_FILES` (``huggingface_hub``,
    into its cache). Refused at once as :func:`local_or_hub` does; a failed download is a
    :class:`UserError` naming ``flag`` and the name."""
    local_or_hub(value, flag)
    if os.path.exists(value):
        return value
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(value, allow_patterns=MODEL_FILES, local_files_only=True)
    except Exception:  # noqa: BLE001 - not cached (with these files): download them
        pass
    try:
        return snapshot_download(value, allow_patterns=MODEL_FILES)
    except Exception as exc:  # noqa: BLE001 - network, authentication (gated models), unknown name
        raise UserError(f"{flag} {value}: downloading it from the Hugging Face Hub failed: "
                        f"{type(exc).__name__}: {exc}") from None
