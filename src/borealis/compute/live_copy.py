"""A consistent copy of a running instance's data directory, taken beside it on this host.

What a clone starts from. PostgreSQL's own backup protocol makes a file copy of a live
server consistent: ``pg_backup_start`` (a checkpoint, or a restartpoint on a hot
standby) marks where replay must begin, the files are copied while the server keeps
running, and ``pg_backup_stop`` returns the ``backup_label`` that makes recovery replay
from that mark to past the end of the copy. Torn pages in the copy are harmless: every
page changed after the mark is rewritten by a full-page image during that replay.

Each file is cloned (``FICLONE``: the copy shares the source's blocks until either side
writes, on XFS and btrfs) or, where the filesystem cannot, copied inside the kernel
(``copy_file_range``). A clone costs no data copy where the filesystem allows.

What is left out is what ``pg_basebackup`` leaves out: WAL (the clone replays it from the
storage tier), the postmaster's run files, replication slots, temporary and
statistics files; their directories are kept, empty.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import psycopg

from borealis.compute.postgres import RunAs
from borealis.wal.lsn import parse_lsn

FICLONE = 0x40049409  # _IOW(0x94, 9, int): share the source file's extents
EMPTIED_DIRS = frozenset({"pg_wal", "pg_replslot", "pg_stat_tmp", "pg_dynshmem", "pg_notify",
                          "pg_serial", "pg_snapshots", "pg_subtrans"})
SKIPPED_FILES = frozenset({"postmaster.pid", "postmaster.opts", "standby.signal",
                           "recovery.signal", "backup_label", "backup_label.old",
                           "tablespace_map", "current_logfiles", "pg_internal.init"})
# Errors that mean "this filesystem cannot share blocks here": fall back to a copy.
NO_CLONE = frozenset({errno.EOPNOTSUPP, errno.ENOTTY, errno.EXDEV, errno.EINVAL,
                      errno.ENOSYS, errno.EPERM})


@dataclass(frozen=True)
class CopyResult:
    start_lsn: int  # replay begins here (the backup's checkpoint redo point)
    stop_lsn: int  # replay must pass this for the copy to be consistent
    total_bytes: int
    shared_bytes: int  # of those, cloned (blocks shared) rather than copied


@dataclass
class _Tally:
    total: int = 0
    shared: int = 0


def live_copy(dsn: str, source: Path, dest: Path, run_as: RunAs,
              copied: Callable[[int], None] | None = None) -> CopyResult:
    """Copy the data directory ``source`` of the server at ``dsn`` into ``dest`` (which
    must not exist), with its ``backup_label``; ``copied`` hears bytes as they go."""
    tally = _Tally()
    with psycopg.connect(dsn, autocommit=True) as conn:
        # The backup lives as long as this session; an error ends both.
        conn.execute("SELECT pg_backup_start('borealis live copy', true)")
        _copy_dir(source, dest, tally, copied or (lambda _n: None), top=True)
        row = conn.execute("SELECT lsn::text, labelfile, spcmapfile "
                           "FROM pg_backup_stop(false)").fetchone()
    assert row is not None
    stop_lsn, label, tablespace_map = row
    (dest / "backup_label").write_text(label)
    if tablespace_map:
        (dest / "tablespace_map").write_text(tablespace_map)
    run_as.own(dest)
    return CopyResult(_label_start(label), parse_lsn(stop_lsn), tally.total, tally.shared)


def data_size(source: Path) -> int:
    """Bytes ``live_copy`` would copy (for a progress bar; files may grow meanwhile)."""
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


def _label_start(label: str) -> int:
    for line in label.splitlines():
        if line.startswith("START WAL LOCATION:"):
            return parse_lsn(line.split(":", 1)[1].split()[0])
    raise ValueError("backup_label without START WAL LOCATION")


def _copy_dir(src: Path, dst: Path, tally: _Tally, copied: Callable[[int], None],
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
