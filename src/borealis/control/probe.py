"""Queries the control plane runs against servers that may be frozen.

A stopped (SIGSTOP) server still completes TCP handshakes but never answers. psycopg,
when an awaited query is cancelled, sends the server a cancel request and waits for it:
against a frozen server that wait never ends. So the query itself is driven here at the
libpq level with a deadline, and on timeout the socket is simply closed.
"""

from __future__ import annotations

import asyncio
from typing import Any

import psycopg
from psycopg import pq


class ProbeTimeout(Exception):
    pass


async def connect(dsn: str, timeout_s: float) -> psycopg.AsyncConnection[Any]:
    """Connecting is safe to abandon: psycopg only closes the half-open connection."""
    async with asyncio.timeout(timeout_s):
        return await psycopg.AsyncConnection.connect(dsn, connect_timeout=max(1, int(timeout_s)),
                                                     autocommit=True)


async def first_value(conn: psycopg.AsyncConnection[Any], sql: str,
                      timeout_s: float) -> str | None:
    """The first column of the first row of ``sql``; on timeout or error the connection
    is closed without a goodbye and ProbeTimeout / psycopg.OperationalError raised."""
    pgconn = conn.pgconn
    loop = asyncio.get_running_loop()
    try:
        pgconn.nonblocking = 1
        pgconn.send_query(sql.encode())
        while pgconn.flush():
            await asyncio.sleep(0.001)
        async with asyncio.timeout(timeout_s):
            while True:
                pgconn.consume_input()
                if not pgconn.is_busy():
                    break
                readable = loop.create_future()
                loop.add_reader(pgconn.socket, readable.set_result, None)
                try:
                    await readable
                finally:
                    loop.remove_reader(pgconn.socket)
        value: str | None = None
        while (res := pgconn.get_result()) is not None:
            if res.status == pq.ExecStatus.TUPLES_OK and res.ntuples and value is None:
                raw = res.get_value(0, 0)
                value = raw.decode() if raw is not None else None
            elif res.status not in (pq.ExecStatus.TUPLES_OK, pq.ExecStatus.COMMAND_OK):
                raise psycopg.OperationalError(
                    (res.error_message or b"query failed").decode(errors="replace"))
        return value
    except TimeoutError:
        pgconn.finish()
        raise ProbeTimeout(f"no answer in {timeout_s}s") from None
    except (psycopg.Error, OSError):
        pgconn.finish()
        raise


async def value_once(dsn: str, sql: str, timeout_s: float) -> str | None:
    """Connect, run ``sql``, disconnect: :func:`first_value` on a connection of its own."""
    conn = await connect(dsn, timeout_s)
    value = await first_value(conn, sql, timeout_s)
    await conn.close()
    return value
