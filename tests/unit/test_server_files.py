"""What a server on a host writes into its data directory (files only, no server)."""

from __future__ import annotations

import os
from pathlib import Path

from borealis.compute import postgres as pg
from borealis.compute import server
from borealis.protocol.files import ServerConfig, TlsIdentity

NOBODY = pg.RunAs(None, os.getuid(), os.getgid())


def _config(role: str) -> ServerConfig:
    return ServerConfig("port = 5432\n", role, "10.0.0.11",
                        TlsIdentity("CERT", "KEY", "CA"), ca_pem="NODE-CA")


def test_a_start_sets_the_role_and_a_reload_leaves_standby_signal_to_postgresql(
        tmp_path: Path) -> None:
    server.apply(_config("reader"), tmp_path, NOBODY, starting=True)
    assert (tmp_path / "standby.signal").exists()
    # Promotion: the settings become a writer's while the standby still runs; PostgreSQL
    # removes standby.signal itself and fails if it is already gone.
    server.apply(_config("writer"), tmp_path, NOBODY)
    assert (tmp_path / "standby.signal").exists()
    server.apply(_config("writer"), tmp_path, NOBODY, starting=True)
    assert not (tmp_path / "standby.signal").exists()


def test_files_are_the_configs_and_private(tmp_path: Path) -> None:
    server.apply(_config("writer"), tmp_path, NOBODY, starting=True)
    assert (tmp_path / pg.CONF_NAME).read_text() == "port = 5432\n"
    assert (tmp_path / pg.KEY_FILE).read_text() == "KEY"
    assert (tmp_path / pg.CA_FILE).read_text() == "NODE-CA"
    hba = (tmp_path / "pg_hba.conf").read_text()
    assert "hostssl all all 0.0.0.0/0 scram-sha-256" in hba
    assert "host all all 0.0.0.0/0" not in hba  # from elsewhere: TLS only
    for name in (pg.KEY_FILE, pg.CERT_FILE, "pg_hba.conf"):
        assert (tmp_path / name).stat().st_mode & 0o077 == 0, name


def test_settings_on_a_host_listen_there_with_tls() -> None:
    text = pg.ServerSettings(port=5432, role="writer", address="10.0.0.11").render()
    assert "listen_addresses = '127.0.0.1,10.0.0.11'" in text
    assert "ssl = on" in text and "ssl_key_file = 'server.key'" in text
    assert "ssl = " not in pg.ServerSettings(port=5432, role="writer").render()


def test_a_data_directory_from_an_earlier_boot_without_fsync_is_never_started_on(
        tmp_path: Path) -> None:
    from borealis import processes

    datadir = tmp_path / server.DATA
    datadir.mkdir()
    (datadir / "PG_VERSION").write_text("15\n")
    without_fsync = ServerConfig("fsync = off\n", "reader", "10.0.0.11",
                                 TlsIdentity("CERT", "KEY", "CA"))
    with_fsync = ServerConfig("fsync = on\n", "writer", "10.0.0.11",
                              TlsIdentity("CERT", "KEY", "CA"))
    # Never started (or before the rule): nothing is known, nothing is set aside.
    assert not server.lost_with_host(without_fsync, datadir)
    (tmp_path / server.BOOT_FILE).write_text(processes.current_boot_id())
    assert not server.lost_with_host(without_fsync, datadir)  # the same boot
    (tmp_path / server.BOOT_FILE).write_text("an-earlier-boot")
    assert server.lost_with_host(without_fsync, datadir)
    assert not server.lost_with_host(with_fsync, datadir)  # its writes were on disk
