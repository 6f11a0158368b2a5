"""Who may use the console, and which jobs they see: every authorization decision of the console is here.

The console is for operators: a token whose scope includes admin (a bare RPQ_API_TOKENS entry is one) may log
in, and sees every tenant's jobs; a tenant's token may not. A principal limited to one tenant is still handled
throughout (`sees`, `tenant_filter`), so that a job of another tenant can never show, whatever `authorize` lets in.
The routes only ask `console_principal`, `sees` and `tenant_filter`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from fastapi import Request

from jobs.api import Job
from jobs.web.auth import Tokens
from jobs.web.console.session import Session, Signer


@dataclass(frozen=True)
class Principal:
    """Who a console session acts for."""

    session: Session
    #: None: every tenant's jobs; a name: that tenant's jobs alone.
    tenant: str | None = None
    admin: bool = False


def authorize(tokens: Tokens, token_digest: bytes, session: Session) -> Principal | None:
    """The principal of the token with this digest, if it may use the console; None if it may not (any more).

    Checked at login and on every request, so a token removed from RPQ_API_TOKENS ends its sessions at once.
    An API served without tokens (RPQ_API_ALLOW_NO_AUTH) has no console: anyone could log in."""
    if tokens.open:
        return None
    grant = tokens.grant_for_digest(token_digest)
    if grant is None:
        return None
    return Principal(session=session, tenant=grant.sees, admin=grant.admin)


def is_admin(principal: Principal | None) -> bool:
    """May this principal use the console at all? (Operators only: a submit or read token may not.)"""
    return principal is not None and principal.admin


def console_principal(request: Request, signer: Signer, cookie: str | None) -> Principal | None:
    """The admin principal of the request's session cookie, or None (no session, forged, expired, revoked)."""
    session = signer.session(cookie)
    if session is None:
        return None
    tokens: Tokens = request.app.state.tokens
    principal = authorize(tokens, session.token_digest, session)
    return principal if is_admin(principal) else None


def job_tenant(job: Job) -> str | None:
    """The tenant a job belongs to (None: a job submitted without one)."""
    return job.tenant


def sees(principal: Principal, job: Job) -> bool:
    """May the principal see (and act on) this job? A tenant-scoped one sees its own tenant's jobs alone."""
    return principal.tenant is None or job_tenant(job) == principal.tenant


def shows_endpoints(principal: Principal) -> bool:
    """The endpoint panel counts every tenant's jobs: operators of every tenant alone see it."""
    return principal.tenant is None


def tenant_filter(principal: Principal, asked: str | None) -> str | None:
    """The tenant a listing is limited to: the principal's own, or else the one asked for (None: all)."""
    return principal.tenant if principal.tenant is not None else asked


def tenant_arguments(tenant: str | None) -> dict[str, Any]:
    """Keyword arguments that pass a tenant filter on to `list_jobs` and `select_jobs`."""
    return {"tenant": tenant} if tenant else {}
