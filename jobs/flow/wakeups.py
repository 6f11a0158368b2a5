"""Wake-ups: the Celery messages that tell a worker to look at the job table.

The table is the schedule (a PENDING row is work for the dispatcher, an in-flight row's
`next_poll_at` is work for the poller); a message only says "look now" or "look at time T". So
there is one chain of messages per endpoint and role, not one per job, and a wait of any length
costs a row, not a countdown message held in a worker's memory.

A wake-up is deduplicated in Redis: the key `rpq:wake:{task}:{endpoint}` holds the time of the
earliest message already on its way, and a request for that time or later publishes nothing. A
task clears the key as it starts, before it reads the table, so a row committed after its read
always finds a later message. Losing the key (a FLUSHALL, Redis down) only costs a duplicate
message, which finds nothing to do; losing a message is healed by the reconciler, which wakes every
endpoint with work each time it runs.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import redis

log = logging.getLogger("rpq.wakeups")

#: A wake-up's key outlives its due time by this much: a message that never ran (lost with a killed
#: worker) stops suppressing new ones once it is this late.
STALE_AFTER_MS = 10_000

# KEYS[1]: the wake-up key. ARGV[1]: the due time (ms since the epoch). Returns 1 when the caller must
# publish (nothing earlier is on its way), 0 when a message due at or before then already is.
_CLAIM = """
local due = tonumber(ARGV[1])
local current = tonumber(redis.call('GET', KEYS[1]))
if current and current <= due then
    return 0
end
local now = redis.call('TIME')
local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
redis.call('SET', KEYS[1], due, 'PX', math.max(due - now_ms, 0) + tonumber(ARGV[2]))
return 1
"""

# Clear the key if the message it stands for is due by now (it is the one starting, or an earlier
# one): a later wake-up stays, so its message is not published twice.
_CLEAR = """
local current = tonumber(redis.call('GET', KEYS[1]))
if current and current <= tonumber(ARGV[1]) then
    redis.call('DEL', KEYS[1])
end
return 0
"""

Publish = Callable[[str, str, float | None], None]


class Wakeups:
    """Publish wake-ups through `publish`, deduplicated in Redis at `redis_url` (None: never
    deduplicated, every request publishes; for tests that record messages)."""

    def __init__(self, publish: Publish, redis_url: str | None = None) -> None:
        self._publish = publish
        self._redis = redis.Redis.from_url(redis_url, socket_timeout=2, socket_connect_timeout=2) if redis_url \
            else None
        self._claim: Any = self._redis.register_script(_CLAIM) if self._redis else None
        self._clear: Any = self._redis.register_script(_CLEAR) if self._redis else None
        self._last_warning = 0.0

    def wake(self, task: str, endpoint_id: str, in_seconds: float = 0.0) -> None:
        """Make sure `task` runs for `endpoint_id` within `in_seconds` (now, when 0). Raises what the
        publish raises: callers that must not fail catch it (the reconciler heals a lost wake-up)."""
        in_seconds = max(in_seconds, 0.0)
        if self._claim is not None:
            due_ms = int((time.time() + in_seconds) * 1000)
            try:
                if not self._claim(keys=[key(task, endpoint_id)], args=[due_ms, STALE_AFTER_MS]):
                    return
            except redis.RedisError as exc:
                self._warn(exc)  # publish anyway: a duplicate is harmless, a missing one is not
        self._publish(task, endpoint_id, in_seconds or None)

    def started(self, task: str, endpoint_id: str) -> None:
        """Called by a task as it starts, before it reads the table."""
        if self._clear is None:
            return
        try:
            self._clear(keys=[key(task, endpoint_id)], args=[int(time.time() * 1000) + 50])
        except redis.RedisError as exc:
            self._warn(exc)

    def _warn(self, exc: Exception) -> None:
        if time.monotonic() - self._last_warning > 60:
            self._last_warning = time.monotonic()
            log.warning("wake-ups not deduplicated (Redis: %s); duplicates are harmless", exc)


def key(task: str, endpoint_id: str) -> str:
    return f"rpq:wake:{task}:{endpoint_id}"
