"""One process of many hammering the simulator's /status, for tests/integration/test_budget.py.

    RUNPOD_API_KEY=... python -m tests.integration.budget_hammer BASE_URL ENDPOINT JOB_ID \\
        --threads 4 --requests 7 [--redis URL --limits status=80]

Each thread sends `--requests` /status calls through one RunPodClient (no retries of its own, so a
429 shows), taking a token from a RedisBudget on `--redis` before each (none without `--redis`).
A call the budget refuses is made again once a token is free; only calls that reached the simulator
count towards `--requests`. Prints one JSON line: {"ok": n, "rate_limited": n, "other": n, "denied": n}
(the first three reached the simulator; "denied" counts refusals by the budget, which sent nothing).
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time
from collections import Counter

from jobs.errors import RunPodBudgetExhausted, RunPodError, RunPodRateLimited
from jobs.flow.backoff import NO_RETRY
from jobs.runpod.budget import RedisBudget, parse_limits
from jobs.runpod.client import RunPodClient

OUTCOMES = ("ok", "rate_limited", "other", "denied")


def hammer(client: RunPodClient, endpoint: str, job_id: str, requests: int, counts: Counter[str],
           lock: threading.Lock) -> None:
    sent = 0
    while sent < requests:
        try:
            client.status(endpoint, job_id)
            outcome = "ok"
        except RunPodBudgetExhausted as exc:
            with lock:
                counts["denied"] += 1
            time.sleep(exc.retry_after or 0)  # the budget said when a token is free
            continue
        except RunPodRateLimited:
            outcome = "rate_limited"
        except RunPodError:
            outcome = "other"
        sent += 1
        with lock:
            counts[outcome] += 1


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("base_url")
    parser.add_argument("endpoint")
    parser.add_argument("job_id")
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument("--requests", type=int, default=10)
    parser.add_argument("--redis")
    parser.add_argument("--limits", default="")
    parser.add_argument("--budget-wait", type=float, default=1.0)
    args = parser.parse_args()

    problems: list[str] = []
    limits = parse_limits(args.limits, problems)
    if problems:
        raise SystemExit("; ".join(problems))
    budget = RedisBudget(args.redis, limits) if args.redis else None
    counts: Counter[str] = Counter()
    lock = threading.Lock()
    with RunPodClient(api_key=os.environ["RUNPOD_API_KEY"], base_url=args.base_url, timeout=10.0, retry=NO_RETRY,
                      budget=budget, budget_wait=args.budget_wait) as client:
        threads = [threading.Thread(target=hammer, args=(client, args.endpoint, args.job_id, args.requests,
                                                         counts, lock)) for _ in range(args.threads)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    print(json.dumps({key: counts[key] for key in OUTCOMES}), flush=True)


if __name__ == "__main__":
    main()
