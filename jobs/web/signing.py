"""Signed, expiring values with no server-side store: what the console's cookies and the API's events URLs are.

A value is a JSON payload and its HMAC-SHA256, under a key derived from a server secret and a context (so the
same secret never signs two things alike), and for a purpose within that context (a session cookie is not a
CSRF token). Every payload carries `exp`, a Unix time after which it is refused.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import time


class Sealer:
    """Seals payloads into signed strings and opens them again, under one secret and one context."""

    def __init__(self, secret: str, context: bytes) -> None:
        # A key of its own per context, so that this secret's HMACs are never those of anything else it signs.
        self._key = hmac.new(secret.encode(), context, hashlib.sha256).digest()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(***)"

    def mac(self, purpose: str, data: bytes) -> bytes:
        return hmac.new(self._key, purpose.encode() + b"\x00" + data, hashlib.sha256).digest()

    def seal(self, purpose: str, payload: dict[str, object]) -> str:
        body = b64(json.dumps(payload, separators=(",", ":"), sort_keys=True).encode())
        return f"{body}.{b64(self.mac(purpose, body.encode()))}"

    def open(self, purpose: str, value: str | None, now: float | None = None) -> dict[str, object] | None:
        """The payload of a value sealed for `purpose`, or None: missing, forged, altered or expired."""
        if not value or value.count(".") != 1 or len(value) > 1024:
            return None
        body, _, mac = value.partition(".")
        given = unb64(mac)
        if given is None or not hmac.compare_digest(given, self.mac(purpose, body.encode())):
            return None
        raw = unb64(body)
        payload = json.loads(raw) if raw is not None else None  # signed by us: well-formed JSON
        if not isinstance(payload, dict):
            return None
        expires = payload.get("exp")
        if not isinstance(expires, int) or expires <= (time.time() if now is None else now):
            return None
        return payload


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unb64(text: str) -> bytes | None:
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        return None
