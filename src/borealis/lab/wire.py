"""Latency between the lab's AZs, made in user space: ``borealis lab delay MS``.

A kernel without the netem queue (``sch_netem``) cannot delay packets in ``tc``; this
process does it for the one path that matters, between hosts of different AZs. In each
server host's namespace it opens a TUN device (``bwire``) and routes there every other
AZ's host address (``/32``, more specific than the lab's subnet on the bridge). A packet
the kernel sends into one host's device comes out of the destination host's device
``MS`` later: once per direction, as netem on each host's link would do it. Traffic
within an AZ, and to the client and the control plane, stays on the bridge, undelayed.

Partitions hold: a packet from or to a host whose link to the bridge is down (``lab
partition``) is dropped, as the bridge would. When the process ends, its devices go
with it (a TUN device lives as long as its file), and with them the routes: traffic is
back on the bridge with no delay.

Two threads: one reads every device (``epoll``) and queues each packet with the time it
is due; one writes them out when due. A thread sleeps to the microsecond; an event loop
would round each wait up to the next millisecond.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import ctypes
import fcntl
import os
import select
import signal
import struct
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from borealis.fsync import write_atomic
from borealis.lab import netns
from borealis.lab.plan import Lab, LabHost

DEVICE = "bwire"
_TUNSETIFF = 0x400454CA
_IFF_TUN = 0x0001
_IFF_NO_PI = 0x1000
_CLONE_NEWNET = 0x40000000
_LINK_CHECK_S = 0.05  # how stale a partition may be seen
_MAX_QUEUED = 100_000  # packets in flight at most; more are dropped, as a full queue does


@dataclass
class Port:
    host: LabHost
    fd: int


def _setns(path: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(path, os.O_RDONLY)
    try:
        if libc.setns(fd, _CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns {path}: {os.strerror(err)}")
    finally:
        os.close(fd)


def open_device(namespace: str) -> int:
    """A TUN device inside ``namespace``, held by this process (the calling thread
    enters the namespace for the open and comes back)."""
    own = f"/proc/self/task/{threading.get_native_id()}/ns/net"
    back = os.open(own, os.O_RDONLY)
    try:
        _setns(f"/run/netns/{namespace}")
        try:
            fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
            fcntl.ioctl(fd, _TUNSETIFF, struct.pack("16sH", DEVICE.encode(),
                                                    _IFF_TUN | _IFF_NO_PI))
        finally:
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.setns(back, _CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "could not return to this namespace")
    finally:
        os.close(back)
    return fd


def route_commands(lab: Lab) -> list[list[str]]:
    """Each server host: the device up, every host of another AZ routed through it."""
    cmds = []
    for h in lab.servers():
        ns = ["ip", "-n", h.namespace]
        cmds.append([*ns, "link", "set", DEVICE, "up"])
        cmds += [[*ns, "route", "replace", f"{o.address}/32", "dev", DEVICE, "src", h.address]
                 for o in lab.servers() if o.az != h.az]
    return cmds


class Wire:
    def __init__(self, lab: Lab, delay_s: float) -> None:
        self.delay_s = delay_s
        self.ports = {h.address: Port(h, open_device(h.namespace)) for h in lab.servers()}
        self.by_fd = {p.fd: p for p in self.ports.values()}
        # Every packet waits as long: one queue in arrival order is in due order.
        self.queue: collections.deque[tuple[float, Port, bytes]] = collections.deque()
        self.due = threading.Condition()
        self.links_up: dict[str, bool] = {}
        self.links_seen = 0.0
        self.stopping = False

    def _link_up(self, host: LabHost) -> bool:
        now = time.monotonic()
        if now - self.links_seen > _LINK_CHECK_S:
            self.links_seen = now
            self.links_up = {}
        up = self.links_up.get(host.veth_bridge)
        if up is None:
            try:
                flags = int(Path(f"/sys/class/net/{host.veth_bridge}/flags").read_text(), 16)
                up = bool(flags & 1)  # IFF_UP: `lab partition` sets the link down
            except (OSError, ValueError):
                up = False
            self.links_up[host.veth_bridge] = up
        return up

    def read_all(self) -> None:
        poller = select.epoll()
        for fd in self.by_fd:
            poller.register(fd, select.EPOLLIN)
        while not self.stopping:
            for fd, _ in poller.poll(0.2):
                self._drain(self.by_fd[fd])

    def _drain(self, source: Port) -> None:
        while True:
            try:
                packet = os.read(source.fd, 65536)
            except BlockingIOError:
                return
            if len(packet) < 20 or packet[0] >> 4 != 4:
                continue  # IPv4 only: the lab has no other
            target = self.ports.get(".".join(str(b) for b in packet[16:20]))
            if (target is None or len(self.queue) >= _MAX_QUEUED
                    or not (self._link_up(source.host) and self._link_up(target.host))):
                continue
            with self.due:
                self.queue.append((time.monotonic() + self.delay_s, target, packet))
                self.due.notify()

    def write_due(self) -> None:
        while not self.stopping:
            with self.due:
                if not self.queue:
                    self.due.wait(0.2)
                    continue
                wait = self.queue[0][0] - time.monotonic()
                if wait > 0:
                    self.due.wait(wait)
                    continue
                _, port, packet = self.queue.popleft()
            with contextlib.suppress(OSError):  # full or down: lost, as on a link
                os.write(port.fd, packet)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m borealis.lab.wire")
    parser.add_argument("--lab-dir", type=Path, required=True)
    parser.add_argument("--delay-ms", type=float, required=True)
    args = parser.parse_args()
    lab = netns.load(args.lab_dir.parent.parent, args.lab_dir.name)
    wire = Wire(lab, args.delay_ms / 1000)
    for cmd in route_commands(lab):
        subprocess.run(cmd, check=True, capture_output=True)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    threads = [threading.Thread(target=wire.read_all, daemon=True),
               threading.Thread(target=wire.write_due, daemon=True)]
    for t in threads:
        t.start()
    write_atomic(args.lab_dir / "wire.ready", str(os.getpid()))
    stop.wait()
    wire.stopping = True


if __name__ == "__main__":
    main()
