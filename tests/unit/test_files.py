"""The files between processes: each type reads back what it wrote; a replaced file is
never seen half-written."""

from __future__ import annotations

import threading
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st

from borealis.fsync import write_atomic
from borealis.protocol import files as f

lsns = st.integers(0, (1 << 64) - 1)
texts = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=40)
peers = st.builds(f.PeerAddress, texts, st.just("127.0.0.1"), st.integers(1, 65535))


@given(st.builds(f.NodeConfig, texts, texts, st.builds(Path, st.just("/x/data")), texts,
                 st.integers(1, 65535), st.integers(1, 65535), texts, texts, texts,
                 st.lists(peers, max_size=5)))
def test_node_config_round_trips(config: f.NodeConfig) -> None:
    assert f.NodeConfig.from_json(config.to_json()) == config


@given(st.builds(f.VolumeClientConfig, texts, st.integers(0, 1 << 40), texts,
                 st.lists(peers, max_size=6), texts, st.builds(Path, st.just("/v/s.json"))))
def test_volume_client_config_round_trips(config: f.VolumeClientConfig) -> None:
    assert f.VolumeClientConfig.from_json(config.to_json()) == config


tls = st.builds(f.TlsIdentity, texts, texts, texts)
sources = st.builds(f.CopySource, texts, st.integers(1, 65535), texts, texts, texts)


@given(st.builds(f.ServerConfig, texts, st.sampled_from(["writer", "reader"]), texts, tls,
                 texts, texts, st.none() | sources, st.none() | texts))
def test_server_config_round_trips(config: f.ServerConfig) -> None:
    assert f.ServerConfig.from_json(config.to_json()) == config


@given(st.builds(f.VolumeStatus, st.integers(1, 1 << 22), texts, st.integers(0, 1 << 40),
                 st.integers(1, 1 << 30), lsns, lsns, lsns, lsns, lsns,
                 st.dictionaries(texts, st.builds(f.LinkStatus, st.booleans(), st.booleans(),
                                                  lsns, st.integers(0, 100)), max_size=6),
                 st.one_of(st.none(), st.floats(0, 2e9)), st.one_of(st.none(), texts),
                 st.floats(0, 2e9)))
def test_volume_status_round_trips_with_lsns_as_postgresql_writes_them(
        status: f.VolumeStatus) -> None:
    assert f.VolumeStatus.from_json(status.to_json()) == status
    assert "/" in status.shown()["vdl"]  # what `status --json` shows: 0/16B3748


@given(st.builds(f.ProxyConfig, texts,
                 st.lists(st.builds(f.EndpointSpec, texts, st.sampled_from(["WRITER", "READER"]),
                                    st.integers(1, 65535), static=st.tuples(texts)),
                          max_size=3).map(tuple),
                 st.lists(st.builds(f.Backend, texts, st.just("127.0.0.1"),
                                    st.integers(1, 65535), st.sampled_from(["writer", "reader"]),
                                    st.booleans(), st.one_of(st.none(), st.integers(0, 10**6))),
                          max_size=4).map(tuple),
                 st.floats(0, 100), st.floats(0, 100)))
def test_proxy_config_round_trips_and_its_text_is_deterministic(config: f.ProxyConfig) -> None:
    text = config.to_json()
    again = f.ProxyConfig.from_json(text)
    assert again == config and again.to_json() == text  # the applied digest is stable


def test_retain_mark_and_control_info_round_trip() -> None:
    mark = f.RetainMark(0x16B3748, 1.5)
    assert f.RetainMark.from_json(mark.to_json()) == mark
    assert '"0/16B3748"' in mark.to_json()
    info = f.ControlInfo(42, 8000, "http://127.0.0.1:8000", "us-west-2")
    assert f.ControlInfo.from_json(info.to_json()) == info


def test_a_replaced_file_is_never_seen_half_written(tmp_path: Path) -> None:
    path = tmp_path / "status.json"
    bodies = [("a" * 200_000), ("b" * 300_000)]
    write_atomic(path, bodies[0])
    stop = threading.Event()

    def writer(body: str) -> None:
        while not stop.is_set():
            write_atomic(path, body)
    threads = [threading.Thread(target=writer, args=(b,)) for b in bodies]
    for t in threads:
        t.start()
    try:
        for _ in range(300):
            assert path.read_text() in bodies
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert path.stat().st_mode & 0o777 == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["status.json"]  # no temporaries
