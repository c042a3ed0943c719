"""The lab's layout and the commands that build, break and remove it (pure)."""

from __future__ import annotations

import pytest

from borealis.lab.plan import (
    LabError,
    down_commands,
    heal_commands,
    layout,
    partition_commands,
    up_commands,
)


def test_hosts_spread_over_azs_with_a_client_last() -> None:
    lab = layout("t", 5, "10.9.0.0/24")
    assert [(h.name, h.az, h.address) for h in lab.hosts] == [
        ("az-a-1", "az-a", "10.9.0.11"), ("az-b-1", "az-b", "10.9.0.12"),
        ("az-c-1", "az-c", "10.9.0.13"), ("az-a-2", "az-a", "10.9.0.14"),
        ("az-b-2", "az-b", "10.9.0.15"), ("client", None, "10.9.0.100")]
    assert lab.gateway == "10.9.0.1"
    assert [h.name for h in lab.in_az("az-a")] == ["az-a-1", "az-a-2"]
    # Interface names fit the kernel's 15 bytes; namespaces are the lab's own.
    assert all(len(h.veth_bridge) <= 15 for h in lab.hosts) and len(lab.bridge) <= 15
    assert len({h.namespace for h in lab.hosts}) == len(lab.hosts)


@pytest.mark.parametrize("name,hosts,subnet", [
    ("Bad", 3, "10.9.0.0/24"), ("toolong7", 3, "10.9.0.0/24"), ("t", 0, "10.9.0.0/24"),
    ("t", 13, "10.9.0.0/24"), ("t", 3, "8.8.8.0/24"), ("t", 3, "10.9.0.0/25"),
    ("t", 3, "nonsense"), ("t", 3, "fd00::/64")])
def test_bad_labs_are_refused_with_a_reason(name: str, hosts: int, subnet: str) -> None:
    with pytest.raises(LabError):
        layout(name, hosts, subnet)


def test_up_and_down_cover_every_namespace_and_the_bridge() -> None:
    lab = layout("t", 3, "10.9.0.0/24")
    up = up_commands(lab)
    assert up[0] == ["ip", "link", "add", lab.bridge, "type", "bridge"]
    made = {c[3] for c in up if c[:3] == ["ip", "netns", "add"]}
    removed = {c[3] for c in down_commands(lab) if c[:3] == ["ip", "netns", "delete"]}
    assert made == removed == {h.namespace for h in lab.hosts}
    assert down_commands(lab)[-1] == ["ip", "link", "delete", lab.bridge]
    for h in lab.hosts:  # each host routes through the gateway
        assert ["ip", "-n", h.namespace, "route", "add", "default", "via", lab.gateway] in up


def test_partition_cuts_exactly_the_az_and_heal_restores_it() -> None:
    lab = layout("t", 6, "10.9.0.0/24")
    cut = partition_commands(lab, "az-b")
    assert [c[3] for c in cut] == [h.veth_bridge for h in lab.in_az("az-b")]
    assert all(c[-1] == "down" for c in cut)
    assert [c[3] for c in heal_commands(lab, "az-b")] == [c[3] for c in cut]
    with pytest.raises(LabError, match="no host in AZ"):
        partition_commands(lab, "az-z")
