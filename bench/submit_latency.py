"""`jobs.submit()` latency, in-process: validation, the SQL commit and the dispatcher's wake-up.

    .venv/bin/python bench/submit_latency.py
    .venv/bin/python bench/submit_latency.py --calls 2000 --databases postgresql

On each database it makes `--repeats` rounds of `--calls` calls (after a warm-up) of

    jobs.submit("bench", {"prompt": "...", "n": i}, runtime=rt)

with the real wake-up (one EVALSHA, and a Celery publish when no dispatcher run is already due) on
a private redis-server. No worker consumes, so nothing but this script touches the job table while
it is timed. The wake-up is timed on its own too (the runtime's wake-ups are wrapped), so the figures
split into "SQL and validation" and "wake-up". The CPU that the rest of the machine used meanwhile
(other tenants: the machine is shared) is reported too.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

from harness import (
    ENDPOINT_ID,
    ENDPOINT_NAME,
    CpuMeter,
    RedisServer,
    database,
    median_spread,
    percentile,
    postgres_backends,
    print_machine,
    process_group,
    redis_server,
    say,
    stop_on_sigterm,
    this_process,
)

from jobs import api
from jobs.flow.wakeups import Wakeups
from jobs.runtime import Runtime
from jobs.settings import Endpoint, Secret, Settings

WARM_UP = 50  # calls before timing: the first builds the Celery app and opens the connections


class TimedWakeups:
    """Wraps the runtime's wake-ups and keeps how long the last wake-up took (a submit makes one)."""

    def __init__(self, wakeups: Wakeups) -> None:
        self.wake = wakeups.wake
        self.last = 0.0

    def __call__(self, task: str, endpoint_id: str, in_seconds: float = 0.0) -> None:
        started = time.perf_counter()
        self.wake(task, endpoint_id, in_seconds)
        self.last = time.perf_counter() - started


def one_round(rt: Runtime, timed: TimedWakeups, calls: int) -> tuple[list[float], list[float]]:
    """`calls` submits; (whole call, wake-up part) in milliseconds, one per call."""
    whole, wake = [], []
    for i in range(calls):
        started = time.perf_counter()
        api.submit(ENDPOINT_NAME, {"prompt": "a cat in a hat", "n": i}, runtime=rt)
        whole.append((time.perf_counter() - started) * 1000)
        wake.append(timed.last * 1000)
    return whole, wake


def measure(kind: str, server: RedisServer, args: argparse.Namespace, scratch: Path) -> dict[str, list[float]]:
    """`args.repeats` rounds on database `kind`."""
    figures: dict[str, list[float]] = {"p50": [], "p99": [], "max": [], "wake-up p50": [], "wake-up p99": [],
                                       "sql p50": [], "calls/s": [], "cpu per call": [], "rest of machine": []}
    meter = CpuMeter({"this script": this_process(), "redis-server": process_group(server.pid)})
    with ExitStack() as stack:
        url = stack.enter_context(database(kind, scratch))
        settings = Settings(runpod_api_key=Secret("unused"), database_url=url, celery_broker_url=server.database(),
                            endpoints={ENDPOINT_NAME: Endpoint(ENDPOINT_NAME, ENDPOINT_ID)})
        rt = Runtime.from_settings(settings)
        stack.callback(rt.close)
        assert rt.wakeups is not None
        timed = TimedWakeups(rt.wakeups)
        rt.wakeups.wake = timed  # type: ignore[method-assign]  # what Runtime.wake calls
        one_round(rt, timed, WARM_UP)
        if kind == "postgresql":
            meter.parts["postgres"] = postgres_backends(url)
        for _ in range(args.repeats):
            meter.start()
            started = time.perf_counter()
            whole, wake = one_round(rt, timed, args.calls)
            elapsed = time.perf_counter() - started
            cpu = meter.stop()
            ours = sum(cpu[part] for part in meter.parts)
            figures["rest of machine"].append(max(0.0, cpu["whole machine"] - ours) / cpu["wall"])
            figures["p50"].append(percentile(whole, 50))
            figures["p99"].append(percentile(whole, 99))
            figures["max"].append(max(whole))
            figures["wake-up p50"].append(percentile(wake, 50))
            figures["wake-up p99"].append(percentile(wake, 99))
            figures["sql p50"].append(percentile([w - p for w, p in zip(whole, wake, strict=True)], 50))
            figures["calls/s"].append(args.calls / elapsed)
            # CPU rather than time: less moved by the rest of the machine (Redis's and PostgreSQL's not included).
            figures["cpu per call"].append(cpu["this script"] * 1000 / args.calls)
        say(f"  {kind}: p50 {median_spread(figures['p50'], '{:.2f}')} ms, "
            f"p99 {median_spread(figures['p99'], '{:.2f}')} ms")
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=1000, help="timed calls per round (default 1000)")
    parser.add_argument("--repeats", type=int, default=3, help="rounds per database (default 3)")
    parser.add_argument("--databases", default="sqlite,postgresql", help="(default sqlite,postgresql)")
    args = parser.parse_args()
    stop_on_sigterm()
    say("machine:")
    print_machine()
    started = time.monotonic()
    results: dict[str, dict[str, list[float]]] = {}
    with tempfile.TemporaryDirectory(prefix="rpq-bench-") as scratch, redis_server(Path(scratch)) as server:
        for kind in args.databases.split(","):
            results[kind] = measure(kind, server, args, Path(scratch))

    say(f"\n{args.calls} calls per round, {args.repeats} rounds; each cell: median of the rounds (min-max), ms\n")
    columns = ["p50", "p99", "max", "sql p50", "wake-up p50", "wake-up p99", "cpu per call"]
    say("| database | " + " | ".join(columns) + " | calls/s, one thread | rest of machine, cores |")
    say("|---|" + "---|" * (len(columns) + 2))
    for kind, figures in results.items():
        cells = [median_spread(figures[c], "{:.2f}") for c in columns]
        say(f"| {kind} | " + " | ".join(cells) + f" | {median_spread(figures['calls/s'])} "
            f"| {median_spread(figures['rest of machine'], '{:.2f}')} |")
    say("\n'sql p50' is the median of (whole call - wake-up): validation, the row, its event, the commit.")
    say("'cpu per call' is this process's CPU time (every thread) per submit() call.")
    say(f"whole run: {time.monotonic() - started:.0f} s")


if __name__ == "__main__":
    main()
