"""Making writes durable and atomic: a rename is on disk only once the directory is
fsynced; a file replaced through a temporary one is never seen half-written."""

from __future__ import annotations

import os
import threading
from pathlib import Path


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: str | bytes, mode: int = 0o600, durable: bool = False,
                 make_parent: bool = False) -> None:
    """Replace ``path`` with ``data`` all at once: a reader sees the old file or the new
    one, never a part. With ``durable`` the data and the rename reach the disk before
    this returns (files a crash must not lose; status files need not). With
    ``make_parent`` a missing folder is made first (else that is an error)."""
    if make_parent:
        path.parent.mkdir(parents=True, exist_ok=True)
    # Two writers of one file (threads of the control plane) never share a temporary.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    raw = data.encode() if isinstance(data, str) else data
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        view = memoryview(raw)
        while view:
            view = view[os.write(fd, view):]
        if durable:
            os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    if durable:
        fsync_dir(path.parent)
