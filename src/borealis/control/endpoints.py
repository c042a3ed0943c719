"""A cluster's endpoints as the control plane keeps them: rows in SQLite, the proxy
process, and the config file the proxy watches.

Every cluster has a WRITER endpoint (named like the cluster), a READER endpoint
(``<cluster>-ro``) and one INSTANCE endpoint per instance; up to five CUSTOM endpoints
are created, modified and deleted by users.
"""

from __future__ import annotations

import contextlib
import signal
import time
from pathlib import Path
from typing import Any

from psycopg.conninfo import make_conninfo

from borealis import processes
from borealis.control.cluster import ClusterRuntime
from borealis.control.handle import ClusterError
from borealis.control.host_processes import LOCAL_ADDRESS
from borealis.control.placement import LOCAL
from borealis.control.state import EndpointRow
from borealis.endpoints.routing import client_side_order, members
from borealis.fsync import write_atomic
from borealis.protocol.files import (
    APPLIED_FILE,
    Backend,
    EndpointSpec,
    ProxyConfig,
    ProxyStatus,
    config_digest,
)

MAX_CUSTOM = 5
APPLY_TIMEOUT_S = 2.0  # the proxy reads its config every 0.1 s


class ClusterEndpoints:
    def __init__(self, rt: ClusterRuntime) -> None:
        self.rt = rt
        self.state = rt.state
        self.dir = rt.dir / "endpoints"

    @property
    def config_path(self) -> Path:
        return self.dir / "config.json"

    # -- rows ----------------------------------------------------------------------------------

    def ensure_rows(self) -> None:
        """The built-in endpoints exist; instance endpoints follow the instances."""
        name = self.rt.name
        have = {e.name: e for e in self.state.endpoints(name)}
        if name not in have:
            self.state.add_endpoint(name, name, "WRITER")
        if f"{name}-ro" not in have:
            self.state.add_endpoint(f"{name}-ro", name, "READER")
        instances = {i.id for i in self.state.instances(name)}
        for inst in instances - {e.instance for e in have.values() if e.type == "INSTANCE"}:
            if self.state.endpoint(inst) is None:
                self.state.add_endpoint(inst, name, "INSTANCE", instance=inst)
        for e in have.values():
            if e.type == "INSTANCE" and e.instance not in instances:
                self.state.delete_endpoint(e.name)

    def create(self, endpoint: str, custom_type: str, static: list[str],
               excluded: list[str]) -> EndpointRow:
        self._check_custom(custom_type, static, excluded)
        if self.state.endpoint(endpoint) is not None or self.state.cluster(endpoint):
            raise ClusterError(f"an endpoint named {endpoint!r} already exists")
        custom = [e for e in self.state.endpoints(self.rt.name) if e.type == "CUSTOM"]
        if len(custom) >= MAX_CUSTOM:
            raise ClusterError(f"a cluster has at most {MAX_CUSTOM} custom endpoints")
        self.state.add_endpoint(endpoint, self.rt.name, "CUSTOM", custom_type, static, excluded)
        self.rt.event("endpoint", f"custom endpoint {endpoint} created ({custom_type})")
        row = self.state.endpoint(endpoint)
        assert row is not None
        return row

    def modify(self, endpoint: str, custom_type: str | None, static: list[str] | None,
               excluded: list[str] | None) -> EndpointRow:
        row = self._custom(endpoint)
        self._check_custom(custom_type or row.custom_type or "ANY", static or [],
                           excluded or [])
        self.state.modify_endpoint(endpoint, custom_type, static, excluded)
        self.rt.event("endpoint", f"custom endpoint {endpoint} modified")
        fresh = self.state.endpoint(endpoint)
        assert fresh is not None
        return fresh

    def delete(self, endpoint: str) -> None:
        self._custom(endpoint)
        self.state.delete_endpoint(endpoint)
        self.rt.event("endpoint", f"custom endpoint {endpoint} deleted")

    def _custom(self, endpoint: str) -> EndpointRow:
        row = self.state.endpoint(endpoint)
        if row is None or row.cluster != self.rt.name:
            raise ClusterError(f"endpoint {endpoint!r} not found")
        if row.type != "CUSTOM":
            raise ClusterError(f"{endpoint} is a {row.type} endpoint; only custom endpoints "
                               "can be changed")
        return row

    def _check_custom(self, custom_type: str, static: list[str], excluded: list[str]) -> None:
        if custom_type not in ("READER", "ANY"):
            raise ClusterError("a custom endpoint's type is READER or ANY")
        if static and excluded:
            raise ClusterError("give either a static member list or an exclusion list")
        known = {i.id for i in self.state.instances(self.rt.name)}
        unknown = sorted((set(static) | set(excluded)) - known)
        if unknown:
            raise ClusterError(f"not instances of {self.rt.name}: {', '.join(unknown)}")

    # -- what the proxy sees ------------------------------------------------------------------

    def backends(self, lag_ms: dict[str, int | None]) -> list[Backend]:
        out = []
        for inst in self.state.instances(self.rt.name):
            available = inst.state == "available" and self.rt.instance_alive(inst)
            # The kernel steers only to servers on this machine (it borrows their
            # listening sockets); the proxy forwards to the others, on their hosts.
            local = inst.host == LOCAL
            out.append(Backend(inst.id, self.rt.hosted.address(inst.host), inst.port,
                               inst.role, available,
                               lag_ms.get(inst.id, 0) if inst.role == "reader" else 0,
                               inst.pid if available and local else None))
        return out

    def specs(self) -> list[EndpointSpec]:
        lag_ms = self.rt.settings.endpoint_max_lag_ms
        return [_spec(e, lag_ms) for e in self.state.endpoints(self.rt.name)]

    def write_config(self, lag_ms: dict[str, int | None]) -> bool:
        """Write the proxy's config if it changed; returns True when it did."""
        text = ProxyConfig(self.rt.name, tuple(self.specs()), tuple(self.backends(lag_ms)),
                           hold_timeout_s=self.rt.settings.endpoint_hold_s).to_json()
        try:
            if self.config_path.read_text() == text:
                return False
        except FileNotFoundError:
            pass
        write_atomic(self.config_path, text, make_parent=True)
        return True

    def proxy_status(self) -> dict[str, Any]:
        """What the proxy last reported for each endpoint it listens for (every 0.5 s)."""
        status = self.read_status()
        return status.endpoints if status else {}

    def read_status(self) -> ProxyStatus | None:
        try:
            return ProxyStatus.from_json((self.dir / "status.json").read_text())
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def serving(self, row: EndpointRow) -> bool:
        """The proxy listens at the endpoint's address (a new one does within a second)."""
        return bool(self.proxy_alive() and
                    self.proxy_status().get(row.name, {}).get("address") == [row.host, row.port])

    def describe(self, lag_ms: dict[str, int | None]) -> list[dict[str, Any]]:
        c = self.rt.cluster
        backends = self.backends(lag_ms)
        metrics = self.proxy_status()
        out = []
        for row in self.state.endpoints(self.rt.name):
            spec = _spec(row, self.rt.settings.endpoint_max_lag_ms)
            m = metrics.get(spec.name, {})
            out.append({
                "name": spec.name, "type": spec.type, "host": spec.host, "port": spec.port,
                "members": [b.id for b in members(spec, backends)],
                # What the running proxy routes to now (it follows the config within a
                # fraction of a second; empty until it serves the endpoint).
                "routed_to": list(m.get("members", [])),
                "dsn": make_conninfo(host=spec.host, port=spec.port, user=c.master_user,
                                     password=c.master_password, dbname="postgres"),
                "multi_host_dsn": self.multi_host_dsn(spec, backends),
                "custom_type": row.custom_type, "static": row.static,
                "excluded": row.excluded,
                "metrics": {k: m.get(k, 0) for k in ("active", "total", "bytes_in",
                                                     "bytes_out", "held", "timed_out",
                                                     "steered")},
            })
        return out

    def multi_host_dsn(self, spec: EndpointSpec, backends: list[Backend]) -> str | None:
        """For a cluster whose servers are on hosts, the writer and reader endpoints as a
        libpq multi-host connection string over the servers themselves: psql, psycopg
        and pgbench find the writer (``read-write``) or a reader (``prefer-standby``)
        by themselves after a failover, skipping a lost host after 2 s."""
        remote = [b for b in backends if b.host != LOCAL_ADDRESS]  # reachable from elsewhere
        if spec.type not in ("WRITER", "READER") or not remote:
            return None
        order = client_side_order(spec, remote)
        c = self.rt.cluster
        return make_conninfo(
            host=",".join(b.host for b in order), port=",".join(str(b.port) for b in order),
            user=c.master_user, password=c.master_password, dbname="postgres",
            target_session_attrs="read-write" if spec.type == "WRITER" else "prefer-standby",
            connect_timeout=2, sslmode="verify-full",
            sslrootcert=str(self.rt.hosts.ca_file()),
            # A server whose host vanished answers nothing, ever: the connection is
            # given up within seconds, not after TCP's quarter hour.
            keepalives=1, keepalives_idle=2, keepalives_interval=1, keepalives_count=3,
            tcp_user_timeout=5000)

    # -- the proxy process ------------------------------------------------------------------------

    def proxy_alive(self) -> bool:
        return processes.alive(self.state.proxy_pid(self.rt.name), str(self.config_path))

    def ensure_proxy(self) -> bool:
        if self.proxy_alive():
            return False
        self.dir.mkdir(parents=True, exist_ok=True)
        pid = processes.spawn_python("borealis.endpoints.proxy",
                                     ["--config", str(self.config_path)],
                                     self.dir / "proxy.log")
        self.state.set_proxy_pid(self.rt.name, pid)
        self.rt.event("endpoint", f"endpoint proxy started (pid {pid})")
        return True

    def wait_applied(self, timeout_s: float = APPLY_TIMEOUT_S) -> bool:
        """Until the running proxy has applied the config as it is now (it reads it every
        0.1 s); False when it did not in time, or none runs."""
        deadline = time.monotonic() + timeout_s
        try:
            wanted = config_digest(self.config_path.read_text())
        except OSError:
            return False
        while self.proxy_alive():
            with contextlib.suppress(OSError):  # not written yet
                if (self.dir / APPLIED_FILE).read_text() == wanted:
                    return True
            if time.monotonic() > deadline:
                return False
            time.sleep(0.01)
        return False

    def stop_proxy(self) -> None:
        processes.stop(self.state.proxy_pid(self.rt.name), str(self.config_path),
                       signal.SIGTERM, timeout_s=10)
        self.state.set_proxy_pid(self.rt.name, None)


def _spec(row: EndpointRow, max_lag_ms: int) -> EndpointSpec:
    return EndpointSpec(row.name, row.type, row.port, row.custom_type, tuple(row.static),
                        tuple(row.excluded), row.instance, max_lag_ms, row.host)
