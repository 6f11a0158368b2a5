"""Fault injection and RunPod's per-endpoint rate limits.

A fault rule (runtime ``POST /_sim/faults`` or the ``fault_*_rate`` config defaults) picks requests by
operation and endpoint and makes them fail in one of four ways:

- ``5xx``: answer with ``status`` (default 503);
- ``429``: answer 429 with a ``Retry-After`` of ``retry_after`` seconds;
- ``slow``: answer only after ``delay`` seconds (a client with a shorter timeout gives up);
- ``drop``: start the response and then close the connection, so the client never gets a full answer.

``when: "before"`` fails without doing anything; ``when: "after"`` does the operation (the job really is
enqueued, cancelled, ...) and then fails the response. That is how tests get a ``/run`` whose outcome is
unknown to the client.
"""

from __future__ import annotations

import math
import random
from collections import deque
from dataclasses import dataclass
from typing import Any

OPS = frozenset({"run", "runsync", "status", "status-sync", "stream", "cancel", "retry", "purge-queue", "health"})
KINDS = frozenset({"5xx", "429", "slow", "drop"})


@dataclass
class FaultRule:
    kind: str
    op: str = "*"
    endpoint: str | None = None
    rate: float = 1.0
    count: int | None = None  #: Apply to the next N matching requests, then expire.
    delay: float = 5.0
    status: int = 503
    retry_after: int = 1
    when: str = "before"

    @classmethod
    def parse(cls, raw: Any) -> FaultRule:
        """Build a rule from its JSON form; raises ValueError with a readable message."""
        if not isinstance(raw, dict):
            raise ValueError("a fault rule must be an object")
        unknown = set(raw) - {"op", "endpoint", "kind", "rate", "count", "delay", "status", "retry_after", "when"}
        if unknown:
            raise ValueError(f"unknown fault rule fields: {sorted(unknown)}")
        rule = cls(
            kind=raw.get("kind", ""),
            op=raw.get("op", "*"),
            endpoint=raw.get("endpoint"),
            rate=raw.get("rate", 1.0),
            count=raw.get("count"),
            delay=raw.get("delay", 5.0),
            status=raw.get("status", 503),
            retry_after=raw.get("retry_after", 1),
            when=raw.get("when", "before"),
        )
        if rule.kind not in KINDS:
            raise ValueError(f"kind must be one of {sorted(KINDS)}")
        if rule.op != "*" and rule.op not in OPS:
            raise ValueError(f"op must be '*' or one of {sorted(OPS)}")
        if rule.endpoint is not None and not isinstance(rule.endpoint, str):
            raise ValueError("endpoint must be a string")
        if not _number(rule.rate) or not 0 <= rule.rate <= 1:
            raise ValueError("rate must be between 0 and 1")
        if rule.count is not None and (not _integer(rule.count) or rule.count < 1):
            raise ValueError("count must be a positive integer")
        if not _number(rule.delay) or rule.delay < 0:
            raise ValueError("delay must be a non-negative number of seconds")
        if not _integer(rule.status) or not 500 <= rule.status <= 599:
            raise ValueError("status must be a 5xx code")
        if not _integer(rule.retry_after) or rule.retry_after < 0:
            raise ValueError("retry_after must be a non-negative integer")
        if rule.when not in ("before", "after"):
            raise ValueError("when must be 'before' or 'after'")
        return rule

    def matches(self, op: str, endpoint_id: str) -> bool:
        return self.op in ("*", op) and self.endpoint in (None, endpoint_id)

    def as_dict(self) -> dict[str, Any]:
        return {
            "op": self.op,
            "endpoint": self.endpoint,
            "kind": self.kind,
            "rate": self.rate,
            "count": self.count,
            "delay": self.delay,
            "status": self.status,
            "retry_after": self.retry_after,
            "when": self.when,
        }


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class FaultInjector:
    """Decides, per request, whether and how it fails. Random draws come from one seeded generator."""

    def __init__(self, *, seed: int, defaults: list[FaultRule]) -> None:
        self._seed = seed
        self._defaults = defaults
        self.rules: list[FaultRule] = []
        self._rng = random.Random(seed)

    @classmethod
    def from_config(
        cls,
        *,
        seed: int,
        rate_5xx: float,
        rate_429: float,
        rate_slow: float,
        slow_seconds: float,
        rate_drop: float,
    ) -> FaultInjector:
        defaults = [
            FaultRule(kind="5xx", rate=rate_5xx),
            FaultRule(kind="429", rate=rate_429),
            FaultRule(kind="slow", rate=rate_slow, delay=slow_seconds),
            FaultRule(kind="drop", rate=rate_drop),
        ]
        return cls(seed=seed, defaults=[rule for rule in defaults if rule.rate > 0])

    def replace(self, rules: list[FaultRule]) -> None:
        self.rules = list(rules)

    def reset(self) -> None:
        self.rules = []
        self._rng = random.Random(self._seed)

    def pick(self, op: str, endpoint_id: str) -> FaultRule | None:
        """The fault for this request, if any: runtime rules first (in order), then the config defaults."""
        for rule in self.rules:
            if rule.matches(op, endpoint_id) and self._rng.random() < rule.rate:
                if rule.count is not None:
                    rule.count -= 1
                    if rule.count <= 0:
                        self.rules.remove(rule)
                return rule
        for rule in self._defaults:
            if self._rng.random() < rule.rate:
                return rule
        return None


# -- rate limits ----------------------------------------------------------------------------------------

WINDOW_SECONDS = 10.0
#: RunPod's documented per-endpoint limits: requests per 10 s and concurrent requests (None: not given).
#: /retry and /health are not in RunPod's table, so they are not limited here.
BASE_LIMITS: dict[str, tuple[int, int | None]] = {
    "run": (1000, 200),
    "runsync": (2000, 400),
    "status": (2000, 400),
    "stream": (2000, 400),
    "cancel": (100, 20),
    "purge-queue": (2, None),
}
#: The dynamic limit is max(base, running workers x this) per 10 s (the docs' example figure).
PER_WORKER_LIMIT = 50


class RateLimited(Exception):
    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after


class RateLimiter:
    """Sliding 10 s windows and concurrency counts per (endpoint, operation).

    Limits are multiplied by ``scale`` (at least 1 remains) so tests can reach them with a handful of
    requests. Times come from the simulator clock, so advancing it also empties the windows.
    """

    def __init__(self, *, scale: float) -> None:
        self.scale = scale
        self._windows: dict[tuple[str, str], deque[float]] = {}
        self._in_flight: dict[tuple[str, str], int] = {}

    def reset(self) -> None:
        self._windows.clear()
        self._in_flight.clear()

    def _scaled(self, value: int) -> int:
        return max(1, math.floor(value * self.scale))

    def acquire(self, endpoint_id: str, op: str, *, now: float, running_workers: int) -> bool:
        """Count a request in; raises :class:`RateLimited`. True means :meth:`release` must follow."""
        limits = BASE_LIMITS.get(op)
        if limits is None:
            return False
        per_window, concurrent = limits
        key = (endpoint_id, op)
        window = self._windows.setdefault(key, deque())
        while window and window[0] <= now - WINDOW_SECONDS:
            window.popleft()
        allowed = max(self._scaled(per_window), self._scaled(running_workers * PER_WORKER_LIMIT))
        if len(window) >= allowed:
            wait = window[0] + WINDOW_SECONDS - now
            raise RateLimited(
                f"rate limit exceeded for {op}: {allowed} requests per {WINDOW_SECONDS:g} s",
                retry_after=max(1, math.ceil(wait)),
            )
        if concurrent is not None and self._in_flight.get(key, 0) >= self._scaled(concurrent):
            raise RateLimited(
                f"rate limit exceeded for {op}: {self._scaled(concurrent)} concurrent requests", retry_after=1
            )
        window.append(now)
        if concurrent is None:
            return False
        self._in_flight[key] = self._in_flight.get(key, 0) + 1
        return True

    def release(self, endpoint_id: str, op: str) -> None:
        key = (endpoint_id, op)
        if self._in_flight.get(key, 0) > 0:
            self._in_flight[key] -= 1
