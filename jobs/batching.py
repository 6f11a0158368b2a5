"""What the dispatcher and the poller share: one pool of threads for RunPod calls, and the budget.

A batch's RunPod calls run concurrently on one process-wide pool, over the process's one RunPod
client (one httpx connection pool, kept warm). The pool is small and fixed: RunPod also limits
concurrent requests per endpoint (200 for /run, 400 for /status), and every process shares those.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor, wait
from typing import TypeVar

from jobs import logcontext
from jobs.runtime import Runtime

#: Concurrent RunPod calls per process.
POOL_SIZE = 16

T = TypeVar("T")
R = TypeVar("R")

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


def fan_out(work: Callable[[T], R], items: Iterable[T]) -> list[R]:
    """`work(item)` for every item, concurrently; results in the items' order. An exception in one
    is raised after all have finished (each item's own writes are fenced, so the others stand)."""
    items = list(items)
    if len(items) <= 1:
        return [_tagged(work, item) for item in items]
    futures = [_executor().submit(_tagged, work, item) for item in items]
    wait(futures)
    return [future.result() for future in futures]


def _tagged(work: Callable[[T], R], item: T) -> R:
    with logcontext.scope():  # each item's log lines carry its own job id, not a neighbour's
        return work(item)


def tokens_available(rt: Runtime, endpoint_id: str, operation: str) -> int:
    """How many `operation` calls to the endpoint the shared budget allows right now (a batch's size)."""
    budget = rt.runpod.budget
    return 1_000_000 if budget is None else budget.available(endpoint_id, operation)
