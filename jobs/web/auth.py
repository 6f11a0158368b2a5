"""Bearer tokens for the HTTP API.

`RPQ_API_TOKENS` holds comma-separated entries, each `sha256:<hex digest of a token>` (recommended:
the environment then holds nothing a thief could use) or a plain token. Tokens are compared as
SHA-256 digests with `hmac.compare_digest`, so neither a token's length nor its first wrong byte
shows in the time an answer takes. No message, log line or repr ever contains a token or an entry.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from jobs.errors import ConfigError

TOKENS_VARIABLE = "RPQ_API_TOKENS"
NO_AUTH_VARIABLE = "RPQ_API_ALLOW_NO_AUTH"
DIGEST_PREFIX = "sha256:"
# Tokens start with this so that secret scanners (and people) can tell what a leaked one is for.
TOKEN_PREFIX = "rpq_"


def new_token() -> tuple[str, str]:
    """A new random token and its `sha256:` entry for RPQ_API_TOKENS: give the token to the client,
    put the entry in the server's environment."""
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    return token, DIGEST_PREFIX + _digest(token.encode()).hex()


@dataclass(frozen=True)
class Tokens:
    """The tokens the API accepts; `open` means none are needed (chosen on purpose)."""

    digests: tuple[bytes, ...] = field(repr=False)
    open: bool = False

    @classmethod
    def configure(
        cls,
        entries: str | Iterable[str] | None = None,
        *,
        allow_no_auth: bool | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> Tokens:
        """The accepted tokens from `entries` (a list, or a string like RPQ_API_TOKENS), or from the
        environment for what is None.

        Refuses (ConfigError) to run with no token unless no-auth was allowed explicitly.
        """
        env = os.environ if environ is None else environ
        problems: list[str] = []
        if entries is None:
            entries = env.get(TOKENS_VARIABLE, "")
        if isinstance(entries, str):
            entries = entries.split(",")
        digests = tuple(_parse_entries(entries, problems))
        if allow_no_auth is None:
            allow_no_auth = _flag(env.get(NO_AUTH_VARIABLE, ""), problems)
        if not digests and not allow_no_auth and not problems:
            problems.append(
                f"{TOKENS_VARIABLE}: no API token configured; make one with `rpq api token` (or "
                f"jobs.web.new_token()), or set {NO_AUTH_VARIABLE}=true to serve without authentication on purpose"
            )
        if problems:
            raise ConfigError(problems)
        return cls(digests=digests, open=not digests)

    def accepts(self, token: str | None) -> bool:
        if self.open:
            return True
        if not token:
            return False
        # Header values arrive decoded as latin-1; encoding them back gives the bytes that were sent.
        presented = _digest(token.encode("latin-1"))
        # Every entry is compared, so the time taken does not say which one (if any) matched.
        matches = [hmac.compare_digest(presented, digest) for digest in self.digests]
        return any(matches)


def _parse_entries(entries: Iterable[str], problems: list[str]) -> Iterable[bytes]:
    for number, entry in enumerate((e.strip() for e in entries), start=1):
        if not entry:
            continue
        if not entry.startswith(DIGEST_PREFIX):
            yield _digest(entry.encode())
            continue
        hex_digest = entry.removeprefix(DIGEST_PREFIX)
        try:
            digest = bytes.fromhex(hex_digest)
        except ValueError:
            digest = b""
        if len(digest) != hashlib.sha256().digest_size:
            # The entry itself is not quoted: it might be a real token with a typo in it.
            problems.append(f"{TOKENS_VARIABLE}: entry {number} is not sha256: followed by 64 hex digits")
        else:
            yield digest


def _flag(raw: str, problems: list[str]) -> bool:
    value = raw.strip().lower()
    if value not in ("", "true", "false"):
        problems.append(f"{NO_AUTH_VARIABLE}: expected true or false")
    return value == "true"


def _digest(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()
