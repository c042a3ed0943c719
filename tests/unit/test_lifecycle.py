"""The lifecycle tables, and the state store refusing any move they do not allow."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from borealis.control import lifecycle
from borealis.control.lifecycle import (
    CLUSTER_MOVES,
    INSTANCE_MOVES,
    ClusterStatus,
    IllegalTransition,
    InstanceState,
)
from borealis.control.state import State

I = InstanceState  # noqa: E741
C = ClusterStatus


def reachable(moves: dict[lifecycle.S, frozenset[lifecycle.S]], start: lifecycle.S
              ) -> set[lifecycle.S]:
    seen, todo = {start}, [start]
    while todo:
        for nxt in moves[todo.pop()]:
            if nxt not in seen:
                seen.add(nxt)
                todo.append(nxt)
    return seen


def test_every_state_has_a_row_and_every_row_names_known_states() -> None:
    assert set(INSTANCE_MOVES) == set(InstanceState)
    assert set(CLUSTER_MOVES) == set(ClusterStatus)


def test_every_instance_state_is_reachable_from_creating_and_can_reach_deleting() -> None:
    assert reachable(INSTANCE_MOVES, I.CREATING) == set(InstanceState)
    for state in InstanceState:
        assert I.DELETING in reachable(INSTANCE_MOVES, state), state


def test_every_cluster_status_is_reachable_from_creating_and_can_reach_deleting() -> None:
    assert reachable(CLUSTER_MOVES, C.CREATING) == set(ClusterStatus)
    for status in ClusterStatus:
        assert C.DELETING in reachable(CLUSTER_MOVES, status), status


def test_an_instance_being_deleted_never_serves_again() -> None:
    assert reachable(INSTANCE_MOVES, I.DELETING) == {I.DELETING, I.STOPPED} | reachable(
        INSTANCE_MOVES, I.STOPPED)  # it only stops: the failover of a deleted writer
    with pytest.raises(IllegalTransition):
        lifecycle.check_instance("x", "deleting", "available")


def test_an_instance_is_available_only_after_its_server_started() -> None:
    for state in InstanceState:
        if I.AVAILABLE in INSTANCE_MOVES[state]:
            assert state in (I.STARTING, I.REBOOTING), state


@given(st.sampled_from(list(InstanceState)), st.sampled_from(list(InstanceState)))
def test_check_instance_agrees_with_the_table(at: InstanceState, to: InstanceState) -> None:
    if at == to or to in INSTANCE_MOVES[at]:
        assert lifecycle.check_instance("x", at, to) == to
    else:
        with pytest.raises(IllegalTransition):
            lifecycle.check_instance("x", at, to)


def test_unknown_states_are_refused() -> None:
    with pytest.raises(IllegalTransition, match="unknown state"):
        lifecycle.check_cluster("c", "available", "sleeping")


def test_the_state_store_refuses_a_move_the_table_does_not_allow(tmp_path: Path) -> None:
    state = State(tmp_path)
    state.create_cluster("c")
    inst = state.add_instance("c", "writer", "az-a", 0)
    state.set_instance(inst.id, state=I.STARTING, pid=42)
    state.set_instance(inst.id, state=I.AVAILABLE)
    state.set_instance(inst.id, state=I.DELETING)
    with pytest.raises(IllegalTransition, match="deleting -> available"):
        state.set_instance(inst.id, state=I.AVAILABLE, pid=43)
    after = state.instance(inst.id)
    assert after is not None and after.state == "deleting" and after.pid == 42  # untouched
    state.set_instance(inst.id, pid=None)  # fields other than the state: no check
    state.set_cluster("c", status=C.AVAILABLE)
    with pytest.raises(IllegalTransition):
        state.set_cluster("c", status=C.CREATING)
    cluster = state.cluster("c")
    assert cluster is not None and cluster.status == "available"
