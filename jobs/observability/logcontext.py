"""Which job a log line is about: every line logged while a task works on a job carries its id and
correlation id (and its tenant, once known), so one grep follows a request from the web app through every
task. And what no line may carry: botocore's signatures (`quiet_botocore`).

How the lines are written (text or JSON) is `jobs.observability.logs`'s."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import NamedTuple


class Tags(NamedTuple):
    """What a log line is about; None where it is not known (a line about no job, a request without a tenant)."""

    job_id: str | None = None
    correlation_id: str | None = None
    tenant: str | None = None


_NONE = Tags()
_tags: ContextVar[Tags] = ContextVar("rpq_log_tags", default=_NONE)


def bind(*, job_id: str | None = None, correlation_id: str | None = None, tenant: str | None = None) -> None:
    """Tag this task's (or request's) further log lines; `scope()` around the task undoes it."""
    _tags.set(Tags(job_id, correlation_id or None, tenant or None))


def bind_tenant(tenant: str | None) -> None:
    """Add the tenant to the tags already bound: it is learnt later than the job or the correlation id (from the
    caller's token, say)."""
    _tags.set(_tags.get()._replace(tenant=tenant or None))


def current() -> Tags:
    return _tags.get()


@contextmanager
def scope() -> Iterator[None]:
    token = _tags.set(_NONE)
    try:
        yield
    finally:
        _tags.reset(token)


class ContextFilter(logging.Filter):
    """Copies the tags onto each record as it is logged, in the thread that logs it, so a handler that formats
    later or elsewhere still has them."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.job_id, record.correlation_id, record.tenant = _tags.get()
        return True


def quiet_botocore() -> None:
    """botocore logs at DEBUG every signature it computes (a presigned URL's signature is its credential) and
    every request's headers, Authorization too: its loggers stay at INFO when a process logs at DEBUG, unless a
    level was chosen for them on purpose."""
    botocore = logging.getLogger("botocore")
    if botocore.level == logging.NOTSET:  # it would follow the root logger down to DEBUG
        botocore.setLevel(logging.INFO)


def install(logger: logging.Logger) -> None:
    """Add the tags to every handler of `logger` and write its lines in RPQ_LOG_FORMAT (Celery's worker and beat
    call this once they have set up their own handlers)."""
    from jobs.observability import logs  # it imports this module

    quiet_botocore()
    for handler in logger.handlers:
        if not any(isinstance(f, ContextFilter) for f in handler.filters):
            handler.addFilter(ContextFilter())
        handler.setFormatter(logs.formatter())
