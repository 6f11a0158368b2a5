"""`jobs.submit()` latency, in-process: validation, the SQL commit and the Redis publish.

    .venv/bin/python bench/submit_latency.py
    .venv/bin/python bench/submit_latency.py --calls 2000 --databases postgresql
    .venv/bin/python bench/submit_latency.py --publish celery,wakeup

On each database it makes `--repeats` rounds of `--calls` calls (after a warm-up) of

    jobs.submit("bench", {"prompt": "...", "n": i}, runtime=rt)

with a real Celery publish to a private redis-server. No worker consumes, so nothing but this
script touches the job table while it is timed. The publish is timed on its own too (the runtime's
publisher is wrapped), so the figures split into "SQL and validation" and "Redis publish". The CPU
that the rest of the machine used meanwhile (other tenants: the machine is shared) is reported too.

`--publish wakeup` measures with the stand-in of `wakeup.py` for the deduplicated wake-up that is to
replace the per-submit Celery publish: one `SET NX PX` per submit, and a publish only when it set the key.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
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
from wakeup import wakeup_publisher

from jobs import api
from jobs.runtime import Runtime
from jobs.settings import Endpoint, Secret, Settings

WARM_UP = 50  # calls before timing: the first builds the Celery app and opens the connections


class TimedPublisher:
    """Wraps the runtime's publisher and keeps how long each publish took."""

    def __init__(self, publish: Callable[[str, str, float | None], None]) -> None:
        self.publish = publish
        self.last = 0.0

    def __call__(self, task: str, job_id: str, countdown: float | None) -> None:
        started = time.perf_counter()
        self.publish(task, job_id, countdown)
        self.last = time.perf_counter() - started


def one_round(rt: Runtime, publisher: TimedPublisher, calls: int) -> tuple[list[float], list[float]]:
    """`calls` submits; (whole call, publish part) in milliseconds, one per call."""
    whole, publish = [], []
    for i in range(calls):
        started = time.perf_counter()
        api.submit(ENDPOINT_NAME, {"prompt": "a cat in a hat", "n": i}, runtime=rt)
        whole.append((time.perf_counter() - started) * 1000)
        publish.append(publisher.last * 1000)
    return whole, publish


def measure(kind: str, mode: str, server: RedisServer, args: argparse.Namespace, scratch: Path
            ) -> dict[str, list[float]]:
    """`args.repeats` rounds on database `kind`, publishing the `mode` way ("celery" or "wakeup")."""
    figures: dict[str, list[float]] = {"p50": [], "p99": [], "max": [], "publish p50": [], "publish p99": [],
                                       "sql p50": [], "calls/s": [], "cpu per call": [], "rest of machine": []}
    meter = CpuMeter({"this script": this_process(), "redis-server": process_group(server.pid)})
    with ExitStack() as stack:
        url = stack.enter_context(database(kind, scratch))
        settings = Settings(runpod_api_key=Secret("unused"), database_url=url, celery_broker_url=server.database(),
                            endpoints={ENDPOINT_NAME: Endpoint(ENDPOINT_NAME, ENDPOINT_ID)})
        rt = Runtime.from_settings(settings)
        stack.callback(rt.close)
        if mode == "wakeup":
            rt.publish = wakeup_publisher(settings, rt.publish)
        publisher = TimedPublisher(rt.publish)
        rt.publish = publisher
        one_round(rt, publisher, WARM_UP)
        if kind == "postgresql":
            meter.parts["postgres"] = postgres_backends(url)
        for _ in range(args.repeats):
            meter.start()
            started = time.perf_counter()
            whole, publish = one_round(rt, publisher, args.calls)
            elapsed = time.perf_counter() - started
            cpu = meter.stop()
            ours = sum(cpu[part] for part in meter.parts)
            figures["rest of machine"].append(max(0.0, cpu["whole machine"] - ours) / cpu["wall"])
            figures["p50"].append(percentile(whole, 50))
            figures["p99"].append(percentile(whole, 99))
            figures["max"].append(max(whole))
            figures["publish p50"].append(percentile(publish, 50))
            figures["publish p99"].append(percentile(publish, 99))
            figures["sql p50"].append(percentile([w - p for w, p in zip(whole, publish, strict=True)], 50))
            figures["calls/s"].append(args.calls / elapsed)
            # CPU rather than time: less moved by the rest of the machine (Redis's and PostgreSQL's not included).
            figures["cpu per call"].append(cpu["this script"] * 1000 / args.calls)
        say(f"  {kind}, publish {mode}: p50 {median_spread(figures['p50'], '{:.2f}')} ms, "
            f"p99 {median_spread(figures['p99'], '{:.2f}')} ms")
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=1000, help="timed calls per round (default 1000)")
    parser.add_argument("--repeats", type=int, default=3, help="rounds per database (default 3)")
    parser.add_argument("--databases", default="sqlite,postgresql", help="(default sqlite,postgresql)")
    parser.add_argument("--publish", default="celery",
                        help="celery (send_task, as submit() does), wakeup (the stand-in of wakeup.py), or both "
                        "comma-separated (default celery)")
    args = parser.parse_args()
    stop_on_sigterm()
    say("machine:")
    print_machine()
    started = time.monotonic()
    results: dict[tuple[str, str], dict[str, list[float]]] = {}
    with tempfile.TemporaryDirectory(prefix="rpq-bench-") as scratch, redis_server(Path(scratch)) as server:
        for kind in args.databases.split(","):
            for publish in args.publish.split(","):
                results[(kind, publish)] = measure(kind, publish, server, args, Path(scratch))

    say(f"\n{args.calls} calls per round, {args.repeats} rounds; each cell: median of the rounds (min-max), ms\n")
    columns = ["p50", "p99", "max", "sql p50", "publish p50", "publish p99", "cpu per call"]
    say("| database | publish | " + " | ".join(columns) + " | calls/s, one thread | rest of machine, cores |")
    say("|---|---|" + "---|" * (len(columns) + 2))
    for (kind, publish), figures in results.items():
        cells = [median_spread(figures[c], "{:.2f}") for c in columns]
        say(f"| {kind} | {publish} | " + " | ".join(cells) + f" | {median_spread(figures['calls/s'])} "
            f"| {median_spread(figures['rest of machine'], '{:.2f}')} |")
    say("\n'sql p50' is the median of (whole call - publish): validation, the row, its event, the commit.")
    say("'cpu per call' is this process's CPU time (every thread) per submit() call.")
    say(f"whole run: {time.monotonic() - started:.0f} s")


if __name__ == "__main__":
    main()
