"""A model of one cluster for the seeded simulation of the supervisor's rules.

Processes are values: an instance's server runs, is frozen or is dead; a storage node
runs, is frozen or is dead. A nemesis changes them at random; the model turns its state
into the observation the real supervisor would make, and carries out ``decide``'s
actions the way the real actors do (a failover fences a read quorum, stops the old
writer for good, promotes a reader under a new epoch). Virtual time: a tick is
``TICK_S``; nothing sleeps.

What the model tracks beyond the observation, to check what the rules must guarantee:
which processes could commit (a writer's server that runs and whose epoch the storage
tier has not fenced), so "never two writers" is checked on the model, not on the
decision.
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass, field

from borealis.control import decide as d
from borealis.control.lifecycle import InstanceState
from borealis.volume.quorum import READ_QUORUM, WRITE_QUORUM

I = InstanceState  # noqa: E741
TICK_S = 0.5
RUNNING, FROZEN, DEAD = "running", "frozen", "dead"
AZS = ("az-a", "az-b", "az-c")


@dataclass
class Server:
    id: str
    role: str
    az: str
    state: InstanceState = I.AVAILABLE
    proc: str = RUNNING
    epoch: int = 0  # for a writer: the epoch it writes under
    started_at: float = 0.0
    storage_node: str | None = None


@dataclass
class Node:
    id: str
    az: str
    proc: str = RUNNING
    misses: int = 0
    answered_at: float | None = 0.0


@dataclass
class ClusterModel:
    rng: random.Random
    now: float = 0.0
    epoch: int = 1
    servers: dict[str, Server] = field(default_factory=dict)
    nodes: dict[str, Node] = field(default_factory=dict)
    client_alive: bool = True
    stalled_since: float | None = None
    writer_misses: int = 0
    image_age: float | None = None
    image_busy_until: float | None = None
    pruned_at: float | None = None
    trace: list[str] = field(default_factory=list)
    failovers: int = 0

    @classmethod
    def new(cls, seed: int, readers: int) -> ClusterModel:
        m = cls(random.Random(seed))
        m.servers["c-1"] = Server("c-1", "writer", "az-a", epoch=1)
        for n in range(readers):
            m.servers[f"c-{n + 2}"] = Server(f"c-{n + 2}", "reader", AZS[(n + 1) % 3],
                                             storage_node=f"sn-{AZS[(n + 1) % 3][-1]}1")
        for az in AZS:
            for i in (1, 2):
                m.nodes[f"sn-{az[-1]}{i}"] = Node(f"sn-{az[-1]}{i}", az)
        return m

    # -- the world moving on ---------------------------------------------------------------

    def writer(self) -> Server | None:
        return next((s for s in self.servers.values() if s.role == "writer"), None)

    def answering(self) -> list[Node]:
        return [n for n in self.nodes.values() if n.proc == RUNNING]

    def nemesis(self, calm: bool) -> None:
        """At most one fault a tick (none when calm); frozen things thaw in time."""
        if not calm and self.rng.random() < 0.15:
            kind = self.rng.choice(["kill-writer", "freeze-writer", "kill-reader",
                                    "freeze-reader", "kill-node", "freeze-node",
                                    "freeze-node", "kill-volume-client"])
            self._fault(kind)
        for s in self.servers.values():
            if s.proc == FROZEN and (calm or self.rng.random() < 0.1):
                s.proc = RUNNING
                self.trace.append(f"{self.now:7.1f} thaw {s.id}")
        for n in self.nodes.values():
            if n.proc == FROZEN and (calm or self.rng.random() < 0.1):
                n.proc = RUNNING
                self.trace.append(f"{self.now:7.1f} thaw {n.id}")

    def _fault(self, kind: str) -> None:
        target, _, what = kind.partition("-")
        if what == "writer":
            victims: list[Server | Node] = [s for s in self.servers.values()
                                            if s.role == "writer" and s.proc == RUNNING]
        elif what == "reader":
            victims = [s for s in self.servers.values() if s.role == "reader"
                       and s.proc == RUNNING]
        elif what == "node":
            victims = [n for n in self.nodes.values() if n.proc == RUNNING]
        else:
            if self.client_alive:
                self.client_alive = False
                self.trace.append(f"{self.now:7.1f} kill volume client")
            return
        if not victims:
            return
        victim = self.rng.choice(victims)
        victim.proc = DEAD if target == "kill" else FROZEN
        self.trace.append(f"{self.now:7.1f} {target} {victim.id}")

    def advance(self) -> None:
        """A tick of virtual time: the watchers' counts, the volume's progress."""
        self.now += TICK_S
        for n in self.nodes.values():
            if n.proc == RUNNING:
                n.misses, n.answered_at = 0, self.now
            else:
                n.misses += 1
        w = self.writer()
        probed = w is not None and w.state == I.AVAILABLE
        self.writer_misses = self.writer_misses + 1 if probed and w is not None \
            and w.proc != RUNNING else 0
        durable = len(self.answering()) >= WRITE_QUORUM
        writing = w is not None and w.proc == RUNNING and self.client_alive
        if writing and not durable:
            self.stalled_since = self.stalled_since if self.stalled_since is not None \
                else self.now
        else:
            self.stalled_since = None
        if self.image_busy_until is not None and self.now >= self.image_busy_until:
            self.image_busy_until, self.image_age = None, 0.0
        elif self.image_age is not None:
            self.image_age += TICK_S

    # -- what the supervisor would see -------------------------------------------------------

    def observe(self) -> d.ClusterObservation:
        instances = tuple(
            d.InstanceView(s.id, s.role, s.az, s.state, alive=s.proc != DEAD,
                           accepts=(s.proc == RUNNING and s.state in (I.STARTING, I.REBOOTING)
                                    and self.now - s.started_at >= 1.0),
                           storage_node=s.storage_node)
            for s in self.servers.values())
        nodes = tuple(d.NodeView(n.id, n.az, n.proc != DEAD, n.misses, n.answered_at)
                      for n in self.nodes.values())
        stalled = 0.0 if self.stalled_since is None else self.now - self.stalled_since
        return d.ClusterObservation(
            "c", self.epoch, self.now, instances, nodes,
            d.VolumeView(self.client_alive, self.epoch, None, 0, stalled),
            self.writer_misses,
            d.ImageView(age_s=self.image_age, start_lsn=0, stored=self.image_age is not None,
                        in_flight=self.image_busy_until is not None),
            None if self.pruned_at is None else self.now - self.pruned_at)

    # -- the actors ------------------------------------------------------------------------------

    def act(self, actions: list[d.Action]) -> None:
        for a in actions:
            self.trace.append(f"{self.now:7.1f}   {type(a).__name__} "
                              f"{dataclasses.asdict(a)}")
            self._act(a)

    def _act(self, a: d.Action) -> None:
        if isinstance(a, d.RestartNode):
            self.nodes[a.node_id].proc = RUNNING
        elif isinstance(a, d.StartVolumeClient):
            self.epoch += 1  # a new volume client begins a new epoch
            self.servers[a.writer_id].epoch = self.epoch
            self.client_alive = True
        elif isinstance(a, (d.FailOver, d.RebuildWriter)):
            self._fail_over(a)
        elif isinstance(a, d.RestartWriterInPlace):
            s = self.servers[a.writer_id]
            s.proc, s.state, s.started_at = RUNNING, I.STARTING, self.now
            self.writer_misses = 0
        elif isinstance(a, d.MarkAvailable):
            self.servers[a.instance_id].state = I.AVAILABLE
        elif isinstance(a, d.RebuildReader):
            w = self.writer()
            if w is not None and w.state == I.AVAILABLE:
                s = self.servers[a.instance_id]
                s.proc, s.state, s.started_at = RUNNING, I.STARTING, self.now
        elif isinstance(a, d.RestartReader):
            s = self.servers[a.instance_id]
            s.proc, s.state, s.started_at = RUNNING, I.STARTING, self.now
        elif isinstance(a, d.RepointReader):
            self.servers[a.instance_id].storage_node = a.node_id
        elif isinstance(a, d.TakeBaseImage):
            self.image_busy_until = self.now + 5.0
        elif isinstance(a, d.Prune):
            self.pruned_at = self.now

    def _fail_over(self, a: d.FailOver | d.RebuildWriter) -> None:
        """As ``failover.fail_over``: fence a read quorum (refused without one), stop
        the old writer for good, promote a reader or rebuild from the image."""
        if len(self.answering()) < READ_QUORUM:
            self.trace.append(f"{self.now:7.1f}   refused: no read quorum to fence")
            return
        self.epoch += 1  # the fence: the old writer's epoch can no longer commit
        old = self.servers[a.writer_id]
        candidates = [s for s in self.servers.values() if s.role == "reader"
                      and s.state == I.AVAILABLE and s.proc == RUNNING]
        if isinstance(a, d.FailOver) and not candidates:
            self.trace.append(f"{self.now:7.1f}   refused: no reader to promote")
            return
        old.proc, old.state = DEAD, I.STOPPED
        if isinstance(a, d.FailOver):
            new = candidates[0]
            new.role = "writer"
            old.role, old.state = "reader", I.REBUILDING
        else:
            new = old
        self.epoch += 1  # the new writer's volume client
        new.state, new.proc, new.epoch, new.started_at = I.AVAILABLE, RUNNING, self.epoch, self.now
        self.client_alive, self.writer_misses, self.stalled_since = True, 0, None
        self.failovers += 1

    # -- what must always hold -----------------------------------------------------------------

    def committers(self) -> list[str]:
        """Servers that could acknowledge a commit now: a writer's server that runs and
        whose epoch is the storage tier's current one."""
        return [s.id for s in self.servers.values()
                if s.role == "writer" and s.proc != DEAD and s.epoch == self.epoch]

    def check(self) -> None:
        writers = [s.id for s in self.servers.values() if s.role == "writer"]
        assert len(writers) <= 1, f"two writers in the rows: {writers}"
        assert len(self.committers()) <= 1, f"two servers can commit: {self.committers()}"
