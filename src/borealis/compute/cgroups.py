"""CPU and memory limits for one server and everything it forks, through the kernel's
control groups: cgroup v2 where the unified hierarchy offers the ``cpu`` and ``memory``
controllers (``cpu.max``, ``memory.high``, ``memory.max``); else the v1 ``cpu`` and
``memory`` hierarchies (``cpu.cfs_quota_us``, ``memory.soft_limit_in_bytes``,
``memory.limit_in_bytes``); else none, and :func:`detect` says why.

A server's group is named after the Borealis home and the instance, so two homes on one
machine never share one. Its postmaster is moved in right after it starts, before it
forks its children (:func:`place`; they are born in the group), and any process of its
tree found outside is moved in again at the next sample; the group is removed when the
server has stopped.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

CPU_PERIOD_US = 100_000


@dataclass(frozen=True)
class Support:
    kind: str  # "v2", "v1", or "" when the limits cannot be set
    reason: str  # what is missing, when kind is ""
    v2_root: Path | None = None
    cpu_root: Path | None = None  # v1
    memory_root: Path | None = None  # v1

    def describe(self) -> str:
        return f"cgroup {self.kind}" if self.kind else f"settings only ({self.reason})"


def _mounts(mounts_text: str) -> list[tuple[Path, str, set[str]]]:
    out = []
    for line in mounts_text.splitlines():
        fields = line.split()
        if len(fields) >= 4 and fields[2] in ("cgroup", "cgroup2"):
            out.append((Path(fields[1]), fields[2], set(fields[3].split(","))))
    return out


def _own_groups(cgroup_text: str) -> dict[str, str]:
    """This process's group in each hierarchy (``/proc/self/cgroup``): by controller
    name for v1, under ``""`` for v2."""
    out: dict[str, str] = {}
    for line in cgroup_text.splitlines():
        _id, controllers, path = line.split(":", 2)
        for name in controllers.split(",") if controllers else [""]:
            out[name] = path
    return out


def detect(home: Path, mounts_text: str | None = None, cgroup_text: str | None = None
           ) -> Support:
    """Where this machine lets Borealis (root) set a server's limits, with a parent
    group per home made ready (below the control plane's own group, so whatever limits
    the control plane still holds its servers); a machine without says why."""
    if os.geteuid() != 0:
        return Support("", "the control plane does not run as root")
    try:
        mounts_text = mounts_text or Path("/proc/self/mounts").read_text()
        cgroup_text = cgroup_text or Path("/proc/self/cgroup").read_text()
    except OSError as exc:
        return Support("", f"no control groups: {exc}")
    mounts, own, name = _mounts(mounts_text), _own_groups(cgroup_text), _home_group(home)
    reason = "no cgroup v2 hierarchy offers the cpu and memory controllers"
    for path, kind, _opts in mounts:
        if kind != "cgroup2":
            continue
        try:
            offered = set((path / "cgroup.controllers").read_text().split())
        except OSError:
            continue
        if {"cpu", "memory"} <= offered:
            try:
                return Support("v2", "", v2_root=_enable_v2(path, own.get("", "/"), name))
            except OSError as exc:
                reason = f"cgroup v2 at {path} refused a group: {exc.strerror}"
    v1 = {c: next((p for p, k, o in mounts if k == "cgroup" and c in o), None)
          for c in ("cpu", "memory")}
    if None in v1.values():
        return Support("", reason + ", and no cgroup v1 cpu and memory hierarchies")
    roots = [_below(mount, own.get(c, "/")) / name for c, mount in v1.items()
             if mount is not None]
    try:
        for root in roots:
            root.mkdir(exist_ok=True)
    except OSError as exc:
        return Support("", f"{reason}; cgroup v1 refused a group: {exc.strerror}")
    return Support("v1", "", cpu_root=roots[0], memory_root=roots[1])


def _below(mount: Path, own: str) -> Path:
    """The process's own group in a hierarchy mounted at ``mount``, if it shows there
    (a namespaced mount shows only its own subtree, at its root)."""
    candidate = mount / own.lstrip("/")
    return candidate if candidate.is_dir() else mount


_SUPPORT: dict[Path, Support] = {}


def support_for(home: Path) -> Support:
    """:func:`detect`, once per home in a process (the controller and the code that
    starts servers share it)."""
    if home not in _SUPPORT:
        _SUPPORT[home] = detect(home)
    return _SUPPORT[home]


def known_support(home: Path) -> Support | None:
    """The support found for ``home`` in this process, if it was looked for."""
    return _SUPPORT.get(home)


def place(home: Path, instance_id: str, pid: int) -> bool:
    """Move a server that just started into its group, before its postmaster forks its
    children (they are born in the group); whether there was a group to move it to."""
    support = support_for(home)
    if not support.kind:
        return False
    group = ServerGroup(support, instance_id)
    group.ensure()
    group.adopt([pid])
    return True


def remove_home_groups(support: Support) -> None:
    """The home's groups whose servers have stopped, and the home's parent groups once
    empty (a server still running keeps its group, and so its parent)."""
    for root in (support.v2_root, support.cpu_root, support.memory_root):
        if root is None:
            continue
        with contextlib.suppress(OSError):
            for child in root.iterdir():
                if child.is_dir():
                    with contextlib.suppress(OSError):
                        child.rmdir()
            root.rmdir()


def _home_group(home: Path) -> str:
    return "borealis-" + hashlib.sha256(str(home.resolve()).encode()).hexdigest()[:10]


def _enable_v2(mount: Path, own: str, name: str) -> Path:
    """The home's group, with cpu and memory handed down to the servers' groups: below
    the control plane's own group where v2 allows it (a group holding processes may not
    hand controllers down), else at the top of the hierarchy."""
    last: OSError | None = None
    for parent in dict.fromkeys([_below(mount, own), mount]):
        try:
            (parent / "cgroup.subtree_control").write_text("+cpu +memory")
            group = parent / name
            group.mkdir(exist_ok=True)
            (group / "cgroup.subtree_control").write_text("+cpu +memory")
            return group
        except OSError as exc:
            last = exc
    assert last is not None
    raise last


@dataclass(frozen=True)
class Applied:
    """The limits a group has now, read back from the kernel."""

    cpu_cores: float | None  # None: no CPU limit
    memory_high: int | None
    memory_max: int | None


class ServerGroup:
    """One server's group (one directory under v2, two under v1)."""

    def __init__(self, support: Support, instance_id: str) -> None:
        assert support.kind, "no control groups on this machine"
        self.support = support
        if support.kind == "v2":
            assert support.v2_root is not None
            self.dirs = [support.v2_root / instance_id]
        else:
            assert support.cpu_root is not None and support.memory_root is not None
            self.dirs = [support.cpu_root / instance_id, support.memory_root / instance_id]

    @property
    def path(self) -> Path:
        return self.dirs[-1]

    def ensure(self) -> None:
        for d in self.dirs:
            d.mkdir(exist_ok=True)

    def members(self) -> set[int]:
        try:
            return {int(p) for p in (self.dirs[0] / "cgroup.procs").read_text().split()}
        except OSError:
            return set()

    def adopt(self, pids: list[int]) -> int:
        """Move these processes in (those already gone are skipped); how many moved."""
        moved = 0
        inside = [self.members()] if len(self.dirs) == 1 else [
            {int(p) for p in (d / "cgroup.procs").read_text().split()} for d in self.dirs]
        for pid in pids:
            for d, there in zip(self.dirs, inside, strict=True):
                if pid in there:
                    continue
                try:
                    (d / "cgroup.procs").write_text(str(pid))
                    moved += 1
                except OSError as exc:
                    if exc.errno != errno.ESRCH:
                        raise
        return moved

    def apply(self, cpu_cores: float, memory_high: int, memory_max: int) -> None:
        """Set the limits. Memory that would fall below what the server holds is asked
        back by the kernel first; a v1 limit it cannot reach in time stays where it was
        (OSError), to be tried again at the next sample."""
        quota = max(1000, int(cpu_cores * CPU_PERIOD_US))
        if self.support.kind == "v2":
            d = self.dirs[0]
            (d / "cpu.max").write_text(f"{quota} {CPU_PERIOD_US}")
            _write_in_order(d / "memory.max", memory_max, d / "memory.high", memory_high)
            return
        cpu, memory = self.dirs
        (cpu / "cpu.cfs_period_us").write_text(str(CPU_PERIOD_US))
        (cpu / "cpu.cfs_quota_us").write_text(str(quota))
        (memory / "memory.limit_in_bytes").write_text(str(memory_max))
        (memory / "memory.soft_limit_in_bytes").write_text(str(memory_high))

    def applied(self) -> Applied:
        if self.support.kind == "v2":
            d = self.dirs[0]
            quota, period = (d / "cpu.max").read_text().split()
            return Applied(None if quota == "max" else int(quota) / int(period),
                           _bytes((d / "memory.high").read_text()),
                           _bytes((d / "memory.max").read_text()))
        cpu, memory = self.dirs
        cfs_quota = int((cpu / "cpu.cfs_quota_us").read_text())
        cfs_period = int((cpu / "cpu.cfs_period_us").read_text())
        return Applied(None if cfs_quota < 0 else cfs_quota / cfs_period,
                       _bytes((memory / "memory.soft_limit_in_bytes").read_text()),
                       _bytes((memory / "memory.limit_in_bytes").read_text()))

    def anonymous_memory(self) -> int | None:
        """The group's own memory (not the page cache it reads the volume through)."""
        key = "anon" if self.support.kind == "v2" else "total_rss"
        with contextlib.suppress(OSError, ValueError):
            for line in (self.path / "memory.stat").read_text().splitlines():
                name, value = line.split()
                if name == key:
                    return int(value)
        return None

    def remove(self) -> bool:
        """Remove the group once its processes are gone; False while some remain."""
        for d in self.dirs:
            try:
                d.rmdir()
            except FileNotFoundError:
                continue
            except OSError as exc:
                if exc.errno == errno.EBUSY:
                    return False
                raise
        return True


def _write_in_order(max_path: Path, max_value: int, high_path: Path, high_value: int) -> None:
    """memory.high never above memory.max: the one that shrinks first goes first."""
    current_max = _bytes(max_path.read_text())
    if current_max is not None and max_value < current_max:
        high_path.write_text(str(high_value))
        max_path.write_text(str(max_value))
    else:
        max_path.write_text(str(max_value))
        high_path.write_text(str(high_value))


def _bytes(text: str) -> int | None:
    """A memory limit as the kernel shows it; None for no limit (v2 ``max``, or v1's
    largest page-aligned value)."""
    text = text.strip()
    if text == "max":
        return None
    value = int(text)
    return None if value >= (1 << 62) else value
