"""The control plane's state: SQLite under ``$BOREALIS_HOME``.

One row per cluster, instance, storage node and volume client, with the PIDs of the
processes running them (so a restarted control plane re-adopts instead of restarting).
Ports are chosen once, when a thing is created, and kept.
"""

from __future__ import annotations

import json
import os
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from borealis import identifiers
from borealis.control import lifecycle
from borealis.control.ports import (
    ENDPOINT_PORTS,
    HOST_PORT_OFFSET,
    KEPT_PORTS,
    bindable,
    loopback_addresses,
)
from borealis.control.state_rows import (
    ADDED_COLUMNS,
    AZS,
    DEFAULT_INSTANCE_CLASS,
    SCHEMA,
    Cluster,
    EndpointRow,
    Instance,
    Secret,
    Snapshot,
    StorageNodeRow,
)

__all__ = ["AZS", "Cluster", "EndpointRow", "Instance", "Secret", "Snapshot", "State",
           "StorageNodeRow"]


def _owner_only(home: Path) -> None:
    """The home holds the state, configs and logs: no other user may list or enter it.
    The servers' account may be given search permission by an ACL entry (see
    ``RunAs.ensure_traversable``); the group class bits are then the ACL's mask, and
    clearing them would take that permission away again."""
    mode = home.stat().st_mode & 0o777
    try:
        has_acl = "system.posix_acl_access" in os.listxattr(home)
    except OSError:
        has_acl = False
    wanted = mode & 0o770 if has_acl else 0o700
    if mode != wanted:
        os.chmod(home, wanted)


class State:
    def __init__(self, home: Path) -> None:
        self.home = home
        home.mkdir(parents=True, exist_ok=True)
        _owner_only(home)
        self._local = threading.local()
        self.db.executescript(SCHEMA)
        for table, column, ddl in ADDED_COLUMNS:  # a home from before they existed
            if column not in {r[1] for r in self.db.execute(f"PRAGMA table_info({table})")}:
                self.db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {ddl}")
        # The database holds passwords and secret keys: owner-only, like the home.
        for suffix in ("", "-wal", "-shm"):
            path = home / f"state.db{suffix}"
            if path.exists():
                os.chmod(path, 0o600)

    @property
    def db(self) -> sqlite3.Connection:
        """One connection per thread: sqlite3 connections are not shared across threads."""
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.home / "state.db", isolation_level=None, timeout=30)
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA journal_mode=WAL")
            self._local.conn = conn
        return conn

    def allocate_port(self, also_taken: int = 0, block: int = 1) -> int:
        """A port for something that keeps it across restarts: not recorded for anything
        else (a stopped cluster's ports are not bound, but they are taken) and free now;
        with ``block``, the ports after it too."""
        taken = {int(r[0]) for r in self.db.execute(
            "SELECT port FROM storage_nodes UNION SELECT pg_port FROM storage_nodes "
            "UNION SELECT port FROM instances")}
        for (shared,) in self.db.execute("SELECT DISTINCT port FROM endpoints"):
            taken.update(range(int(shared), int(shared) + ENDPOINT_PORTS))
        taken.add(also_taken)
        for _ in range(1000):
            port = secrets.choice(KEPT_PORTS[:-block])
            wanted = range(port, port + block)
            if taken.isdisjoint(wanted) and all(bindable(p) for p in wanted):
                return port
        raise RuntimeError("no free port left in the range Borealis keeps ports in")

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield self.db
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    # -- clusters -------------------------------------------------------------------

    def create_cluster(self, name: str, master_user: str = "borealis",
                       master_password: str | None = None,
                       admin_password: str | None = None) -> Cluster:
        """``admin_password``: the internal role's password the cluster's data carries
        (a restore's or clone's source's); a new one for a new database."""
        with self.transaction() as db:
            db.execute(
                "INSERT INTO clusters (name, created, master_user, master_password, "
                "storage_secret, replication_password, admin_password) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (name, time.time(), master_user, master_password or secrets.token_urlsafe(18),
                 secrets.token_urlsafe(24), secrets.token_urlsafe(18),
                 secrets.token_urlsafe(24) if admin_password is None else admin_password),
            )
            for az in AZS:
                for i in (1, 2):
                    port = self.allocate_port()
                    db.execute(
                        "INSERT INTO storage_nodes (id, cluster, az, port, pg_port) "
                        "VALUES (?, ?, ?, ?, ?)",
                        (f"sn-{az[-1]}{i}", name, az, port, self.allocate_port(port)),
                    )
        # Its built-in endpoints exist from the start (reads never have to make them).
        self.add_endpoint(name, name, "WRITER")
        self.add_endpoint(f"{name}-ro", name, "READER")
        cluster = self.cluster(name)
        assert cluster is not None
        return cluster

    def cluster(self, name: str) -> Cluster | None:
        row = self.db.execute("SELECT * FROM clusters WHERE name = ?", (name,)).fetchone()
        return Cluster(**dict(row)) if row else None

    def clusters(self) -> list[Cluster]:
        rows = self.db.execute("SELECT * FROM clusters ORDER BY created").fetchall()
        return [Cluster(**dict(r)) for r in rows]

    def set_cluster(self, name: str, **fields: object) -> None:
        """Update a cluster's row; a new ``status`` must be a move its lifecycle allows."""
        self._update("clusters", "name", name, fields, "status", lifecycle.check_cluster)

    def next_epoch(self, name: str) -> int:
        with self.transaction() as db:
            db.execute("UPDATE clusters SET epoch = epoch + 1 WHERE name = ?", (name,))
            row = db.execute("SELECT epoch FROM clusters WHERE name = ?", (name,)).fetchone()
        return int(row[0])

    def delete_cluster(self, name: str) -> None:
        with self.transaction() as db:
            for table in ("instances", "storage_nodes", "volume_clients", "events", "endpoints",
                          "endpoint_proxies", "secrets"):
                db.execute(f"DELETE FROM {table} WHERE cluster = ?", (name,))
            db.execute("DELETE FROM clusters WHERE name = ?", (name,))

    # -- instances ------------------------------------------------------------------

    def add_instance(self, cluster: str, role: str, az: str, tier: int,
                     instance_id: str | None = None, host: str = "") -> Instance:
        if instance_id is not None:
            assert identifiers.identifier(instance_id, "instance id") == instance_id
        with self.transaction() as db:
            if instance_id is None:
                n = 1
                taken = {r[0] for r in db.execute("SELECT id FROM instances")}
                while f"{cluster}-{n}" in taken:
                    n += 1
                instance_id = f"{cluster}-{n}"
            db.execute(
                "INSERT INTO instances (id, cluster, role, az, tier, port, created, host) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (instance_id, cluster, role, az, tier, self.allocate_port(), time.time(),
                 host),
            )
        if self.endpoint(instance_id) is None:  # its instance endpoint, as on Aurora
            self.add_endpoint(instance_id, cluster, "INSTANCE", instance=instance_id)
        inst = self.instance(instance_id)
        assert inst is not None
        return inst

    def instance(self, instance_id: str) -> Instance | None:
        row = self.db.execute("SELECT * FROM instances WHERE id = ?", (instance_id,)).fetchone()
        return Instance(**dict(row)) if row else None

    def instances(self, cluster: str) -> list[Instance]:
        rows = self.db.execute(
            "SELECT * FROM instances WHERE cluster = ? ORDER BY role DESC, created", (cluster,)
        ).fetchall()
        return [Instance(**dict(r)) for r in rows]

    def set_instance(self, instance_id: str, **fields: object) -> None:
        """Update an instance's row; a new ``state`` must be a move its lifecycle allows."""
        self._update("instances", "id", instance_id, fields, "state", lifecycle.check_instance)

    def delete_instance(self, instance_id: str) -> None:
        with self.transaction() as db:
            db.execute("DELETE FROM instances WHERE id = ?", (instance_id,))
            db.execute("DELETE FROM endpoints WHERE instance = ? AND type = 'INSTANCE'",
                       (instance_id,))

    # -- storage and volume ------------------------------------------------------------

    def storage_nodes(self, cluster: str) -> list[StorageNodeRow]:
        rows = self.db.execute(
            "SELECT * FROM storage_nodes WHERE cluster = ? ORDER BY id", (cluster,)
        ).fetchall()
        return [StorageNodeRow(**dict(r)) for r in rows]

    def set_storage_host(self, cluster: str, node_id: str, host: str) -> None:
        self.db.execute("UPDATE storage_nodes SET host = ? WHERE cluster = ? AND id = ?",
                        (host, cluster, node_id))

    def set_storage_pid(self, cluster: str, node_id: str, pid: int | None) -> None:
        self.db.execute("UPDATE storage_nodes SET pid = ? WHERE cluster = ? AND id = ?",
                        (pid, cluster, node_id))

    def volume_client(self, cluster: str) -> tuple[int | None, int] | None:
        row = self.db.execute("SELECT pid, epoch FROM volume_clients WHERE cluster = ?",
                              (cluster,)).fetchone()
        return (row[0], row[1]) if row else None

    def set_volume_client(self, cluster: str, pid: int | None, epoch: int) -> None:
        self.db.execute(
            "INSERT INTO volume_clients (cluster, pid, epoch) VALUES (?, ?, ?) "
            "ON CONFLICT(cluster) DO UPDATE SET pid = excluded.pid, epoch = excluded.epoch",
            (cluster, pid, epoch),
        )

    # -- endpoints ------------------------------------------------------------------

    def endpoints(self, cluster: str) -> list[EndpointRow]:
        rows = self.db.execute("SELECT * FROM endpoints WHERE cluster = ? ORDER BY rowid",
                               (cluster,)).fetchall()
        return [EndpointRow.from_row(r) for r in rows]

    def endpoint(self, name: str) -> EndpointRow | None:
        row = self.db.execute("SELECT * FROM endpoints WHERE name = ?", (name,)).fetchone()
        return EndpointRow.from_row(row) if row else None

    def add_endpoint(self, name: str, cluster: str, type_: str, custom_type: str | None = None,
                     static: list[str] | None = None, excluded: list[str] | None = None,
                     instance: str | None = None) -> None:
        """As on Aurora, a cluster's endpoints share one port and differ by address: each
        gets a loopback address of its own (all of 127.0.0.0/8 reaches this host). On
        hosts each but the instance endpoints (an instance is reached where it runs) has
        a port of its own instead (:data:`ENDPOINT_PORTS`)."""
        with self.transaction() as db:
            row = db.execute("SELECT port FROM endpoints WHERE cluster = ? ORDER BY rowid "
                             "LIMIT 1", (cluster,)).fetchone()
            port = int(row[0]) if row else self.allocate_port(block=ENDPOINT_PORTS)
            used = {str(r[0]) for r in db.execute("SELECT host FROM endpoints WHERE port = ?",
                                                  (port,))}
            host = next(h for h in loopback_addresses() if h not in used)
            host_port = 0
            if type_ in HOST_PORT_OFFSET:
                host_port = port + HOST_PORT_OFFSET[type_]
            elif type_ == "CUSTOM":
                held = {int(r[0]) for r in db.execute(
                    "SELECT host_port FROM endpoints WHERE cluster = ?", (cluster,))}
                host_port = next(p for p in range(port + 2, port + ENDPOINT_PORTS)
                                 if p not in held)
            db.execute(
                "INSERT INTO endpoints (name, cluster, type, custom_type, port, static, "
                "excluded, instance, host, host_port) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (name, cluster, type_, custom_type, port, json.dumps(static or []),
                 json.dumps(excluded or []), instance, host, host_port))

    def modify_endpoint(self, name: str, custom_type: str | None, static: list[str] | None,
                        excluded: list[str] | None) -> None:
        if custom_type is not None:
            self.db.execute("UPDATE endpoints SET custom_type = ? WHERE name = ?",
                            (custom_type, name))
        if static is not None or excluded is not None:
            self.db.execute("UPDATE endpoints SET static = ?, excluded = ? WHERE name = ?",
                            (json.dumps(static or []), json.dumps(excluded or []), name))

    def delete_endpoint(self, name: str) -> None:
        self.db.execute("DELETE FROM endpoints WHERE name = ?", (name,))

    def proxy_pid(self, cluster: str) -> int | None:
        row = self.db.execute("SELECT pid FROM endpoint_proxies WHERE cluster = ?",
                              (cluster,)).fetchone()
        return int(row[0]) if row and row[0] else None

    def set_proxy_pid(self, cluster: str, pid: int | None) -> None:
        self.db.execute(
            "INSERT INTO endpoint_proxies (cluster, pid) VALUES (?, ?) "
            "ON CONFLICT(cluster) DO UPDATE SET pid = excluded.pid", (cluster, pid))

    def instance_class(self, instance_id: str) -> str:
        """The class an instance was made with (``db.serverless`` has its capacity
        follow its load: ``capacity.py``)."""
        return self.setting(f"instance_class:{instance_id}") or DEFAULT_INSTANCE_CLASS

    def set_instance_class(self, instance_id: str, instance_class: str) -> None:
        self.set_setting(f"instance_class:{instance_id}", instance_class)

    # -- settings, access keys and secrets -----------------------------------------------

    def setting(self, key: str, default: str | None = None) -> str | None:
        row = self.db.execute("SELECT value FROM settings WHERE key = ?", (key,)).fetchone()
        return str(row[0]) if row else default

    def set_setting(self, key: str, value: str) -> None:
        self.db.execute("INSERT INTO settings (key, value) VALUES (?, ?) ON CONFLICT(key) "
                        "DO UPDATE SET value = excluded.value", (key, value))

    def delete_setting(self, key: str) -> None:
        self.db.execute("DELETE FROM settings WHERE key = ?", (key,))

    def setting_once(self, key: str, make: Callable[[], str]) -> str:
        """A setting chosen once (the first time it is asked for) and then kept."""
        kept = self.setting(key)  # the usual case: no write transaction to read it
        if kept is not None:
            return kept
        with self.transaction() as db:
            row = db.execute("SELECT value FROM settings WHERE key = ?", (key,)).fetchone()
            if row:
                return str(row[0])
            value = make()
            db.execute("INSERT INTO settings (key, value) VALUES (?, ?)", (key, value))
        return value

    def access_keys(self) -> list[tuple[str, str]]:
        rows = self.db.execute(
            "SELECT access_key_id, secret_access_key FROM access_keys ORDER BY created")
        return [(str(r[0]), str(r[1])) for r in rows]

    def secret_key(self, access_key_id: str) -> str | None:
        row = self.db.execute("SELECT secret_access_key FROM access_keys WHERE "
                              "access_key_id = ?", (access_key_id,)).fetchone()
        return str(row[0]) if row else None

    def add_access_key(self, access_key_id: str, secret_access_key: str) -> None:
        self.db.execute("INSERT INTO access_keys (access_key_id, secret_access_key, created) "
                        "VALUES (?, ?, ?)", (access_key_id, secret_access_key, time.time()))

    def add_secret(self, name: str, cluster: str, username: str, password: str,
                   arn: str) -> Secret:
        self.db.execute("INSERT INTO secrets (name, cluster, username, password, arn, created) "
                        "VALUES (?, ?, ?, ?, ?, ?)",
                        (name, cluster, username, password, arn, time.time()))
        found = self.secret(name)
        assert found is not None
        return found

    def secret(self, name: str) -> Secret | None:
        row = self.db.execute("SELECT * FROM secrets WHERE name = ?", (name,)).fetchone()
        return Secret(**dict(row)) if row else None

    def secret_by_arn(self, arn: str) -> Secret | None:
        row = self.db.execute("SELECT * FROM secrets WHERE arn = ?", (arn,)).fetchone()
        return Secret(**dict(row)) if row else None

    def secrets(self) -> list[Secret]:
        rows = self.db.execute("SELECT * FROM secrets ORDER BY created").fetchall()
        return [Secret(**dict(r)) for r in rows]

    def update_secret_password(self, name: str, password: str) -> None:
        self.db.execute("UPDATE secrets SET password = ? WHERE name = ?", (password, name))

    def delete_secret(self, name: str) -> None:
        self.db.execute("DELETE FROM secrets WHERE name = ?", (name,))

    # -- snapshots -------------------------------------------------------------------------

    def add_snapshot(self, name: str, cluster: Cluster, location: str) -> Snapshot:
        self.db.execute(
            "INSERT INTO snapshots (name, cluster, created, status, master_user, "
            "master_password, location, admin_password) "
            "VALUES (?, ?, ?, 'creating', ?, ?, ?, ?)",
            (name, cluster.name, time.time(), cluster.master_user, cluster.master_password,
             location, cluster.admin_password))
        found = self.snapshot(name)
        assert found is not None
        return found

    def snapshot(self, name: str) -> Snapshot | None:
        row = self.db.execute("SELECT * FROM snapshots WHERE name = ?", (name,)).fetchone()
        return Snapshot(**dict(row)) if row else None

    def snapshots(self) -> list[Snapshot]:
        rows = self.db.execute("SELECT * FROM snapshots ORDER BY created").fetchall()
        return [Snapshot(**dict(r)) for r in rows]

    def set_snapshot(self, name: str, **fields: object) -> None:
        """Update a snapshot's row; a new ``status`` must be a move its lifecycle allows."""
        self._update("snapshots", "name", name, fields, "status", lifecycle.check_snapshot)

    def _update(self, table: str, key: str, value: str, fields: dict[str, object],
                state_column: str, check: Callable[[str, str, str], object]) -> None:
        """One row's fields, in a transaction that first checks the state move (a row
        already gone is left alone, as an UPDATE of nothing)."""
        assignments = ", ".join(f"{k} = ?" for k in fields)
        with self.transaction() as db:
            if state_column in fields:
                row = db.execute(f"SELECT {state_column} FROM {table} WHERE {key} = ?",
                                 (value,)).fetchone()
                if row is not None:
                    fields = {**fields, state_column: str(check(value, row[0],
                                                                 str(fields[state_column])))}
            db.execute(f"UPDATE {table} SET {assignments} WHERE {key} = ?",
                       (*fields.values(), value))

    def delete_snapshot(self, name: str) -> None:
        self.db.execute("DELETE FROM snapshots WHERE name = ?", (name,))

    # -- events ---------------------------------------------------------------------

    def event(self, cluster: str, source: str, message: str) -> None:
        self.db.execute("INSERT INTO events (cluster, time, source, message) VALUES (?, ?, ?, ?)",
                        (cluster, time.time(), source, message))

    def events(self, cluster: str, limit: int = 200) -> list[dict[str, object]]:
        rows = self.db.execute(
            "SELECT time, source, message FROM events WHERE cluster = ? ORDER BY id DESC LIMIT ?",
            (cluster, limit),
        ).fetchall()
        return [dict(r) for r in reversed(rows)]
