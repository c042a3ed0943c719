"""Console sessions: one-time links, expiry, sign-out."""

from __future__ import annotations

from borealis.console.sessions import LINK_S, SESSION_S, Sessions


def test_a_link_signs_in_once_and_only_while_fresh() -> None:
    s = Sessions()
    link = s.new_link(now=1000.0)
    session = s.use_link(link, now=1001.0)
    assert session is not None and s.valid(session, now=1002.0)
    assert s.use_link(link, now=1003.0) is None  # once
    stale = s.new_link(now=2000.0)
    assert s.use_link(stale, now=2000.0 + LINK_S + 1) is None


def test_a_session_ends_when_it_expires_or_signs_out() -> None:
    s = Sessions()
    token = s.new_session(now=0.0)
    assert s.valid(token, now=SESSION_S - 1)
    assert not s.valid(token, now=SESSION_S + 1)
    other = s.new_session(now=10.0)
    s.end(other)
    assert not s.valid(other, now=11.0)
    assert not s.valid(None, now=11.0) and not s.valid("made-up", now=11.0)
