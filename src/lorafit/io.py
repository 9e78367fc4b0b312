"""Atomic file writes (a reader, or a crash, sees the old complete file or the new complete file), and
whether a download may be tried (`offline`)."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it is fsynced and renamed over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; give the usual permissions
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write `text` (UTF-8) to `path` through a temporary file renamed into place."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(path: str | os.PathLike, data: Any) -> None:
    """Write `data` as indented JSON to `path`, atomically."""
    write_text_atomic(path, json.dumps(data, indent=2) + "\n")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def read_json(path: str | os.PathLike, missing: str) -> Any:
    """Parse a JSON file; a missing file raises LorafitError(`missing`), bad JSON names the file."""
    from .errors import LorafitError

    path = Path(path)
    if not path.is_file():
        raise LorafitError(missing)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LorafitError(f"{path}: not valid JSON ({e})") from None


def host_resolves(host: str) -> bool:
    """Whether `host`'s name resolves (with `HF_ENDPOINT` set, a mirror: assumed so): a download that cannot
    even resolve its host fails in milliseconds here instead of after huggingface_hub's retries."""
    import socket

    if os.environ.get("HF_ENDPOINT"):
        return True
    try:
        socket.getaddrinfo(host, 443)
        return True
    except OSError:
        return False


def offline_requested() -> bool:
    """Whether the user asked for no downloads: `LORAFIT_OFFLINE=1` or `HF_HUB_OFFLINE=1`."""
    return os.environ.get("LORAFIT_OFFLINE") == "1" or os.environ.get("HF_HUB_OFFLINE") == "1"


def offline() -> bool:
    """True when no download should be tried: offline requested (`offline_requested`), or huggingface.co
    does not resolve."""
    return offline_requested() or not host_resolves("huggingface.co")
