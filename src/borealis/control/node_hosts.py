"""Where a storage node runs, and how it is started, stopped and seen there.

A node placed on this machine (host ``""``) is a child process, known by PID and the
path of its config file (:mod:`borealis.processes`). A node placed on a host runs under
that host's agent: started with its config, stopped, and seen alive through the agent.
What the agent cannot be asked (it is down or cut off) counts as not running: the node
watcher's own probes over the network decide the rest.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

from borealis import pki, processes
from borealis.agent.client import AgentRefused, AgentUnreachable
from borealis.control.hosts import HostRegistry
from borealis.control.placement import LOCAL
from borealis.control.state import StorageNodeRow
from borealis.protocol.agent import ProcessKey, ProcessReport, ProcessSpec
from borealis.protocol.files import PeerAddress, TlsIdentity

LOCAL_ADDRESS = "127.0.0.1"
REPORTS_FRESH_S = 0.5  # one call per host per supervisor tick, not one per node
UNREACHABLE_FRESH_S = 2.0  # a cut-off host costs a tick its timeout at most this often
AGENT_CALL_S = 0.5  # an agent answers in milliseconds; the tick must not wait for one

# (home, host) -> when asked, and the agent's processes (None: it did not answer). Shared
# by every handle of the process: each supervisor tick makes new handles.
_REPORTS: dict[tuple[str, str], tuple[float, dict[ProcessKey, ProcessReport] | None]] = {}


class NodeHosts:
    def __init__(self, registry: HostRegistry, cluster: str) -> None:
        self.registry = registry
        self.cluster = cluster

    def key(self, node: StorageNodeRow) -> ProcessKey:
        return ProcessKey(self.cluster, "storage-node", node.id)

    def address(self, node: StorageNodeRow) -> str:
        """Where the node listens, and where others reach it."""
        return LOCAL_ADDRESS if node.host == LOCAL else self.registry.host(node.host).address

    def peer_address(self, node: StorageNodeRow) -> PeerAddress:
        """How to reach the node: on a host, over TLS checked against the CA."""
        remote = node.host != LOCAL
        return PeerAddress(node.id, self.address(node), node.port,
                           self.registry.ca().cert_pem if remote else None)

    def tls_identity(self, node: StorageNodeRow) -> TlsIdentity | None:
        """A node on a host serves TLS with a certificate for the host's address."""
        if node.host == LOCAL:
            return None
        ca = self.registry.ca()
        pair = pki.issue(ca, f"{self.cluster}-{node.id}", [self.address(node)])
        return TlsIdentity(pair.cert_pem, pair.key_pem, ca.cert_pem)

    def ca_pem(self, node: StorageNodeRow) -> str | None:
        return None if node.host == LOCAL else self.registry.ca().cert_pem

    def alive(self, node: StorageNodeRow, config_path: Path) -> bool:
        if node.host == LOCAL:
            return processes.alive(node.pid, str(config_path))
        reports = self._reports_of(node.host)
        if reports is None:
            # Its host is cut off or down: nothing says the process is gone, and nothing
            # could start it there. It counts as running; whether it answers is for the
            # node watcher's probes (a partitioned node misses them and is avoided), and
            # the host's agent restarts it if it did exit.
            return True
        report = reports.get(self.key(node))
        return report is not None and report.alive

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
            reports: dict[ProcessKey, ProcessReport] | None = {
                p.key: p for p in client.info().processes}
        except (AgentUnreachable, AgentRefused):
            reports = None
        _REPORTS[cache_key] = (now, reports)
        return reports

    def start_remote(self, node: StorageNodeRow, config_json: str) -> int | None:
        """Have the node's host run it with this config (kept running by the agent);
        returns its PID there."""
        assert node.host != LOCAL
        client = self.registry.client(self.registry.host(node.host))
        report = client.ensure(ProcessSpec(self.key(node), config_json, keep=True))
        _REPORTS.pop((str(self.registry.state.home), node.host), None)
        return report.pid

    def stop(self, node: StorageNodeRow, config_path: Path, sig: int = signal.SIGTERM,
             forget: bool = False) -> None:
        """Stop the node (SIGKILL after 10 s); ``forget`` also removes it and its files
        from a host (a local node's files go with the cluster's folder)."""
        if node.host == LOCAL:
            processes.stop(node.pid, str(config_path), sig, timeout_s=10)
            return
        client = self.registry.client(self.registry.host(node.host))
        try:
            client.stop(self.key(node), signal.Signals(sig).name.removeprefix("SIG"),
                        timeout_s=10, forget=forget)
        except AgentUnreachable:
            if forget:
                raise
        _REPORTS.pop((str(self.registry.state.home), node.host), None)
