"""What the supervisor does about one cluster, given what it observed: pure.

``decide(observation) -> actions``. The observation is a frozen value: the rows, which
processes run, what the storage nodes and the volume client last said, the writer
checks, the base image and the clocks, all as plain values. The actions say what to do
and why; the sentence in ``why`` is what goes into the cluster's events. Nothing here
does I/O or reads a clock: :mod:`borealis.control.supervisor` observes and acts, and
``tests/unit/test_decide.py`` (table cases, properties, a seeded simulation) tests the
rules without a process.

Invariants (checked by :func:`check` after every decision, in production too):
- at most one of {fail over, rebuild the writer, restart the writer in place} a tick;
- never a failover or a rebuild unless a read quorum of storage nodes answers (with
  fewer, no new writer could know the end of the log);
- a writer that runs, passes its checks (:class:`~borealis.control.failover_rules.
  WriterWatch` already forgives a busy writer its volume client still hears) and whose
  volume takes its WAL is left alone;
- no base image is asked for while one is being taken.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from borealis.control.lifecycle import InstanceState
from borealis.protocol.volume import WRITER_BEHIND_VOLUME
from borealis.volume.quorum import READ_QUORUM, WRITE_QUORUM

NODE_MISSES = 3  # failed status checks in a row before a node counts as not answering
WRITER_MISSES = 3  # failed writer checks in a row before the writer counts as lost
VOLUME_STALL_S = 3.0  # VDL standing still with WAL waiting, storage tier answering
# A node counts as answering the stall question only if it answered this recently: the
# stall's start is known to a tick (a node that froze just after it may have answered
# since), its freezing to a check round (1 s at most, every 0.5 s).
NODE_FRESH_S = 2.0

I = InstanceState  # noqa: E741 - short name for the many comparisons


# -- what was observed --------------------------------------------------------------------

@dataclass(frozen=True)
class InstanceView:
    id: str
    role: str  # "writer" or "reader"
    az: str
    state: InstanceState
    alive: bool  # its server's process runs
    # It answered a connection this tick (asked only while it is starting).
    accepts: bool = False
    storage_node: str | None = None  # the node a reader streams from


@dataclass(frozen=True)
class NodeView:
    id: str
    az: str
    alive: bool  # its process runs
    misses: int = 0  # status checks it failed in a row (frozen, cut off)
    answered_at: float | None = None  # when it last answered one (monotonic seconds)

    @property
    def answering(self) -> bool:
        return self.alive and self.misses < NODE_MISSES


@dataclass(frozen=True)
class VolumeView:
    """The volume client of the cluster's current epoch, as its status file says."""

    client_alive: bool
    epoch: int | None = None  # the epoch its status is about
    stopped: str | None = None  # why it stopped, if it did
    vdl: int = 0
    stalled_s: float = 0.0  # how long VDL has stood still with WAL waiting
    writer_heard_at: float | None = None  # when the writer last answered it (wall clock)


@dataclass(frozen=True)
class ImageView:
    """The cluster's base image: the local copy and the object store's."""

    age_s: float | None = None  # of the local image; None: there is none
    start_lsn: int | None = None  # where its WAL begins
    stored: bool = False  # the object store holds one
    wanted: bool = False  # a new one is asked for however recent (after a backtrack)
    in_flight: bool = False  # one is being taken now
    failed_ago_s: float | None = None  # since the last attempt failed


@dataclass(frozen=True)
class Rules:
    """The knobs the rules read (from :class:`borealis.settings.Settings`)."""

    base_image_interval_s: float = 3600.0
    base_image_wal_bytes: int = 1 << 30
    base_image_retry_s: float = 30.0
    prune_interval_s: float = 60.0


@dataclass(frozen=True)
class ClusterObservation:
    name: str
    epoch: int
    now_s: float  # monotonic
    instances: tuple[InstanceView, ...]
    nodes: tuple[NodeView, ...]
    volume: VolumeView
    writer_misses: int = 0  # writer checks failed in a row (WriterWatch)
    image: ImageView = ImageView()
    pruned_ago_s: float | None = None  # None: never in this run
    rules: Rules = Rules()
    preferred_nodes: frozenset[str] = frozenset()  # the nodes a failover sealed
    paused: bool = False  # Serverless v2 at 0 ACU: its servers are stopped on purpose

    @property
    def writer(self) -> InstanceView | None:
        return next((i for i in self.instances if i.role == "writer"), None)

    @property
    def readers(self) -> list[InstanceView]:
        return [i for i in self.instances if i.role == "reader"]

    @property
    def answering_nodes(self) -> list[NodeView]:
        return [n for n in self.nodes if n.answering]


# -- what to do -----------------------------------------------------------------------------

@dataclass(frozen=True)
class Action:
    why: str = field(default="", kw_only=True)


@dataclass(frozen=True)
class RestartNode(Action):
    node_id: str


@dataclass(frozen=True)
class StartVolumeClient(Action):
    writer_id: str


@dataclass(frozen=True)
class FailOver(Action):
    """Promote a reader (the old writer is fenced, stopped and rebuilt as a reader)."""

    writer_id: str


@dataclass(frozen=True)
class RebuildWriter(Action):
    """No reader to promote: a new writer from the base image and the volume's WAL."""

    writer_id: str


@dataclass(frozen=True)
class RestartWriterInPlace(Action):
    """Neither a reader nor a base image: start the writer again on its own data."""

    writer_id: str
    stop_first: bool  # its process still runs (frozen): stop it first
    announce: bool  # say so in the events (not for a writer already known to be down)


@dataclass(frozen=True)
class Hold(Action):
    """Nothing can be done for the writer now; the reason is told once."""


@dataclass(frozen=True)
class MarkAvailable(Action):
    instance_id: str


@dataclass(frozen=True)
class RebuildReader(Action):
    instance_id: str


@dataclass(frozen=True)
class RestartReader(Action):
    instance_id: str


@dataclass(frozen=True)
class RepointReader(Action):
    instance_id: str
    node_id: str


@dataclass(frozen=True)
class TakeBaseImage(Action):
    source_id: str


@dataclass(frozen=True)
class Prune(Action):
    """Apply the backup retention window and tell the nodes what WAL they keep."""


WRITER_ACTIONS = (FailOver, RebuildWriter, RestartWriterInPlace)


# -- the rules ------------------------------------------------------------------------------

def decide(obs: ClusterObservation) -> list[Action]:
    actions: list[Action] = [RestartNode(n.id, why=f"storage node {n.id} was down; restarted")
                             for n in obs.nodes if not n.alive]
    writer = obs.writer
    if writer is None or obs.paused:  # a paused cluster keeps its volume, nothing else
        return actions
    if writer.state in (I.DELETING, I.CREATING, I.FAILED):
        # Operations hold the cluster's lock while they run (the supervisor waits): one
        # that failed left these, to be retried or looked at, not to be restarted.
        return actions + [Hold(why=f"writer {writer.id} is {writer.state}")]
    lost = _writer_lost_because(obs, writer)
    if lost is not None:
        return actions + [_replace_writer(obs, writer, lost)]
    if writer.state != I.AVAILABLE:
        if not writer.accepts:
            return actions  # starting: wait for it
        actions.append(MarkAvailable(writer.id))
    if not obs.volume.client_alive:
        return actions + [StartVolumeClient(writer.id)]
    if _volume_stalled(obs):
        return actions + [_replace_writer(
            obs, writer, "it cannot reach a write quorum of storage nodes (no commit "
                         f"became durable in {VOLUME_STALL_S:g} s)")]
    source = _base_image_source(obs)
    if source is not None:
        actions.append(TakeBaseImage(source, why="the base image is due"))
    if obs.pruned_ago_s is None or obs.pruned_ago_s >= obs.rules.prune_interval_s:
        actions.append(Prune())
    for reader in obs.readers:
        actions += _reader_actions(obs, reader)
    return actions


def _writer_lost_because(obs: ClusterObservation, writer: InstanceView) -> str | None:
    if not writer.alive:
        return "its process is gone"
    if obs.writer_misses >= WRITER_MISSES:
        return "it does not answer"
    if writer.state != I.AVAILABLE and not writer.accepts:
        return None  # starting
    if _behind_volume(obs):
        return ("its log ends below the volume's durable end (its host crashed?); it is "
                "rebuilt from the volume")
    return None


def _behind_volume(obs: ClusterObservation) -> bool:
    """The current epoch's volume client stopped because the writer's log ends below
    the VDL: following that writer would cut acknowledged WAL."""
    volume = obs.volume
    return ((volume.stopped or "").startswith(WRITER_BEHIND_VOLUME)
            and volume.epoch == obs.epoch and not volume.client_alive)


def _replace_writer(obs: ClusterObservation, writer: InstanceView, why: str) -> Action:
    """Fail over to a reader, or with none rebuild the writer from the base image; with
    neither, restart it in place. Never without a read quorum of storage nodes."""
    reason = f"writer {writer.id}: {why}"
    promotable = [r for r in obs.readers if r.state == I.AVAILABLE and r.alive]
    can_replace = writer.state in (I.AVAILABLE, I.STOPPED)
    if can_replace and (promotable or obs.image.age_s is not None):
        if len(obs.answering_nodes) < READ_QUORUM:
            return Hold(why=f"{reason}; only {len(obs.answering_nodes)} storage nodes "
                            f"answer, a failover needs {READ_QUORUM}")
        if promotable:
            return FailOver(writer.id, why=reason)
        return RebuildWriter(writer.id, why=reason)
    return RestartWriterInPlace(writer.id, stop_first=writer.alive,
                                announce=writer.state in (I.AVAILABLE, I.STARTING),
                                why=f"{reason}; restarting it in place")


def _volume_stalled(obs: ClusterObservation) -> bool:
    """VDL stood still for VOLUME_STALL_S with WAL waiting, while a write quorum of
    nodes answered since the stall began: the writer's side is cut off, not the
    storage tier (with the quorum lost, no writer would do better)."""
    volume = obs.volume
    if volume.stopped or volume.stalled_s < VOLUME_STALL_S:
        return False
    since = max(obs.now_s - volume.stalled_s, obs.now_s - NODE_FRESH_S)
    fresh = [n for n in obs.nodes if n.alive and n.answered_at is not None
             and n.answered_at >= since]
    return len(fresh) >= WRITE_QUORUM


def _base_image_source(obs: ClusterObservation) -> str | None:
    """Keep the base image recent, so rebuilding a writer replays little WAL; taken
    from a reader when there is one (the writer has enough to do)."""
    image, rules, writer = obs.image, obs.rules, obs.writer
    assert writer is not None
    much_wal = (image.start_lsn is not None
                and obs.volume.vdl - image.start_lsn > rules.base_image_wal_bytes)
    if (not image.wanted and image.age_s is not None and image.age_s < rules.base_image_interval_s
            and image.stored and not much_wal):
        return None
    if (writer.state != I.AVAILABLE or image.in_flight
            or (image.failed_ago_s is not None
                and image.failed_ago_s < rules.base_image_retry_s)):
        return None
    readers = [r for r in obs.readers if r.state == I.AVAILABLE and r.alive]
    return (readers[0] if readers else writer).id


def _reader_actions(obs: ClusterObservation, reader: InstanceView) -> list[Action]:
    if reader.state == I.REBUILDING:
        return [RebuildReader(reader.id)]
    if reader.state in (I.CREATING, I.FAILED, I.DELETING):
        return []  # an operation owns it (or left it to look at)
    if not reader.alive:
        return [RestartReader(reader.id, why=f"reader {reader.id} is down; restarting it")]
    actions: list[Action] = []
    target = repoint_target(reader, obs.nodes, obs.preferred_nodes)
    if target is not None:
        actions.append(RepointReader(reader.id, target))
    if reader.state in (I.STARTING, I.REBOOTING) and reader.accepts:
        actions.append(MarkAvailable(reader.id))
    return actions


def reader_node(reader_az: str, current: str | None, nodes: Sequence[NodeView],
                preferred: frozenset[str] = frozenset()) -> str:
    """The node a reader streams from: an answering one (of the sealed ones during a
    failover), in its own AZ if there is one; its current node if that qualifies."""
    assert nodes, "a cluster has storage nodes"
    running = [n for n in nodes if n.answering] or list(nodes)
    if preferred:
        running = [n for n in running if n.id in preferred] or running
    same_az = [n for n in running if n.az == reader_az]
    kept = [n for n in (same_az or running) if n.id == current]
    return (kept or same_az or running)[0].id


def repoint_target(reader: InstanceView, nodes: Sequence[NodeView],
                   preferred: frozenset[str] = frozenset()) -> str | None:
    """Where to move a reader whose node is down, frozen or (during a failover) not one
    that holds the sealed log; None while its node serves."""
    node = next((n for n in nodes if n.id == reader.storage_node), None)
    if node is not None and node.answering and (not preferred or node.id in preferred):
        return None
    return reader_node(reader.az, reader.storage_node, nodes, preferred)


def check(obs: ClusterObservation, actions: Sequence[Action]) -> None:
    """The invariants of a decision (see the module's docstring); raises AssertionError."""
    writer_moves = [a for a in actions if isinstance(a, WRITER_ACTIONS)]
    assert len(writer_moves) <= 1, f"{obs.name}: more than one writer action: {writer_moves}"
    if any(isinstance(a, (FailOver, RebuildWriter)) for a in actions):
        assert len(obs.answering_nodes) >= READ_QUORUM, \
            f"{obs.name}: a failover with {len(obs.answering_nodes)} storage nodes answering"
    writer = obs.writer
    if writer_moves and writer is not None and writer.alive:
        assert (obs.writer_misses >= WRITER_MISSES or _behind_volume(obs)
                or _volume_stalled(obs)), \
            f"{obs.name}: a writer that runs and passes its checks was replaced"
    if obs.paused:
        assert all(isinstance(a, RestartNode) for a in actions), \
            f"{obs.name}: a paused cluster's servers were touched: {actions}"
    if obs.image.in_flight:
        assert not any(isinstance(a, TakeBaseImage) for a in actions), \
            f"{obs.name}: a second base image while one is being taken"
