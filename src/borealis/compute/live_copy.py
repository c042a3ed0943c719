"""A consistent copy of a running instance's data directory, taken beside it on this host.

What a clone starts from. PostgreSQL's own backup protocol makes a file copy of a live
server consistent: ``pg_backup_start`` (a checkpoint, or a restartpoint on a hot
standby) marks where replay must begin, the files are copied while the server keeps
running, and ``pg_backup_stop`` returns the ``backup_label`` that makes recovery replay
from that mark to past the end of the copy. Torn pages in the copy are harmless: every
page changed after the mark is rewritten by a full-page image during that replay.

The files are copied by :mod:`borealis.compute.tree_copy` in a child process (blocks
shared where the filesystem can); this module holds the backup session around it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import psycopg

from borealis.compute.postgres import ComputeError, RunAs
from borealis.wal.lsn import parse_lsn


@dataclass(frozen=True)
class CopyResult:
    start_lsn: int  # replay begins here (the backup's checkpoint redo point)
    stop_lsn: int  # replay must pass this for the copy to be consistent
    total_bytes: int
    shared_bytes: int  # of those, cloned (blocks shared) rather than copied


def live_copy(dsn: str, source: Path, dest: Path, run_as: RunAs,
              copied: Callable[[int], None] | None = None) -> CopyResult:
    """Copy the data directory ``source`` of the server at ``dsn`` into ``dest`` (which
    must not exist), with its ``backup_label``; ``copied`` hears bytes as they go."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        # The backup lives as long as this session; an error ends both.
        conn.execute("SELECT pg_backup_start('borealis live copy', true)")
        tally = _copy_files(source, dest, copied or (lambda _n: None))
        row = conn.execute("SELECT lsn::text, labelfile, spcmapfile "
                           "FROM pg_backup_stop(false)").fetchone()
    assert row is not None
    stop_lsn, label, tablespace_map = row
    (dest / "backup_label").write_text(label)
    if tablespace_map:
        (dest / "tablespace_map").write_text(tablespace_map)
    run_as.own(dest)
    return CopyResult(_label_start(label), parse_lsn(stop_lsn), tally["total"],
                      tally["shared"])


def _copy_files(source: Path, dest: Path, copied: Callable[[int], None]) -> dict[str, int]:
    proc = subprocess.Popen([sys.executable, "-m", "borealis.compute.tree_copy", str(source),
                             str(dest)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    assert proc.stdout is not None and proc.stderr is not None
    last = ""
    for line in proc.stdout:
        last = line.strip()
        if last.isdigit():
            copied(int(last))
    err = proc.stderr.read().strip().splitlines()
    if proc.wait() != 0:
        raise ComputeError(f"copying {source} failed: "
                           f"{err[-1] if err else 'exit status ' + str(proc.returncode)}")
    result: dict[str, int] = json.loads(last)
    return result


def label_start(datadir: Path) -> int:
    """Where replay of a copy with a ``backup_label`` starts."""
    return _label_start((datadir / "backup_label").read_text())


def _label_start(label: str) -> int:
    for line in label.splitlines():
        if line.startswith("START WAL LOCATION:"):
            return parse_lsn(line.split(":", 1)[1].split()[0])
    raise ValueError("backup_label without START WAL LOCATION")
