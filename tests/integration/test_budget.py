"""The RunPod request budget on real Redis: shared by every process, and enough to keep RunPod's 429s away.

The hammer tests run many threads in several processes against the simulator with its rate limits on,
scaled to 5% (/status: 100 requests a 10 s window per endpoint) so a window fills in seconds.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator

import pytest
import redis
from prometheus_client import CollectorRegistry, generate_latest

from jobs.flow.backoff import NO_RETRY
from jobs.observability.metrics import RpqCollector
from jobs.runpod.budget import DENIED_KEY, Limits, RedisBudget, bucket_key
from jobs.runpod.client import RunPodClient
from jobs.runtime import QUEUES, Runtime
from jobs.settings import Endpoint
from tests.conftest import ROOT, SimulatorProcess
from tests.integration.budget_hammer import OUTCOMES, hammer

pytestmark = pytest.mark.integration

SCALE = 0.05
SIMULATOR_STATUS_LIMIT = 100  # RunPod's 2000 a window, scaled
PROCESSES, THREADS, REQUESTS = 3, 4, 7  # and THREADS more in the test's own process: 16 callers, 112 requests


@pytest.fixture
def broker(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    client.flushdb()
    yield client
    client.flushdb()
    client.close()


# -- sharing ------------------------------------------------------------------------------------------------


def test_two_processes_spend_one_budget_and_the_refused_one_is_counted(redis_url: str, broker: redis.Redis) -> None:
    first, second = RedisBudget(redis_url, Limits(purge=1)), RedisBudget(redis_url, Limits(purge=1))

    assert first.acquire("ep-a", "purge", max_wait=0) is None
    free_in = second.acquire("ep-a", "purge", max_wait=0)
    assert second.acquire("ep-b", "purge", max_wait=0) is None  # another endpoint has a budget of its own

    assert free_in is not None and 9 < free_in <= 10.000001
    assert first.available("ep-a", "purge") == second.available("ep-a", "purge") == 0
    assert first.denied() == {("ep-a", "purge"): 1}
    assert broker.hgetall(DENIED_KEY) == {b"purge|ep-a": b"1"}


def test_a_bucket_key_expires_once_its_bucket_would_be_full_again(redis_url: str, broker: redis.Redis) -> None:
    budget = RedisBudget(redis_url, Limits(status=20))  # a burst of 2, then one every 0.53 s

    budget.acquire("ep-a", "status", max_wait=0)

    ttl_ms = int(broker.pttl(bucket_key("ep-a", "status")))
    assert 1000 < ttl_ms <= 1527  # 0.53 s until the bucket is full, and a second more
    assert budget.available("ep-a", "status") == 1


def test_a_caller_that_may_wait_is_given_the_next_slot_and_one_that_may_not_is_refused(redis_url: str,
                                                                                        broker: redis.Redis) -> None:
    sleeps: list[float] = []
    budget = RedisBudget(redis_url, Limits(status=20), sleep=sleeps.append)

    granted = [budget.acquire("ep-a", "status", max_wait=0) for _ in range(2)]
    waited = budget.acquire("ep-a", "status", max_wait=5)
    refused = budget.acquire("ep-a", "status", max_wait=0)

    assert granted == [None, None] and waited is None
    assert len(sleeps) == 1 and 0 < sleeps[0] <= 0.526316  # its slot, reserved at once
    assert refused is not None and 0.526316 < refused <= 2 * 0.526316  # behind the reserved slot
    assert budget.denied() == {("ep-a", "status"): 1}


# -- against the simulator's rate limits ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def limited_simulator(start_simulator: Callable[..., SimulatorProcess]) -> SimulatorProcess:
    return start_simulator("--rate-limit-scale", str(SCALE))


def hammer_from_everywhere(sim: SimulatorProcess, endpoint: str, *, redis_url: str | None,
                           limits: Limits = Limits()) -> list[Counter[str]]:
    """PROCESSES processes and this one, THREADS threads each, REQUESTS /status calls a thread; with a
    `redis_url`, each process spends a RedisBudget of `limits` on it."""
    with RunPodClient(api_key=sim.api_key, base_url=sim.base_url, retry=NO_RETRY) as client:
        job = client.run(endpoint, {"output": "done"})
    budget_args = ["--redis", redis_url, "--limits", str(limits)] if redis_url else []
    children = [
        subprocess.Popen([sys.executable, "-m", "tests.integration.budget_hammer", sim.base_url, endpoint, job.id,
                          "--threads", str(THREADS), "--requests", str(REQUESTS), *budget_args],
                         cwd=ROOT, env={**os.environ, "RUNPOD_API_KEY": sim.api_key}, stdout=subprocess.PIPE)
        for _ in range(PROCESSES)
    ]
    here: Counter[str] = Counter()
    lock = threading.Lock()
    budget = RedisBudget(redis_url, limits) if redis_url else None
    with RunPodClient(api_key=sim.api_key, base_url=sim.base_url, retry=NO_RETRY, timeout=10.0, budget=budget,
                      budget_wait=1.0) as client:
        threads = [threading.Thread(target=hammer, args=(client, endpoint, job.id, REQUESTS, here, lock))
                   for _ in range(THREADS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    counts = [here]
    for child in children:
        out, _ = child.communicate(timeout=90)
        assert child.returncode == 0
        counts.append(Counter(json.loads(out)))
    return counts


def total(counts: list[Counter[str]]) -> dict[str, int]:
    return {key: sum(c[key] for c in counts) for key in OUTCOMES}


def test_sixteen_callers_in_four_processes_sharing_a_budget_below_runpods_limit_draw_no_429(
        limited_simulator: SimulatorProcess, redis_url: str, broker: redis.Redis) -> None:
    # 80% of the simulator's limit: RunPod counts arrivals, and a send can slip behind the next one (a busy
    # core); the 20 requests between the two absorb slips of up to 2.7 s. With a budget per process instead
    # of one shared, four processes would send 4 x 80 in the first window: the test would see 429s.
    endpoint = limited_simulator.create_endpoint()

    counts = hammer_from_everywhere(limited_simulator, endpoint, redis_url=redis_url, limits=Limits(status=80))

    seen = total(counts)
    assert seen["rate_limited"] == 0, counts
    assert seen["ok"] == (PROCESSES + 1) * THREADS * REQUESTS > SIMULATOR_STATUS_LIMIT  # more than one window's worth
    assert seen["other"] == 0, counts


def test_the_same_callers_without_a_budget_draw_429s(limited_simulator: SimulatorProcess) -> None:
    endpoint = limited_simulator.create_endpoint()

    counts = hammer_from_everywhere(limited_simulator, endpoint, redis_url=None)
    # On a machine busy enough, the 112 calls can take longer than one window and draw no 429: then
    # the same callers go on, in this process, until they do (the limit is 100 a window; 1,000 calls
    # in a row from 16 threads cannot all fit in windows of 100 unless they take 100 s).
    with RunPodClient(api_key=limited_simulator.api_key, base_url=limited_simulator.base_url, retry=NO_RETRY,
                      timeout=10.0) as client:
        job = client.run(endpoint, {"output": "done"})
        more: Counter[str] = Counter()
        lock = threading.Lock()
        deadline = time.monotonic() + 60
        while total([*counts, more])["rate_limited"] == 0 and sum(more.values()) < 1000 \
                and time.monotonic() < deadline:
            threads = [threading.Thread(target=hammer, args=(client, endpoint, job.id, 10, more, lock))
                       for _ in range(THREADS * (PROCESSES + 1))]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()

    seen = total([*counts, more])
    assert seen["rate_limited"] > 0, counts
    assert seen["denied"] == 0


# -- the exporter ------------------------------------------------------------------------------------------


def test_the_exporter_shows_each_limit_and_the_denials_by_endpoint_name(runtime: Runtime, redis_url: str,
                                                                        broker: redis.Redis) -> None:
    runtime.settings = runtime.settings.__class__(**{
        **runtime.settings.__dict__, "runpod_limits": Limits(purge=1, cancel=50),
        "endpoints": {"tts": Endpoint("tts", "tts-endpoint")},
    })
    budget = RedisBudget(redis_url, runtime.settings.runpod_limits)
    for endpoint_id in ("tts-endpoint", "bare-endpoint-id"):
        budget.acquire(endpoint_id, "purge", max_wait=0)
        budget.acquire(endpoint_id, "purge", max_wait=0)
    budget.acquire("tts-endpoint", "purge", max_wait=0)
    registry = CollectorRegistry()
    registry.register(RpqCollector(runtime, broker, QUEUES))

    text = generate_latest(registry).decode()

    for line in [
        'rpq_runpod_budget_limit{operation="run"} 800.0',
        'rpq_runpod_budget_limit{operation="status"} 1400.0',
        'rpq_runpod_budget_limit{operation="cancel"} 50.0',
        'rpq_runpod_budget_limit{operation="purge"} 1.0',
        'rpq_runpod_budget_denied_total{endpoint="tts",operation="purge"} 2.0',
        'rpq_runpod_budget_denied_total{endpoint="bare-endpoint-id",operation="purge"} 1.0',
    ]:
        assert line in text, line
