"""A cluster's endpoints as the control plane keeps them: rows in SQLite, the proxy
process, and the config file the proxy watches.

Every cluster has a WRITER endpoint (named like the cluster), a READER endpoint
(``<cluster>-ro``) and one INSTANCE endpoint per instance; up to five CUSTOM endpoints
are created, modified and deleted by users.

A cluster on hosts has, besides the proxy here (loopback addresses, one shared port), a
proxy on every joined host, run by its agent: there each endpoint but the instance
endpoints listens on the host's address with a port of its own (``host_port``), so any
host's address reaches any endpoint. A host's proxy steers to the servers on that host
and forwards to the others; TLS goes through it end to end (servers refuse plain
connections from anywhere but their own loopback).
"""

from __future__ import annotations

import contextlib
import dataclasses
import signal
import time
from pathlib import Path
from typing import Any

from psycopg.conninfo import make_conninfo

from borealis import processes
from borealis.agent.client import AgentRefused, AgentUnreachable
from borealis.control.cluster import ClusterRuntime
from borealis.control.handle import ClusterError
from borealis.control.host_processes import LOCAL_ADDRESS
from borealis.control.hosts import Host
from borealis.control.placement import HOST_PROXY, LOCAL
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
# Names for the endpoints (``<endpoint>.borealis.internal``) to put in /etc/hosts or a DNS
# zone (``borealis hosts-file``): an instance endpoint is named after its instance, so a
# failover-aware driver finds instances with the pattern ``?.borealis.internal``.
DNS_SUFFIX = "borealis.internal"
APPLY_TIMEOUT_S = 2.0  # the proxy reads its config every 0.1 s

# (home, cluster, host) -> the config last given to that host's proxy: a supervisor tick
# calls an agent only when its proxy's config changed (or the proxy is not running).
_PUSHED: dict[tuple[str, str, str], str] = {}


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

    def backends(self, lag_ms: dict[str, int | None], here: str = LOCAL) -> list[Backend]:
        """The instances as the proxy on ``here`` (this machine, or a host) sees them."""
        out = []
        for inst in self.state.instances(self.rt.name):
            available = inst.state == "available" and self.rt.instance_alive(inst)
            # The kernel steers only to servers on the proxy's own machine (it borrows
            # their listening sockets); the proxy forwards to the others.
            beside = inst.host == here
            out.append(Backend(inst.id, self.rt.hosted.address(inst.host), inst.port,
                               inst.role, available,
                               lag_ms.get(inst.id, 0) if inst.role == "reader" else 0,
                               inst.pid if available and beside else None))
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

    # -- the proxies on hosts ------------------------------------------------------------------

    def on_hosts(self) -> bool:
        return any(n.host != LOCAL for n in self.state.storage_nodes(self.rt.name))

    def proxy_hosts(self) -> list[Host]:
        """Where a proxy of the cluster runs besides here: every joined host."""
        if not self.on_hosts():
            return []
        return [h for h in self.rt.hosts.hosts() if h.joined]

    def host_config(self, host: Host, lag_ms: dict[str, int | None]) -> ProxyConfig:
        max_lag = self.rt.settings.endpoint_max_lag_ms
        specs = tuple(dataclasses.replace(_spec(e, max_lag), host=host.address,
                                          port=e.host_port)
                      for e in self.state.endpoints(self.rt.name) if e.host_port)
        return ProxyConfig(self.rt.name, specs, tuple(self.backends(lag_ms, host.name)),
                           hold_timeout_s=self.rt.settings.endpoint_hold_s)

    def keep_host_proxies(self, lag_ms: dict[str, int | None]) -> None:
        """Every joined host runs the cluster's proxy with the config as it is now. A
        host that is away is left alone: its agent keeps the proxy it had running, and
        the proxy gets the config when the host answers again."""
        hosted = self.rt.hosted
        key = hosted.key(*HOST_PROXY)
        for host in self.proxy_hosts():
            if not hosted.reachable(host.name):
                continue
            text = self.host_config(host, lag_ms).to_json()
            pushed = (str(self.state.home), self.rt.name, host.name)
            running = hosted.alive(host.name, key)
            if running and _PUSHED.get(pushed) == text:
                continue
            try:
                if running:
                    hosted.reload(host.name, key, text)
                else:
                    hosted.ensure(host.name, key, text)
                    self.rt.event("endpoint", f"endpoint proxy started on {host.name}")
            except (AgentUnreachable, AgentRefused) as exc:
                _PUSHED.pop(pushed, None)
                self.rt.event("endpoint", f"endpoint proxy on {host.name}: {exc}")
                continue
            _PUSHED[pushed] = text

    def _hosts_applied(self, deadline: float) -> bool:
        """Until every answering host's proxy applied the config it was last given."""
        key = self.rt.hosted.key(*HOST_PROXY)
        for host in self.proxy_hosts():
            text = _PUSHED.get((str(self.state.home), self.rt.name, host.name))
            if text is None:
                continue
            wanted = config_digest(text).encode()
            while (applied := self.rt.hosted.read_file(host.name, key, APPLIED_FILE)
                   ) is not None and applied != wanted:
                if time.monotonic() > deadline:
                    return False
                time.sleep(0.02)
        return True

    def stop_host_proxies(self) -> None:
        """Stop and forget the proxies on hosts (one on a host that is away goes with
        the host sweep when it answers again)."""
        key = self.rt.hosted.key(*HOST_PROXY)
        for host in self.rt.hosts.hosts():
            _PUSHED.pop((str(self.state.home), self.rt.name, host.name), None)
            if host.joined and self.rt.hosted.reachable(host.name):
                with contextlib.suppress(AgentUnreachable, AgentRefused):
                    self.rt.hosted.stop(host.name, key, forget=True)

    def hosts_dsn(self, row: EndpointRow, hosts: list[Host]) -> str | None:
        """The endpoint through the proxies of every host (any of them routes it)."""
        if not row.host_port or not hosts:
            return None
        c = self.rt.cluster
        return make_conninfo(
            host=",".join(h.address for h in hosts), port=row.host_port,
            user=c.master_user, password=c.master_password, dbname="postgres",
            connect_timeout=2, sslmode="verify-full",
            sslrootcert=str(self.rt.hosts.ca_file()))

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
        hosts = self.proxy_hosts()
        out = []
        for row in self.state.endpoints(self.rt.name):
            spec = _spec(row, self.rt.settings.endpoint_max_lag_ms)
            m = metrics.get(spec.name, {})
            out.append({
                "name": spec.name, "type": spec.type, "host": spec.host, "port": spec.port,
                "dns_name": f"{spec.name}.{DNS_SUFFIX}",
                "members": [b.id for b in members(spec, backends)],
                # What the running proxy routes to now (it follows the config within a
                # fraction of a second; empty until it serves the endpoint).
                "routed_to": list(m.get("members", [])),
                "dsn": make_conninfo(host=spec.host, port=spec.port, user=c.master_user,
                                     password=c.master_password, dbname="postgres"),
                "multi_host_dsn": self.multi_host_dsn(spec, backends),
                # On hosts: every host's address, at this port, reaches the endpoint.
                "hosts": [h.address for h in hosts] if row.host_port else [],
                "host_port": row.host_port if hosts else None,
                "hosts_dsn": self.hosts_dsn(row, hosts),
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
                    return self._hosts_applied(deadline)
            if time.monotonic() > deadline:
                return False
            time.sleep(0.01)
        return False

    def stop_proxy(self) -> None:
        processes.stop(self.state.proxy_pid(self.rt.name), str(self.config_path),
                       signal.SIGTERM, timeout_s=10)
        self.state.set_proxy_pid(self.rt.name, None)
        self.stop_host_proxies()


def _spec(row: EndpointRow, max_lag_ms: int) -> EndpointSpec:
    return EndpointSpec(row.name, row.type, row.port, row.custom_type, tuple(row.static),
                        tuple(row.excluded), row.instance, max_lag_ms, row.host)
