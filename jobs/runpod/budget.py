"""rpq's own budget of RunPod requests, per endpoint and operation, shared by every process.

RunPod limits requests per endpoint in 10 s windows (/run 1000, /runsync, /status and /stream 2000
each, /cancel 100, /purge-queue 2) and answers 429 past them. rpq spends a budget set below those,
so however many workers, threads and jobs there are, it never draws a 429 by itself. Every RunPod
client call takes a token first (`RunPodClient(budget=...)`); a call that cannot get one in time is
not sent at all (`RunPodBudgetExhausted`), and the caller tries again later.

Operations, each with a budget of its own per endpoint:

    run      /run, /runsync and /retry (each starts work on a GPU)
    status   /status, /status-sync and /stream (reads of a job)
    cancel   /cancel
    purge    /purge-queue

/health is not budgeted (RunPod does not limit it; beat calls it once a period per endpoint).

**The guarantee.** However requests arrive, no closed 10 s window ever holds more sends than the
limit. The bucket is a token bucket of capacity `b` refilled at `r` tokens a second, kept as GCRA
(one "theoretical arrival time" per key, in integer microseconds, so the arithmetic is exact):
each grant moves it on by `T = 1/r`, and a request may go once it is no further than `(b - 1)·T`
ahead. For grants j..k whose send times lie in a window of length W, the state moves on by `T` per
grant, so `s_k >= s_j + (k - j)·T - (b - 1)·T`, which gives `k - j + 1 <= b + W/T`; the count is
a whole number, so it is at most `b + floor(W/T)`. `bucket_for` picks `b = max(1, limit // 10)`
and the smallest whole `T` with `floor(W/T) <= limit - b`, so that bound is the limit: exactly, up
to limits of 3,553 (a steady stream of requests reaches it); above that whole microseconds are too
coarse, and it is a little lower (19,985 for 20,000). `tests/unit/test_budget.py` checks it on
generated request sequences.

The guarantee is about when rpq *sends*. RunPod counts when requests *arrive*; a send delayed by
more than the next one (a slow connection, a stalled thread) moves requests closer together. That is
what the distance between rpq's defaults and RunPod's limits is for: at 1,400 /status a 10 s
window, sends would have to slip by over 4 s for RunPod's 2,000 to be reached.

**Sharing.** `RedisBudget` keeps the state in Redis (`rpq:budget:{op}:{endpoint_id}`) and moves it
with one Lua script, on Redis's clock (`TIME`), so every process on every machine spends one budget.
A request that must wait is given the next free slot at once (the script moves the state on) and
sleeps until it: one round trip, first come first served, no crowd of sleepers retrying together.
A key expires once its bucket is full again (an absent key is a full bucket). Denials are counted
in the hash `rpq:budget:denied` (`{op}|{endpoint_id}`), in the same script, for the exporter.

**When Redis does not answer**, work neither stops nor spends without limit: each process falls
back to a bucket of its own at a share of the limit (a quarter by default: four processes together
stay within it), logs a warning (once a minute at most), and tries Redis again every few seconds.
More processes than that may draw 429s while Redis is down; the client honours them like any 429.
Celery's broker is the same Redis, so in such an outage few tasks run anyway.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields, replace
from typing import Protocol

import redis

log = logging.getLogger("rpq.budget")

WINDOW_SECONDS = 10
WINDOW_US = WINDOW_SECONDS * 1_000_000

#: Budgeted operations, and which RunPod paths spend each one.
OPERATIONS = ("run", "status", "cancel", "purge")
OPERATION_OF_PATH: Mapping[str, str] = {
    "run": "run", "runsync": "run", "retry": "run",
    "status": "status", "status-sync": "status", "stream": "status",
    "cancel": "cancel",
    "purge-queue": "purge",
}

#: RunPod's documented base limits per 10 s, for the operations as rpq groups them (the lowest of a group).
RUNPOD_BASE_LIMITS: Mapping[str, int] = {"run": 1000, "status": 2000, "cancel": 100, "purge": 2}

#: A wait longer than this is never reserved; it bounds how far ahead of Redis's clock a key can be.
MAX_WAIT_SECONDS = 60.0

#: Far above any RunPod limit (thousands a window), and low enough for exact arithmetic in Redis's Lua.
MAX_LIMIT = 1_000_000

DENIED_KEY = "rpq:budget:denied"
SEP = "|"


def bucket_key(endpoint_id: str, op: str) -> str:
    return f"rpq:budget:{op}:{endpoint_id}"


@dataclass(frozen=True)
class Limits:
    """rpq's budget: requests per 10 s, per endpoint, per operation.

    The defaults sit below RunPod's base limits (1000 / 2000 / 100 / 2). RunPod raises an endpoint's
    limits with its running workers, so higher values are allowed; they are then the operator's word
    that the endpoint's limit is that high."""

    run: int = 800
    status: int = 1400
    cancel: int = 80
    purge: int = 1

    def __post_init__(self) -> None:
        for spec in fields(self):
            value = getattr(self, spec.name)
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_LIMIT:
                raise ValueError(f"{spec.name}: a limit must be a whole number of requests from 1 to {MAX_LIMIT:,}")

    def of(self, op: str) -> int:
        if op not in OPERATIONS:
            raise ValueError(f"unknown budgeted operation {op!r}")
        value: int = getattr(self, op)
        return value

    def share(self, fraction: float) -> Limits:
        """These limits times `fraction`, rounded down, never below 1."""
        return Limits(**{op: max(1, math.floor(self.of(op) * fraction)) for op in OPERATIONS})

    def __str__(self) -> str:
        return ",".join(f"{op}={self.of(op)}" for op in OPERATIONS)


def parse_limits(raw: str, problems: list[str], *, name: str = "RPQ_RUNPOD_LIMITS") -> Limits:
    """`run=800,status=1400` (any subset; the rest keep their defaults). Every problem is appended."""
    values: dict[str, int] = {}
    for item in (part.strip() for part in raw.split(",")):
        if not item:
            continue
        op, sep, number = (s.strip() for s in item.partition("="))
        if not sep:
            problems.append(f"{name}: expected operation=requests, got {item!r}")
        elif op not in OPERATIONS:
            problems.append(f"{name}: {op!r} is not a budgeted operation ({', '.join(OPERATIONS)})")
        elif op in values:
            problems.append(f"{name}: {op} is listed twice")
        elif not number.isascii() or not number.isdigit() or not 1 <= int(number) <= MAX_LIMIT:
            problems.append(f"{name}: {op} must be a whole number of requests per 10 s from 1 to "
                            f"{MAX_LIMIT:,}, got {number!r}")
            values[op] = 1  # so a second mention is still reported as listed twice
        else:
            values[op] = int(number)
    return replace(Limits(), **values)


# -- the pure arithmetic --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Bucket:
    """A token bucket of `burst` tokens refilled one per `interval_us`, as GCRA sees it."""

    burst: int
    interval_us: int

    @property
    def tolerance_us(self) -> int:
        """How far ahead of now the state may be for a request to go at once."""
        return (self.burst - 1) * self.interval_us


def bucket_for(limit: int, window_us: int = WINDOW_US) -> Bucket:
    """The bucket that lets at most `limit` requests through in any closed window of `window_us`.

    burst `b = max(1, limit // 10)`; interval `T = window // (limit - b + 1) + 1`, the smallest whole
    number of microseconds with `floor(window / T) <= limit - b`, so `b + floor(window / T) <= limit`
    (equal up to limits of 3,553).
    """
    if limit < 1:
        raise ValueError("limit must be at least 1")
    burst = max(1, limit // 10)
    return Bucket(burst=burst, interval_us=window_us // (limit - burst + 1) + 1)


@dataclass(frozen=True)
class Decision:
    granted: bool
    wait_us: int  #: granted: how long to sleep before sending; denied: until a token would be free
    state_us: int  #: the key's state afterwards (unchanged when denied)


def decide(bucket: Bucket, state_us: int | None, now_us: int, max_wait_us: int) -> Decision:
    """One request at `now_us` against a bucket whose state is `state_us` (None: a full bucket).

    The Lua script in `RedisBudget` is this function, line for line."""
    tat = now_us if state_us is None or state_us < now_us else state_us
    if tat - now_us > bucket.tolerance_us + bucket.interval_us + round(MAX_WAIT_SECONDS * 1_000_000):
        # Further ahead than any reservation can put it: the clock went back. Start afresh.
        tat = now_us
    wait = tat - bucket.tolerance_us - now_us
    if wait > max_wait_us:
        return Decision(granted=False, wait_us=wait, state_us=tat)
    return Decision(granted=True, wait_us=max(wait, 0), state_us=tat + bucket.interval_us)


def tokens_free(bucket: Bucket, state_us: int | None, now_us: int) -> int:
    """How many requests could go at `now_us` without waiting."""
    debt = 0 if state_us is None else max(state_us - now_us, 0)
    return max(bucket.burst - math.ceil(debt / bucket.interval_us), 0)


def expiry_ms(state_us: int, now_us: int) -> int:
    """A key's time to live: past the moment its bucket is full again (an absent key is a full one)."""
    return max(state_us - now_us, 0) // 1000 + 1000


# -- budgets --------------------------------------------------------------------------------------------


class Budget(Protocol):
    def acquire(self, endpoint_id: str, op: str, *, max_wait: float) -> float | None:
        """Take one token of `op` for `endpoint_id`, sleeping at most `max_wait` seconds for it.

        None: taken (any sleep is done). Otherwise nothing was taken, and the number is the seconds
        until a token would be free."""
        ...

    def available(self, endpoint_id: str, op: str) -> int:
        """Tokens free now (nothing is taken): for a batch poller sizing a batch."""
        ...


class UnlimitedBudget:
    """No limit at all: for tests and tools that opt out on purpose."""

    def acquire(self, endpoint_id: str, op: str, *, max_wait: float) -> float | None:
        return None

    def available(self, endpoint_id: str, op: str) -> int:
        return 2**31 - 1


def _max_wait_us(max_wait: float) -> int:
    return max(0, math.floor(min(max_wait, MAX_WAIT_SECONDS) * 1_000_000))


class LocalBudget:
    """The budget kept in this process only (unit tests, and `RedisBudget`'s fallback).

    `clock` (seconds) and `sleep` are injectable so tests run without waiting."""

    def __init__(self, limits: Limits = Limits(), *, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.limits = limits
        self._buckets = {op: bucket_for(limits.of(op)) for op in OPERATIONS}
        self._clock = clock
        self._sleep = sleep
        self._lock = threading.Lock()
        self._states: dict[tuple[str, str], int] = {}
        self.denied: dict[tuple[str, str], int] = {}

    def _now_us(self) -> int:
        return math.floor(self._clock() * 1_000_000)

    def acquire(self, endpoint_id: str, op: str, *, max_wait: float) -> float | None:
        bucket = self._buckets[op]
        key = (endpoint_id, op)
        with self._lock:
            now = self._now_us()
            decision = decide(bucket, self._states.get(key), now, _max_wait_us(max_wait))
            if not decision.granted:
                self.denied[key] = self.denied.get(key, 0) + 1
                return decision.wait_us / 1_000_000
            self._states[key] = decision.state_us
        if decision.wait_us:
            self._sleep(decision.wait_us / 1_000_000)
        return None

    def available(self, endpoint_id: str, op: str) -> int:
        with self._lock:
            return tokens_free(self._buckets[op], self._states.get((endpoint_id, op)), self._now_us())


# KEYS[1] the bucket's state (µs on Redis's clock), KEYS[2] the denial counts.
# ARGV: interval µs, tolerance µs, max wait µs, horizon µs (see `decide`), the denial field.
# Redis runs a script as one command, so no other client sees a half-made decision; TIME before a write
# needs Redis 5 or later (effects replication).
_ACQUIRE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local tolerance = tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
if tat - now > tonumber(ARGV[4]) then tat = now end
local wait = tat - tolerance - now
if wait > tonumber(ARGV[3]) then
  redis.call('HINCRBY', KEYS[2], ARGV[5], 1)
  return {0, wait}
end
local state = tat + interval
redis.call('SET', KEYS[1], string.format('%d', state), 'PX', math.floor((state - now) / 1000) + 1000)
if wait < 0 then wait = 0 end
return {1, wait}
"""

_AVAILABLE = """
local t = redis.call('TIME')
return {tonumber(t[1]) * 1000000 + tonumber(t[2]), redis.call('GET', KEYS[1])}
"""


class RedisBudget:
    """The budget shared through Redis by every process (see the module's docstring)."""

    #: After Redis fails, this process spends its own share for this long before asking Redis again.
    RETRY_REDIS_SECONDS = 5.0
    WARN_EVERY_SECONDS = 60.0

    def __init__(self, url: str, limits: Limits = Limits(), *, fallback_share: float = 0.25,
                 sleep: Callable[[float], None] = time.sleep, socket_timeout: float = 2.0) -> None:
        if not 0 < fallback_share <= 1:
            raise ValueError("fallback_share must be in (0, 1]")
        self.limits = limits
        self._buckets = {op: bucket_for(limits.of(op)) for op in OPERATIONS}
        self._redis = redis.Redis.from_url(url, socket_timeout=socket_timeout,
                                           socket_connect_timeout=socket_timeout)
        self._acquire = self._redis.register_script(_ACQUIRE)
        self._available = self._redis.register_script(_AVAILABLE)
        self._sleep = sleep
        self.fallback = LocalBudget(limits.share(fallback_share), sleep=sleep)
        self._fallback_share = fallback_share
        self._down_until = 0.0
        self._last_warning = -math.inf
        self._state_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"RedisBudget(limits={self.limits})"  # never the URL: it may carry a password

    def close(self) -> None:
        self._redis.close()

    def acquire(self, endpoint_id: str, op: str, *, max_wait: float) -> float | None:
        bucket = self._buckets[op]
        if self._redis_down():
            return self.fallback.acquire(endpoint_id, op, max_wait=max_wait)
        horizon = bucket.tolerance_us + bucket.interval_us + round(MAX_WAIT_SECONDS * 1_000_000)
        try:
            granted, wait_us = self._acquire(
                keys=[bucket_key(endpoint_id, op), DENIED_KEY],
                args=[bucket.interval_us, bucket.tolerance_us, _max_wait_us(max_wait), horizon,
                      SEP.join((op, endpoint_id))],
            )
        except redis.RedisError as exc:
            self._failed(exc)
            return self.fallback.acquire(endpoint_id, op, max_wait=max_wait)
        self._answered()
        if not granted:
            return int(wait_us) / 1_000_000
        if wait_us:
            self._sleep(int(wait_us) / 1_000_000)
        return None

    def available(self, endpoint_id: str, op: str) -> int:
        if self._redis_down():
            return self.fallback.available(endpoint_id, op)
        try:
            now_us, state = self._available(keys=[bucket_key(endpoint_id, op)])
        except redis.RedisError as exc:
            self._failed(exc)
            return self.fallback.available(endpoint_id, op)
        self._answered()
        return tokens_free(self._buckets[op], None if state is None else int(state), int(now_us))

    def denied(self) -> dict[tuple[str, str], int]:
        """Denials so far, by (endpoint id, operation): what the exporter shows."""
        return read_denied(self._redis)

    # -- Redis failing ------------------------------------------------------------------------------

    def _redis_down(self) -> bool:
        return time.monotonic() < self._down_until

    def _failed(self, exc: redis.RedisError) -> None:
        with self._state_lock:
            now = time.monotonic()
            self._down_until = now + self.RETRY_REDIS_SECONDS
            if now - self._last_warning >= self.WARN_EVERY_SECONDS:
                self._last_warning = now
                log.warning("RunPod request budget: Redis did not answer (%s); this process spends "
                            "%.0f%% of each limit on its own until it does", exc, self._fallback_share * 100)

    def _answered(self) -> None:
        if self._last_warning > -math.inf:
            with self._state_lock:
                if self._last_warning > -math.inf:
                    self._last_warning = -math.inf
                    log.info("RunPod request budget: Redis answers again; the budget is shared again")


def read_denied(client: redis.Redis) -> dict[tuple[str, str], int]:
    """The denial counts in Redis, by (endpoint id, operation)."""
    counts: dict[tuple[str, str], int] = {}
    for field, value in client.hgetall(DENIED_KEY).items():
        text = field.decode() if isinstance(field, bytes) else str(field)
        op, sep, endpoint_id = text.partition(SEP)
        if sep and op in OPERATIONS:
            counts[(endpoint_id, op)] = int(value)
    return counts
