"""A PostgreSQL server that a host's agent runs: ``python -m borealis.compute.server
--config FILE`` (:class:`~borealis.protocol.files.ServerConfig`).

The first time, it makes the data directory (``initdb`` as the internal role for a new
volume's writer, or a copy of the writer over the network for a reader); every time, it
writes the settings, the server's certificate and the access rules it was sent, ends
what a killed predecessor left running in the directory, and then *becomes* the
postmaster (exec, as the server's account): the PID the agent holds is the server's,
signals reach it directly, and nothing stands between them.

Access on a host: plain connections only from the host itself (127.0.0.1: its volume
client), everything from elsewhere over TLS with a password (SCRAM).
"""

from __future__ import annotations

import os
import re
import shutil
import sys
from pathlib import Path

from borealis import entrypoint, processes
from borealis.compute import postgres as pg
from borealis.fsync import write_atomic
from borealis.protocol.files import ServerConfig

DATA = "data"  # the data directory, beside the config
BOOT_FILE = "boot_id"  # the boot of the host its server last started in
HBA = """# Written by Borealis; edits are replaced.
host all all 127.0.0.1/32 scram-sha-256
host replication all 127.0.0.1/32 scram-sha-256
hostssl all all 0.0.0.0/0 scram-sha-256
hostssl replication all 0.0.0.0/0 scram-sha-256
"""


def datadir_of(config_path: Path) -> Path:
    return config_path.parent / DATA


def lost_with_host(config: ServerConfig, datadir: Path) -> bool:
    """The data directory was last used in an earlier boot of this host by a server with
    ``fsync=off`` (every reader; the writer unless durability is local): the host
    crashed or lost power under it, and writes it made may be gone. It is never started
    on again: a reader is copied afresh, a writer rebuilt by the control plane."""
    try:
        recorded = (datadir.parent / BOOT_FILE).read_text().strip()
    except OSError:
        return False  # never started, or before this rule: nothing is known
    durable = re.search(r"^fsync = on$", config.conf, re.MULTILINE) is not None
    return (datadir / "PG_VERSION").exists() and not durable and \
        recorded != processes.current_boot_id()


def prepare(config: ServerConfig, config_path: Path, bindir: Path, run_as: pg.RunAs) -> Path:
    """The data directory, made if missing, with this config's files written; returns it."""
    datadir = datadir_of(config_path)
    run_as.ensure_traversable(config_path.parent)
    if lost_with_host(config, datadir):
        aside = datadir.with_name(DATA + ".lost-with-host")
        shutil.rmtree(aside, ignore_errors=True)
        os.rename(datadir, aside)  # renamed first: a removal cut short leaves no half
        shutil.rmtree(aside, ignore_errors=True)
        print(f"{datadir}: this host restarted while the server ran without fsync; the "
              "data directory is set aside, never started on again", file=sys.stderr)
    if not datadir.exists():
        # Made aside and renamed when whole: a copy cut short (killed, host lost) is
        # never taken for a data directory at the next start, only made again.
        making = datadir.with_name(DATA + ".making")
        if config.copy_from is not None:
            src = config.copy_from
            pg.base_copy(bindir, src.port, src.user, src.password, making, run_as,
                         host=src.host, ca_pem=src.ca_pem)
        elif config.role == "writer" and config.superuser:
            shutil.rmtree(making, ignore_errors=True)
            pg.initdb(bindir, making, config.superuser, config.password, run_as)
        else:
            raise pg.ComputeError(f"{datadir} has no data directory, and the config says "
                                  "neither how to make one nor where to copy it from")
        os.rename(making, datadir)
    apply(config, datadir, run_as, starting=True)
    write_atomic(config_path.parent / BOOT_FILE, processes.current_boot_id())
    return datadir


def apply(config: ServerConfig, datadir: Path, run_as: pg.RunAs, starting: bool = False
          ) -> None:
    """Settings, certificate and access rules (a running server rereads them on
    SIGHUP; the agent sends it after calling this). Only a server about to start has
    its ``standby.signal`` set by role: a running standby being promoted removes the
    file itself, and fails if it is already gone."""
    files = {pg.CONF_NAME: config.conf, "pg_hba.conf": HBA, pg.CERT_FILE: config.tls.cert_pem,
             pg.KEY_FILE: config.tls.key_pem}
    if config.ca_pem is not None:
        files[pg.CA_FILE] = config.ca_pem
    for name, text in files.items():
        path = datadir / name
        tmp = path.with_name(f".{name}.tmp")
        tmp.write_text(text)
        os.chmod(tmp, 0o600)  # the key above all: PostgreSQL refuses one others can read
        run_as.own(tmp)
        os.replace(tmp, path)
    standby = datadir / "standby.signal"
    if not starting:
        return
    if config.role == "reader":
        standby.touch()
        run_as.own(standby)
    else:
        standby.unlink(missing_ok=True)


def become_postmaster(bindir: Path, datadir: Path, run_as: pg.RunAs) -> None:
    """Replace this process with the server (as its account when we are root)."""
    pg.end_orphans(bindir, datadir)  # a killed predecessor's backends hold its memory
    env = {**run_as.environment(), "LC_ALL": "C.UTF-8"}
    os.chdir("/")
    if run_as.user is not None:
        os.setgroups([])
        os.setgid(run_as.gid)
        os.setuid(run_as.uid)
    sys.stdout.flush()
    sys.stderr.flush()
    command = pg.server_command(bindir, datadir)
    os.execve(command[0], command, env)


def main() -> None:
    path = entrypoint.config_path("Borealis PostgreSQL server")
    config = ServerConfig.from_json(path.read_text())
    bindir, run_as = pg.find_bindir(), pg.RunAs.detect()
    datadir = prepare(config, path, bindir, run_as)
    become_postmaster(bindir, datadir, run_as)


if __name__ == "__main__":
    main()
