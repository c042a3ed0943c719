"""Making a rename durable: the directory entry is on disk only once the directory is
fsynced (used by the segment store and the local object store)."""

from __future__ import annotations

import os
from pathlib import Path


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
