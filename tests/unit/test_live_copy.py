"""The file side of a live copy: what is copied, what is left out, and the label."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from borealis.compute import live_copy, tree_copy


def make_datadir(root: Path) -> Path:
    data = root / "data"
    for d in ("base/5", "global", "pg_wal/archive_status", "pg_replslot/borealis_volume",
              "pg_stat_tmp", "pg_subtrans", "base/pgsql_tmp", "pg_xact", "pg_tblspc"):
        (data / d).mkdir(parents=True)
    files = {
        "PG_VERSION": b"15\n", "base/5/16384": os.urandom(3 * 8192), "base/5/16384_fsm": b"f",
        "global/pg_control": os.urandom(8192), "pg_xact/0000": os.urandom(8192),
        "pg_wal/000000010000000000000003": b"w" * 100, "pg_replslot/borealis_volume/state": b"s",
        "pg_stat_tmp/db_0.stat": b"x", "pg_subtrans/0000": b"x", "base/pgsql_tmp/t1": b"x",
        "postmaster.pid": b"123", "postmaster.opts": b"o", "standby.signal": b"",
        "backup_label": b"old", "global/pg_internal.init": b"cache",
    }
    for name, body in files.items():
        (data / name).write_bytes(body)
    os.symlink("/elsewhere", data / "pg_tblspc" / "16400")
    return data


def test_copy_keeps_data_and_leaves_out_what_a_base_backup_does(tmp_path: Path) -> None:
    data = make_datadir(tmp_path)
    heard: list[int] = []
    tally = tree_copy.copy_tree(data, tmp_path / "copy", heard.append)
    copy = tmp_path / "copy"
    for kept in ("PG_VERSION", "base/5/16384", "base/5/16384_fsm", "global/pg_control",
                 "pg_xact/0000"):
        assert (copy / kept).read_bytes() == (data / kept).read_bytes()
    for emptied in ("pg_wal", "pg_replslot", "pg_stat_tmp", "pg_subtrans"):
        assert (copy / emptied).is_dir() and not any((copy / emptied).iterdir())
    for left_out in ("postmaster.pid", "postmaster.opts", "standby.signal", "backup_label",
                     "global/pg_internal.init", "base/pgsql_tmp"):
        assert not (copy / left_out).exists()
    assert os.readlink(copy / "pg_tblspc" / "16400") == "/elsewhere"
    assert sum(heard) == tally.total == tree_copy.data_size(data)
    assert oct((copy / "base").stat().st_mode & 0o777) == oct((data / "base").stat().st_mode
                                                               & 0o777)


def test_copy_refuses_an_existing_destination(tmp_path: Path) -> None:
    data = make_datadir(tmp_path)
    (tmp_path / "copy").mkdir()
    with pytest.raises(FileExistsError):
        tree_copy.copy_tree(data, tmp_path / "copy")


def test_label_start() -> None:
    label = ("START WAL LOCATION: 0/6000028 (file 000000010000000000000006)\n"
             "CHECKPOINT LOCATION: 0/6000060\nBACKUP METHOD: streamed\n")
    assert live_copy._label_start(label) == 0x6000028
    with pytest.raises(ValueError):
        live_copy._label_start("BACKUP METHOD: streamed\n")


def test_the_child_process_reports_progress_and_the_tally(tmp_path: Path) -> None:
    data = make_datadir(tmp_path)
    heard: list[int] = []
    tally = live_copy._copy_files(data, tmp_path / "copy", heard.append)
    assert tally["total"] == tree_copy.data_size(data)
    assert tally["shared"] in (0, tally["total"])  # all cloned, or (here) all copied
    assert sum(heard) == tally["total"]
    with pytest.raises(Exception, match="copying"):
        live_copy._copy_files(data, tmp_path / "copy", heard.append)  # it exists now
