"""Bearer tokens for the HTTP API, and what each one may do.

`RPQ_API_TOKENS` holds entries separated by commas (or newlines). An entry is a token's secret, alone or
after attributes joined by `;`:

    sha256:<hex>                                              admin (every tenant, every route)
    tenant=shop;scope=submit+read;endpoints=tts+export;sha256:<hex>

The secret is `sha256:<hex digest of a token>` (recommended: the environment then holds nothing a thief
could use) or a plain token. An entry without attributes is an admin token, as every token was before
tenants existed, so an existing configuration keeps working unchanged. The attributes:

- `tenant=NAME`: the jobs and uploads this token makes are the tenant's, and it sees only the tenant's.
  Every entry but an admin one needs it.
- `scope=A+B`: any of submit, read, cancel, retry, admin. Without it, a tenant's token has
  submit+read+cancel+retry. `admin` is every scope on every tenant's jobs, and bare RunPod endpoint ids.
- `endpoints=A+B`: the endpoint names (from RUNPOD_ENDPOINTS) it may submit to; without it, every name.
  Only an admin token may name a bare RunPod endpoint id.

Tokens are compared as SHA-256 digests with `hmac.compare_digest`, every entry each time, so neither
a token's length, its first wrong byte nor which entry matched shows in the time an answer takes. No
message, log line or repr ever contains a token, a digest or an entry.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field

from jobs.errors import ConfigError
from jobs.settings import ENDPOINT_NAME_RE
from jobs.tenants import TENANT_RE

TOKENS_VARIABLE = "RPQ_API_TOKENS"
NO_AUTH_VARIABLE = "RPQ_API_ALLOW_NO_AUTH"
DIGEST_PREFIX = "sha256:"
# Tokens start with this so that secret scanners (and people) can tell what a leaked one is for.
TOKEN_PREFIX = "rpq_"

SUBMIT, READ, CANCEL, RETRY, ADMIN = "submit", "read", "cancel", "retry", "admin"
SCOPES = (SUBMIT, READ, CANCEL, RETRY, ADMIN)
#: What a tenant's token may do when its entry names no scope: everything on the tenant's own jobs.
TENANT_SCOPES = frozenset({SUBMIT, READ, CANCEL, RETRY})
_ATTRIBUTES = ("tenant", "scope", "endpoints")


@dataclass(frozen=True)
class Grant:
    """What one token may do: its tenant's jobs (every tenant's for admin), with these scopes, on these
    endpoint names (None: every configured name)."""

    tenant: str | None
    scopes: frozenset[str]
    endpoints: frozenset[str] | None = None

    @property
    def admin(self) -> bool:
        return ADMIN in self.scopes

    @property
    def sees(self) -> str | None:
        """The tenant whose jobs this token reads and changes; None for admin: every tenant's."""
        return None if self.admin else self.tenant

    def allows(self, scope: str) -> bool:
        return self.admin or scope in self.scopes

    def may_use(self, endpoint: str, configured: Collection[str]) -> bool:
        """Whether this token may run work on `endpoint` (a name or a bare RunPod id)."""
        if self.admin:
            return True
        return endpoint in configured and (self.endpoints is None or endpoint in self.endpoints)

    def usable_endpoints(self, configured: Collection[str]) -> list[str]:
        return sorted(name for name in configured if self.endpoints is None or name in self.endpoints)


#: The grant of an entry without attributes, and of every request when no token is needed.
ADMIN_GRANT = Grant(tenant=None, scopes=frozenset({ADMIN}))


def new_token() -> tuple[str, str]:
    """A new random token and its `sha256:` entry for RPQ_API_TOKENS: give the token to the client,
    put the entry in the server's environment."""
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    return token, DIGEST_PREFIX + _digest(token.encode()).hex()


def entry_for(digest_entry: str, *, tenant: str | None = None, scopes: Iterable[str] = (),
              endpoints: Iterable[str] = ()) -> str:
    """The RPQ_API_TOKENS entry for a token's `sha256:` line with these attributes (none: admin).
    ConfigError when the attributes would not parse back."""
    parts = [f"tenant={tenant}"] if tenant is not None else []
    scopes, endpoints = list(scopes), list(endpoints)
    if scopes:
        parts.append("scope=" + "+".join(scopes))
    if endpoints:
        parts.append("endpoints=" + "+".join(endpoints))
    entry = ";".join([*parts, digest_entry])
    problems: list[str] = []
    _parse_entry(entry, 1, problems)
    if problems:
        raise ConfigError(problems)
    return entry


@dataclass(frozen=True)
class Tokens:
    """The tokens the API accepts and what each may do; `open` means none are needed (chosen on purpose)."""

    grants: tuple[tuple[bytes, Grant], ...] = field(repr=False)
    open: bool = False

    @classmethod
    def configure(
        cls,
        entries: str | Iterable[str] | None = None,
        *,
        allow_no_auth: bool | None = None,
        environ: Mapping[str, str] | None = None,
        endpoints: Collection[str] | None = None,
    ) -> Tokens:
        """The accepted tokens from `entries` (a list, or a string like RPQ_API_TOKENS), or from the
        environment for what is None. With `endpoints` (the configured names), an entry's allow-list
        must name only those.

        Refuses (ConfigError, every problem at once) to run with a malformed entry, or with no token
        unless no-auth was allowed explicitly.
        """
        env = os.environ if environ is None else environ
        problems: list[str] = []
        if entries is None:
            entries = env.get(TOKENS_VARIABLE, "")
        if isinstance(entries, str):
            entries = re.split(r"[,\n]", entries)
        grants: list[tuple[bytes, Grant]] = []
        numbers: dict[bytes, int] = {}
        for number, entry in enumerate((e.strip() for e in entries), start=1):
            if not entry:
                continue
            parsed = _parse_entry(entry, number, problems)
            if parsed is None:
                continue
            digest, grant = parsed
            if digest in numbers:
                # Two grants for one token: which applies would depend on the order, so neither does.
                problems.append(f"{TOKENS_VARIABLE}: entry {number} has the same token as entry {numbers[digest]}")
                continue
            numbers[digest] = number
            unknown = sorted((grant.endpoints or set()) - set(endpoints)) if endpoints is not None else []
            if unknown:
                problems.append(f"{TOKENS_VARIABLE}: entry {number} allows endpoints that are not in RUNPOD_ENDPOINTS "
                                f"({', '.join(sorted(endpoints or ())) or 'none configured'})")
            grants.append((digest, grant))
        if allow_no_auth is None:
            allow_no_auth = _flag(env.get(NO_AUTH_VARIABLE, ""), problems)
        if not grants and not allow_no_auth and not problems:
            problems.append(
                f"{TOKENS_VARIABLE}: no API token configured; make one with `rpq api token` (or "
                f"jobs.web.new_token()), or set {NO_AUTH_VARIABLE}=true to serve without authentication on purpose"
            )
        if problems:
            raise ConfigError(problems)
        return cls(grants=tuple(grants), open=not grants)

    def grant_for(self, token: str | None) -> Grant | None:
        """What `token` may do, or None when it is not one of ours."""
        if self.open:
            return ADMIN_GRANT
        if not token:
            return None
        # Header values arrive decoded as latin-1; encoding them back gives the bytes that were sent.
        return self.grant_for_digest(_digest(token.encode("latin-1")))

    def grant_for_digest(self, presented: bytes) -> Grant | None:
        """What the token with this SHA-256 digest may do (the console keeps only the digest), or None."""
        if self.open:
            return None  # nobody to tell apart: no digest stands for a token here
        # Every entry is compared, so the time taken does not say which one (if any) matched.
        found: Grant | None = None
        for digest, grant in self.grants:
            if hmac.compare_digest(presented, digest):
                found = grant
        return found

    def accepts(self, token: str | None) -> bool:
        return self.grant_for(token) is not None


def _parse_entry(entry: str, number: int, problems: list[str]) -> tuple[bytes, Grant] | None:
    """An entry's digest and grant, or None with its problems added. Nothing of the entry is quoted:
    a typo may have put a real token anywhere in it."""
    *attributes, secret = (part.strip() for part in entry.split(";"))
    where = f"{TOKENS_VARIABLE}: entry {number}"
    before = len(problems)
    digest = _secret_digest(secret, where, problems)
    if not attributes:
        return None if digest is None else (digest, ADMIN_GRANT)
    values: dict[str, str] = {}
    for index, attribute in enumerate(attributes, start=1):
        name, sep, value = (s.strip() for s in attribute.partition("="))
        if not sep or name not in _ATTRIBUTES:
            problems.append(f"{where}: part {index} is not one of {', '.join(a + '=...' for a in _ATTRIBUTES)} "
                            "(the token's sha256: line, or the token, comes last)")
        elif name in values:
            problems.append(f"{where}: {name} is given twice")
        else:
            values[name] = value
    tenant = values.get("tenant")
    if tenant is not None and not TENANT_RE.match(tenant):
        problems.append(f"{where}: tenant must be 1 to 64 letters, digits, '.', '_' or '-', starting with a "
                        "letter or digit")
    scopes = frozenset(TENANT_SCOPES)
    if "scope" in values:
        named = values["scope"].split("+")
        if not all(s.strip() in SCOPES for s in named):
            problems.append(f"{where}: scope must be one or more of {', '.join(SCOPES)} joined by '+'")
        scopes = frozenset(s.strip() for s in named)
    endpoints: frozenset[str] | None = None
    if "endpoints" in values:
        names = [n.strip() for n in values["endpoints"].split("+")]
        if not all(ENDPOINT_NAME_RE.match(n) for n in names):
            problems.append(f"{where}: endpoints must be endpoint names from RUNPOD_ENDPOINTS joined by '+'")
        endpoints = frozenset(names)
    if ADMIN in scopes and endpoints is not None:
        problems.append(f"{where}: an admin token may use every endpoint; drop endpoints= or the admin scope")
    if ADMIN not in scopes and "tenant" not in values:
        problems.append(f"{where}: a token without the admin scope needs a tenant (tenant=NAME)")
    if len(problems) > before or digest is None:
        return None
    return digest, Grant(tenant=tenant, scopes=scopes, endpoints=endpoints)


def _secret_digest(secret: str, where: str, problems: list[str]) -> bytes | None:
    if not secret:
        problems.append(f"{where}: no token: an entry ends with the token's sha256: line (or the token)")
        return None
    if not secret.startswith(DIGEST_PREFIX):
        return _digest(secret.encode())
    try:
        digest = bytes.fromhex(secret.removeprefix(DIGEST_PREFIX))
    except ValueError:
        digest = b""
    if len(digest) != hashlib.sha256().digest_size:
        problems.append(f"{where} is not sha256: followed by 64 hex digits")
        return None
    return digest


def _flag(raw: str, problems: list[str]) -> bool:
    value = raw.strip().lower()
    if value not in ("", "true", "false"):
        problems.append(f"{NO_AUTH_VARIABLE}: expected true or false")
    return value == "true"


def _digest(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()
