"""The kernel side of connection steering: loading ``bpf.py``'s programs, filling their
maps, borrowing PostgreSQL's listening sockets, and a census of steered connections.

Everything here needs CAP_BPF and CAP_NET_ADMIN (root) and Linux 5.9 or later;
:meth:`Steering.open` returns None where that is missing, and the proxy then forwards
every connection itself, as it always could.

Invariants:
- the programs are attached through BPF links held by this process: when it exits,
  they detach and every connection reaches the proxy's own listeners again;
- a listening socket is in the map only while its postmaster holds it open (the kernel
  removes it when the postmaster closes it; this process keeps no descriptor of it).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import platform
import socket
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from borealis import settings
from borealis.endpoints import bpf

log = logging.getLogger("borealis.endpoints")

_libc = ctypes.CDLL(None, use_errno=True)
_NR_BPF = {"x86_64": 321, "aarch64": 280}.get(platform.machine(), -1)
_NR_PIDFD_GETFD = 438
_ATTR_SIZE = 144

_MAP_CREATE, _MAP_LOOKUP, _MAP_UPDATE, _MAP_DELETE, _PROG_LOAD, _LINK_CREATE = 0, 1, 2, 3, 5, 28
_MAP_HASH, _MAP_ARRAY, _MAP_SOCKMAP = 1, 2, 15
_PROG_SOCK_OPS, _PROG_SK_LOOKUP = 13, 30
_ATTACH_CGROUP_SOCK_OPS, _ATTACH_SK_LOOKUP = 3, 36

MAX_LISTENERS = 64
MAX_ENDPOINTS = 64
_TCP_LISTEN, _TCP_ESTABLISHED = "0A", "01"


class KernelError(OSError):
    pass


def _bpf(cmd: int, attr: bytes) -> int:
    buf = ctypes.create_string_buffer(attr, _ATTR_SIZE)
    result = int(_libc.syscall(_NR_BPF, cmd, buf, _ATTR_SIZE))
    if result < 0:
        err = ctypes.get_errno()
        raise KernelError(err, os.strerror(err))
    return result


def _map_create(kind: int, key_size: int, value_size: int, entries: int) -> int:
    return _bpf(_MAP_CREATE, struct.pack("<5I", kind, key_size, value_size, entries, 0))


def _elem(cmd: int, map_fd: int, key: bytes, value: bytes | None = None) -> None:
    k = ctypes.create_string_buffer(key, len(key))
    v = ctypes.create_string_buffer(value or b"", max(1, len(value or b"")))
    _bpf(cmd, struct.pack("<IIQQQ", map_fd, 0, ctypes.addressof(k),
                          ctypes.addressof(v) if value is not None else 0, 0))


def _delete(map_fd: int, key: bytes) -> None:
    """Remove a key; one already gone is no error (a SOCKMAP slot empties itself when
    its socket closes, and answers EINVAL rather than ENOENT)."""
    try:
        _elem(_MAP_DELETE, map_fd, key)
    except KernelError as exc:
        if exc.errno not in (errno.ENOENT, errno.EINVAL):
            raise


def _lookup(map_fd: int, key: bytes, size: int) -> bytes:
    k = ctypes.create_string_buffer(key, len(key))
    v = ctypes.create_string_buffer(size)
    _bpf(_MAP_LOOKUP, struct.pack("<IIQQQ", map_fd, 0, ctypes.addressof(k),
                                  ctypes.addressof(v), 0))
    return v.raw


def _prog_load(kind: int, code: bytes, expected_attach: int, name: bytes) -> int:
    insns = ctypes.create_string_buffer(code, len(code))
    license_ = ctypes.create_string_buffer(b"GPL")
    verifier_log = ctypes.create_string_buffer(1 << 16)
    attr = struct.pack("<IIQQIIQII16sII", kind, len(code) // 8, ctypes.addressof(insns),
                       ctypes.addressof(license_), 1, len(verifier_log),
                       ctypes.addressof(verifier_log), 0, 0, name, 0, expected_attach)
    try:
        return _bpf(_PROG_LOAD, attr)
    except KernelError as exc:
        raise KernelError(exc.errno, f"{exc.strerror}: {verifier_log.value.decode()[-500:]}"
                          ) from None


def _link(prog_fd: int, target_fd: int, attach_type: int) -> int:
    return _bpf(_LINK_CREATE, struct.pack("<4I", prog_fd, target_fd, attach_type, 0))


def _cgroup2_root() -> Path | None:
    for line in Path("/proc/mounts").read_text().splitlines():
        fields = line.split()
        if len(fields) > 2 and fields[2] == "cgroup2":
            return Path(fields[1])
    return None


class Steering:
    """The loaded programs and their maps, for one proxy process."""

    def __init__(self) -> None:
        self._fds: list[int] = []
        self.routes = self._own(_map_create(_MAP_HASH, 8, bpf.ROUTE_VALUE_SIZE, 1024))
        self.listeners = self._own(_map_create(_MAP_SOCKMAP, 4, 4, MAX_LISTENERS))
        self.accounted = self._own(_map_create(_MAP_HASH, 8, 4, MAX_ENDPOINTS))
        self.counters = self._own(_map_create(_MAP_ARRAY, 4, bpf.COUNTERS_SIZE,
                                              MAX_ENDPOINTS))
        steer = self._own(_prog_load(_PROG_SK_LOOKUP, bpf.steer_program(
            self.routes, self.listeners), _ATTACH_SK_LOOKUP, b"borealis_steer"))
        account = self._own(_prog_load(_PROG_SOCK_OPS, bpf.account_program(
            self.accounted, self.counters), 0, b"borealis_count"))
        netns = os.open("/proc/self/ns/net", os.O_RDONLY)
        try:
            self._own(_link(steer, netns, _ATTACH_SK_LOOKUP))
        finally:
            os.close(netns)
        cgroup = _cgroup2_root()
        if cgroup is None:
            raise KernelError(0, "no cgroup2 hierarchy to count connections in")
        cgroup_fd = os.open(cgroup, os.O_RDONLY | os.O_DIRECTORY)
        try:
            self._own(_link(account, cgroup_fd, _ATTACH_CGROUP_SOCK_OPS))
        finally:
            os.close(cgroup_fd)

    def _own(self, fd: int) -> int:
        self._fds.append(fd)
        return fd

    @classmethod
    def open(cls) -> Steering | None:
        if not settings.current().endpoint_steering or _NR_BPF < 0:
            return None
        try:
            return cls()
        except OSError as exc:
            log.info("connection steering unavailable (%s): the proxy forwards every "
                     "connection itself", exc)
            return None

    def close(self) -> None:
        for fd in reversed(self._fds):
            with contextlib.suppress(OSError):
                os.close(fd)
        self._fds.clear()

    # -- maps -----------------------------------------------------------------------------

    def set_listener(self, slot: int, fd: int) -> None:
        _elem(_MAP_UPDATE, self.listeners, struct.pack("<I", slot), struct.pack("<I", fd))

    def clear_listener(self, slot: int) -> None:
        _delete(self.listeners, struct.pack("<I", slot))

    def set_route(self, host: str, port: int, slots: list[int]) -> None:
        _elem(_MAP_UPDATE, self.routes, bpf.address_key(host, port), bpf.route_value(slots))

    def handed_out(self, host: str, port: int) -> int:
        """How many connections the current route of (host, port) has handed out (its
        ``next``), 0 if it has none."""
        try:
            value = _lookup(self.routes, bpf.address_key(host, port), bpf.ROUTE_VALUE_SIZE)
        except KernelError:
            return 0
        return int(struct.unpack_from("<II", value)[1])

    def clear_route(self, host: str, port: int) -> None:
        _delete(self.routes, bpf.address_key(host, port))

    def account(self, host: str, port: int, index: int) -> None:
        """Count connections to (host, port) under ``index`` from now on (from zero)."""
        _elem(_MAP_UPDATE, self.counters, struct.pack("<I", index), bytes(bpf.COUNTERS_SIZE))
        _elem(_MAP_UPDATE, self.accounted, bpf.address_key(host, port),
              struct.pack("<I", index))

    def unaccount(self, host: str, port: int) -> None:
        _delete(self.accounted, bpf.address_key(host, port))

    def counted(self, index: int) -> bpf.Accounted:
        return bpf.decode_counters(_lookup(self.counters, struct.pack("<I", index),
                                           bpf.COUNTERS_SIZE))


# -- PostgreSQL's sockets -----------------------------------------------------------------


@dataclass(frozen=True)
class TcpSocket:
    local: tuple[str, int]
    remote: tuple[str, int]
    state: str
    inode: int


_NETLINK_SOCK_DIAG = 4
_SOCK_DIAG_BY_FAMILY = 20
_NLMSG_ERROR, _NLMSG_DONE = 2, 3
_NLM_F_REQUEST_DUMP = 0x1 | 0x300
_STATE_CODES = {1: _TCP_ESTABLISHED, 10: _TCP_LISTEN}


def tcp_sockets() -> list[TcpSocket]:
    """The host's IPv4 TCP sockets that are established or listening, from the kernel's
    sock_diag netlink interface (``/proc/net/tcp`` formats every socket as text,
    thousands in TIME_WAIT included: far too slow to read twice a second)."""
    request = struct.pack("<IHHII", 16 + 56, _SOCK_DIAG_BY_FAMILY, _NLM_F_REQUEST_DUMP, 1, 0)
    request += struct.pack("<BBBBI", socket.AF_INET, socket.IPPROTO_TCP, 0, 0,
                           (1 << 1) | (1 << 10)) + bytes(48)
    out: list[TcpSocket] = []
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, _NETLINK_SOCK_DIAG) as nl:
        nl.sendto(request, (0, 0))
        while True:
            data = nl.recv(1 << 16)
            offset = 0
            while offset + 16 <= len(data):
                length, kind = struct.unpack_from("<IH", data, offset)
                if kind == _NLMSG_DONE:
                    return out
                if kind == _NLMSG_ERROR or length < 16:
                    raise KernelError(0, "sock_diag refused the dump")
                msg = data[offset + 16: offset + length]
                state = _STATE_CODES.get(msg[1])
                if state is not None:
                    sport, dport = struct.unpack_from(">HH", msg, 4)
                    out.append(TcpSocket((socket.inet_ntoa(msg[8:12]), sport),
                                         (socket.inet_ntoa(msg[24:28]), dport), state,
                                         struct.unpack_from("<I", msg, 68)[0]))
                offset += (length + 3) & ~3


def socket_inodes(pid: int) -> dict[int, int]:
    """The process's sockets: inode -> its descriptor number."""
    out: dict[int, int] = {}
    with contextlib.suppress(OSError):
        for entry in os.scandir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                target = os.readlink(entry.path)
                if target.startswith("socket:["):
                    out[int(target[8:-1])] = int(entry.name)
    return out


def children(pid: int) -> list[int]:
    with contextlib.suppress(OSError):
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    return []


def borrow_listener(pid: int, host: str, port: int, sockets: list[TcpSocket]) -> int:
    """A descriptor of the listening socket ``pid`` has on (host, port), found among
    ``sockets`` (:func:`tcp_sockets`): the caller puts it in the map and closes it."""
    inodes = {s.inode for s in sockets if s.state == _TCP_LISTEN
              and s.local == (host, port)}
    fds = [fd for inode, fd in socket_inodes(pid).items() if inode in inodes]
    if not fds:
        raise KernelError(0, f"process {pid} does not listen on {host}:{port}")
    pidfd = os.pidfd_open(pid)
    try:
        fd = int(_libc.syscall(_NR_PIDFD_GETFD, pidfd, fds[0], 0))
        if fd < 0:
            err = ctypes.get_errno()
            raise KernelError(err, os.strerror(err))
        return fd
    finally:
        os.close(pidfd)


def steered_backends(postmaster: int, local_inodes: Iterable[int]) -> dict[int, int]:
    """Among the postmaster's backends, those serving one of ``local_inodes``:
    inode -> backend pid."""
    wanted = set(local_inodes)
    out: dict[int, int] = {}
    if not wanted:
        return out
    for child in children(postmaster):
        for inode in socket_inodes(child):
            if inode in wanted:
                out[inode] = child
    return out
