"""A bulk load through the cluster endpoint: one long transaction the writer dies in.

Kinds: ``insert`` (``INSERT ... SELECT`` of 2 KB rows), ``copy`` (``COPY FROM STDIN``
streamed by the client), ``index`` (``CREATE INDEX`` on a table made beforehand),
``record`` (one WAL record four segments long: a transactional logical message, as
change-data-capture applications emit, then a row). Each writes far more than a WAL
segment, so the log the storage nodes hold when the writer is killed usually ends inside
one of its records; with ``record`` it always does. The transaction never commits:
afterwards none of its effects may be visible (:meth:`BulkLoad.assert_absent`).
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

import psycopg

from borealis.wal.lsn import parse_lsn

KINDS = ("insert", "copy", "index", "record")
ROW = "x" * 2000
INDEX_ROWS = 300_000  # its index build writes about 30 MiB of WAL (two segments)
RECORD_BYTES = 64 << 20  # written in about a quarter of a second


class BulkLoad:
    def __init__(self, dsn: str, kind: str, tag: str) -> None:
        if kind not in KINDS:
            raise ValueError(f"unknown bulk load {kind!r}; use one of {', '.join(KINDS)}")
        self.dsn = dsn
        self.kind = kind
        self.table = f"bulk_{tag}"
        self.index = f"bulk_{tag}_idx"
        self.error: BaseException | None = None
        self.finished = False
        self._thread: threading.Thread | None = None
        self._started_lsn = 0
        self._pid = 0

    def prepare(self) -> None:
        with psycopg.connect(self.dsn, autocommit=True, connect_timeout=10) as conn:
            conn.execute(f"DROP TABLE IF EXISTS {self.table}")
            conn.execute(f"CREATE TABLE {self.table} (id bigint, payload text)")
            if self.kind == "index":
                conn.execute(f"INSERT INTO {self.table} SELECT g, md5(g::text) || "
                             f"md5((g * 7)::text) FROM generate_series(1, {INDEX_ROWS}) g")

    def start(self) -> None:
        ready = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(ready,), daemon=True)
        self._thread.start()
        if not ready.wait(30):
            raise AssertionError(f"the {self.kind} load did not start")

    def _run(self, ready: threading.Event) -> None:
        try:
            with psycopg.connect(self.dsn, connect_timeout=10) as conn:
                row = conn.execute("SELECT pg_backend_pid(), pg_current_wal_lsn()::text"
                                   ).fetchone()
                assert row is not None
                self._pid, self._started_lsn = int(row[0]), parse_lsn(row[1])
                ready.set()
                if self.kind == "insert":
                    conn.execute(f"INSERT INTO {self.table} SELECT g, repeat('x', 2000) "
                                 "FROM generate_series(1, 3000000) g")
                elif self.kind == "copy":
                    with conn.cursor() as cur, cur.copy(f"COPY {self.table} FROM STDIN") as cp:
                        for i in range(3_000_000):
                            cp.write_row((i, ROW))
                elif self.kind == "index":
                    conn.execute(f"CREATE INDEX {self.index} ON {self.table} "
                                 "(payload, id)")
                else:
                    conn.execute("SELECT pg_logical_emit_message(true, 'borealis-bulk', "
                                 "repeat('x', %s))", (RECORD_BYTES,))
                    conn.execute(f"INSERT INTO {self.table} VALUES (1, 'sent')")
                conn.commit()
                self.finished = True
        except BaseException as exc:  # the writer is killed under it: expected
            self.error = exc
            ready.set()

    def _poll_writer(self, sql: str, until: Callable[[int], bool], timeout_s: float,
                     every_s: float) -> int | None:
        """Run ``sql`` (an LSN) on the writer until ``until`` holds for it, while the load
        still runs; the LSN, or None at the deadline."""
        deadline = time.monotonic() + timeout_s
        with psycopg.connect(self.dsn, autocommit=True, connect_timeout=10) as conn:
            while time.monotonic() < deadline:
                row = conn.execute(sql).fetchone()
                assert row is not None
                if self.finished or self.error is not None:
                    raise AssertionError(f"the {self.kind} load ended before the fault: "
                                         f"{self.error!r}")
                if until(parse_lsn(row[0])):
                    return parse_lsn(row[0])
                time.sleep(every_s)
        return None

    def wait_mid_transaction(self, wal_bytes: int, timeout_s: float = 60) -> None:
        """Until the load has written ``wal_bytes`` of WAL and is still running."""
        if self._poll_writer("SELECT pg_current_wal_lsn()::text",
                             lambda lsn: lsn - self._started_lsn >= wal_bytes,
                             timeout_s, 0.02) is None:
            raise AssertionError(f"the {self.kind} load wrote less than {wal_bytes} bytes "
                                 f"of WAL in {timeout_s} s")

    def freeze_inside_a_record(self, timeout_s: float = 10) -> int | None:
        """Freeze the load's backend (SIGSTOP) at a moment when the log the writer has
        flushed ends inside one of the load's records, and return once the volume client
        holds all of it: the end the storage nodes hold when the writer dies is then
        inside a record, as it usually is when a writer dies with no other commit running.

        Only the load writes WAL meanwhile (the bank is held), and its backend flushes to
        a record's end whenever it evicts a page it dirtied: a flush seen standing on a
        page boundary (the WAL writer and full WAL buffers flush whole pages) is only
        still the end if the backend is stopped before it is read. Returns the flush LSN
        with the backend frozen (:meth:`kill_backend` ends it), or None if no such
        moment came in ``timeout_s``."""
        assert self._pid > 0, "the load has no backend"  # os.kill(0) is our own group
        if self.kind == "record":
            return self._freeze_inside_the_record(timeout_s)
        deadline = time.monotonic() + timeout_s
        # A backend stopped while it holds a lock would stall these queries: they give up.
        with psycopg.connect(self.dsn, autocommit=True, connect_timeout=10,
                             options="-c statement_timeout=1000") as conn:
            while time.monotonic() < deadline:
                if self.finished or self.error is not None:
                    return None  # it committed first: the round says so, and is run again
                os.kill(self._pid, signal.SIGSTOP)
                try:
                    flush = self._lsn(conn, "SELECT pg_current_wal_flush_lsn()::text")
                    # Frozen for half a second at most: a backend stopped while it holds
                    # a lock every new connection takes (ProcArrayLock) makes the writer
                    # refuse the supervisor's probes, and three in a row fail it over.
                    if (flush % 8192 == 0 and flush > self._started_lsn
                            and self._volume_holds(conn, flush,
                                                   min(deadline, time.monotonic() + 0.5))):
                        return flush
                except psycopg.errors.QueryCanceled:
                    pass
                os.kill(self._pid, signal.SIGCONT)
                time.sleep(0.002)
        return None

    def _freeze_inside_the_record(self, timeout_s: float) -> int | None:
        """Freeze the backend once the writer has flushed a megabyte of the load's one
        record but not its end, then wait for the volume client to hold that much: while
        the record is unfinished nothing after it can be flushed (a flush waits for the
        insertions before it), so the log ends inside it whatever the WAL writer or an
        orphaned walsender does after the kill.

        The record is written in a fraction of a second, faster than a busy machine
        answers a poll, so the backend runs in steps of a few milliseconds (stopped
        while the writer's own flush is read: the volume's acknowledgements trail it)
        and cannot pass the record's 64 MiB in one step. Frozen while it copies the
        record, it holds no lock that a connection or a probe takes, so it may stay
        frozen while the volume catches up."""
        deadline = time.monotonic() + timeout_s
        inside, end = self._started_lsn + (1 << 20), self._started_lsn + RECORD_BYTES
        with psycopg.connect(self.dsn, autocommit=True, connect_timeout=10,
                             options="-c statement_timeout=5000") as conn:
            while time.monotonic() < deadline and not self.finished and self.error is None:
                os.kill(self._pid, signal.SIGSTOP)
                try:
                    flush = self._lsn(conn, "SELECT pg_current_wal_flush_lsn()::text")
                    if flush >= end:
                        break  # past its record in one step: the round says so
                    if flush > inside:
                        if self._volume_holds(conn, inside, time.monotonic() + 10):
                            return flush
                        break  # the volume lags
                except BaseException:  # never leave it stopped: the writer could not
                    os.kill(self._pid, signal.SIGCONT)  # even shut down
                    raise
                os.kill(self._pid, signal.SIGCONT)
                time.sleep(0.002)
            with contextlib.suppress(ProcessLookupError):
                os.kill(self._pid, signal.SIGCONT)
        return None

    @staticmethod
    def _lsn(conn: psycopg.Connection[Any], sql: str) -> int:
        row = conn.execute(sql).fetchone()
        return parse_lsn(row[0]) if row and row[0] else 0

    def _volume_holds(self, conn: psycopg.Connection[Any], lsn: int, deadline: float) -> bool:
        """Whether the writer's synchronous standby (the volume client) has flushed the
        log up to ``lsn`` before the deadline."""
        while time.monotonic() < deadline:
            if self._lsn(conn, "SELECT max(flush_lsn)::text FROM pg_stat_replication "
                               "WHERE sync_state = 'sync'") >= lsn:
                return True
            time.sleep(0.002)
        return False

    def kill_backend(self) -> None:
        """SIGKILL the load's backend (frozen by :meth:`freeze_inside_a_record`)."""
        if self._pid > 0 and not self.finished:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self._pid, signal.SIGKILL)

    def join(self, timeout_s: float = 60) -> None:
        if self._thread is not None:
            self._thread.join(timeout_s)
            assert not self._thread.is_alive(), f"the {self.kind} load is still running"

    def check_outcome(self, dsn: str) -> bool:
        """All or nothing of the load is there; returns whether the kill struck it in
        the middle (nothing there). A load whose commit was acknowledged must be all
        there. One whose commit became durable just before the kill, its answer lost
        with the writer, may be all there too (its outcome was unknown to the client);
        an index build can end between the check and the kill."""
        with psycopg.connect(dsn, autocommit=True, connect_timeout=10) as conn:
            if self.kind == "index":
                row = conn.execute("SELECT count(*) FROM pg_class WHERE relname = %s",
                                   (self.index,)).fetchone()
                assert row is not None
                done = row[0] == 1
            else:
                rows = 1 if self.kind == "record" else 3_000_000
                row = conn.execute(f"SELECT count(*) FROM {self.table}").fetchone()
                assert row is not None and row[0] in (0, rows), \
                    f"{row[0]} rows of the {self.kind} load are visible: half a transaction"
                done = row[0] == rows
        assert done or not self.finished, f"the acknowledged {self.kind} load is missing"
        if not done:
            self.assert_absent(dsn)
        else:
            with psycopg.connect(dsn, autocommit=True, connect_timeout=10) as conn:
                conn.execute(f"DROP TABLE {self.table}")
        return not done

    def assert_absent(self, dsn: str) -> None:
        """The killed transaction left nothing behind."""
        with psycopg.connect(dsn, autocommit=True, connect_timeout=10) as conn:
            if self.kind == "index":
                row = conn.execute("SELECT count(*) FROM pg_class WHERE relname = %s",
                                   (self.index,)).fetchone()
                assert row is not None and row[0] == 0, "the unfinished index exists"
                rows = conn.execute(f"SELECT count(*) FROM {self.table}").fetchone()
                assert rows is not None and rows[0] == INDEX_ROWS
            else:
                rows = conn.execute(f"SELECT count(*) FROM {self.table}").fetchone()
                assert rows is not None and rows[0] == 0, \
                    f"{rows[0]} rows of the unfinished {self.kind} are visible"
            conn.execute(f"DROP TABLE {self.table}")
