"""Processes on hosts: started, reconfigured, stopped and seen through each host's agent.

Whatever runs on this machine (host ``""``) is a child process known by PID and a path
in its command line (:mod:`borealis.processes`), handled by its owner; this module is
for the rest. What the agent cannot be asked (it is down or cut off) counts as running:
nothing says the process is gone, and nothing could start it there. Whether it answers
is for the probes over the network (a partitioned storage node misses them and is
avoided; a writer that answers nothing is failed over), and the agent restarts a
process to keep that exited.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

from borealis import pki
from borealis.agent.client import AgentRefused, AgentUnreachable
from borealis.control.hosts import HostRegistry
from borealis.control.placement import LOCAL
from borealis.protocol.agent import ProcessKey, ProcessReport, ProcessSpec
from borealis.protocol.files import TlsIdentity

LOCAL_ADDRESS = "127.0.0.1"
REPORTS_FRESH_S = 0.5  # one call per host per supervisor tick, not one per process
UNREACHABLE_FRESH_S = 2.0  # a cut-off host costs a tick its timeout at most this often
AGENT_CALL_S = 0.5  # an agent answers in milliseconds; the tick must not wait for one

# (home, host) -> when asked, and the agent's processes (None: it did not answer). Shared
# by every handle of the process: each supervisor tick makes new handles.
_REPORTS: dict[tuple[str, str], tuple[float, dict[ProcessKey, ProcessReport] | None]] = {}
_MEMORY: dict[tuple[str, str], int | None] = {}  # (home, host) -> bytes available there


class HostProcesses:
    def __init__(self, registry: HostRegistry, cluster: str) -> None:
        self.registry = registry
        self.cluster = cluster

    def key(self, kind: str, name: str) -> ProcessKey:
        return ProcessKey(self.cluster, kind, name)

    def address(self, host: str) -> str:
        """Where processes on ``host`` listen, and where others reach them."""
        return LOCAL_ADDRESS if host == LOCAL else self.registry.host(host).address

    def ca_pem(self, host: str) -> str | None:
        """The CA whose certificates processes on ``host`` present (None: this machine,
        plain TCP on the loopback)."""
        return None if host == LOCAL else self.registry.ca().cert_pem

    def tls_identity(self, host: str, name: str, every_host: bool = False
                     ) -> TlsIdentity | None:
        """A certificate for the host's address, named after the process; with
        ``every_host``, for every host's address too (a PostgreSQL server: a client's
        TLS goes through the endpoint proxy of whichever host it dialled, and checks
        the server's certificate against that host's address)."""
        if host == LOCAL:
            return None
        ca = self.registry.ca()
        addresses = [self.address(host)]
        if every_host:
            addresses += sorted({h.address for h in self.registry.hosts()} - {addresses[0]})
        pair = pki.issue(ca, f"{self.cluster}-{name}", addresses)
        return TlsIdentity(pair.cert_pem, pair.key_pem, ca.cert_pem)

    def alive(self, host: str, key: ProcessKey) -> bool:
        assert host != LOCAL
        reports = self._reports_of(host)
        if reports is None:
            return True  # cut off or down: see the module's docstring
        report = reports.get(key)
        return report is not None and report.alive

    def report(self, host: str, key: ProcessKey) -> ProcessReport | None:
        """What the host's agent last said of the process (None: nothing, or away)."""
        reports = self._reports_of(host)
        return None if reports is None else reports.get(key)

    def memory_available(self, host: str) -> int | None:
        self._reports_of(host)
        return _MEMORY.get((str(self.registry.state.home), host))

    def reachable(self, host: str) -> bool:
        """Whether the host's agent answers (asked at most every half second)."""
        return host == LOCAL or self._reports_of(host) is not None

    def _reports_of(self, host: str) -> dict[ProcessKey, ProcessReport] | None:
        """The host agent's processes, or None if the agent does not answer."""
        now = time.monotonic()
        cache_key = (str(self.registry.state.home), host)
        cached = _REPORTS.get(cache_key)
        if cached and now - cached[0] < (REPORTS_FRESH_S if cached[1] is not None
                                         else UNREACHABLE_FRESH_S):
            return cached[1]
        client = self.registry.client(self.registry.host(host))
        client.timeout_s = AGENT_CALL_S
        try:
            info = client.info()
            reports: dict[ProcessKey, ProcessReport] | None = {
                p.key: p for p in info.processes}
            _MEMORY[cache_key] = info.memory_available
        except (AgentUnreachable, AgentRefused):
            reports = None
        _REPORTS[cache_key] = (now, reports)
        return reports

    def _forget_reports(self, host: str) -> None:
        _REPORTS.pop((str(self.registry.state.home), host), None)

    def ensure(self, host: str, key: ProcessKey, config_json: str, keep: bool = True
               ) -> int | None:
        """Have ``host`` run the process with this config (kept running by its agent
        when ``keep``) unless it runs already; returns its PID there."""
        assert host != LOCAL
        client = self.registry.client(self.registry.host(host))
        report = client.ensure(ProcessSpec(key, config_json, keep=keep))
        self._forget_reports(host)
        return report.pid

    def reload(self, host: str, key: ProcessKey, config_json: str) -> bool:
        """A new config for the process; a running server applies it at once."""
        client = self.registry.client(self.registry.host(host))
        return client.reload(ProcessSpec(key, config_json))

    def stop(self, host: str, key: ProcessKey, sig: int = signal.SIGTERM,
             timeout_s: float = 10.0, forget: bool = False) -> None:
        """Stop the process (SIGKILL after the timeout); ``forget`` also removes it and
        its files from the host. An unreachable host is no error unless ``forget``
        (and is not waited for: a failover stopping a cut-off writer goes on at once)."""
        if not forget and self._reports_of(host) is None:
            return
        client = self.registry.client(self.registry.host(host))
        try:
            client.stop(key, signal.Signals(sig).name.removeprefix("SIG"), timeout_s=timeout_s,
                        forget=forget)
        except AgentUnreachable:
            if forget:
                raise
        self._forget_reports(host)

    def install_data(self, host: str, key: ProcessKey, archive: Path) -> None:
        """A stopped server's data directory on ``host``, from a tar archive here."""
        client = self.registry.client(self.registry.host(host))
        client.install_data(key, archive)
        self._forget_reports(host)

    def read_file(self, host: str, key: ProcessKey, name: str) -> bytes | None:
        """One of the files the agent lets be read (``status.json``, ``process.log``);
        None if the host is away (not asked again while it is known to be)."""
        if self._reports_of(host) is None:
            return None
        client = self.registry.client(self.registry.host(host))
        client.timeout_s = AGENT_CALL_S
        try:
            return client.read_file(key, name)
        except (AgentUnreachable, AgentRefused):
            return None
