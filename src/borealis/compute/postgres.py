"""PostgreSQL server processes: finding the binaries, initdb, configuration, base copies.

Who uses it: the control plane. Everything here is a thin wrapper over PostgreSQL's own
programs; the settings are where Borealis's design shows:

- writer: ``synchronous_standby_names = '"borealis_volume"'``, ``synchronous_commit=on``,
  data checksums, ``wal_log_hints``; ``fsync=off`` by default because durability is the
  volume's (a writer is never trusted after its host crashed);
- reader: a hot standby whose ``primary_conninfo`` names a storage node, never the writer,
  with ``hot_standby_feedback=on`` and ``recovery_target_timeline=latest``.

PostgreSQL refuses to run as root; when Borealis runs as root the servers run as an
unprivileged OS user (``postgres`` by default, ``BOREALIS_PG_USER`` to change).
"""

from __future__ import annotations

import functools
import glob
import logging
import os
import pwd
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from borealis import processes, settings
from borealis.logfiles import private_log

CONF_NAME = "borealis.conf"

logger = logging.getLogger("borealis.compute")


class ComputeError(Exception):
    pass


def find_bindir(configured: str | None = None) -> Path:
    """PostgreSQL's bin directory: configured, else ``pg_config --bindir``, else the newest
    ``/usr/lib/postgresql/*/bin``."""
    candidates: list[str] = []
    if configured:
        candidates.append(configured)
    if env := settings.current().pg_bindir:
        candidates.append(env)
    pg_config = shutil.which("pg_config")
    if pg_config:
        try:
            out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True,
                                 check=True, timeout=10)
            candidates.append(out.stdout.strip())
        except (subprocess.SubprocessError, OSError):
            pass
    candidates.extend(sorted(glob.glob("/usr/lib/postgresql/*/bin"),
                             key=lambda p: int(p.split("/")[-2]), reverse=True))
    for c in candidates:
        if (Path(c) / "postgres").exists() and (Path(c) / "initdb").exists():
            return Path(c)
    raise ComputeError("PostgreSQL server binaries not found; run scripts/setup")


@functools.cache
def server_version(bindir: Path) -> str:
    """``15.14`` from ``postgres (PostgreSQL) 15.14 (Debian 15.14-0+deb12u1)``."""
    out = subprocess.run([str(bindir / "postgres"), "--version"], capture_output=True,
                         text=True, check=True, timeout=10).stdout
    return out.split(")", 1)[1].split()[0]


@dataclass(frozen=True)
class RunAs:
    """The OS account PostgreSQL runs as (None when we are not root)."""

    user: str | None
    uid: int
    gid: int
    home: str | None = None  # the account's home: libpq looks for its files there

    def environment(self) -> dict[str, str]:
        """The environment a server or tool of this account runs with: its own HOME,
        never root's (libpq would try to read ``~/.postgresql`` of an account it cannot
        enter, and fail the connection)."""
        return {**os.environ, **({"HOME": self.home} if self.user and self.home else {})}

    @classmethod
    def detect(cls) -> RunAs:
        if os.geteuid() != 0:
            return cls(None, os.getuid(), os.getgid())
        name = settings.current().pg_user
        try:
            entry = pwd.getpwnam(name)
        except KeyError:
            raise ComputeError(f"running as root needs an OS user {name!r} for PostgreSQL") \
                from None
        return cls(name, entry.pw_uid, entry.pw_gid, entry.pw_dir)

    def popen_kwargs(self) -> dict[str, object]:
        if self.user is None:
            return {}
        return {"user": self.uid, "group": self.gid, "extra_groups": []}

    def own(self, path: Path) -> None:
        """Give a directory tree to the server's account (it must own its data dir)."""
        if self.user is None:
            return
        os.lchown(path, self.uid, self.gid)
        for root, dirs, files in os.walk(path):
            os.chown(root, self.uid, self.gid)
            for name in dirs + files:
                os.lchown(os.path.join(root, name), self.uid, self.gid)

    def ensure_traversable(self, path: Path) -> None:
        """Let the server's account, and it alone, reach ``path``: on each ancestor it
        cannot search, an ACL entry gives it search (x) permission. Nobody else gains
        anything: ``/root`` or the home stay closed to other users.

        Where the filesystem has no ACLs (or ``setfacl`` is missing) the search bit for
        others is the only way left; that is logged, once per directory.
        """
        if self.user is None:
            return
        for parent in [path, *path.parents]:
            if parent == Path("/"):
                break
            if self._can_search(parent):
                continue
            setfacl = shutil.which("setfacl")
            done = setfacl is not None and subprocess.run(
                [setfacl, "-m", f"u:{self.uid}:x", str(parent)], capture_output=True,
                timeout=30).returncode == 0
            if not done:
                logger.warning("no ACLs on %s: giving every user search permission there so "
                            "the %s account can reach its data", parent, self.user)
                os.chmod(parent, parent.stat().st_mode | 0o001)

    def _can_search(self, directory: Path) -> bool:
        st = directory.stat()
        if st.st_uid == self.uid:
            return bool(st.st_mode & 0o100)
        if st.st_mode & 0o001:
            return True
        try:
            acl = subprocess.run(["getfacl", "-cn", str(directory)], capture_output=True,
                                 text=True, timeout=30).stdout
        except (OSError, subprocess.TimeoutExpired):
            return False
        entry = f"user:{self.uid}:"
        return any(line.startswith(entry) and line[len(entry):][2:3] == "x"
                   for line in acl.splitlines())


def run(cmd: list[str], run_as: RunAs, env: dict[str, str] | None = None,
        timeout_s: float = 300) -> str:
    full_env = {**run_as.environment(), "LC_ALL": "C.UTF-8", **(env or {})}
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, env=full_env,
                             timeout=timeout_s, cwd="/", **run_as.popen_kwargs())  # type: ignore[call-overload]
    except subprocess.TimeoutExpired:
        raise ComputeError(f"{Path(cmd[0]).name} timed out after {timeout_s}s") from None
    if out.returncode != 0:
        raise ComputeError(f"{Path(cmd[0]).name} failed: {out.stderr.strip() or out.stdout}")
    return str(out.stdout)


def initdb(bindir: Path, datadir: Path, superuser: str, password: str, run_as: RunAs) -> None:
    datadir.mkdir(parents=True, exist_ok=True)
    os.chmod(datadir, 0o700)
    pwfile = datadir.parent / f".{datadir.name}.pw"
    pwfile.write_text(password + "\n")
    os.chmod(pwfile, 0o600)
    run_as.own(datadir)
    run_as.own(pwfile)
    try:
        run([str(bindir / "initdb"), "-D", str(datadir), "--data-checksums", "-U", superuser,
             f"--pwfile={pwfile}", "--auth-host=scram-sha-256", "--auth-local=peer",
             "-E", "UTF8", "--locale=C", "--no-instructions"], run_as)
    finally:
        pwfile.unlink(missing_ok=True)
    conf = datadir / "postgresql.conf"
    with open(conf, "a") as f:
        f.write(f"\ninclude_if_exists = '{CONF_NAME}'\n")


def conf_string(value: str) -> str:
    """A string setting as postgresql.conf reads it back: backslashes are escapes there,
    and a quote is doubled."""
    return "'" + value.replace("\\", "\\\\").replace("'", "''") + "'"


# A server on a host: its certificate and key, in the data directory.
CERT_FILE, KEY_FILE = "server.crt", "server.key"


@dataclass
class ServerSettings:
    port: int
    role: str  # "writer" | "reader"
    shared_buffers: str = "32MB"
    max_connections: int = 100
    fsync: bool = False
    primary_conninfo: str = ""
    application_name: str = ""
    extra: dict[str, str] | None = None
    ca_pem: str | None = None  # what a standby checks its storage node's certificate with
    # On a host: its address too, where clients from elsewhere come with TLS (the
    # certificate and key beside the settings, see compute/server.py).
    address: str | None = None

    def render(self) -> str:
        s: dict[str, str] = {
            "listen_addresses": conf_string(",".join(["127.0.0.1", *filter(None, [
                self.address])])),
            "port": str(self.port),
            "unix_socket_directories": "''",
            "shared_buffers": f"'{self.shared_buffers}'",
            "max_connections": str(self.max_connections),
            "wal_level": "replica",
            "wal_log_hints": "on",
            "fsync": "on" if self.fsync else "off",
            "full_page_writes": "on",
            # Every WAL byte goes to six storage nodes and the archive: full-page images
            # (most of the WAL after a checkpoint) shrink about 3x for little CPU.
            "wal_compression": "lz4",
            "synchronous_commit": "on",
            "max_wal_senders": "10",
            "max_replication_slots": "10",
            "max_slot_wal_keep_size": "'4GB'",
            "wal_sender_timeout": "'30s'",
            "wal_receiver_timeout": "'30s'",
            "hot_standby": "on",
            "hot_standby_feedback": "on",
            "recovery_target_timeline": "'latest'",
            "wal_retrieve_retry_interval": "'500ms'",
            # Readers report their oldest snapshot every second (default 10 s), so a
            # new query is protected from the writer's vacuum within about a second.
            "wal_receiver_status_interval": "'1s'",
            "logging_collector": "off",
            "log_line_prefix": "'%m [%p] '",
            "log_min_messages": "warning",
            "log_checkpoints": "off",
            "password_encryption": "'scram-sha-256'",
            # Connections through an endpoint reach the server directly (the kernel steers
            # them): a client that never finishes its startup is dropped here, after the
            # same 10 s the endpoint proxy allows.
            "authentication_timeout": "'10s'",
            # Top SQL per instance (``borealis top``), as Performance Insights shows it.
            "shared_preload_libraries": "'pg_stat_statements'",
            "pg_stat_statements.max": "1000",
        }
        # Readers carry it too (a standby ignores it): a promoted reader then waits for the
        # volume from its first commit on, with no reload racing the promotion.
        s["synchronous_standby_names"] = "'\"borealis_volume\"'"
        if self.role == "writer":
            s["primary_conninfo"] = "''"
        else:
            s["primary_conninfo"] = conf_string(self.primary_conninfo)
        if self.address:
            s.update(ssl="on", ssl_cert_file=conf_string(CERT_FILE),
                     ssl_key_file=conf_string(KEY_FILE),
                     ssl_min_protocol_version="'TLSv1.2'")
        for key, value in (self.extra or {}).items():
            s[key] = value
        body = "".join(f"{k} = {v}\n" for k, v in s.items())
        return "# Written by Borealis; edits are replaced.\n" + body


CA_FILE = "borealis-ca.pem"  # in the data directory, the standby's working directory


def write_conf(datadir: Path, settings: ServerSettings, run_as: RunAs) -> None:
    """Only the settings file (a promotion removes ``standby.signal`` itself), and the
    CA a standby checks its storage node with."""
    if settings.ca_pem is not None:
        ca = datadir / CA_FILE
        ca.write_text(settings.ca_pem)
        run_as.own(ca)
    path = datadir / CONF_NAME
    path.write_text(settings.render())
    run_as.own(path)


def write_settings(datadir: Path, settings: ServerSettings, run_as: RunAs) -> None:
    write_conf(datadir, settings, run_as)
    standby_signal = datadir / "standby.signal"
    if settings.role == "reader":
        standby_signal.touch()
    else:
        standby_signal.unlink(missing_ok=True)
    if standby_signal.exists():
        run_as.own(standby_signal)


# A copy takes as long as the database is large (100 GiB at 200 MB/s: over 8 minutes);
# the limit is for a copy that hangs (a frozen source), not a slow one.
BASE_COPY_TIMEOUT_S = 6 * 3600.0


def base_copy(bindir: Path, source_port: int, user: str, password: str, datadir: Path,
              run_as: RunAs, host: str = "127.0.0.1", ca_pem: str | None = None) -> None:
    """A reader's data directory: ``pg_basebackup`` without WAL (from another host:
    over TLS, the source's certificate checked against the CA ``ca_pem``).

    The WAL the copy needs comes from the storage tier, never from the writer.
    """
    if datadir.exists():
        shutil.rmtree(datadir)
    datadir.parent.mkdir(parents=True, exist_ok=True)
    run_as.ensure_traversable(datadir.parent)
    if run_as.user is not None:
        os.chown(datadir.parent, run_as.uid, run_as.gid)
    tls: dict[str, str] = {}
    if ca_pem is not None:  # where the copying account can read it
        ca_file = datadir.with_name(f".{datadir.name}.ca.pem")
        ca_file.write_text(ca_pem)
        run_as.own(ca_file)
        tls = {"PGSSLMODE": "verify-full", "PGSSLROOTCERT": str(ca_file)}
    run([str(bindir / "pg_basebackup"), "-h", host, "-p", str(source_port), "-U", user,
         "-D", str(datadir), "-X", "none", "-c", "fast", "--no-sync", "--no-manifest"],
        run_as, env={"PGPASSWORD": password, **tls}, timeout_s=BASE_COPY_TIMEOUT_S)
    for stale in ("postmaster.pid", "postmaster.opts", "standby.signal"):
        (datadir / stale).unlink(missing_ok=True)


def copy_data_dir(source: Path, dest: Path) -> None:
    """A stopped or immutable data directory copied as it is (modes, owners, links),
    blocks shared where the filesystem can (reflink), else copied in the kernel."""
    try:
        subprocess.run(["cp", "-a", "--reflink=auto", str(source), str(dest)], check=True,
                       capture_output=True, text=True, timeout=BASE_COPY_TIMEOUT_S)
    except subprocess.CalledProcessError as exc:
        raise ComputeError(f"copying {source} failed: {exc.stderr.strip()}") from None
    except subprocess.TimeoutExpired:
        raise ComputeError(f"copying {source} timed out after {BASE_COPY_TIMEOUT_S}s") \
            from None


def end_orphans(bindir: Path, datadir: Path) -> int:
    """Kill what is left of a server whose postmaster is gone: backends running on as
    orphans hold their clients' connections (a client mid-query would wait forever),
    keep the shared memory that stops a new postmaster from starting, and may write to
    files of the directory. Returns how many were ended.

    A server whose postmaster still runs has no orphans: nothing is touched then (a
    start on its directory fails on PostgreSQL's own lock, as it should)."""
    found = processes.working_in(datadir, bindir / "postgres")
    try:
        postmaster = int((datadir / "postmaster.pid").read_text().split("\n", 1)[0])
    except (OSError, ValueError):
        postmaster = 0
    if postmaster in found and not processes.is_zombie(postmaster):
        return 0
    left = processes.kill_all(found)
    if left:
        raise ComputeError(f"processes {left} of {datadir} do not end on SIGKILL")
    return len(found)


def client_sessions(pids: list[int], internal_users: frozenset[str]) -> int:
    """How many of these server processes are client sessions, read from their process
    titles (``postgres: USER DATABASE HOST(PORT) STATE``) so counting needs no
    connection of its own; walsenders, workers and the users named are left out."""
    count = 0
    for pid in pids:
        words = processes.cmdline(pid).split()
        if (len(words) >= 4 and words[0] == "postgres:"
                and words[1] not in ("walsender", "autovacuum", "parallel", "logical")
                and words[1] not in internal_users
                and (words[3].endswith(")") or words[3] == "[local]")):
            count += 1
    return count


def server_command(bindir: Path, datadir: Path) -> list[str]:
    return [str(bindir / "postgres"), "-D", str(datadir)]


def start_server(bindir: Path, datadir: Path, log_path: Path,
                 run_as: RunAs) -> subprocess.Popen[bytes]:
    """Start a postmaster in its own session, so it outlives the control plane."""
    with private_log(log_path) as log:
        proc: subprocess.Popen[bytes] = subprocess.Popen(
            server_command(bindir, datadir), stdout=log, stderr=log, stdin=subprocess.DEVNULL,
            env=run_as.environment(), start_new_session=True, cwd="/", **run_as.popen_kwargs())  # type: ignore[call-overload]
    return proc
