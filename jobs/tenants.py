"""Tenants: who a job belongs to, and the limits each tenant's submits meet.

A tenant is a name (`shop`) that a job, an upload and an API token carry. A tenant's token sees only
its tenant's jobs (jobs.web.auth); `jobs.submit(..., tenant=...)` records it from Python.

Two limits apply to a tenant's submits, set per tenant (`shop=100`) with `*` for every other tenant:

- jobs in flight (RPQ_TENANT_MAX_IN_FLIGHT): the tenant's jobs not yet final, counted in the job table,
  which is the truth every API process shares. The count and the insert are not one transaction, so
  submits racing each other may pass the limit by as many as race (a few, not a flood).
- submits per minute (RPQ_TENANT_SUBMITS_PER_MINUTE): a counter in Redis per tenant and clock minute
  (Redis's clock, so every process counts in one window), moved by one Lua script: a submit is counted
  only when it is let through. A fixed window: at most N in each minute, so up to 2N across a minute's
  end. Simple, one key per tenant and minute, and exact within it.

When Redis does not answer, submits per minute fail open: the submit goes on, and a warning is logged
(once a minute at most). Jobs in flight still bound what a tenant can queue, since they are counted in
the database, and Redis is Celery's broker too, so in such an outage little runs anyway; refusing every
submit would stop the web apps for what is a rate limit, not a safety limit. Redis is asked again a few
seconds later, so the submits meanwhile do not each wait for its timeout.
"""

from __future__ import annotations

import logging
import math
import re
import threading
import time
from collections.abc import Mapping

import redis

from jobs.errors import RpqError

log = logging.getLogger("rpq.tenants")

TENANT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z")
MAX_TENANT_LENGTH = 64
#: The limit for tenants a limits setting does not list.
EVERY_TENANT = "*"
#: A tenant at its limit of jobs in flight is told to try again after this: jobs finish at any time.
IN_FLIGHT_RETRY_SECONDS = 5
#: Redis keys, one per tenant and clock minute (the minute's number is appended).
SUBMITS_KEY = "rpq:tenant-submits:{tenant}:"


class TenantLimited(RpqError):
    """The tenant is at one of its limits: nothing was written. Try again after `retry_after` seconds."""

    def __init__(self, tenant: str, limit: str, allowed: int, retry_after: float) -> None:
        self.tenant, self.limit, self.allowed = tenant, limit, allowed
        self.retry_after = max(1, math.ceil(retry_after))
        what = "jobs in flight" if limit == "in_flight" else "submits per minute"
        super().__init__(f"tenant {tenant} is at its limit of {allowed} {what}; try again in {self.retry_after} s")


def limit_for(limits: Mapping[str, int], tenant: str) -> int | None:
    """A tenant's limit in a `NAME=N,*=N` setting, or None when it has none."""
    return limits.get(tenant, limits.get(EVERY_TENANT))


# KEYS[1] the tenant's key prefix; ARGV[1] the submits allowed a minute.
# Returns {1, 0} when counted, {0, ms until the minute ends} when not. TIME before a write needs Redis 5+.
_HIT = """
local t = redis.call('TIME')
local minute = math.floor(tonumber(t[1]) / 60)
local key = KEYS[1] .. minute
local n = tonumber(redis.call('GET', key) or '0')
if n >= tonumber(ARGV[1]) then
  local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  return {0, (minute + 1) * 60000 - now_ms}
end
redis.call('INCR', key)
redis.call('EXPIRE', key, 120)
return {1, 0}
"""


class SubmitRate:
    """Submits per tenant and minute, counted in Redis and shared by every process that uses it."""

    #: After Redis fails, submits are let through uncounted for this long before Redis is asked again.
    RETRY_REDIS_SECONDS = 5.0
    WARN_EVERY_SECONDS = 60.0

    def __init__(self, url: str, *, socket_timeout: float = 0.5) -> None:
        self._redis = redis.Redis.from_url(url, socket_timeout=socket_timeout, socket_connect_timeout=socket_timeout)
        self._hit = self._redis.register_script(_HIT)
        self._down_until = 0.0
        self._last_warning = -math.inf
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return "SubmitRate()"  # never the URL: it may carry a password

    def close(self) -> None:
        self._redis.close()

    def take(self, tenant: str, per_minute: int) -> float | None:
        """Count one submit of `tenant`; None when let through, else the seconds until one may be."""
        if time.monotonic() < self._down_until:
            return None
        try:
            counted, wait_ms = self._hit(keys=[SUBMITS_KEY.format(tenant=tenant)], args=[per_minute])
        except redis.RedisError as exc:
            self._failed(exc)
            return None
        return None if counted else max(int(wait_ms), 1) / 1000

    def _failed(self, exc: redis.RedisError) -> None:
        with self._lock:
            now = time.monotonic()
            self._down_until = now + self.RETRY_REDIS_SECONDS
            if now - self._last_warning >= self.WARN_EVERY_SECONDS:
                self._last_warning = now
                log.warning("tenant submit limits: Redis did not answer (%s); submits per minute are not "
                            "counted until it does (jobs in flight still are)", type(exc).__name__)
