"""What one request-budget token costs: CPU and time per `acquire`, in-process and on Redis.

    .venv/bin/python bench/budget.py
    .venv/bin/python bench/budget.py --calls 20000 --repeats 5

Every RunPod call rpq makes (but /health) first takes a token (`jobs.runpod.budget`). This measures, per
call, on a private redis-server:

- the arithmetic alone (`decide`) and the in-process bucket (`LocalBudget`, Redis's fallback);
- `RedisBudget.acquire` granted (a limit so high it never waits), denied (an empty bucket, which
  also counts the denial), and `available`, from one thread and from 8 threads of one process;
- for scale: a bare Redis PING (one round trip, nothing else), and `RunPodClient.status()` through
  an httpx MockTransport (the client's own CPU per call, no network, no budget).

Each figure is the median of `--repeats` rounds (min-max). CPU per call is this process's
(`time.process_time`) and the redis-server's (/proc, in 10 ms ticks: enough over 20,000 calls);
"rest of machine" is what everything else used meanwhile, in cores.
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import redis
from harness import (
    CpuMeter,
    median_spread,
    print_machine,
    process_group,
    redis_server,
    say,
    stop_on_sigterm,
    this_process,
)

from jobs.runpod.budget import MAX_LIMIT, Limits, LocalBudget, RedisBudget, bucket_for, decide
from jobs.runpod.client import RunPodClient

JOB = b'{"id": "job-1-u1", "status": "COMPLETED", "output": {"url": "s3://b/k.wav"}}'


def in_threads(threads: int, calls: int, work: Callable[[int], None]) -> None:
    """`calls` calls of `work`, split over `threads` threads."""
    share = calls // threads
    runners = [threading.Thread(target=lambda: [work(i) for i in range(share)]) for _ in range(threads)]
    for runner in runners:
        runner.start()
    for runner in runners:
        runner.join()


def cases(url: str) -> dict[str, tuple[int, Callable[[int], None]]]:
    """name -> (threads, one call)."""
    plenty = Limits(**dict.fromkeys(("run", "status", "cancel", "purge"), MAX_LIMIT))
    budget = RedisBudget(url, plenty)
    empty = RedisBudget(url, Limits(purge=1))
    empty.acquire("bench-endpoint", "purge", max_wait=0)  # the bucket is empty for the next 10 s
    local = LocalBudget(plenty)
    bucket = bucket_for(MAX_LIMIT)
    state: list[int | None] = [None]
    ping = redis.Redis.from_url(url)
    client = RunPodClient(api_key="bench", transport=httpx.MockTransport(lambda _: httpx.Response(200, content=JOB)))

    def arithmetic(i: int) -> None:
        state[0] = decide(bucket, state[0], i * 20, 0).state_us

    return {
        "decide() (the arithmetic)": (1, arithmetic),
        "LocalBudget.acquire": (1, lambda i: local.acquire("bench-endpoint", "status", max_wait=0) and None),
        "Redis PING (one round trip)": (1, lambda i: ping.ping() and None),
        "RedisBudget.acquire, granted": (1, lambda i: budget.acquire("bench-endpoint", "status", max_wait=0)
                                         and None),
        "RedisBudget.acquire, denied": (1, lambda i: empty.acquire("bench-endpoint", "purge", max_wait=0) and None),
        "RedisBudget.available": (1, lambda i: budget.available("bench-endpoint", "status") and None),
        "RedisBudget.acquire, granted, 8 threads": (8, lambda i: budget.acquire("bench-endpoint", "status",
                                                                                max_wait=0) and None),
        "RunPodClient.status(), MockTransport, no budget": (1, lambda i: client.status("bench-endpoint", "job-1-u1")
                                                            and None),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=20_000, help="calls per round (default 20000)")
    parser.add_argument("--repeats", type=int, default=3, help="rounds per case (default 3)")
    args = parser.parse_args()
    stop_on_sigterm()
    say("machine:")
    print_machine()
    started = time.monotonic()
    rows = []
    with tempfile.TemporaryDirectory(prefix="rpq-bench-") as scratch, redis_server(Path(scratch)) as server:
        meter = CpuMeter({"this script": this_process(), "redis-server": process_group(server.pid)})
        for name, (threads, work) in cases(server.database()).items():
            in_threads(threads, min(args.calls, 1000), work)  # warm up: connections, the script's SHA
            wall, ours, theirs, rest = [], [], [], []
            for _ in range(args.repeats):
                meter.start()
                cpu_before = time.process_time()
                in_threads(threads, args.calls, work)
                own_cpu = time.process_time() - cpu_before
                cpu = meter.stop()
                calls = args.calls // threads * threads
                wall.append(cpu["wall"] / calls * 1e6)
                ours.append(own_cpu / calls * 1e6)
                theirs.append(cpu["redis-server"] / calls * 1e6)
                rest.append(max(0.0, cpu["whole machine"] - cpu["this script"] - cpu["redis-server"]) / cpu["wall"])
            rows.append((name, wall, ours, theirs, rest))
            say(f"  {name}: {median_spread(ours, '{:.1f}')} µs CPU a call")

    say(f"\n{args.calls} calls per round, {args.repeats} rounds; median of the rounds (min-max)\n")
    say("| case | wall per call, µs | CPU of this process per call, µs | CPU of redis-server per call, µs "
        "| rest of machine, cores |")
    say("|---|---|---|---|---|")
    for name, wall, ours, theirs, rest in rows:
        say(f"| {name} | {median_spread(wall, '{:.1f}')} | {median_spread(ours, '{:.1f}')} "
            f"| {median_spread(theirs, '{:.1f}')} | {median_spread(rest, '{:.2f}')} |")
    say("\nWith 8 threads, 'wall per call' is elapsed time over all calls (the inverse of throughput).")
    say(f"whole run: {time.monotonic() - started:.0f} s")


if __name__ == "__main__":
    main()
