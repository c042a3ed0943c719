"""What the control plane and a host's agent say to each other (JSON over HTTPS, mutual
TLS with the deployment's CA). Shapes and checks only; no I/O.

An agent runs a fixed set of process kinds (:data:`KINDS`), never an arbitrary command:
a stolen control-plane certificate starts storage nodes, not shells. A process is named
by :class:`ProcessKey` (cluster, kind, name); the agent keeps its files under
``<root>/clusters/<cluster>/<kind>/<name>/`` and writes the config it is given there.

Join: ``borealis host add`` makes a one-time secret; the token an operator hands the new
agent is ``<secret>.<CA fingerprint>``. The agent checks the control plane's certificate
against the fingerprint before it sends the secret, and receives its own key and
certificate in exchange.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any

from borealis import identifiers

KINDS: dict[str, str] = {  # kind -> the module that runs it with ``--config FILE``
    "storage-node": "borealis.storage.server",
    "volume-client": "borealis.volume.client",
    "endpoint-proxy": "borealis.endpoints.proxy",
    "postgres": "borealis.compute.server",  # becomes the postmaster once its data is made
}
# What the control plane may read back ("applied": the digest of the config an endpoint
# proxy has applied).
FILES = ("status.json", "process.log", "applied")
CONTROL_PLANE_CN = "borealis-control-plane"
AGENT_PORT = 7420
_TOKEN = re.compile(r"^([0-9a-f]{32})\.([0-9a-f]{64})$")


class AgentProtocolError(ValueError):
    pass


def check_name(what: str, value: object) -> str:
    """Host, cluster and process names follow the identifier rules (they become folder
    names and certificate names), in lower case."""
    try:
        checked = identifiers.identifier(value, what)
    except identifiers.BadIdentifier as exc:
        raise AgentProtocolError(str(exc)) from None
    if checked != value:
        raise AgentProtocolError(f"{what} {value!r} must be lower case")
    return checked


@dataclass(frozen=True)
class ProcessKey:
    cluster: str
    kind: str
    name: str

    def __post_init__(self) -> None:
        check_name("cluster", self.cluster)
        if self.kind not in KINDS:
            raise AgentProtocolError(f"unknown process kind {self.kind!r} "
                                     f"(kinds: {', '.join(KINDS)})")
        check_name("process name", self.name)

    def path(self) -> str:
        """The process's folder, relative to the agent's root."""
        return f"clusters/{self.cluster}/{self.kind}/{self.name}"


@dataclass(frozen=True)
class ProcessSpec:
    key: ProcessKey
    config: str  # the JSON the process reads with --config
    keep: bool = True  # restart it if it exits (until told to stop)

    def to_json(self) -> dict[str, Any]:
        return {"config": self.config, "keep": self.keep}

    @classmethod
    def from_json(cls, key: ProcessKey, data: Any) -> ProcessSpec:
        if not isinstance(data, dict) or not isinstance(data.get("config"), str):
            raise AgentProtocolError("a process spec is {\"config\": \"<json>\", \"keep\": "
                                     "true|false}")
        return cls(key, data["config"], bool(data.get("keep", True)))


@dataclass(frozen=True)
class ProcessReport:
    cluster: str
    kind: str
    name: str
    pid: int | None
    alive: bool
    keep: bool
    restarts: int = 0
    # A PostgreSQL server's usage with its backends (the host's own /proc: the control
    # plane cannot read another machine's): CPU seconds, bytes read and written.
    cpu_s: float | None = None
    read_bytes: int | None = None
    write_bytes: int | None = None

    @property
    def key(self) -> ProcessKey:
        return ProcessKey(self.cluster, self.kind, self.name)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ProcessReport:
        return cls(**data)


@dataclass(frozen=True)
class AgentInfo:
    host: str
    az: str
    address: str
    port: int
    root: str  # where the agent keeps processes' files
    boot_id: str  # changes when the machine restarts
    pid: int
    processes: list[ProcessReport] = field(default_factory=list)
    memory_available: int | None = None  # bytes the host can still give

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["processes"] = [p.to_json() for p in self.processes]
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> AgentInfo:
        procs = [ProcessReport.from_json(p) for p in data.get("processes", [])]
        return cls(**{**data, "processes": procs})


@dataclass(frozen=True)
class Identity:
    """What an agent receives when it joins, and keeps (owner-only) to serve with."""

    host: str
    az: str
    address: str
    port: int
    cert_pem: str
    key_pem: str
    ca_pem: str
    control_url: str

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Identity:
        return cls(**data)


def make_token(secret: str, ca_fingerprint: str) -> str:
    token = f"{secret}.{ca_fingerprint}"
    parse_token(token)
    return token


def parse_token(token: str) -> tuple[str, str]:
    """(secret, CA fingerprint) of a join token."""
    m = _TOKEN.match(token.strip())
    if not m:
        raise AgentProtocolError("a join token is <32 hex digits>.<64 hex digits>, as "
                                 "`borealis host add` prints it")
    return m.group(1), m.group(2)
