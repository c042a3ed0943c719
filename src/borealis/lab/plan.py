"""The lab's network, as data: which namespaces, links and addresses make N hosts.

Pure: :func:`layout` turns a lab's name, size and subnet into :class:`Lab` (hosts, their
AZs and addresses), and the ``*_commands`` functions turn a lab into the ``ip`` and ``tc``
commands that build it, tear it down or break it. :mod:`borealis.lab.netns` runs them.

The shape: one bridge in the root namespace (the control plane's side, address ``.1``),
one namespace per host with a veth pair into the bridge (``.11``, ``.12``, ...), and a
``client`` namespace (``.100``) for programs that stand for users on another machine.
A partition cuts a host's link. A delay between AZs is made by a process of its own
(:mod:`borealis.lab.wire`), not by the bridge.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

AZS = ("az-a", "az-b", "az-c", "az-d", "az-e", "az-f")
MAX_HOSTS = 12
CLIENT = "client"
LAB_NAME = re.compile(r"^[a-z][a-z0-9]{0,5}$")  # interface names are at most 15 bytes
FIRST_HOST = 11
CLIENT_HOST = 100


class LabError(Exception):
    pass


@dataclass(frozen=True)
class LabHost:
    name: str  # "az-a-1" (the first host of AZ az-a), or "client"
    az: str | None  # None for the client
    address: str
    namespace: str
    veth_host: str  # inside the namespace
    veth_bridge: str  # in the root namespace, a port of the bridge


@dataclass(frozen=True)
class Lab:
    name: str
    subnet: str  # e.g. 10.77.0.0/24
    bridge: str
    gateway: str  # the bridge's address: the root namespace's side
    hosts: tuple[LabHost, ...]  # the client last

    @property
    def prefix(self) -> int:
        return ipaddress.ip_network(self.subnet).prefixlen

    def host(self, name: str) -> LabHost:
        for h in self.hosts:
            if h.name == name:
                return h
        raise LabError(f"no host {name!r} in lab {self.name} "
                       f"(hosts: {', '.join(h.name for h in self.hosts)})")

    def servers(self) -> tuple[LabHost, ...]:
        """The hosts that run a cluster's processes (every one but the client)."""
        return tuple(h for h in self.hosts if h.az is not None)

    def in_az(self, az: str) -> tuple[LabHost, ...]:
        found = tuple(h for h in self.servers() if h.az == az)
        if not found:
            raise LabError(f"no host in AZ {az!r} (AZs: "
                           f"{', '.join(sorted({h.az for h in self.servers() if h.az}))})")
        return found


def layout(name: str, hosts: int, subnet: str, azs: int = 3) -> Lab:
    """``hosts`` server hosts spread round-robin over ``azs`` AZs, plus the client."""
    if not LAB_NAME.match(name):
        raise LabError(f"lab name {name!r}: 1 to 6 lowercase letters or digits, "
                       "starting with a letter")
    if not 1 <= hosts <= MAX_HOSTS:
        raise LabError(f"a lab has 1 to {MAX_HOSTS} hosts, not {hosts}")
    if not 1 <= azs <= len(AZS):
        raise LabError(f"a lab has 1 to {len(AZS)} AZs, not {azs}")
    try:
        net = ipaddress.ip_network(subnet)
    except ValueError as exc:
        raise LabError(f"subnet {subnet!r}: {exc}") from None
    if not isinstance(net, ipaddress.IPv4Network) or net.prefixlen > 24 or not net.is_private:
        raise LabError(f"subnet {subnet}: a private IPv4 network of /24 or larger")
    base = net.network_address
    made: list[LabHost] = []
    per_az: dict[str, int] = {}
    for i in range(hosts):
        az = AZS[i % azs]
        per_az[az] = per_az.get(az, 0) + 1
        made.append(_host(name, f"{az}-{per_az[az]}", az, str(base + FIRST_HOST + i), i))
    made.append(_host(name, CLIENT, None, str(base + CLIENT_HOST), CLIENT_HOST))
    return Lab(name, str(net), f"bl{name}", str(base + 1), tuple(made))


def _host(lab: str, name: str, az: str | None, address: str, index: int) -> LabHost:
    return LabHost(name, az, address, f"bl-{lab}-{name}", "eth0", f"bl{lab}h{index}")


Command = list[str]


def up_commands(lab: Lab) -> list[Command]:
    """Build the lab: the bridge, then each host's namespace, link and address."""
    cmds: list[Command] = [
        ["ip", "link", "add", lab.bridge, "type", "bridge"],
        ["ip", "addr", "add", f"{lab.gateway}/{lab.prefix}", "dev", lab.bridge],
        ["ip", "link", "set", lab.bridge, "up"],
    ]
    for h in lab.hosts:
        ns = ["ip", "-n", h.namespace]
        cmds += [
            ["ip", "netns", "add", h.namespace],
            ["ip", "link", "add", h.veth_bridge, "type", "veth", "peer", "name", h.veth_host,
             "netns", h.namespace],
            ["ip", "link", "set", h.veth_bridge, "master", lab.bridge],
            ["ip", "link", "set", h.veth_bridge, "up"],
            [*ns, "addr", "add", f"{h.address}/{lab.prefix}", "dev", h.veth_host],
            [*ns, "link", "set", h.veth_host, "up"],
            [*ns, "link", "set", "lo", "up"],
            [*ns, "route", "add", "default", "via", lab.gateway],
        ]
    return cmds


def down_commands(lab: Lab) -> list[Command]:
    """Tear down in reverse; deleting a namespace deletes its end of the veth pair, and
    with it the bridge's end."""
    cmds: list[Command] = [["ip", "netns", "delete", h.namespace] for h in lab.hosts]
    cmds.append(["ip", "link", "delete", lab.bridge])
    return cmds


def partition_commands(lab: Lab, az: str) -> list[Command]:
    """Cut every host of ``az`` off the network (its link down, as a failed switch)."""
    return [["ip", "link", "set", h.veth_bridge, "down"] for h in lab.in_az(az)]


def heal_commands(lab: Lab, az: str) -> list[Command]:
    return [["ip", "link", "set", h.veth_bridge, "up"] for h in lab.in_az(az)]
