"""Request counters for ``GET /_sim/stats``: what a client's traffic looked like from RunPod's side.

Per endpoint and operation: requests, answers by status code (429s above all), the busiest 10 s so far
(RunPod's rate limits are per 10 s), and requests per second, so a benchmark can check any window of its
own. Each request costs a few dictionary and deque operations, nothing that grows with the jobs held.
"""

from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any

#: RunPod's rate-limit window (docs: "requests per 10 seconds").
WINDOW_SECONDS = 10.0
#: How many seconds of the per-second counts are kept: an hour is longer than any benchmark run.
KEEP_SECONDS = 3600


@dataclass
class OperationStats:
    requests: int = 0
    #: Answers by status code as text; "error" for a request that raised instead of answering.
    responses: Counter[str] = field(default_factory=Counter)
    #: Arrival times (epoch seconds) of the requests in the last WINDOW_SECONDS.
    window: deque[float] = field(default_factory=deque)
    peak: int = 0
    peak_at: float | None = None  #: The end of the first window that held ``peak`` requests.
    #: Requests by whole epoch second, oldest first, for the last KEEP_SECONDS seconds.
    per_second: dict[int, int] = field(default_factory=dict)

    def arrived(self, now: float) -> None:
        self.requests += 1
        window = self.window
        while window and window[0] <= now - WINDOW_SECONDS:
            window.popleft()
        window.append(now)
        if len(window) > self.peak:
            self.peak, self.peak_at = len(window), now
        second = int(now)
        self.per_second[second] = self.per_second.get(second, 0) + 1
        while (oldest := next(iter(self.per_second))) <= second - KEEP_SECONDS:
            del self.per_second[oldest]

    def as_dict(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "responses": dict(sorted(self.responses.items())),
            "peak_10s": self.peak,
            "peak_10s_at": self.peak_at,
            "per_second": [[second, count] for second, count in self.per_second.items()],
        }


class RequestStats:
    """Counters per (endpoint, operation); times are epoch seconds from the simulator's clock."""

    def __init__(self) -> None:
        self._ops: dict[str, dict[str, OperationStats]] = {}
        self.since: float | None = None

    def reset(self, now: float) -> None:
        self._ops = {}
        self.since = now

    def _of(self, endpoint_id: str, op: str) -> OperationStats:
        ops = self._ops.setdefault(endpoint_id, {})
        stats = ops.get(op)
        if stats is None:
            stats = ops[op] = OperationStats()
        return stats

    def arrived(self, endpoint_id: str, op: str, now: float) -> None:
        self._of(endpoint_id, op).arrived(now)

    def answered(self, endpoint_id: str, op: str, status: int | str) -> None:
        self._of(endpoint_id, op).responses[str(status)] += 1

    def report(self, endpoint_id: str | None = None) -> dict[str, Any]:
        return {
            "since": self.since,
            "window_seconds": WINDOW_SECONDS,
            "endpoints": {
                ep: {op: stats.as_dict() for op, stats in sorted(ops.items())}
                for ep, ops in sorted(self._ops.items())
                if endpoint_id in (None, ep)
            },
        }
