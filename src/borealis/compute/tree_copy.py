"""Copying a data directory's files the way a base backup does, sharing blocks where the
filesystem can.

Each file is cloned (``FICLONE``: the copy shares the source's blocks until either side
writes, on XFS and btrfs) or, where the filesystem cannot, copied inside the kernel
(``copy_file_range``). Left out is what ``pg_basebackup`` leaves out: WAL, the
postmaster's run files, replication slots, temporary and statistics files; their
directories are kept, empty.

Run as ``python -m borealis.compute.tree_copy SOURCE DEST``, it reports bytes copied as
lines on stdout and ends with a JSON line ``{"total": ..., "shared": ...}``: the control
plane copies in a child process, so the copy never waits for the control plane's
interpreter lock between system calls (it took 2-4x longer in a thread there).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import stat
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

FICLONE = 0x40049409  # _IOW(0x94, 9, int): share the source file's extents
EMPTIED_DIRS = frozenset({"pg_wal", "pg_replslot", "pg_stat_tmp", "pg_dynshmem", "pg_notify",
                          "pg_serial", "pg_snapshots", "pg_subtrans"})
SKIPPED_FILES = frozenset({"postmaster.pid", "postmaster.opts", "standby.signal",
                           "recovery.signal", "backup_label", "backup_label.old",
                           "tablespace_map", "current_logfiles", "pg_internal.init"})
# Errors that mean "this filesystem cannot share blocks here": fall back to a copy.
NO_CLONE = frozenset({errno.EOPNOTSUPP, errno.ENOTTY, errno.EXDEV, errno.EINVAL,
                      errno.ENOSYS, errno.EPERM})


@dataclass
class Tally:
    total: int = 0
    shared: int = 0  # of ``total``, cloned (blocks shared) rather than copied


def copy_tree(source: Path, dest: Path, copied: Callable[[int], None] | None = None) -> Tally:
    """Copy the data directory ``source`` into ``dest`` (which must not exist);
    ``copied`` hears each file's bytes as it is done."""
    tally = Tally()
    _copy_dir(source, dest, tally, copied or (lambda _n: None), top=True)
    return tally


def data_size(source: Path) -> int:
    """Bytes :func:`copy_tree` would copy (for a progress bar; files may grow meanwhile)."""
    total = 0
    for root, dirs, files in os.walk(source):
        dirs[:] = [d for d in dirs if not d.startswith("pgsql_tmp")
                   and not (Path(root) == source and d in EMPTIED_DIRS)]
        for name in files:
            if name not in SKIPPED_FILES:
                with contextlib.suppress(FileNotFoundError):
                    st = os.lstat(os.path.join(root, name))
                    total += st.st_size if stat.S_ISREG(st.st_mode) else 0
    return total


def _copy_dir(src: Path, dst: Path, tally: Tally, copied: Callable[[int], None],
              top: bool = False) -> None:
    os.mkdir(dst, stat.S_IMODE(os.lstat(src).st_mode))
    with os.scandir(src) as entries:
        for entry in entries:
            target = dst / entry.name
            if entry.is_symlink():
                os.symlink(os.readlink(entry.path), target)
            elif entry.is_dir():
                if top and entry.name in EMPTIED_DIRS:
                    os.mkdir(target, stat.S_IMODE(entry.stat().st_mode))
                elif entry.name.startswith("pgsql_tmp"):
                    continue
                else:
                    _copy_dir(Path(entry.path), target, tally, copied)
            elif entry.name not in SKIPPED_FILES:
                try:
                    n, shared = _copy_file(entry.path, target)
                except FileNotFoundError:
                    continue  # dropped by the server meanwhile: replay removes it anyway
                tally.total += n
                tally.shared += n if shared else 0
                copied(n)


def _copy_file(src: str, dst: Path) -> tuple[int, bool]:
    """(bytes, whether blocks are shared). A file growing meanwhile is copied to where
    it ends when read; replay brings the rest."""
    with open(src, "rb") as fin:
        mode = stat.S_IMODE(os.fstat(fin.fileno()).st_mode)
        fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        try:
            try:
                fcntl.ioctl(fd, FICLONE, fin.fileno())
                return os.fstat(fd).st_size, True
            except OSError as exc:
                if exc.errno not in NO_CLONE:
                    raise
            return _copy_bytes(fin.fileno(), fd), False
        finally:
            os.close(fd)


def _copy_bytes(fin: int, fout: int) -> int:
    """Inside the kernel where it can (same filesystem), through user space otherwise."""
    total = 0
    try:
        while n := os.copy_file_range(fin, fout, 1 << 30):
            total += n
        return total
    except OSError as exc:
        if exc.errno not in NO_CLONE:
            raise
    while chunk := os.read(fin, 1 << 20):
        os.write(fout, chunk)
        total += len(chunk)
    return total


REPORT_BYTES = 32 << 20


def main() -> None:
    source, dest = Path(sys.argv[1]), Path(sys.argv[2])
    pending = 0

    def report(n: int) -> None:
        nonlocal pending
        pending += n
        if pending >= REPORT_BYTES:
            print(pending, flush=True)
            pending = 0
    tally = copy_tree(source, dest, report)
    if pending:
        print(pending, flush=True)
    print(json.dumps({"total": tally.total, "shared": tally.shared}), flush=True)


if __name__ == "__main__":
    main()
