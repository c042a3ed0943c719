"""A writer that takes no new connection but still commits is not failed over: the
supervisor's probes fail (every connection slot is taken), yet its WAL keeps arriving
at the volume client, so its working sessions are left alone."""

from __future__ import annotations

import time

import psycopg
import pytest

from tests.harness import Borealis, ClusterView, own_cluster, wait_for

# Longer than the 3 failed probes (0.5 s apart) after which a silent writer is lost.
BUSY_S = 6.0


def take_every_slot(dsn: str) -> list[psycopg.Connection[tuple[object, ...]]]:
    """Open connections until the server refuses one (superuser slots included)."""
    held: list[psycopg.Connection[tuple[object, ...]]] = []
    try:
        while len(held) < 200:
            held.append(psycopg.connect(dsn, autocommit=True, connect_timeout=5))
    except psycopg.OperationalError as exc:
        assert "too many clients" in str(exc) or "remaining connection slots" in str(exc), exc
        return held
    raise AssertionError("the writer accepted 200 connections")


def test_a_writer_without_free_slots_that_commits_is_kept(borealis: Borealis) -> None:
    with own_cluster(borealis, "busy", readers=1) as view:
        check_busy_writer_is_kept(borealis, view)


def check_busy_writer_is_kept(b: Borealis, view: ClusterView) -> None:
    writer = view.writer()
    with psycopg.connect(writer["dsn"], autocommit=True) as work:
        work.execute("CREATE TABLE ticks (i int)")
        held = take_every_slot(writer["dsn"])
        try:
            with pytest.raises(psycopg.OperationalError):
                psycopg.connect(writer["dsn"], connect_timeout=5).close()
            # Commits go on through the connection opened before the slots ran out.
            n = 0
            until = time.monotonic() + BUSY_S
            while time.monotonic() < until:
                n += 1
                work.execute("INSERT INTO ticks VALUES (%s)", (n,))
        finally:
            for conn in held:
                conn.close()
        after = view.writer()
        assert after["id"] == writer["id"] and after["pid"] == writer["pid"], after
        events = b.cli("events", "busy").stdout
        assert "checks in a row" not in events, events
        assert work.execute("SELECT count(*) FROM ticks").fetchone() == (n,)
    wait_for("the writer to take new connections again", lambda: psycopg.connect(
        writer["dsn"], connect_timeout=5).close() is None, 30)
