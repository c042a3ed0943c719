"""Every file one Borealis process writes and another reads, as one type each (sans-IO:
``to_json`` and ``from_json`` only; :func:`borealis.fsync.write_atomic` writes them).

| file | written by | read by |
|---|---|---|
| ``storage/<node>/node.json``: :class:`NodeConfig` | control plane | storage node |
| ``volume/volume.json``: :class:`VolumeClientConfig` | control plane | volume client |
| ``.../postgres/<id>/config.json``: :class:`ServerConfig` | control plane, by agent | server |
| ``volume/status.json``: :class:`VolumeStatus` | volume client (every 0.25 s) | control plane |
| ``storage/<node>/data/retain.json``: :class:`RetainMark` | control plane | archiver |
| ``endpoints/proxy.json``: :class:`ProxyConfig` | control plane | endpoint proxy |
| ``endpoints/applied``: the digest of the config applied | endpoint proxy | control plane |
| ``endpoints/status.json``: :class:`ProxyStatus` | endpoint proxy | control plane |
| ``$BOREALIS_HOME/control.json``: :class:`ControlInfo` | control plane | CLI |
| ``$BOREALIS_HOME/client.json``: :class:`ClientConfig` | control plane | CLI |

A reader never sees half a file (they are replaced whole); a file that does not parse
is treated as absent by its reader, never as a crash.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

from borealis.wal.lsn import format_lsn, parse_lsn

APPLIED_FILE = "applied"
# Touched by the proxy when it holds a connection no member can take: a paused
# Serverless v2 cluster resumes on it.
WAKE_FILE = "wake"
RETAIN_FILE = "retain.json"


def config_digest(text: str) -> str:
    """What the endpoint proxy writes to ``applied`` once it applied a config's text."""
    return hashlib.sha256(text.encode()).hexdigest()


class FlatJson:
    """``to_json``/``from_json`` for a file whose fields are all plain JSON values."""

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))  # type: ignore[call-overload]

    @classmethod
    def from_json(cls, text: str) -> Self:
        return cls(**json.loads(text))


@dataclass(frozen=True)
class PeerAddress:
    node_id: str
    host: str
    port: int
    # The CA that signed the node's certificate when it is on another host: the link is
    # TLS, and the node must prove its address. None: plain TCP on this machine.
    ca_pem: str | None = None


@dataclass(frozen=True)
class TlsIdentity:
    """A process's own certificate (for its address) and the CA it trusts."""

    cert_pem: str
    key_pem: str
    ca_pem: str


# -- process configs -------------------------------------------------------------------------

@dataclass
class NodeConfig:
    node_id: str
    az: str
    directory: Path  # the node's disk
    host: str
    port: int  # volume protocol
    pg_port: int  # replication protocol for hot standbys
    secret: str
    replication_user: str
    replication_password: str
    peers: list[PeerAddress] = field(default_factory=list)
    scrub_interval_s: float = 30.0
    scrub_bytes_per_s: int = 2 * 1024 * 1024  # a pass never takes more than its share of CPU
    gossip_interval_s: float = 1.0
    archive_location: str | None = None  # the object store for continuous backup
    archive_prefix: str = ""  # clusters/<name>
    archive_rank: int = 0  # 0-5: who archives first (see storage/archive.py)
    tls: TlsIdentity | None = None  # on a host: both ports speak TLS only

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=1, default=str)

    @classmethod
    def from_json(cls, text: str) -> NodeConfig:
        data = json.loads(text)
        data["directory"] = Path(data["directory"])
        data["peers"] = [PeerAddress(**p) for p in data.get("peers", [])]
        if data.get("tls"):
            data["tls"] = TlsIdentity(**data["tls"])
        return cls(**data)


@dataclass
class VolumeClientConfig:
    cluster: str
    epoch: int
    writer_conninfo: str
    nodes: list[PeerAddress]
    secret: str
    status_path: Path
    buffer_bytes: int = 64 * 1024 * 1024

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=1, default=str)

    @classmethod
    def from_json(cls, text: str) -> VolumeClientConfig:
        data = json.loads(text)
        data["nodes"] = [PeerAddress(**n) for n in data["nodes"]]
        data["status_path"] = Path(data["status_path"])
        return cls(**data)


@dataclass(frozen=True)
class CopySource:
    """Where a new reader's data directory is copied from (``pg_basebackup`` over the
    network, TLS checked against ``ca_pem``), as the internal role."""

    host: str
    port: int
    user: str
    password: str
    ca_pem: str


@dataclass(frozen=True)
class ServerConfig:
    """A PostgreSQL server on a host: how its data directory is made the first time
    (``initdb`` as the internal role, or a copy of the writer), and the settings it
    runs with. Paths are the agent's: the data directory is ``data`` beside this file."""

    conf: str  # the settings file's text (ServerSettings.render)
    role: str  # "writer" | "reader": a reader starts as a standby
    address: str  # the host's address (TLS with ``tls`` there; 127.0.0.1 is plain)
    tls: TlsIdentity  # the server's certificate for ``address``, and the cluster's CA
    superuser: str = ""  # initdb's bootstrap superuser (the internal role) ...
    password: str = ""  # ... and its password
    copy_from: CopySource | None = None  # a reader: copied from the writer
    ca_pem: str | None = None  # what a standby checks its storage node's certificate with

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=1)

    @classmethod
    def from_json(cls, text: str) -> ServerConfig:
        data = json.loads(text)
        data["tls"] = TlsIdentity(**data["tls"])
        if data.get("copy_from"):
            data["copy_from"] = CopySource(**data["copy_from"])
        return cls(**data)


# -- the volume client's report ----------------------------------------------------------------

@dataclass(frozen=True)
class LinkStatus:
    connected: bool
    ready: bool
    flush_lsn: int
    reconnects: int


@dataclass(frozen=True)
class VolumeStatus:
    pid: int
    cluster: str
    epoch: int
    timeline: int
    vdl: int
    stream_start: int
    received: int
    writer_flush: int
    buffer_start: int
    nodes: dict[str, LinkStatus]
    writer_heard: float | None  # when the writer last answered (wall clock)
    stopped: str | None  # why the client stopped, if it did
    updated: float
    # Batches the VDL came to cover, and how long they waited for it in all (seconds).
    quorum_wait_s: float = 0.0
    quorum_waits: int = 0

    _LSNS = ("vdl", "stream_start", "received", "writer_flush", "buffer_start")

    def to_json(self) -> str:
        data: dict[str, Any] = dataclasses.asdict(self)
        for key in self._LSNS:
            data[key] = format_lsn(data[key])
        for link in data["nodes"].values():
            link["flush_lsn"] = format_lsn(link["flush_lsn"])
        return json.dumps(data)

    @classmethod
    def from_json(cls, text: str) -> VolumeStatus:
        data = json.loads(text)
        for key in cls._LSNS:
            data[key] = parse_lsn(data[key])
        data["nodes"] = {nid: LinkStatus(**{**link, "flush_lsn": parse_lsn(link["flush_lsn"])})
                         for nid, link in data["nodes"].items()}
        return cls(**data)

    def shown(self) -> dict[str, Any]:
        """The per-node part as ``status --json`` shows it (LSNs as text)."""
        out: dict[str, Any] = json.loads(self.to_json())
        return out


# -- what a storage node must keep --------------------------------------------------------------

@dataclass(frozen=True)
class RetainMark:
    retain_from: int  # below it, WAL may be dropped once archived
    written: float

    def to_json(self) -> str:
        return json.dumps({"retain_from": format_lsn(self.retain_from),
                           "written": self.written})

    @classmethod
    def from_json(cls, text: str) -> RetainMark:
        data = json.loads(text)
        return cls(parse_lsn(data["retain_from"]), float(data["written"]))


# -- the endpoint proxy --------------------------------------------------------------------------

@dataclass(frozen=True)
class Backend:
    id: str
    host: str
    port: int
    role: str  # "writer" | "reader"
    available: bool = True
    lag_ms: int | None = 0
    pid: int | None = None  # its postmaster, whose listening socket steering borrows


@dataclass(frozen=True)
class EndpointSpec:
    name: str
    type: str  # WRITER | READER | CUSTOM | INSTANCE
    port: int
    custom_type: str | None = None  # READER | ANY for CUSTOM
    static: tuple[str, ...] = ()
    excluded: tuple[str, ...] = ()
    instance: str | None = None
    max_lag_ms: int = 30_000
    host: str = "127.0.0.1"
    extra: dict[str, object] = field(default_factory=dict, compare=False)


@dataclass(frozen=True)
class ProxyConfig:
    cluster: str
    endpoints: tuple[EndpointSpec, ...]
    backends: tuple[Backend, ...]
    hold_timeout_s: float = 30.0
    client_timeout_s: float = 10.0

    def to_json(self) -> str:
        """Deterministic text: the proxy's ``applied`` digest is of exactly this."""
        endpoints = [{k: v for k, v in dataclasses.asdict(s).items() if k != "extra"}
                     for s in self.endpoints]
        return json.dumps({"cluster": self.cluster, "hold_timeout_s": self.hold_timeout_s,
                           "client_timeout_s": self.client_timeout_s, "endpoints": endpoints,
                           "backends": [dataclasses.asdict(b) for b in self.backends]},
                          indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ProxyConfig:
        data = json.loads(text)
        specs = tuple(EndpointSpec(**{**raw, "static": tuple(raw.get("static") or ()),
                                      "excluded": tuple(raw.get("excluded") or ())})
                      for raw in data.get("endpoints", []))
        return cls(str(data.get("cluster", "")), specs,
                   tuple(Backend(**b) for b in data.get("backends", [])),
                   float(data.get("hold_timeout_s", 30.0)),
                   float(data.get("client_timeout_s", 10.0)))


@dataclass(frozen=True)
class ProxyStatus(FlatJson):
    pid: int
    steering: bool  # the kernel steers connections (else the proxy forwards them)
    endpoints: dict[str, dict[str, Any]]  # name -> counters, members, address
    updated: float


# -- the control plane's address -------------------------------------------------------------------

@dataclass(frozen=True)
class ControlInfo(FlatJson):
    pid: int
    port: int
    url: str
    region: str


@dataclass(frozen=True)
class ClientConfig(FlatJson):
    """What the CLI needs to call the API, kept while the control plane is stopped too
    (owner-only: it holds the secret key). The CLI never opens the state database."""

    access_key_id: str
    secret_access_key: str
    url: str  # the address kept for this home, whether or not the API runs now
    region: str
