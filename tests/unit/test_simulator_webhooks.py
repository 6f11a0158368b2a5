"""The simulator's webhook sender: many jobs ending together are delivered a bounded number at a time."""

from __future__ import annotations

import asyncio

import httpx

from jobs.simulator.clock import Clock
from jobs.simulator.webhooks import WebhookDispatcher


def test_a_burst_of_webhooks_is_sent_a_bounded_number_at_a_time_and_every_one_arrives() -> None:
    at_once = {"now": 0, "most": 0}
    received: list[str] = []

    async def slow_receiver(request: httpx.Request) -> httpx.Response:
        at_once["now"] += 1
        at_once["most"] = max(at_once["most"], at_once["now"])
        await asyncio.sleep(0.001)
        at_once["now"] -= 1
        received.append(request.url.path)
        return httpx.Response(200)

    async def burst() -> None:
        sender = WebhookDispatcher(clock=Clock(), attempts=1, interval_seconds=0, timeout_seconds=5,
                                   max_concurrent=8, transport=httpx.MockTransport(slow_receiver))
        for n in range(500):
            sender.deliver(f"http://app.example/hook/{n}", f"job-{n}", {"id": f"job-{n}"})
        while len(received) < 500:
            await asyncio.sleep(0.01)
        await sender.close()

    asyncio.run(asyncio.wait_for(burst(), timeout=60))

    assert sorted(received) == sorted(f"/hook/{n}" for n in range(500))
    assert at_once["most"] == 8
