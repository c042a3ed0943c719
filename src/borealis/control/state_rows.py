"""The state's shape: its SQLite schema, the columns added since the first release,
and the rows as the rest of the control plane reads them (:mod:`.state` reads and
writes them)."""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass

SCHEMA = """
CREATE TABLE IF NOT EXISTS clusters (
    name TEXT PRIMARY KEY,
    created REAL NOT NULL,
    master_user TEXT NOT NULL,
    master_password TEXT NOT NULL,
    storage_secret TEXT NOT NULL,
    replication_password TEXT NOT NULL,
    epoch INTEGER NOT NULL DEFAULT 0,
    desired TEXT NOT NULL DEFAULT 'up',
    status TEXT NOT NULL DEFAULT 'creating',
    admin_password TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS instances (
    id TEXT PRIMARY KEY,
    cluster TEXT NOT NULL REFERENCES clusters(name),
    role TEXT NOT NULL,
    az TEXT NOT NULL,
    tier INTEGER NOT NULL DEFAULT 1,
    port INTEGER NOT NULL,
    pid INTEGER,
    state TEXT NOT NULL DEFAULT 'creating',
    storage_node TEXT,
    created REAL NOT NULL,
    host TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS storage_nodes (
    id TEXT NOT NULL,
    cluster TEXT NOT NULL REFERENCES clusters(name),
    az TEXT NOT NULL,
    port INTEGER NOT NULL,
    pg_port INTEGER NOT NULL,
    pid INTEGER,
    host TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (cluster, id)
);
CREATE TABLE IF NOT EXISTS volume_clients (
    cluster TEXT PRIMARY KEY REFERENCES clusters(name),
    pid INTEGER,
    epoch INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS endpoints (
    name TEXT PRIMARY KEY,
    cluster TEXT NOT NULL REFERENCES clusters(name),
    type TEXT NOT NULL,
    custom_type TEXT,
    port INTEGER NOT NULL,
    static TEXT NOT NULL DEFAULT '[]',
    excluded TEXT NOT NULL DEFAULT '[]',
    instance TEXT,
    host TEXT NOT NULL DEFAULT '127.0.0.1'
);
CREATE TABLE IF NOT EXISTS endpoint_proxies (
    cluster TEXT PRIMARY KEY REFERENCES clusters(name),
    pid INTEGER
);
CREATE TABLE IF NOT EXISTS access_keys (
    access_key_id TEXT PRIMARY KEY,
    secret_access_key TEXT NOT NULL,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS secrets (
    name TEXT PRIMARY KEY,
    cluster TEXT NOT NULL,
    username TEXT NOT NULL,
    password TEXT NOT NULL,
    arn TEXT NOT NULL UNIQUE,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS snapshots (
    name TEXT PRIMARY KEY,
    cluster TEXT NOT NULL,
    created REAL NOT NULL,
    status TEXT NOT NULL,
    master_user TEXT NOT NULL,
    master_password TEXT NOT NULL,
    location TEXT NOT NULL,
    bytes INTEGER NOT NULL DEFAULT 0,
    admin_password TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS settings (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS hosts (
    name TEXT PRIMARY KEY,
    address TEXT NOT NULL UNIQUE,
    az TEXT NOT NULL,
    port INTEGER NOT NULL,
    join_hash TEXT,
    joined REAL,
    added REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    cluster TEXT NOT NULL,
    time REAL NOT NULL,
    source TEXT NOT NULL,
    message TEXT NOT NULL
);
"""

AZS = ("az-a", "az-b", "az-c")
DEFAULT_INSTANCE_CLASS = "db.r6g.large"  # what an instance made without a class reports


@dataclass
class Cluster:
    name: str
    created: float
    master_user: str
    master_password: str
    storage_secret: str
    replication_password: str
    epoch: int
    desired: str
    status: str
    # The internal role's (ADMIN_USER) password: the control plane, volume client and
    # base copies log in with it, never with the master user's, which the customer may
    # change in SQL. '' for a cluster made before it had one (the master user then).
    admin_password: str = ""


@dataclass
class Secret:
    name: str
    cluster: str
    username: str
    password: str
    arn: str
    created: float


@dataclass
class Snapshot:
    """A snapshot outlives its cluster: the row keeps what a restore needs."""
    name: str
    cluster: str
    created: float
    status: str
    master_user: str
    master_password: str
    location: str
    bytes: int
    admin_password: str = ""  # the internal role's, as the snapshot's data carries it


@dataclass
class Instance:
    id: str
    cluster: str
    role: str
    az: str
    tier: int
    port: int
    pid: int | None
    state: str
    storage_node: str | None
    created: float
    host: str = ""  # the host it runs on; '' for this machine


@dataclass
class StorageNodeRow:
    id: str
    cluster: str
    az: str
    port: int
    pg_port: int
    pid: int | None
    host: str = ""  # the host it runs on; '' for this machine (no hosts registered)


@dataclass
class EndpointRow:
    name: str
    cluster: str
    type: str
    custom_type: str | None
    port: int
    static: list[str]
    excluded: list[str]
    instance: str | None
    host: str
    host_port: int  # where it listens on every host (0: only here; see add_endpoint)

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> EndpointRow:
        data = dict(row)
        data["static"] = json.loads(data["static"])
        data["excluded"] = json.loads(data["excluded"])
        return cls(**data)


# Columns added after the first release: (table, column, definition with its default).
ADDED_COLUMNS = (
    ("endpoints", "host", "TEXT NOT NULL DEFAULT '127.0.0.1'"),  # an address of its own
    ("endpoints", "host_port", "INTEGER NOT NULL DEFAULT 0"),  # its port on hosts
    ("storage_nodes", "host", "TEXT NOT NULL DEFAULT ''"),  # hosts ('': this machine)
    ("instances", "host", "TEXT NOT NULL DEFAULT ''"),
    ("clusters", "admin_password", "TEXT NOT NULL DEFAULT ''"),  # the internal role
    ("snapshots", "admin_password", "TEXT NOT NULL DEFAULT ''"),
)


