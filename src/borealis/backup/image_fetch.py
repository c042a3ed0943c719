"""Unpacking a base image from the object store in a child process of the control plane.

    python -m borealis.backup.image_fetch LOCATION KEY DATADIR

The image is hashed and unpacked as it streams (``catalog.unpack_base_image``): a
gigabyte of Python-level reads and writes. In a thread of the control plane each of them
waits for the interpreter lock the control plane's own work holds; a process of its own
runs at the disk's pace. Exit status 0 only when the image was whole and its checksum
matched; otherwise the reason is the last line on stderr.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from borealis.backup import catalog
from borealis.backup.store import ObjectStore, StoreError, open_store


def fetch(store: ObjectStore, key: str, datadir: Path) -> None:
    """Unpack the image at ``key`` (its folder) into ``datadir``, in a child process."""
    proc = subprocess.run([sys.executable, "-m", "borealis.backup.image_fetch", store.location,
                           key, str(datadir)], capture_output=True, text=True)
    if proc.returncode != 0:
        lines = proc.stderr.strip().splitlines()
        raise StoreError(f"the base image {key} could not be unpacked: "
                         f"{lines[-1] if lines else 'exit status ' + str(proc.returncode)}")


def main() -> None:
    location, key, datadir = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    try:
        catalog.unpack_base_image(open_store(location), key, datadir)
    except (StoreError, OSError) as exc:
        print(f"{type(exc).__name__}: {exc}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
