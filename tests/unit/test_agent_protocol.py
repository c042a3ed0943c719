"""Agent messages, join tokens and the deployment's certificates (no processes)."""

from __future__ import annotations

import ssl

import pytest
from hypothesis import given
from hypothesis import strategies as st

from borealis import pki
from borealis.protocol.agent import (
    AgentInfo,
    AgentProtocolError,
    ProcessKey,
    ProcessReport,
    ProcessSpec,
    make_token,
    parse_token,
)


def test_process_keys_name_folders_under_the_agent_root_only() -> None:
    key = ProcessKey("prod", "storage-node", "sn-a1")
    assert key.path() == "clusters/prod/storage-node/sn-a1"
    for bad in [("..", "storage-node", "x"), ("prod", "shell", "x"), ("prod", "storage-node",
                "../etc"), ("prod", "storage-node", ""), ("Prod", "storage-node", "x"),
                ("prod", "storage-node", "é")]:
        with pytest.raises(AgentProtocolError):
            ProcessKey(*bad)


@given(st.text(max_size=80))
def test_any_process_name_is_a_plain_folder_name_or_refused(name: str) -> None:
    try:
        key = ProcessKey("prod", "storage-node", name)
    except AgentProtocolError:
        return
    assert "/" not in key.name and key.name not in (".", "..") and key.name.isascii()


def test_tokens_round_trip_and_bad_ones_are_refused() -> None:
    secret, fp = "ab" * 16, "cd" * 32
    assert parse_token(make_token(secret, fp)) == (secret, fp)
    for bad in ["", "x.y", secret, f"{secret}.{fp}.x", f"{secret.upper()}.{fp}"]:
        with pytest.raises(AgentProtocolError):
            parse_token(bad)


def test_messages_round_trip() -> None:
    report = ProcessReport("prod", "storage-node", "sn-a1", 42, True, True, 3)
    info = AgentInfo("az-a-1", "az-a", "10.0.0.11", 7420, "/var/lib/borealis", "boot", 7,
                     [report])
    assert AgentInfo.from_json(info.to_json()) == info
    spec = ProcessSpec(report.key, '{"a": 1}', keep=False)
    assert ProcessSpec.from_json(report.key, spec.to_json()) == spec
    with pytest.raises(AgentProtocolError):
        ProcessSpec.from_json(report.key, {"config": 5})


def test_certificates_chain_to_the_ca_and_name_their_address() -> None:
    ca = pki.new_ca("test")
    leaf = pki.issue(ca, "az-a-1", ["10.0.0.11", "host.example"])
    assert leaf.fingerprint() != ca.fingerprint() and len(ca.fingerprint()) == 64
    server = pki.server_context(leaf, ca.cert_pem, require_client_cert=True)
    client = pki.client_context(ca.cert_pem, pki.issue(ca, "cp", []))
    assert _handshake(server, client, "10.0.0.11")
    assert not _handshake(server, client, "10.0.0.12")  # not the name in the certificate
    assert not _handshake(server, pki.client_context(ca.cert_pem), "10.0.0.11")  # no cert
    stranger = pki.new_ca("other")  # a client of another CA, either way round
    assert not _handshake(server, pki.client_context(stranger.cert_pem,
                                                     pki.issue(stranger, "cp", [])),
                          "10.0.0.11")


def _handshake(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext, name: str) -> bool:
    """A whole TLS handshake in memory; False if either side refuses the other."""
    bios = [ssl.MemoryBIO() for _ in range(4)]
    server = server_ctx.wrap_bio(bios[0], bios[1], server_side=True)
    client = client_ctx.wrap_bio(bios[2], bios[3], server_hostname=name)
    done = {"server": False, "client": False}
    for _ in range(20):
        for side, obj, out, peer_in in (("client", client, bios[3], bios[0]),
                                        ("server", server, bios[1], bios[2])):
            if not done[side]:
                try:
                    obj.do_handshake()
                    done[side] = True
                except ssl.SSLWantReadError:
                    pass
                except ssl.SSLError:
                    return False
            data = out.read()
            if data:
                peer_in.write(data)
        if all(done.values()):
            try:  # TLS 1.3: the server checks the client's certificate after "done"
                client.write(b"x")
                bios[0].write(bios[3].read())
                return server.read(1) == b"x"
            except ssl.SSLError:
                return False
    return False
