"""Hosts: the places the control plane can run a cluster's processes, and the trust
between them.

A host is added by name, address and AZ; it joins when its agent presents the one-time
secret of its token, and receives a certificate for its address, signed by the
deployment's CA (made once, kept in the state). The control plane calls agents with a
client certificate of its own from the same CA.

Kept in the ``hosts`` table of the state database (:mod:`.state` makes it), behind
:class:`HostRegistry`, so a consensus store can later serve the same calls.

Invariants: a join secret is stored only as its hash and works once; a host that holds
a cluster's process is never removed.
"""

from __future__ import annotations

import hashlib
import ipaddress
import json
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

from borealis import pki
from borealis.agent.client import AgentClient
from borealis.control.placement import HostView
from borealis.control.state import State
from borealis.fsync import write_atomic
from borealis.protocol.agent import AGENT_PORT, CONTROL_PLANE_CN, Identity, check_name, make_token

AZ_NAME = "availability zone"


class HostError(Exception):
    pass


@dataclass(frozen=True)
class Host:
    name: str
    address: str
    az: str
    port: int
    joined: float | None
    added: float

    def to_json(self) -> dict[str, object]:
        return {"name": self.name, "address": self.address, "az": self.az, "port": self.port,
                "state": "joined" if self.joined else "waiting-for-agent",
                "joined": self.joined, "added": self.added}


class HostRegistry:
    def __init__(self, state: State) -> None:
        self.state = state

    # -- trust ----------------------------------------------------------------------------

    def ca(self) -> pki.KeyPair:
        raw = self.state.setting_once("pki_ca", lambda: json.dumps(
            pki.new_ca("Borealis").__dict__))
        return pki.KeyPair(**json.loads(raw))

    def control_plane_pair(self) -> pki.KeyPair:
        """The control plane's client certificate, for calling agents."""
        ca = self.ca()  # first: setting_once takes a transaction of its own
        raw = self.state.setting_once("pki_control_plane", lambda: json.dumps(
            pki.issue(ca, CONTROL_PLANE_CN, []).__dict__))
        return pki.KeyPair(**json.loads(raw))

    def server_pair(self, address: str) -> pki.KeyPair:
        """The control plane's certificate for listening on ``address``."""
        ca = self.ca()
        raw = self.state.setting_once(f"pki_listener_{address}", lambda: json.dumps(
            pki.issue(ca, CONTROL_PLANE_CN, [address, "localhost"]).__dict__))
        return pki.KeyPair(**json.loads(raw))

    def ca_file(self) -> Path:
        """The CA certificate as a file (libpq's ``sslrootcert`` takes a path), in the
        home; public, but written once and only by us."""
        path = self.state.home / "borealis-ca.pem"
        pem = self.ca().cert_pem
        try:
            if path.read_text() == pem:
                return path
        except OSError:
            pass
        write_atomic(path, pem)
        return path

    def client(self, host: Host) -> AgentClient:
        if not host.joined:
            raise HostError(f"host {host.name} has not joined yet (start its agent with "
                            "the token `borealis host add` printed)")
        return AgentClient(host.address, host.port, self.ca().cert_pem,
                           self.control_plane_pair())

    # -- hosts ----------------------------------------------------------------------------

    def add(self, name: str, address: str, az: str, port: int = AGENT_PORT) -> str:
        """Register a host; returns the token its agent joins with."""
        check_name("host name", name)
        check_name(AZ_NAME, az)
        try:
            ipaddress.ip_address(address)
        except ValueError:
            raise HostError(f"host address {address!r} is not an IP address") from None
        if not 1 <= port <= 65535:
            raise HostError(f"port {port}: 1 to 65535")
        secret = secrets.token_hex(16)
        with self.state.transaction() as db:
            for row in db.execute("SELECT name, address FROM hosts WHERE name = ? OR "
                                  "address = ?", (name, address)):
                raise HostError(f"host {row[0]} ({row[1]}) exists already")
            db.execute("INSERT INTO hosts (name, address, az, port, join_hash, added) "
                       "VALUES (?, ?, ?, ?, ?, ?)",
                       (name, address, az, port, _hash(secret), time.time()))
        return make_token(secret, self.ca().fingerprint())

    def join(self, secret: str, control_url: str) -> Identity:
        """Exchange a token's secret (once) for the host's identity."""
        with self.state.transaction() as db:
            row = db.execute("SELECT name FROM hosts WHERE join_hash = ?",
                             (_hash(secret),)).fetchone()
            if row is None:
                raise HostError("this join token is not valid (unknown, or used already)")
            db.execute("UPDATE hosts SET join_hash = NULL, joined = ? WHERE name = ?",
                       (time.time(), row[0]))
        host = self.host(str(row[0]))
        pair = pki.issue(self.ca(), host.name, [host.address])
        return Identity(host.name, host.az, host.address, host.port, pair.cert_pem,
                        pair.key_pem, self.ca().cert_pem, control_url)

    def host(self, name: str) -> Host:
        row = self.state.db.execute("SELECT name, address, az, port, joined, added FROM hosts "
                                    "WHERE name = ?", (name,)).fetchone()
        if row is None:
            raise HostError(f"no host {name!r}")
        return Host(*row)

    def hosts(self) -> list[Host]:
        return [Host(*r) for r in self.state.db.execute(
            "SELECT name, address, az, port, joined, added FROM hosts ORDER BY az, name")]

    def placed_on(self, name: str) -> list[str]:
        """What of every cluster runs on host ``name`` (storage nodes and instances)."""
        db = self.state.db
        return [f"{c}/{i}" for c, i in db.execute(
            "SELECT cluster, id FROM storage_nodes WHERE host = ? UNION ALL "
            "SELECT cluster, id FROM instances WHERE host = ? ORDER BY 1, 2", (name, name))]

    def views(self) -> list[HostView]:
        """The joined hosts with how much each holds, for placement."""
        return [HostView(h.name, h.az, len(self.placed_on(h.name)))
                for h in self.hosts() if h.joined]

    def remove(self, name: str, holding: list[str]) -> None:
        """Forget a host; ``holding`` names the processes placed on it (refused if any)."""
        self.host(name)
        if holding:
            raise HostError(f"host {name} still holds {', '.join(holding)}: move or remove "
                            "them first")
        self.state.db.execute("DELETE FROM hosts WHERE name = ?", (name,))


def _hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()
