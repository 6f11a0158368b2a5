"""The poller: ask RunPod about an endpoint's jobs whose poll is due, together, within its budget.

`next_poll_at` in the job table is the schedule. One task run (`rpq.poll_due`, argument: the
endpoint id) claims the endpoint's due jobs together (`FOR UPDATE SKIP LOCKED` on PostgreSQL),
asks RunPod about them concurrently, stores their answers in one transaction, each with the same
fenced compare-and-set as a single poll (`lifecycle.poll_claimed`), and goes on until nothing is
due, the `/status` budget is spent or its time is up; then it says when to run again: when the next
poll is due. So a wait of any length is a row, never a message held in a worker, and the reconciler
can rebuild everything from the table alone.

When the budget cannot serve every due poll, the most urgent go first: a job made due now (no
`next_poll_at`: RunPod called its webhook, so its result is waiting), then a job's first poll (it
may be done already, or have failed at once) and any poll that has waited far too long; after
those, the most overdue. A due poll the learned plan would no longer make (the job is unlikely to be
over yet) is put off without a call. So submitting more jobs than the budget can poll at their planned gaps stretches
every job's polls fairly (each waits its turn, oldest first), and the budget is never exceeded
whatever is submitted; `rpq_poll_lag_seconds` shows how late the latest poll runs.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import case, func, update
from sqlmodel import col, or_, select

from jobs.flow import lifecycle
from jobs.flow.batching import ask_and_store, tokens_available
from jobs.runtime import DISPATCH_TASK, Runtime
from jobs.states import AT_RUNPOD
from jobs.storage.db import session_scope
from jobs.storage.models import JobRow, utcnow
from jobs.storage.store import JOBS, put_off_polls

log = logging.getLogger("rpq.poller")

#: Jobs claimed together.
BATCH = 64
#: How long one task run goes on before handing the worker back (it re-enqueues itself at once).
RUN_SECONDS = 5.0
#: The longest a poller sleeps, even with nothing due sooner: a cheap look that bounds how long a
#: job made due by other means (an operator, a migration) waits.
HORIZON_SECONDS = 30.0
#: The shortest sleep between two runs: polls due within it are made together, by one run, at the
#: cost of at most this much detection lag. (A run per due job would cost a Celery task per poll.)
GATHER_SECONDS = 0.25
#: With no /status budget left, look again after this (the budget refills continuously).
NO_BUDGET_RECHECK_SECONDS = 0.25
#: A poll this overdue goes before any other (RunPod keeps a finished job's result 30 minutes).
STARVING = timedelta(minutes=5)


@dataclass
class Outcome:
    """What one poller run did, and when it should run again (None: nothing is in flight)."""

    polled: int = 0
    finished: int = 0
    put_off: int = 0  # due polls the plan now says to wait with (made later, without a call now)
    again_in: float | None = None
    reason: str = ""


def poll_due(rt: Runtime, endpoint_id: str, *, rand: Any = random.random,
             run_seconds: float = RUN_SECONDS, batch: int = BATCH) -> Outcome:
    """Poll the endpoint's jobs that are due, as many as its budget allows right now."""
    outcome = Outcome()
    started = time.monotonic()
    while True:
        tokens = tokens_available(rt, endpoint_id, "status")
        short = tokens < batch  # the budget, not the batch size, sets how many are polled now
        room = min(batch, tokens)
        if room <= 0:
            outcome.again_in, outcome.reason = NO_BUDGET_RECHECK_SECONDS, "the /status budget is spent for now"
            break
        claimed, put_off = _claim(rt, endpoint_id, room, rand)
        outcome.put_off += put_off
        if not claimed and not put_off:
            due = _next_due(rt, endpoint_id)
            outcome.again_in = None if due is None else max(due, GATHER_SECONDS)
            outcome.reason = "nothing due"
            break
        steps = ask_and_store(rt, lambda row: lifecycle.ask_status(rt, row, rand=rand), claimed)
        outcome.polled += len(claimed)
        outcome.finished += sum(1 for step in steps if step.poll_in is None)
        if time.monotonic() - started >= run_seconds:
            outcome.again_in, outcome.reason = 0.0, "time is up; more may be due"
            break
        if short and len(claimed) + put_off == room:
            # Every token went, and more polls may be due. Going on now would poll them one or two at a
            # time as tokens trickle back, each batch paying a claim and a transaction: come back when a
            # batch's worth has gathered (the bucket holds them: none is lost).
            outcome.again_in, outcome.reason = NO_BUDGET_RECHECK_SECONDS, "the /status budget is spent for now"
            break
    if outcome.finished and rt.settings.max_in_flight_for(endpoint_id) is not None:
        rt.wake(DISPATCH_TASK, endpoint_id)  # a slot is free: a held job can go
    return outcome


def claim_due(rt: Runtime, endpoint_id: str, limit: int, *, rand: Any = random.random) -> list[JobRow]:
    """Claim up to `limit` of the endpoint's due polls, most urgent first, in one transaction: each
    claimed job's next_poll_at moves to the end of its lease, so a poller killed mid-call leaves it
    for the reconciler. Returns the rows as they were before the claim (the polls put off in the same
    transaction, see `_claim`, are not among them)."""
    return _claim(rt, endpoint_id, limit, rand)[0]


def _claim(rt: Runtime, endpoint_id: str, limit: int, rand: Any) -> tuple[list[JobRow], int]:
    """`claim_due`, and how many of the due polls it put off instead. A poll placed before the
    endpoint had the history to plan from (or by an older plan) may now be one the plan would not
    make: the job is unlikely to be over. Its next_poll_at moves to the job's likely end in the same
    transaction, free, so the budget goes to jobs that may have ended; this is what lets a new
    endpoint's polls focus on its likely ends as soon as its first jobs finish."""
    now = utcnow()
    urgent = or_(col(JobRow.poll_count) == 0, col(JobRow.next_poll_at) < now - STARVING)
    with session_scope(rt.engine) as session:
        rows = list(session.exec(
            select(JobRow)
            .where(JobRow.endpoint_id == endpoint_id, col(JobRow.status).in_(sorted(AT_RUNPOD)),
                   col(JobRow.runpod_job_id).is_not(None),
                   or_(col(JobRow.next_poll_at).is_(None), col(JobRow.next_poll_at) <= now))
            .order_by(case((col(JobRow.next_poll_at).is_(None), 0), (urgent, 1), else_=2), col(JobRow.next_poll_at))
            .limit(limit)
            .with_for_update(skip_locked=True)
        ).all())
        ask: list[JobRow] = []
        later: list[tuple[JobRow, datetime]] = []
        for row in rows:
            wait = lifecycle.planned_wait(rt, row, now=now, rand=rand)
            if wait is None:
                ask.append(row)
            else:
                later.append((row, now + timedelta(seconds=wait)))
        if ask:
            session.execute(update(JOBS).where(JOBS.c.id.in_([row.id for row in ask]))
                            .values(next_poll_at=now + lifecycle.poll_lease(rt)))
        put_off = put_off_polls(session, later)
    return ask, put_off


def _next_due(rt: Runtime, endpoint_id: str) -> float | None:
    """Seconds until the endpoint's next poll is due (at most HORIZON_SECONDS); None if none is in flight."""
    with session_scope(rt.engine, read_only=True) as session:
        count, due = session.exec(select(func.count(), func.min(JobRow.next_poll_at)).where(
            JobRow.endpoint_id == endpoint_id, col(JobRow.status).in_(sorted(AT_RUNPOD)),
            col(JobRow.runpod_job_id).is_not(None))).one()
    if not count:
        return None
    if due is None:
        return 0.0
    return min(max((due - utcnow()).total_seconds(), 0.0), HORIZON_SECONDS)

