"""Where storage nodes go (pure)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from borealis.control.placement import (
    LOCAL,
    HostView,
    PlacementError,
    place_instance,
    place_nodes,
    strays,
)

NODES = [(f"sn-{az}{i}", f"az-{az}") for az in "abc" for i in (1, 2)]


def test_no_hosts_keeps_everything_on_this_machine() -> None:
    assert set(place_nodes(NODES, []).values()) == {LOCAL}


def test_two_hosts_per_az_take_one_node_each() -> None:
    hosts = [HostView(f"{az}{i}", f"az-{az}", 0) for az in "abc" for i in (1, 2)]
    placed = place_nodes(NODES, hosts)
    for az in "abc":
        assert {placed[f"sn-{az}1"], placed[f"sn-{az}2"]} == {f"{az}1", f"{az}2"}


def test_an_az_without_a_host_refuses_rather_than_crowding_one_machine() -> None:
    hosts = [HostView("a1", "az-a", 0), HostView("b1", "az-b", 0)]
    with pytest.raises(PlacementError, match="no host in az-c"):
        place_nodes(NODES, hosts)


@given(st.lists(st.tuples(st.sampled_from(["az-a", "az-b", "az-c"]),
                          st.integers(0, 20)), min_size=3, max_size=12))
def test_nodes_stay_in_their_az_spread_and_on_the_least_loaded(hosts_spec: list[
        tuple[str, int]]) -> None:
    hosts = [HostView(f"h{i}", az, load) for i, (az, load) in enumerate(hosts_spec)]
    if {h.az for h in hosts} != {"az-a", "az-b", "az-c"}:
        with pytest.raises(PlacementError):
            place_nodes(NODES, hosts)
        return
    placed = place_nodes(NODES, hosts)
    by_name = {h.name: h for h in hosts}
    for node, az in NODES:
        assert by_name[placed[node]].az == az
    for az in ("az-a", "az-b", "az-c"):
        pair = {placed[n] for n, a in NODES if a == az}
        in_az = [h for h in hosts if h.az == az]
        assert len(pair) == min(2, len(in_az))  # different hosts when the AZ has two
        # The first node of the AZ went to one of its least loaded hosts.
        least = min(h.load for h in in_az)
        assert by_name[placed[f"sn-{az[-1]}1"]].load == least


def test_an_instance_goes_to_the_least_loaded_host_of_its_az() -> None:
    hosts = [HostView("a1", "az-a", 3), HostView("a2", "az-a", 1), HostView("b1", "az-b", 0)]
    assert place_instance("az-a", hosts) == "a2"
    assert place_instance("az-b", hosts) == "b1"
    assert place_instance("az-a", []) == LOCAL
    with pytest.raises(PlacementError, match="no host in az-c"):
        place_instance("az-c", hosts)


def test_strays_are_what_nothing_places_there_outside_busy_clusters() -> None:
    running = [("a", "storage-node", "sn-a1"), ("a", "postgres", "a-1"),
               ("gone", "storage-node", "sn-a1"), ("b", "volume-client", "volume")]
    expected = {("a", "storage-node", "sn-a1"), ("a", "postgres", "a-1")}
    assert strays(running, expected, busy=set()) == [("gone", "storage-node", "sn-a1"),
                                                     ("b", "volume-client", "volume")]
    assert strays(running, expected, busy={"b"}) == [("gone", "storage-node", "sn-a1")]
