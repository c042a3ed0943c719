"""Processes the control plane starts and later re-adopts, known by PID and command line.

A PID alone can be reused; a process is "ours" only if its ``/proc/<pid>/cmdline``
still contains the marker we recorded (a config or data directory path).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from borealis import settings
from borealis.logfiles import private_log

_CLK_TCK = os.sysconf("SC_CLK_TCK")


def current_boot_id() -> str:
    """This boot of the machine (the kernel's random boot id): it changes at every boot.
    ``BOREALIS_BOOT_ID`` stands for it in tests (a machine "rebooted")."""
    override = settings.current().boot_id
    if override:
        return override
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return "unknown"


@dataclass(frozen=True)
class Usage:
    """What a process and everything under it used so far: CPU seconds and bytes read
    from and written to storage (``/proc/PID/io``)."""

    cpu_s: float
    read_bytes: int
    write_bytes: int


def tree_usage(pid: int) -> Usage | None:
    """``pid``'s usage with its descendants' (a postmaster: its backends and workers);
    None if it is gone."""
    parents: dict[int, int] = {}
    cpu: dict[int, float] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(entry)] = int(fields[1])
        cpu[int(entry)] = (int(fields[11]) + int(fields[12])) / _CLK_TCK
    if pid not in cpu:
        return None
    total_cpu, read, written, frontier = 0.0, 0, 0, [pid]
    while frontier:
        p = frontier.pop()
        total_cpu += cpu.get(p, 0.0)
        with contextlib.suppress(OSError, ValueError):
            io = dict(line.split(": ") for line in
                      Path(f"/proc/{p}/io").read_text().splitlines())
            read += int(io["read_bytes"])
            written += int(io["write_bytes"])
        frontier.extend(c for c, parent in parents.items() if parent == p)
    return Usage(total_cpu, read, written)


def anonymous_memory(pid: int) -> int:
    """Bytes of ``pid``'s own memory in RAM (``RssAnon``: neither files nor shared
    memory, which its siblings count too); 0 if it is gone."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    return 0


def available_memory() -> int | None:
    """Bytes of memory this machine can give without swapping (``MemAvailable``)."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return None


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(
            errors="replace")
    except OSError:
        return ""


def is_zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


def alive(pid: int | None, marker: str) -> bool:
    if not pid:
        return False
    if marker not in cmdline(pid) or is_zombie(pid):
        reap(pid)
        return False
    return True


def children(pid: int) -> list[int]:
    """Direct children of ``pid`` (PostgreSQL's backends lead their own process groups,
    so signalling the postmaster's group does not reach them)."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            out.append(int(entry))
    return out


def kill_tree(pid: int, marker: str, sig: int = signal.SIGKILL) -> None:
    """Signal a process we own and its children (a frozen postmaster and its backends)."""
    if not alive(pid, marker):
        return
    family = [pid, *children(pid)]
    for member in family:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(member, sig)


def find(marker: str) -> list[int]:
    """Running processes whose command line holds ``marker`` (a config or data
    directory path): ours even when no PID was recorded for them (a control plane
    killed between starting one and recording it)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != os.getpid() and marker in cmdline(int(entry)) \
                and not is_zombie(int(entry)):
            found.append(int(entry))
    return found


def working_in(directory: Path, executable: Path) -> list[int]:
    """Processes running ``executable`` with ``directory`` as their working directory.

    A PostgreSQL server's postmaster and every process it forks work in its data
    directory, and a backend whose postmaster was killed runs on (a query does not look
    for its postmaster; a backend waiting on a lock the dead server's other processes
    held never wakes), so this finds them when the parent link no longer does."""
    where, program = os.path.realpath(directory), os.path.realpath(executable)
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            if (os.readlink(f"/proc/{entry}/cwd") == where
                    and os.readlink(f"/proc/{entry}/exe") == program):
                found.append(int(entry))
        except OSError:
            continue  # gone, or not ours to look at
    return found


def kill_all(pids: list[int], timeout_s: float = 10.0) -> list[int]:
    """SIGKILL every process in ``pids`` (frozen ones included) and wait until each is
    gone or a zombie; returns those still there at the deadline."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + timeout_s
    left = pids
    while left and time.monotonic() < deadline:
        for pid in left:
            reap(pid)
        left = [pid for pid in left if not is_zombie(pid)]
        if left:
            time.sleep(0.02)
    return left


def reap(pid: int) -> None:
    """Collect an exited child of ours, if it is one."""
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


def stop(pid: int | None, marker: str, sig: int = signal.SIGTERM, timeout_s: float = 30.0,
         kill_group: bool = False) -> None:
    """Signal a process by PID and wait for it to go; SIGKILL it after the timeout."""
    if not alive(pid, marker):
        return
    assert pid is not None
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not alive(pid, marker):
            return
        time.sleep(0.05)
    if kill_group:
        kill_tree(pid, marker)
    else:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    while alive(pid, marker):
        time.sleep(0.05)


def spawn_python(module: str, args: list[str], log_path: Path) -> int:
    """Start ``python -m module`` in its own session (it outlives the control plane)."""
    with private_log(log_path) as log:
        proc = subprocess.Popen([sys.executable, "-m", module, *args], stdout=log, stderr=log,
                                stdin=subprocess.DEVNULL, start_new_session=True, cwd="/")
    return proc.pid
