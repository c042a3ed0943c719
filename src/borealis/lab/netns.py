"""The lab on this machine: network namespaces made, broken and removed for real.

Runs what :mod:`borealis.lab.plan` lays out, and records the lab in
``<home>/labs/<name>/lab.json`` so ``down`` removes exactly what ``up`` made (and a
half-made lab is removed when ``up`` fails). Needs root (``ip netns``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import ipaddress
import json
import os
import signal
import subprocess
import time
from pathlib import Path

from borealis import processes
from borealis.fsync import write_atomic
from borealis.lab.plan import (
    Command,
    Lab,
    LabError,
    LabHost,
    down_commands,
    heal_commands,
    layout,
    partition_commands,
    up_commands,
)

COMMAND_TIMEOUT_S = 30.0
MAX_DELAY_MS = 10_000
WIRE_START_S = 10.0


def lab_dir(home: Path, name: str) -> Path:
    return home / "labs" / name


def run(cmd: Command) -> str:
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S)
    except FileNotFoundError:
        raise LabError(f"{cmd[0]} is not installed (Debian: apt-get install iproute2)") \
            from None
    except subprocess.TimeoutExpired:
        raise LabError(f"{' '.join(cmd)} did not finish in {COMMAND_TIMEOUT_S} s") from None
    if done.returncode != 0:
        raise LabError(f"{' '.join(cmd)}: {done.stderr.strip() or done.returncode}")
    return done.stdout


def load(home: Path, name: str) -> Lab:
    try:
        data = json.loads((lab_dir(home, name) / "lab.json").read_text())
    except FileNotFoundError:
        raise LabError(f"no lab {name!r} (borealis lab up)") from None
    data["hosts"] = tuple(LabHost(**h) for h in data["hosts"])
    return Lab(**data)


def _save(home: Path, lab: Lab) -> None:
    write_atomic(lab_dir(home, lab.name) / "lab.json",
                 json.dumps(dataclasses.asdict(lab), indent=1), make_parent=True)


def up(home: Path, name: str, hosts: int, subnet: str, azs: int = 3) -> Lab:
    """Make the lab's namespaces and network; everything made is removed again if a
    step fails."""
    if os.geteuid() != 0:
        raise LabError("the lab makes network namespaces: run it as root")
    lab = layout(name, hosts, subnet, azs)
    if (lab_dir(home, name) / "lab.json").exists():
        raise LabError(f"lab {name} is up already (borealis lab down --name {name})")
    _check_free(lab)
    _save(home, lab)  # before the first step: a failed up can be taken down
    try:
        for cmd in up_commands(lab):
            run(cmd)
    except LabError:
        _remove(lab)
        (lab_dir(home, name) / "lab.json").unlink(missing_ok=True)
        raise
    return lab


def _check_free(lab: Lab) -> None:
    """The lab's subnet must not overlap one this machine already routes, and its
    namespaces and bridge must not exist (another lab's, or one left behind)."""
    ours = ipaddress.ip_network(lab.subnet)
    for route in json.loads(run(["ip", "-j", "route", "show"]) or "[]"):
        dst = route.get("dst", "")
        if dst and dst != "default":
            with contextlib.suppress(ValueError):
                if ipaddress.ip_network(dst, strict=False).overlaps(ours):
                    raise LabError(f"subnet {lab.subnet} overlaps {dst}, which this "
                                   "machine routes already: pick another (--subnet)")
    existing = set(run(["ip", "netns", "list"]).split())
    for h in lab.hosts:
        if h.namespace in existing:
            raise LabError(f"namespace {h.namespace} exists already")


def down(home: Path, name: str) -> None:
    """Stop every process in the lab's namespaces (by PID), then remove the namespaces,
    the bridge and the record."""
    lab = load(home, name)
    stop_wire(home, name)
    for h in lab.hosts:
        stop_host_processes(h)
    _remove(lab)
    (lab_dir(home, name) / "lab.json").unlink(missing_ok=True)


def _remove(lab: Lab) -> None:
    existing = set(run(["ip", "netns", "list"]).split())
    links = {link["ifname"] for link in json.loads(run(["ip", "-j", "link", "show"]) or "[]")}
    for cmd in down_commands(lab):
        if (cmd[1] == "netns" and cmd[3] in existing) or (cmd[1] == "link"
                                                            and cmd[3] in links):
            run(cmd)


def host_pids(h: LabHost) -> list[int]:
    """The processes whose network namespace is the host's."""
    try:
        out = run(["ip", "netns", "pids", h.namespace])
    except LabError:
        return []
    return [int(p) for p in out.split()]


def signal_host(h: LabHost, sig: int) -> int:
    """Send ``sig`` to every process of a host (SIGSTOP: the machine hangs; SIGCONT: it
    goes on); returns how many there were."""
    pids = host_pids(h)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
    return len(pids)


def stop_host_processes(h: LabHost, sig: int = signal.SIGKILL, timeout_s: float = 10) -> int:
    """Signal every process of a host, as a machine that loses power stops them all;
    returns how many there were. Waits until none is left."""
    pids = host_pids(h)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
    deadline = time.monotonic() + timeout_s
    while host_pids(h) and time.monotonic() < deadline:
        for pid in host_pids(h):
            with contextlib.suppress(ChildProcessError, ProcessLookupError):
                os.waitpid(pid, os.WNOHANG)
        time.sleep(0.05)
    left = host_pids(h)
    if left:
        raise LabError(f"processes of {h.name} still run after {timeout_s} s: {left}")
    return len(pids)


def partition(home: Path, name: str, az: str) -> None:
    for cmd in partition_commands(load(home, name), az):
        run(cmd)


def heal(home: Path, name: str, az: str) -> None:
    for cmd in heal_commands(load(home, name), az):
        run(cmd)


def delay(home: Path, name: str, ms: float) -> None:
    """Packets between hosts of different AZs wait ``ms`` each way (0: no delay), made
    by :mod:`borealis.lab.wire` (a kernel without netem cannot do it in ``tc``)."""
    if not 0 <= ms <= MAX_DELAY_MS:
        raise LabError(f"a delay of {ms} ms: 0 to {MAX_DELAY_MS}")
    folder = lab_dir(home, name)
    load(home, name)
    stop_wire(home, name)
    if ms == 0:
        return
    (folder / "wire.ready").unlink(missing_ok=True)
    pid = processes.spawn_python("borealis.lab.wire", ["--lab-dir", str(folder),
                                                       "--delay-ms", str(ms)],
                                 folder / "wire.log")
    (folder / "wire.pid").write_text(str(pid))
    deadline = time.monotonic() + WIRE_START_S
    while not (folder / "wire.ready").exists():
        if not processes.alive(pid, _wire_marker(folder)) or time.monotonic() > deadline:
            stop_wire(home, name)
            log = (folder / "wire.log").read_text(errors="replace")[-2000:]
            raise LabError(f"the delay did not start: {log.strip() or 'no output'}")
        time.sleep(0.02)


def _wire_marker(folder: Path) -> str:
    return str(folder)


def stop_wire(home: Path, name: str) -> None:
    """No delay any more: the wire process stops, its devices and routes go with it."""
    folder = lab_dir(home, name)
    try:
        pid = int((folder / "wire.pid").read_text())
    except (OSError, ValueError):
        return
    processes.stop(pid, _wire_marker(folder), signal.SIGTERM, timeout_s=5)
    (folder / "wire.pid").unlink(missing_ok=True)
    (folder / "wire.ready").unlink(missing_ok=True)


def exec_argv(lab: Lab, host: str, argv: list[str]) -> list[str]:
    """The command line that runs ``argv`` inside a host's namespace (the process keeps
    its PID: ``ip netns exec`` replaces itself with the command)."""
    if not argv:
        raise LabError("nothing to run")
    return ["ip", "netns", "exec", lab.host(host).namespace, *argv]


# ``ip netns exec`` mounts a fresh /sys in a mount namespace of its own, without the
# cgroup hierarchies under it; a real machine has them. An agent (and what it starts: an
# endpoint proxy counts connections through the cgroup2 root) gets cgroup2 back.
_WITH_CGROUP2 = ('grep -q " cgroup2 " /proc/mounts || mount -t cgroup2 cgroup2 /sys/fs/cgroup;'
                 ' exec "$@"')


def agent_argv(lab: Lab, host: str, argv: list[str]) -> list[str]:
    """Like :func:`exec_argv`, for a long-lived process of a host: with cgroup2 mounted
    as on a machine (the PID stays: each step replaces itself)."""
    return exec_argv(lab, host, ["sh", "-c", _WITH_CGROUP2, "sh", *argv])
