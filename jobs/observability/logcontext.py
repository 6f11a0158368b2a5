"""Which job a log line is about: every line logged while a task works on a job carries its id and
correlation id, so one grep follows a request from the web app through every task. And what no line may
carry: botocore's signatures (`quiet_botocore`)."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

_job: ContextVar[tuple[str, str]] = ContextVar("rpq_job", default=("-", "-"))

FORMAT = "[%(asctime)s: %(levelname)s/%(processName)s] [job=%(job_id)s cid=%(correlation_id)s] %(name)s: %(message)s"


def bind(*, job_id: str, correlation_id: str | None) -> None:
    """Tag this task's further log lines; `scope()` around the task undoes it."""
    _job.set((job_id, correlation_id or "-"))


@contextmanager
def scope() -> Iterator[None]:
    token = _job.set(("-", "-"))
    try:
        yield
    finally:
        _job.reset(token)


class ContextFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.job_id, record.correlation_id = _job.get()
        return True


def quiet_botocore() -> None:
    """botocore logs at DEBUG every signature it computes (a presigned URL's signature is its credential) and
    every request's headers, Authorization too: its loggers stay at INFO when a process logs at DEBUG, unless a
    level was chosen for them on purpose."""
    botocore = logging.getLogger("botocore")
    if botocore.level == logging.NOTSET:  # it would follow the root logger down to DEBUG
        botocore.setLevel(logging.INFO)


def install(logger: logging.Logger) -> None:
    """Add the job tags to every handler of `logger` and show them in its format."""
    quiet_botocore()
    for handler in logger.handlers:
        handler.addFilter(ContextFilter())
        handler.setFormatter(logging.Formatter(FORMAT))
