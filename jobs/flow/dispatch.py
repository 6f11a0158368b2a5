"""The dispatcher: send an endpoint's PENDING jobs to RunPod, in order, within its limits.

One task run (`rpq.dispatch`, argument: the endpoint id) claims the endpoint's next PENDING jobs
together (highest `priority` first, then oldest; `FOR UPDATE SKIP LOCKED` on PostgreSQL, so two
dispatchers never wait on each other's rows), sends their `/run`s concurrently, and goes on until no
job is left, the endpoint's `max_in_flight` is reached, its `/run` budget is spent, or its time is
up; then it says when to run again. Each job is still sent exactly as `lifecycle.submit_job` sends
it: claimed with a compare-and-set, and every write after /run fenced to its attempt; a batch's
answers are stored in one transaction (`lifecycle.store_together`).

Why not one message per job: the order (priority, then age), the cap and the budget are questions
about all of an endpoint's PENDING jobs, which only a reader of the table can answer; and a message
per job costs a Celery task's CPU per job and a backlog in Redis that delays everything behind it.
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, and_, func, true
from sqlmodel import Session, col, or_, select

from jobs.flow import lifecycle
from jobs.flow.batching import ask_and_store, tokens_available
from jobs.flow.spend_guard import ACCOUNT, HOLD_RECHECK_SECONDS, SpendHold, note_holds, spend_holds
from jobs.runtime import POLL_DUE_TASK, Runtime
from jobs.states import JobStatus
from jobs.storage.db import session_scope
from jobs.storage.models import JobRow, utcnow

log = logging.getLogger("rpq.dispatch")

#: Jobs claimed together: enough to keep RunPod's /run busy, few enough that one slow /run does not
#: hold many claimed jobs back.
BATCH = 32
#: How long one task run goes on before handing the worker back (it re-enqueues itself at once).
RUN_SECONDS = 5.0
#: How long a wake-up from submit() waits, so the jobs submitted meanwhile go out in the same run
#: (a run per job would cost a Celery task per job).
GATHER_SECONDS = 0.1
#: While an endpoint is at its max_in_flight, look again this often (a job ending also wakes it).
HELD_RECHECK_SECONDS = 5.0
#: With no /run budget left, look again after this (the budget refills continuously).
NO_BUDGET_RECHECK_SECONDS = 0.25
#: Statuses that count against an endpoint's max_in_flight: a job RunPod has, or may have.
IN_FLIGHT = (JobStatus.SUBMITTING, JobStatus.SUBMIT_UNKNOWN, JobStatus.IN_QUEUE, JobStatus.IN_PROGRESS)
#: The order an endpoint's PENDING jobs go out in: higher priority first, then oldest, then by id (a
#: total order, so "the jobs ahead of this one" (jobs.flow.waiting) is the same set the dispatcher sends first).
DISPATCH_ORDER: tuple[ColumnElement[Any], ...] = (
    col(JobRow.priority).desc(), col(JobRow.created_at).asc(), col(JobRow.id).asc())


@dataclass
class Outcome:
    """What one dispatcher run did, and when it should run again (None: when woken)."""

    sent: int = 0
    again_in: float | None = None
    reason: str = ""


def dispatch(rt: Runtime, endpoint_id: str, *, rand: Any = random.random,
             run_seconds: float = RUN_SECONDS, batch: int = BATCH) -> Outcome:
    """Send the endpoint's PENDING jobs that are due, as many as its limits allow right now."""
    outcome = Outcome()
    started = time.monotonic()
    cap = rt.settings.max_in_flight_for(endpoint_id)
    hold = _spend_hold(rt, endpoint_id)
    if hold is not None:  # only jobs an operator released go out (jobs.release)
        log.warning("endpoint %s: %s", endpoint_id, hold.message)
    while True:
        room = batch
        if cap is not None:
            with session_scope(rt.engine, read_only=True) as session:
                room = min(room, cap - in_flight(session, endpoint_id))
            if room <= 0:
                outcome.again_in, outcome.reason = _held_recheck(rt, endpoint_id), f"at max_in_flight {cap}"
                return outcome
        tokens = tokens_available(rt, endpoint_id, "run")
        short = tokens < room  # the budget, not the batch size or the cap, sets how many go now
        room = min(room, tokens)
        if room <= 0:
            outcome.again_in, outcome.reason = NO_BUDGET_RECHECK_SECONDS, "the /run budget is spent for now"
            return outcome
        claimed = claim_pending(rt, endpoint_id, room, released_only=hold is not None)
        if not claimed and hold is not None:
            outcome.again_in, outcome.reason = HOLD_RECHECK_SECONDS, hold.message
            return outcome
        if not claimed:
            outcome.again_in, outcome.reason = _next_due(rt, endpoint_id), "nothing left to send"
            return outcome
        steps = ask_and_store(rt, lambda item: lifecycle.send_claimed(rt, item[0], item[1], rand=rand), claimed)
        outcome.sent += len(claimed)
        first_polls = [step.poll_in for step in steps if step.poll_in is not None]
        if first_polls:
            rt.wake(POLL_DUE_TASK, endpoint_id, min(first_polls))
        if time.monotonic() - started >= run_seconds:
            outcome.again_in, outcome.reason = 0.0, "time is up; more may be waiting"
            return outcome
        if short and len(claimed) == room:
            # Every token went, and more jobs may be waiting. The budget refills a token at a time: going
            # on now would send them a job or two at a time, each batch paying a claim and a transaction.
            # Come back when a batch's worth has gathered (the bucket holds them: none is lost).
            outcome.again_in, outcome.reason = NO_BUDGET_RECHECK_SECONDS, "the /run budget is spent for now"
            return outcome


def _spend_hold(rt: Runtime, endpoint_id: str) -> SpendHold | None:
    """The spend guard's hold on the endpoint's new jobs, if any, with its spells recorded as they begin and end.
    Reads only when a limit is set: with none, the guard costs the dispatcher nothing."""
    settings = rt.settings
    name = settings.endpoint_name_for(endpoint_id)
    scopes = set()
    if settings.budget_max_spend_per_hour is not None or settings.budget_min_balance is not None:
        scopes.add(ACCOUNT)
    if name is not None and name in settings.budget_endpoint_max_spend_per_hour:
        scopes.add(name)
    if not scopes:
        return None
    with session_scope(rt.engine) as session:
        now = utcnow()
        holds = spend_holds(session, settings, now, endpoint_id)
        note_holds(session, scopes, holds, now)
    return holds[0] if holds else None


def claim_pending(rt: Runtime, endpoint_id: str, limit: int, *,
                  released_only: bool = False) -> list[tuple[JobRow, str | None]]:
    """Claim up to `limit` of the endpoint's due PENDING jobs (PENDING -> SUBMITTING), in order, in one
    transaction; returns each claimed row with the webhook token its /run will carry. `released_only`: only
    jobs an operator let past the spend guard."""
    now = utcnow()
    with session_scope(rt.engine) as session:
        ids = session.exec(
            select(JobRow.id)
            .where(JobRow.endpoint_id == endpoint_id, due_pending(now),
                   col(JobRow.spend_released) if released_only else true())
            .order_by(*DISPATCH_ORDER)
            .limit(limit)
            .with_for_update(skip_locked=True)
        ).all()
        tokens = {job_id: lifecycle.new_webhook_token(rt) for job_id in ids}
        won = lifecycle.claim_submits(session, tokens)
        rows = {row.id: row for row in session.exec(select(JobRow).where(col(JobRow.id).in_(won)))} if won else {}
    return [(rows[job_id], tokens[job_id]) for job_id in ids if job_id in rows]


def due_pending(now: datetime) -> ColumnElement[bool]:
    """PENDING jobs the dispatcher may send now: all but those waiting out a deferred /run."""
    return and_(col(JobRow.status) == JobStatus.PENDING,
                or_(col(JobRow.next_poll_at).is_(None), col(JobRow.next_poll_at) <= now))


def ahead_of(priority: int, created_at: datetime, job_id: str) -> ColumnElement[bool]:
    """The jobs DISPATCH_ORDER puts before a job with these keys. (Spelled as ranges of ix_jobs_dispatch,
    which PostgreSQL counts with a bitmap of index scans.)"""
    return or_(col(JobRow.priority) > priority,
               and_(col(JobRow.priority) == priority,
                    or_(col(JobRow.created_at) < created_at,
                        and_(col(JobRow.created_at) == created_at, col(JobRow.id) < job_id))))


def in_flight(session: Session, endpoint_id: str) -> int:
    """The endpoint's jobs that RunPod has, or may have."""
    return session.exec(select(func.count()).select_from(JobRow).where(
        JobRow.endpoint_id == endpoint_id, col(JobRow.status).in_(sorted(IN_FLIGHT)))).one()


def _next_due(rt: Runtime, endpoint_id: str) -> float | None:
    """Seconds until the endpoint's next PENDING job waiting out a backoff is due; None if none is."""
    with session_scope(rt.engine, read_only=True) as session:
        due = session.exec(select(func.min(JobRow.next_poll_at)).where(
            JobRow.endpoint_id == endpoint_id, JobRow.status == JobStatus.PENDING)).one()
    if due is None:
        return None
    return max((due - utcnow()).total_seconds(), 0.0)


def _held_recheck(rt: Runtime, endpoint_id: str) -> float | None:
    with session_scope(rt.engine, read_only=True) as session:
        waiting = session.exec(select(JobRow.id).where(
            JobRow.endpoint_id == endpoint_id, JobRow.status == JobStatus.PENDING).limit(1)).first()
    return HELD_RECHECK_SECONDS if waiting is not None else None

