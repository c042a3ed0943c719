"""The supervisor's rules without a process: table cases and properties over any
observation (the seeded simulation is in ``test_simulation.py``)."""

from __future__ import annotations

import dataclasses

from hypothesis import given, settings
from hypothesis import strategies as st

from borealis.control import decide as d
from borealis.control.lifecycle import InstanceState
from borealis.protocol.volume import WRITER_BEHIND_VOLUME

I = InstanceState  # noqa: E741
AZS = ("az-a", "az-b", "az-c")
NOW = 1000.0


def nodes(frozen: int = 0, dead: int = 0) -> tuple[d.NodeView, ...]:
    out = []
    for n, (az, i) in enumerate((az, i) for az in AZS for i in (1, 2)):
        node_id = f"sn-{az[-1]}{i}"
        if n < dead:
            out.append(d.NodeView(node_id, az, alive=False, misses=5))
        elif n < dead + frozen:
            out.append(d.NodeView(node_id, az, alive=True, misses=5, answered_at=NOW - 30))
        else:
            out.append(d.NodeView(node_id, az, alive=True, misses=0, answered_at=NOW - 0.2))
    return tuple(out)


def writer(state: InstanceState = I.AVAILABLE, alive: bool = True,
           accepts: bool = False) -> d.InstanceView:
    return d.InstanceView("c-1", "writer", "az-a", state, alive, accepts)


def reader(n: int = 2, state: InstanceState = I.AVAILABLE, alive: bool = True,
           node: str | None = None, az: str = "az-b") -> d.InstanceView:
    return d.InstanceView(f"c-{n}", "reader", az, state, alive,
                          storage_node=node or f"sn-{az[-1]}1")


def healthy(**changes: object) -> d.ClusterObservation:
    obs = d.ClusterObservation(
        name="c", epoch=7, now_s=NOW, instances=(writer(), reader()), nodes=nodes(),
        volume=d.VolumeView(client_alive=True, epoch=7, vdl=5 << 20),
        image=d.ImageView(age_s=60, start_lsn=4 << 20, stored=True), pruned_ago_s=1.0)
    return dataclasses.replace(obs, **changes)  # type: ignore[arg-type]


def kinds(actions: list[d.Action]) -> list[str]:
    return [type(a).__name__ for a in actions]


# -- table cases ---------------------------------------------------------------------------

def test_a_healthy_cluster_is_left_alone() -> None:
    assert d.decide(healthy()) == []


def test_a_dead_storage_node_is_restarted_and_nothing_else_changes() -> None:
    assert kinds(d.decide(healthy(nodes=nodes(dead=1)))) == ["RestartNode"]


def test_a_paused_cluster_keeps_its_volume_and_nothing_else() -> None:
    stopped = (writer(I.STOPPED, alive=False), reader(state=I.STOPPED, alive=False))
    paused = healthy(instances=stopped, paused=True,
                     volume=d.VolumeView(client_alive=False, epoch=7, vdl=5 << 20))
    assert d.decide(paused) == []
    actions = d.decide(dataclasses.replace(paused, nodes=nodes(dead=2)))
    assert kinds(actions) == ["RestartNode", "RestartNode"]
    d.check(paused, actions)


def test_a_dead_writer_with_a_reader_is_failed_over() -> None:
    actions = d.decide(healthy(instances=(writer(alive=False), reader())))
    assert kinds(actions) == ["FailOver"]
    assert actions[0].why == "writer c-1: its process is gone"


def test_a_dead_writer_without_a_reader_is_rebuilt_from_the_base_image() -> None:
    assert kinds(d.decide(healthy(instances=(writer(alive=False),)))) == ["RebuildWriter"]


def test_a_dead_writer_without_reader_or_image_is_restarted_in_place() -> None:
    actions = d.decide(healthy(instances=(writer(alive=False),), image=d.ImageView()))
    assert actions == [d.RestartWriterInPlace("c-1", stop_first=False, announce=True,
                                              why=actions[0].why)]


def test_no_failover_without_a_read_quorum_of_nodes() -> None:
    actions = d.decide(healthy(instances=(writer(alive=False), reader()),
                               nodes=nodes(frozen=2, dead=2)))
    assert kinds(actions) == ["RestartNode", "RestartNode", "Hold"]
    assert "only 2 storage nodes answer" in actions[-1].why


def test_a_writer_failing_its_checks_is_failed_over_even_while_its_process_runs() -> None:
    actions = d.decide(healthy(writer_misses=d.WRITER_MISSES))
    assert kinds(actions) == ["FailOver"] and "does not answer" in actions[0].why


def test_a_starting_writer_is_waited_for_then_marked_available() -> None:
    waiting = healthy(instances=(writer(I.STARTING),),
                      volume=d.VolumeView(client_alive=False))
    assert d.decide(waiting) == []
    up = dataclasses.replace(waiting, instances=(writer(I.STARTING, accepts=True),))
    assert kinds(d.decide(up)) == ["MarkAvailable", "StartVolumeClient"]


def test_a_stalled_volume_fails_over_only_if_a_write_quorum_answered_since() -> None:
    stalled = d.VolumeView(client_alive=True, epoch=7, vdl=5 << 20, stalled_s=5.0)
    assert kinds(d.decide(healthy(volume=stalled))) == ["FailOver"]
    # Three nodes froze (that is why VDL stands still): no other writer would do better.
    assert kinds(d.decide(healthy(volume=stalled, nodes=nodes(frozen=3)))) == [
        "RepointReader"]  # its node froze too
    short = dataclasses.replace(stalled, stalled_s=d.VOLUME_STALL_S - 0.1)
    assert kinds(d.decide(healthy(volume=short))) == []


def test_a_writer_behind_the_volume_is_replaced_not_followed() -> None:
    behind = d.VolumeView(client_alive=False, epoch=7,
                          stopped=f"{WRITER_BEHIND_VOLUME}: 0/100 < 0/200")
    assert kinds(d.decide(healthy(volume=behind))) == ["FailOver"]
    old_epoch = dataclasses.replace(behind, epoch=6)  # an earlier epoch's report
    assert kinds(d.decide(healthy(volume=old_epoch))) == ["StartVolumeClient"]


def test_base_images_are_taken_from_a_reader_when_due_and_one_at_a_time() -> None:
    actions = d.decide(healthy(image=d.ImageView()))
    assert actions == [d.TakeBaseImage("c-2", why="the base image is due")]
    assert d.decide(healthy(image=d.ImageView(in_flight=True))) == []
    assert d.decide(healthy(image=d.ImageView(failed_ago_s=5))) == []
    much_wal = d.ImageView(age_s=60, start_lsn=0, stored=True)
    big = healthy(image=much_wal, volume=d.VolumeView(client_alive=True, epoch=7,
                                                      vdl=(1 << 30) + 1))
    assert kinds(d.decide(big)) == ["TakeBaseImage"]


def test_readers_are_rebuilt_restarted_and_moved_off_frozen_nodes() -> None:
    obs = healthy(instances=(writer(), reader(2, I.REBUILDING), reader(3, alive=False),
                             reader(4, node="sn-b1", az="az-b")),
                  nodes=nodes(dead=0, frozen=3))  # sn-a1, sn-a2, sn-b1 frozen
    actions = d.decide(obs)
    assert d.RebuildReader("c-2") in actions
    assert any(isinstance(a, d.RestartReader) and a.instance_id == "c-3" for a in actions)
    assert d.RepointReader("c-4", "sn-b2") in actions


def test_instances_an_operation_owns_are_not_touched() -> None:
    actions = d.decide(healthy(instances=(writer(I.DELETING, alive=False), reader())))
    assert kinds(actions) == ["Hold"]
    actions = d.decide(healthy(instances=(writer(), reader(state=I.DELETING, alive=False))))
    assert actions == []


def test_a_reader_follows_its_own_az_and_a_failover_s_sealed_nodes() -> None:
    all_nodes = nodes()
    assert d.reader_node("az-c", None, all_nodes) == "sn-c1"
    assert d.reader_node("az-c", "sn-c2", all_nodes) == "sn-c2"
    assert d.reader_node("az-c", "sn-c2", all_nodes, frozenset({"sn-a1", "sn-b2"})) == "sn-a1"
    # Nothing answers: any node at all beats none.
    assert d.reader_node("az-c", None, nodes(dead=6)) == "sn-c1"


# -- properties over any observation ----------------------------------------------------------

states = st.sampled_from(list(InstanceState))


@st.composite
def observations(draw: st.DrawFn) -> d.ClusterObservation:
    insts = [d.InstanceView("c-1", "writer", "az-a", draw(states), draw(st.booleans()),
                            draw(st.booleans()))]
    for n in range(draw(st.integers(0, 3))):
        az = draw(st.sampled_from(AZS))
        insts.append(d.InstanceView(f"c-{n + 2}", "reader", az, draw(states),
                                    draw(st.booleans()), draw(st.booleans()),
                                    draw(st.sampled_from([None, "sn-a1", "sn-b2", "sn-c1"]))))
    node_views = tuple(
        d.NodeView(f"sn-{az[-1]}{i}", az, draw(st.booleans()), draw(st.integers(0, 5)),
                   draw(st.one_of(st.none(), st.floats(NOW - 20, NOW))))
        for az in AZS for i in (1, 2))
    volume = d.VolumeView(
        client_alive=draw(st.booleans()), epoch=draw(st.sampled_from([None, 6, 7])),
        stopped=draw(st.sampled_from([None, "writer gone", WRITER_BEHIND_VOLUME + ": x"])),
        vdl=draw(st.integers(0, 1 << 32)), stalled_s=draw(st.floats(0, 10)))
    image = d.ImageView(age_s=draw(st.one_of(st.none(), st.floats(0, 1e4))),
                        start_lsn=draw(st.one_of(st.none(), st.integers(0, 1 << 32))),
                        stored=draw(st.booleans()), wanted=draw(st.booleans()),
                        in_flight=draw(st.booleans()),
                        failed_ago_s=draw(st.one_of(st.none(), st.floats(0, 100))))
    return d.ClusterObservation(
        "c", 7, NOW, tuple(insts), node_views, volume, draw(st.integers(0, 5)), image,
        draw(st.one_of(st.none(), st.floats(0, 100))))


@settings(max_examples=600)
@given(observations())
def test_every_decision_keeps_the_invariants(obs: d.ClusterObservation) -> None:
    actions = d.decide(obs)
    d.check(obs, actions)  # at most one writer action, quorum, busy writer, one image
    assert [a.node_id for a in actions if isinstance(a, d.RestartNode)] == \
        [n.id for n in obs.nodes if not n.alive]
    touched = {getattr(a, "instance_id", getattr(a, "writer_id", None)) for a in actions}
    deleting = {i.id for i in obs.instances if i.state == I.DELETING}
    assert not touched & deleting, "an instance being deleted was acted on"
    for a in actions:
        if isinstance(a, d.MarkAvailable):
            inst = next(i for i in obs.instances if i.id == a.instance_id)
            assert inst.alive and inst.accepts


@given(observations())
def test_a_writer_that_runs_and_passes_its_checks_is_left_alone(
        obs: d.ClusterObservation) -> None:
    w = obs.writer
    assert w is not None
    quiet = dataclasses.replace(
        obs, writer_misses=0, instances=(dataclasses.replace(w, alive=True, state=I.AVAILABLE),
                                         *obs.readers),
        volume=dataclasses.replace(obs.volume, stalled_s=0.0, stopped=None))
    assert not any(isinstance(a, (*d.WRITER_ACTIONS, d.Hold)) for a in d.decide(quiet))


def test_a_stall_counts_only_nodes_that_answered_lately() -> None:
    # Three nodes froze just after the stall's clock started: their last answers came
    # after it began, but seconds ago; they must not make a write quorum.
    stalled = d.VolumeView(client_alive=True, epoch=7, vdl=5 << 20, stalled_s=3.5)
    late = tuple(dataclasses.replace(n, answered_at=NOW - 3.2) if i < 3 else n
                 for i, n in enumerate(nodes()))
    assert kinds(d.decide(healthy(volume=stalled, nodes=late))) == []
