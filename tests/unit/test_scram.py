"""The SCRAM-SHA-256 server against a maintained client implementation (scramp)."""

from __future__ import annotations

import pytest
import scramp
from hypothesis import given, settings
from hypothesis import strategies as st

from borealis.protocol.scram import ScramError, ScramServer, make_verifier


def _exchange(server_password: str, client_password: str) -> str:
    client = scramp.ScramClient(["SCRAM-SHA-256"], "replica", client_password)
    server = ScramServer(make_verifier(server_password, iterations=4096))
    client.set_server_first(server.first(client.get_client_first()))
    final = server.final(client.get_client_final())
    client.set_server_final(final)  # the client checks the server's signature
    return final


@settings(max_examples=10, deadline=None)
@given(st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=126), min_size=1,
               max_size=40))
def test_the_right_password_passes_and_the_server_proves_itself(password: str) -> None:
    assert _exchange(password, password).startswith("v=")


def test_a_wrong_password_fails() -> None:
    with pytest.raises(ScramError, match="authentication failed"):
        _exchange("right", "wrong")


def test_libpq_first_message_with_no_user_name_is_taken() -> None:
    server = ScramServer(make_verifier("pw"), nonce="SERVERNONCE")
    first = server.first("n,,n=,r=clientnonce")
    assert first.startswith("r=clientnonceSERVERNONCE,s=") and first.endswith(",i=4096")


@pytest.mark.parametrize("message", ["", "garbage", "p=tls-server-end-point,,n=,r=x",
                                     "n,a=admin,n=,r=x", "n,,n=", "n,,r=x", "n,,n=,r="])
def test_malformed_or_channel_bound_first_messages_are_refused(message: str) -> None:
    with pytest.raises(ScramError):
        ScramServer(make_verifier("pw")).first(message)


def test_a_replayed_or_tampered_final_message_is_refused() -> None:
    client = scramp.ScramClient(["SCRAM-SHA-256"], "replica", "pw")
    server = ScramServer(make_verifier("pw"))
    client_first = client.get_client_first()
    client.set_server_first(server.first(client_first))
    final = client.get_client_final()
    for tampered in (final.replace("c=biws", "c=eSws"), final[:-4] + "AAA=",
                     final.replace("p=", "x=")):
        with pytest.raises(ScramError):
            ScramServer(server.verifier).final(tampered)
    with pytest.raises(ScramError):  # a new exchange has a new nonce
        other = ScramServer(server.verifier)
        other.first(client_first)
        other.final(final)
