"""Top SQL per instance (``borealis top``): the statements that took the most time,
from each instance's ``pg_stat_statements`` (loaded on every server; its view lives in
the ``postgres`` database, its counts cover them all). Internal sessions are left out.
"""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg.rows import dict_row

from borealis.control.cluster import ClusterRuntime
from borealis.control.handle import ADMIN_USER
from borealis.control.topology import TOP_SQL_DATABASE

_SQL = f"""
SELECT s.queryid::text AS queryid, left(s.query, 2000) AS query, s.calls,
       round(s.total_exec_time::numeric, 3)::float8 AS total_ms,
       round(s.mean_exec_time::numeric, 3)::float8 AS mean_ms, s.rows,
       d.datname AS database, r.rolname AS "user"
FROM pg_stat_statements s
JOIN pg_database d ON d.oid = s.dbid
JOIN pg_roles r ON r.oid = s.userid
WHERE r.rolname <> '{ADMIN_USER}'
ORDER BY s.total_exec_time DESC
LIMIT %s
"""


def top_statements(rt: ClusterRuntime, limit: int) -> list[dict[str, Any]]:
    """Per available instance: its id and role, and its top statements (or why not)."""
    out: list[dict[str, Any]] = []
    for inst in rt.state.instances(rt.name):
        entry: dict[str, Any] = {"instance": inst.id, "role": inst.role, "statements": []}
        out.append(entry)
        if inst.state != "available":
            entry["error"] = f"{inst.id} is {inst.state}"
            continue
        try:
            with psycopg.connect(rt.dsn(inst, TOP_SQL_DATABASE), autocommit=True,
                                 connect_timeout=3, row_factory=dict_row) as conn:
                conn.execute("SET statement_timeout = '5s'")
                entry["statements"] = conn.execute(_SQL, (limit,)).fetchall()
        except psycopg.Error as exc:
            entry["error"] = str(exc).strip().splitlines()[0]
    return out
