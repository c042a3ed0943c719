"""Who may use the web console: sessions made from the home's access key (pure, no
I/O; the clock is passed in).

Two ways in: the login form (access key id and secret, checked by the caller against
the state) or a one-time link ``borealis console`` prints (its token good once, for five
minutes). Either gives a session token, kept in a cookie (HttpOnly, SameSite=Strict)
for twelve hours. Tokens are random (``secrets``), compared in constant time, and kept
only as their hashes.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass, field

SESSION_S = 12 * 3600
LINK_S = 300
COOKIE = "borealis_console"


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass
class Sessions:
    sessions: dict[str, float] = field(default_factory=dict)  # digest -> expiry
    links: dict[str, float] = field(default_factory=dict)  # digest -> expiry

    def new_link(self, now: float) -> str:
        token = secrets.token_urlsafe(24)
        self.links[_digest(token)] = now + LINK_S
        return token

    def use_link(self, token: str, now: float) -> str | None:
        """A session for a link's token, once; None if it is unknown, used or stale."""
        expiry = self.links.pop(_digest(token), None)
        return self.new_session(now) if expiry is not None and expiry > now else None

    def new_session(self, now: float) -> str:
        self._expire(now)
        token = secrets.token_urlsafe(32)
        self.sessions[_digest(token)] = now + SESSION_S
        return token

    def valid(self, token: str | None, now: float) -> bool:
        if not token:
            return False
        digest = _digest(token)
        for known, expiry in list(self.sessions.items()):
            if hmac.compare_digest(known, digest):
                return expiry > now
        return False

    def end(self, token: str | None) -> None:
        if token:
            self.sessions.pop(_digest(token), None)

    def _expire(self, now: float) -> None:
        for table in (self.sessions, self.links):
            for digest in [d for d, expiry in table.items() if expiry <= now]:
                del table[digest]
