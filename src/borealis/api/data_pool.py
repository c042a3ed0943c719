"""Open connections kept between Data API calls, so a call does not pay for a new
connection and its authentication (about 12 ms through the cluster endpoint).

Invariants: a connection is given back only idle (no transaction open) and reset
(``DISCARD ALL``: no session setting, prepared statement or temporary table of one call
is seen by the next); a connection whose socket has anything to read while idle (the
server or the endpoint closed it, say after a failover) is never handed out; at most
``MAX_IDLE`` per key, none older than ``IDLE_S``.
"""

from __future__ import annotations

import contextlib
import select
import time
from typing import Any

import psycopg
from psycopg import pq

MAX_IDLE = 8
IDLE_S = 60.0


def _usable(conn: psycopg.AsyncConnection[Any]) -> bool:
    if conn.closed or conn.broken:
        return False
    if conn.info.transaction_status != pq.TransactionStatus.IDLE:
        return False
    try:  # an idle connection with bytes waiting is closing (EOF) or in error
        readable, _, _ = select.select([conn.fileno()], [], [], 0)
    except (OSError, ValueError):
        return False
    return not readable


class IdleConnections:
    def __init__(self) -> None:
        self.idle: dict[str, list[tuple[float, psycopg.AsyncConnection[Any]]]] = {}

    def take(self, key: str) -> psycopg.AsyncConnection[Any] | None:
        """The most recently used live connection for ``key`` (the caller closes the
        rest it is given back later)."""
        kept = self.idle.get(key, [])
        while kept:
            _, conn = kept.pop()
            if _usable(conn):
                return conn
            self._discard(conn)
        return None

    async def give(self, key: str, conn: psycopg.AsyncConnection[Any]) -> None:
        kept = self.idle.setdefault(key, [])
        if not _usable(conn) or len(kept) >= MAX_IDLE:
            await conn.close()
            return
        try:
            await conn.execute("DISCARD ALL")
        except psycopg.Error:
            await conn.close()
            return
        kept.append((time.monotonic(), conn))

    async def prune(self) -> None:
        cutoff = time.monotonic() - IDLE_S
        for key, kept in list(self.idle.items()):
            fresh = [(t, c) for t, c in kept if t >= cutoff]
            for t, conn in kept:
                if t < cutoff:
                    await conn.close()
            self.idle[key] = fresh
            if not fresh:
                del self.idle[key]

    async def close(self) -> None:
        for kept in self.idle.values():
            for _, conn in kept:
                with contextlib.suppress(Exception):
                    await conn.close()
        self.idle.clear()

    @staticmethod
    def _discard(conn: psycopg.AsyncConnection[Any]) -> None:
        with contextlib.suppress(Exception):
            conn.pgconn.finish()
