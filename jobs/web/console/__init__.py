"""The operator console: server-rendered pages at /console on `rpq api` (no build step, no script, no CDN).

    GET  /console/login, POST /console/login    an admin API token for an HttpOnly, SameSite=Strict session
    POST /console/logout
    GET  /console/jobs                          jobs by status, endpoint, tenant and age; bulk actions from there
    GET  /console/jobs/{id}                     a job, its event timeline and its stream
    GET  /console/jobs/{id}/{action}            what cancel, retry or release would do; POST does it
    GET  /console/bulk/{action}                 the dry-run list of a bulk action; POST does it to those jobs
    GET  /console/endpoints                     every configured endpoint's queue panel (stored rows only)

Off unless RPQ_CONSOLE_SECRET is set. Every POST carries the session's CSRF token; every page carries a CSP
without inline script, and is never cached.
"""

from jobs.web.console.routes import router

__all__ = ["router"]
