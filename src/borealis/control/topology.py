"""The cluster's topology inside PostgreSQL, as Aurora PostgreSQL shows it to
failover-aware drivers: ``aurora_db_instance_identifier()`` and
``aurora_replica_status()`` in ``pg_catalog`` of every database, on the writer and on
every reader.

Each server knows its own name from its settings (``borealis.instance_id``). The rest
is published by the control plane on the writer as a setting of the internal role
(``ALTER ROLE ... SET borealis.topology = '<json>'``): that lands in
``pg_db_role_setting``, a catalog shared by all databases and carried to the readers by
the WAL, so every database of every instance reads the same rows (a reader's as of its
replay). It is published when the topology changes (an instance joins, leaves or
changes role, or its lag becomes known), not on a timer: an idle cluster writes no WAL
for it. So ``last_update_timestamp`` is the time of the query, and an instance's own
``replica_lag_in_msec`` is measured at the query (``pg_last_xact_replay_timestamp``);
the others' are as the last publication saw them. The functions are created in each
database that allows connections (a new database gets them at the next round;
``template1`` holds them for the ones to come).
"""

from __future__ import annotations

import json
from typing import Any

import psycopg
from psycopg import sql

from borealis.control.handle import ADMIN_USER

WRITER_SESSION = "MASTER_SESSION_ID"  # what Aurora names the writer's session
INSTANCE_SETTING = "borealis.instance_id"
TOP_SQL_DATABASE = "postgres"  # where pg_stat_statements is read

# Aurora PostgreSQL's columns, in its order (drivers read them by name or position).
_COLUMNS = (
    ("server_id", "text"), ("session_id", "text"), ("durable_lsn", "pg_lsn"),
    ("highest_lsn_rcvd", "pg_lsn"), ("current_read_lsn", "pg_lsn"),
    ("cur_replay_latency_in_usec", "bigint"), ("active_txns", "text"),
    ("is_current", "boolean"), ("last_transport_error", "integer"),
    ("last_error_timestamp", "timestamptz"), ("last_update_timestamp", "timestamptz"),
    ("feedback_xmin", "bigint"), ("feedback_epoch", "integer"),
    ("replica_lag_in_msec", "double precision"),
    ("log_stream_speed_in_kib_per_second", "double precision"),
    ("log_buffer_sequence_number", "bigint"), ("oldest_read_view_trx_id", "bigint"),
    ("oldest_read_view_lsn", "pg_lsn"), ("pending_read_ios", "integer"),
    ("read_ios", "bigint"), ("iops", "double precision"), ("cpu", "double precision"),
)
_PUBLISHED = ("server_id", "session_id", "durable_lsn", "highest_lsn_rcvd",
              "current_read_lsn", "replica_lag_in_msec", "cpu", "last_update_timestamp")


def _function_sql() -> str:
    returns = ", ".join(f"{name} {kind}" for name, kind in _COLUMNS)
    published = ", ".join(
        f"{name} {'double precision' if name == 'last_update_timestamp' else 'text'}"
        for name in _PUBLISHED)
    select = []
    current = "t.server_id = current_setting('borealis.instance_id', true)"
    for name, kind in _COLUMNS:
        if name == "is_current":
            select.append(current)
        elif name == "last_update_timestamp":
            select.append("now()")
        elif name == "replica_lag_in_msec":
            select.append(
                f"CASE WHEN {current} AND pg_is_in_recovery() THEN greatest(0, extract(epoch "
                "FROM now() - pg_last_xact_replay_timestamp()) * 1000)::float8 "
                f"ELSE t.{name}::float8 END")
        elif name in _PUBLISHED:
            select.append(f"t.{name}::{kind}")
        else:
            select.append(f"NULL::{kind}")
    return f"""
CREATE OR REPLACE FUNCTION pg_catalog.aurora_db_instance_identifier() RETURNS text
  LANGUAGE sql STABLE AS $$ SELECT current_setting('{INSTANCE_SETTING}', true) $$;
CREATE OR REPLACE FUNCTION pg_catalog.aurora_replica_status() RETURNS TABLE ({returns})
  LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog AS $$
  SELECT {", ".join(select)}
  FROM pg_db_role_setting s, unnest(s.setconfig) AS c,
       json_to_recordset(substr(c, length('borealis.topology=') + 1)::json) AS t({published})
  WHERE s.setdatabase = 0 AND c LIKE 'borealis.topology=%'
    AND s.setrole = (SELECT oid FROM pg_roles WHERE rolname = '{ADMIN_USER}')
$$;
"""


FUNCTIONS_SQL = _function_sql()


def rows(status: dict[str, Any], cpu: dict[str, float], now: float) -> list[dict[str, Any]]:
    """The published rows (pure): every available instance of ``status``."""
    out = []
    vdl = status.get("vdl")
    for inst in status["instances"]:
        if inst["state"] != "available":
            continue
        writer = inst["role"] == "writer"
        out.append(row(
            inst["id"], writer, durable_lsn=vdl, highest_lsn_rcvd=inst.get("replay_lsn"),
            current_read_lsn=inst.get("replay_lsn"),
            replica_lag_in_msec=None if writer else inst.get("lag_ms"),
            cpu=cpu.get(inst["id"]), last_update_timestamp=now))
    return out


def row(server_id: str, writer: bool, **measured: Any) -> dict[str, Any]:
    """One published row (pure): the instance, its session as Aurora names it (the
    writer's is fixed), and whatever was measured of it."""
    return {"server_id": server_id,
            "session_id": WRITER_SESSION if writer else f"borealis-{server_id}", **measured}


def announce(admin_dsn: str, writer: str, readers: list[str]) -> None:
    """The new writer, published at once by a failover (before the old writer can come
    back as a reader while the rows still name it): lags follow at the next round."""
    with psycopg.connect(admin_dsn, autocommit=True, connect_timeout=2) as conn:
        conn.execute("SET statement_timeout = '5s'")
        _set(conn, [row(writer, True)] + [row(r, False) for r in readers])


def _set(conn: psycopg.Connection[Any], published: list[dict[str, Any]]) -> None:
    conn.execute(sql.SQL("ALTER ROLE {} SET borealis.topology = {}").format(
        sql.Identifier(ADMIN_USER), sql.Literal(json.dumps(published))))


def signature(published: list[dict[str, Any]]) -> tuple[tuple[str, str, bool], ...]:
    """What makes a publication new (pure): who is there, as what, with a lag known."""
    return tuple(sorted((r["server_id"], r["session_id"], r["replica_lag_in_msec"] is None)
                        for r in published))


class Publisher:
    """What each round does on the writer (blocking: run it in a thread)."""

    def __init__(self) -> None:
        self.ready: set[tuple[str, int, str]] = set()  # (instance, postmaster pid, db)
        self.published: dict[str, tuple[int, tuple[tuple[str, str, bool], ...]]] = {}

    def publish(self, admin_dsn: str, writer: str, pid: int, published: list[dict[str, Any]]
                ) -> None:
        with psycopg.connect(admin_dsn, autocommit=True, connect_timeout=2) as conn:
            conn.execute("SET statement_timeout = '2s'")
            databases = [r[0] for r in conn.execute(
                "SELECT datname FROM pg_database WHERE datallowconn ORDER BY 1")]
            for db in databases:
                if (writer, pid, db) not in self.ready:
                    self._create_functions(admin_dsn, db)
                    self.ready.add((writer, pid, db))
            now = (pid, signature(published))
            if self.published.get(writer) == now:
                return  # nothing new: no WAL for it
            _set(conn, published)
            self.published[writer] = now

    def _create_functions(self, admin_dsn: str, db: str) -> None:
        with psycopg.connect(admin_dsn, dbname=db, autocommit=True,
                             connect_timeout=2) as conn:
            conn.execute("SET statement_timeout = '5s'")
            conn.execute(FUNCTIONS_SQL)
            if db == TOP_SQL_DATABASE:  # its view; the statistics cover every database
                conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
