"""What the dispatcher and the poller share: one pool of threads for RunPod calls, one transaction for
a batch's answers, and the budget.

A batch's RunPod calls run concurrently on one process-wide pool, over the process's one RunPod
client (one httpx connection pool, kept warm). The pool is small and fixed: RunPod also limits
concurrent requests per endpoint (200 for /run, 400 for /status), and every process shares those.
The answers are then stored together, in one transaction (`lifecycle.store_together`), by the thread
that runs the batch: a BEGIN and a COMMIT per batch instead of per job.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from jobs.flow import lifecycle
from jobs.observability import logcontext
from jobs.runtime import Runtime

#: Concurrent RunPod calls per process.
POOL_SIZE = 16

T = TypeVar("T")

_pool: ThreadPoolExecutor | None = None
_pool_pid: int | None = None
_pool_lock = threading.Lock()


def _executor() -> ThreadPoolExecutor:
    global _pool, _pool_pid
    with _pool_lock:
        if _pool is None or _pool_pid != os.getpid():  # a forked pool child needs threads of its own
            _pool = ThreadPoolExecutor(max_workers=POOL_SIZE, thread_name_prefix="rpq-runpod")
            _pool_pid = os.getpid()
        return _pool


def ask_and_store(rt: Runtime, ask: Callable[[T], lifecycle.Findings], items: Iterable[T]) -> list[lifecycle.Next]:
    """`ask(item)` for every item concurrently (each asks RunPod about one job), then every answer
    stored in one transaction; each job's next step, in the items' order. An exception in one ask is
    raised after the others' answers are stored (each write is fenced, so they stand on their own)."""
    items = list(items)
    if len(items) <= 1:
        asked = [_settled(ask, item) for item in items]
    else:
        asked = [future.result() for future in [_executor().submit(_settled, ask, item) for item in items]]
    steps = lifecycle.store_together(rt, [found for found in asked if isinstance(found, lifecycle.Findings)])
    failed = [found for found in asked if isinstance(found, Exception)]
    if failed:
        raise failed[0]
    return steps


def _settled(ask: Callable[[T], lifecycle.Findings], item: T) -> lifecycle.Findings | Exception:
    with logcontext.scope():  # each item's log lines carry its own job id, not a neighbour's
        try:
            return ask(item)
        except Exception as exc:  # raised by ask_and_store once the others are stored
            return exc


def tokens_available(rt: Runtime, endpoint_id: str, operation: str) -> int:
    """How many `operation` calls to the endpoint the shared budget allows right now (a batch's size)."""
    budget = rt.runpod.budget
    return 1_000_000 if budget is None else budget.available(endpoint_id, operation)
