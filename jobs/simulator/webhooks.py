"""Webhook delivery, the way RunPod describes it: POST the job when it finishes, retry until a 200.

RunPod makes 3 attempts in total, 10 s apart, and counts only HTTP 200 as delivered. The body is the job
object plus ``input`` and ``webhook`` (the cloud payload users report; for FAILED it is UNCONFIRMED, so we
send the same shape with ``error``). No signature header is sent (none is documented). Delivery runs in
background tasks and never blocks the API; every attempt is recorded for ``GET /_sim/webhooks``.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any

import httpx

from jobs.simulator.clock import Clock

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WebhookAttempt:
    url: str
    job_id: str
    attempt: int
    status_code: int | None
    error: str | None
    at: str

    def as_dict(self) -> dict[str, Any]:
        return {
            "url": self.url,
            "job_id": self.job_id,
            "attempt": self.attempt,
            "status_code": self.status_code,
            "error": self.error,
            "delivered": self.status_code == 200,
            "at": self.at,
        }


#: Webhooks in flight at once. Thousands of jobs can end within seconds; the rest wait their turn here,
#: not in httpx's connection pool, whose queue of waiting requests costs time per request queued: at a
#: few thousand it stalled the simulator's event loop, its own API included.
MAX_CONCURRENT_DELIVERIES = 64


class WebhookDispatcher:
    def __init__(self, *, clock: Clock, attempts: int, interval_seconds: float, timeout_seconds: float,
                 max_concurrent: int = MAX_CONCURRENT_DELIVERIES,
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.clock = clock
        self.attempts = attempts
        self.interval_seconds = interval_seconds
        self.timeout_seconds = timeout_seconds
        self.max_concurrent = max_concurrent
        self.log: list[WebhookAttempt] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._client: httpx.AsyncClient | None = None
        self._slots: asyncio.Semaphore | None = None
        self._transport = transport  # unit tests only: the real thing sends over HTTP

    def deliver(self, url: str, job_id: str, payload: dict[str, Any]) -> None:
        """Start delivering in the background."""
        task = asyncio.get_running_loop().create_task(self._deliver(url, job_id, payload))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _deliver(self, url: str, job_id: str, payload: dict[str, Any]) -> None:
        if self._client is None:
            limits = httpx.Limits(max_connections=self.max_concurrent, max_keepalive_connections=self.max_concurrent)
            self._client = httpx.AsyncClient(timeout=self.timeout_seconds, follow_redirects=False, limits=limits,
                                             transport=self._transport)
            self._slots = asyncio.Semaphore(self.max_concurrent)
        client, slots = self._client, self._slots
        assert slots is not None
        for attempt in range(1, self.attempts + 1):
            status_code: int | None = None
            error: str | None = None
            try:
                async with slots:  # the timeout runs from when the request is sent, as RunPod's would
                    response = await client.post(url, json=payload)
                status_code = response.status_code
            except httpx.HTTPError as exc:
                error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            self.log.append(
                WebhookAttempt(url, job_id, attempt, status_code, error, self.clock.iso_at(self.clock.now()) or "")
            )
            if status_code == 200:
                return
            log.info("webhook for job %s attempt %d failed (%s)", job_id, attempt, status_code or error)
            if attempt < self.attempts:
                await self.clock.sleep(self.interval_seconds)

    async def cancel_all(self) -> None:
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def reset(self) -> None:
        await self.cancel_all()
        self.log.clear()

    async def close(self) -> None:
        await self.cancel_all()
        if self._client is not None:
            await self._client.aclose()
            self._client = None
            self._slots = None
