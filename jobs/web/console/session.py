"""The console's session cookie and CSRF tokens, with no server-side store.

A session is a signed value: a random session id, its expiry and the SHA-256 digest of the API token it was
opened with (never the token). It is signed with HMAC-SHA256 under a key derived from RPQ_CONSOLE_SECRET, so
only this server can make one, and each request checks that the token is still configured: removing a token
from RPQ_API_TOKENS ends its sessions, and changing the secret ends them all.

A CSRF token is an HMAC of the session id under the same key, for another purpose, so it is bound to one session
and cannot be made without the secret. The login form, which has no session yet, is bound the same way to a
short-lived signed nonce cookie.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass

from jobs.web.signing import Sealer, b64

#: How long a console session lasts from login.
SESSION_SECONDS = 8 * 3600
#: How long a login form stays usable.
LOGIN_FORM_SECONDS = 30 * 60


@dataclass(frozen=True)
class Session:
    id: str
    expires_at: int
    token_digest: bytes  # SHA-256 of the API token the session was opened with

    def __repr__(self) -> str:  # the digest identifies a token: keep it out of logs and tracebacks
        return f"Session(id={self.id[:6]}…, expires_at={self.expires_at})"


class Signer(Sealer):
    """Signs and checks the console's cookies and CSRF tokens under RPQ_CONSOLE_SECRET."""

    def __init__(self, secret: str) -> None:
        super().__init__(secret, b"rpq console v1")

    # -- sessions ----------------------------------------------------------------------------------------------

    def new_session(self, token_digest: bytes, *, now: float | None = None) -> tuple[Session, str]:
        """A new session for the token with this digest, and the cookie value that carries it."""
        session = Session(id=secrets.token_hex(16), token_digest=token_digest,
                          expires_at=int((time.time() if now is None else now) + SESSION_SECONDS))
        value = self.seal("session", {"sid": session.id, "exp": session.expires_at, "dig": token_digest.hex()})
        return session, value

    def session(self, value: str | None, *, now: float | None = None) -> Session | None:
        """The session a cookie value carries, or None when it is missing, forged, altered or expired."""
        payload = self.open("session", value, now)
        if payload is None or not isinstance(payload.get("sid"), str) or not isinstance(payload.get("dig"), str):
            return None
        try:
            digest = bytes.fromhex(str(payload["dig"]))
        except ValueError:
            return None
        return Session(id=str(payload["sid"]), expires_at=int(str(payload["exp"])), token_digest=digest)

    def csrf_token(self, session: Session) -> str:
        return b64(self.mac("csrf", session.id.encode()))

    def csrf_ok(self, session: Session, token: str | None) -> bool:
        return bool(token) and hmac.compare_digest(str(token).encode(), self.csrf_token(session).encode())

    # -- the login form ----------------------------------------------------------------------------------------

    def new_login_nonce(self, *, now: float | None = None) -> tuple[str, str]:
        """A nonce cookie for a login form, and the form's CSRF token bound to it."""
        nonce = secrets.token_hex(16)
        value = self.seal("login", {"n": nonce, "exp": int((time.time() if now is None else now)
                                                               + LOGIN_FORM_SECONDS)})
        return value, b64(self.mac("login-csrf", nonce.encode()))

    def login_csrf_ok(self, cookie: str | None, token: str | None, *, now: float | None = None) -> bool:
        payload = self.open("login", cookie, now)
        if payload is None or not token or not isinstance(payload.get("n"), str):
            return False
        expected = b64(self.mac("login-csrf", str(payload["n"]).encode()))
        return hmac.compare_digest(str(token).encode(), expected.encode())


def token_digest(token: str) -> bytes:
    """The SHA-256 of a token, as RPQ_API_TOKENS's `sha256:` entries hold it."""
    return hashlib.sha256(token.encode()).digest()

