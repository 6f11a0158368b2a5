"""What the submit, poll and cancel tasks do, without Celery.

Each function reads the row, talks to RunPod outside any transaction, and writes the result with
a compare-and-set. Each returns a `Next` telling its task what to schedule; the task only obeys.
Any message may arrive twice or never: a duplicate finds the row already moved and does nothing,
and a lost one is found again by the reconciler from the table alone.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import secrets
from dataclasses import dataclass
from datetime import timedelta
from typing import Any
from urllib.parse import urlencode

from sqlmodel import select

from jobs import logcontext, streams
from jobs.backoff import poll_delay, poll_error_delay
from jobs.db import session_scope
from jobs.errors import (
    RunOutcomeUnknown,
    RunPodAuthError,
    RunPodError,
    RunPodNotFound,
    RunPodProtocolError,
    RunPodRejected,
    RunPodTransient,
)
from jobs.models import JobRow, utcnow
from jobs.runpod import JobState, RunPodStatus
from jobs.runtime import Runtime
from jobs.states import AT_RUNPOD, FROM_RUNPOD, JobStatus
from jobs.store import Source, claim_poll, get_row, record_event, transition, update_fields

log = logging.getLogger("rpq.lifecycle")

#: RunPod's default ttl, used for the poll deadline when a job's policy sets none.
DEFAULT_TTL_MS = 24 * 3600 * 1000
#: Past ttl, RunPod has deleted the job; poll a little longer to see its 404 rather than guess.
DEADLINE_GRACE = timedelta(minutes=5)
def poll_lease(rt: Runtime) -> timedelta:
    """How long a claimed poll owns its job: two RunPod timeouts and a margin. A worker killed
    mid-poll is healed by the reconciler once this has passed; a poll that overruns it (retrying a
    slow RunPod) at worst overlaps one other poll, whose compare-and-set writes make that harmless."""
    return timedelta(seconds=2 * rt.settings.runpod_timeout_seconds + 5)
#: A poll hint that arrives this much before the job's next_poll_at is a duplicate: drop it.
EARLY_SLACK = timedelta(seconds=1)
#: RunPod keeps a result 30 minutes; past 25 its /retry may not find the job any more.
RUNPOD_RETRY_WINDOW = timedelta(minutes=25)


@dataclass(frozen=True)
class Next:
    """What a task should do after its step: poll in N seconds, run again in N seconds, or stop."""

    poll_in: float | None = None
    again_in: float | None = None
    reason: str = ""

    @classmethod
    def stop(cls, reason: str) -> Next:
        return cls(reason=reason)


# -- submit ---------------------------------------------------------------------------------------------


def submit_job(rt: Runtime, job_id: str, *, rand: Any = random.random) -> Next:
    """Send a PENDING job to RunPod, exactly once, and hand it to the poller."""
    now = utcnow()
    with session_scope(rt.engine) as session:
        claimed = transition(session, job_id, to=JobStatus.SUBMITTING, source=Source.SUBMIT,
                             expected={JobStatus.PENDING}, values={"submitted_at": now})
        row = get_row(session, job_id)
    if row is None:
        return Next.stop("no such job")
    if claimed is None:
        return Next.stop(f"job is {row.status}, not PENDING: nothing to submit")

    logcontext.bind(job_id=row.id, correlation_id=row.correlation_id)
    try:
        state, token_hash = _send(rt, row)
    except RunPodError as exc:
        rt.metrics.runpod_error("run", exc)
        rt.metrics.submitted(row.endpoint_name, _submit_outcome(exc))
        return _submit_failed(rt, row, exc, rand)
    rt.metrics.submitted(row.endpoint_name, "accepted")
    log.info("job %s is RunPod job %s (attempt %d)", row.id, state.id, row.attempt)
    return _accepted(rt, row, state, token_hash)


def _submit_outcome(exc: RunPodError) -> str:
    if isinstance(exc, RunOutcomeUnknown | RunPodProtocolError):
        return "unknown"
    return "deferred" if isinstance(exc, RunPodTransient) else "rejected"


def _submit_failed(rt: Runtime, row: JobRow, exc: RunPodError, rand: Any) -> Next:
    if isinstance(exc, RunPodTransient) and not isinstance(exc, RunOutcomeUnknown):
        # For /run only errors RunPod provably never acted on get here (see jobs.runpod): send later.
        errors = row.poll_errors + 1
        delay = poll_error_delay(rt.schedule_for(webhooks=False), consecutive_errors=errors,
                                 retry_after=exc.retry_after, rand=rand)
        _move(rt, row.id, JobStatus.PENDING, f"RunPod unavailable ({exc}); next try in {delay:.0f}s",
              values={"next_poll_at": utcnow() + timedelta(seconds=delay), "poll_errors": errors})
        return Next(again_in=delay, reason="transient")
    if isinstance(exc, RunPodRejected | RunPodAuthError | RunPodNotFound):
        _move(rt, row.id, JobStatus.FAILED, f"RunPod refused the job: {exc}",
              values={"error": str(exc), "finished_at": utcnow()})
        rt.metrics.finished(row.endpoint_name, JobStatus.FAILED.value, row.created_at)
        return Next.stop("rejected")
    # RunOutcomeUnknown, an unreadable answer, or anything unforeseen: a job may exist at RunPod.
    detail = (f"{exc}" if isinstance(exc, RunOutcomeUnknown)
              else f"RunPod's answer could not be read ({exc}); a job may exist")
    _move(rt, row.id, JobStatus.SUBMIT_UNKNOWN, f"{detail}; not resubmitted: an operator must decide")
    return Next.stop("outcome unknown")


def _send(rt: Runtime, row: JobRow) -> tuple[JobState, str | None]:
    """`/retry` the previous RunPod job when a retry can reuse it (it keeps its webhook), else `/run`
    a new one. Returns RunPod's answer and the hash of a new webhook token, if one was made."""
    if row.runpod_retry_of:
        adopted = _runpod_retry(rt, row.endpoint_id, row.runpod_retry_of)
        if adopted is not None:
            return adopted, None
    webhook, token_hash = row.webhook, None
    if webhook is None and rt.settings.runpod_webhook_base_url:
        webhook, token_hash = webhook_url(rt.settings.runpod_webhook_base_url, row.correlation_id)
    return rt.runpod.run(row.endpoint_id, row.input, webhook=webhook, policy=row.policy), token_hash


def webhook_url(base: str, correlation_id: str | None) -> tuple[str, str]:
    """A webhook URL with a fresh unguessable token, and the token's hash (all rpq ever stores).

    The correlation id rides along in the query: RunPod's API has no metadata field, and this puts
    it in the one place RunPod keeps and shows beside the job."""
    token = secrets.token_urlsafe(32)
    url = f"{base.rstrip('/')}/v1/webhooks/runpod/{token}"
    if correlation_id:
        url += "?" + urlencode({"correlation_id": correlation_id})
    return url, hash_token(token)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _runpod_retry(rt: Runtime, endpoint_id: str, runpod_job_id: str) -> JobState | None:
    try:
        return rt.runpod.retry(endpoint_id, runpod_job_id)
    except RunPodNotFound:
        return None  # gone from RunPod: a fresh /run
    except RunPodRejected:
        # Refused: either not FAILED any more because an earlier /retry of ours went through
        # (adopt it) or truly not retryable (run anew).
        state = rt.runpod.status(endpoint_id, runpod_job_id)
        return state if not state.is_terminal else None
    except RunPodTransient as exc:
        # The /retry may have requeued the job: like an unknown /run, leave it to an operator.
        raise RunOutcomeUnknown(f"retry of RunPod job {runpod_job_id} got no clear answer ({exc})") from exc


def _accepted(rt: Runtime, row: JobRow, state: JobState, token_hash: str | None) -> Next:
    now = utcnow()
    first = rt.schedule_for(webhooks=bool(token_hash or row.webhook_token_hash)).first
    values: dict[str, Any] = {
        "runpod_job_id": state.id,
        "last_runpod_status": state.status.value,
        "next_poll_at": now + timedelta(seconds=first),
        "deadline_at": now + timedelta(milliseconds=(row.policy or {}).get("ttl", DEFAULT_TTL_MS)) + DEADLINE_GRACE,
        "polls_since_change": 0,
        "poll_errors": 0,
    }
    if token_hash:
        values["webhook_token_hash"] = token_hash
    with session_scope(rt.engine) as session:
        moved = transition(session, row.id, to=JobStatus.IN_QUEUE, source=Source.SUBMIT,
                           expected={JobStatus.SUBMITTING}, detail=f"RunPod job {state.id}", values=values)
        current = get_row(session, row.id)
        if moved is None and current is not None:
            # The row moved while /run was in flight (cancelled by a user, say). Keep RunPod's id
            # on it so nothing at RunPod is untracked.
            update_fields(session, row.id, while_status=set(JobStatus), values={"runpod_job_id": state.id})
            record_event(session, row.id, from_status=current.status, to_status=current.status,
                         source=Source.SUBMIT, detail=f"RunPod job {state.id} created while {current.status}")
    if moved is not None:
        return Next(poll_in=first, reason="submitted")
    if current is not None and current.status is JobStatus.CANCELLED:
        cancel_on_runpod(rt, row.id)
    return Next.stop("row moved during submit")


def _move(rt: Runtime, job_id: str, to: JobStatus, detail: str, *, values: dict[str, Any] | None = None,
          source: str = Source.SUBMIT) -> None:
    with session_scope(rt.engine) as session:
        transition(session, job_id, to=to, source=source, detail=detail, expected={JobStatus.SUBMITTING},
                   values=values)


# -- poll -------------------------------------------------------------------------------------------------


def poll_job(rt: Runtime, job_id: str, *, rand: Any = random.random) -> Next:
    """Ask RunPod about a job once, store what it says, and say when to ask again."""
    now = utcnow()
    with session_scope(rt.engine) as session:
        row = get_row(session, job_id)
        if row is None or row.status not in AT_RUNPOD or row.runpod_job_id is None:
            return Next.stop("not at RunPod")
        if row.next_poll_at is not None and now < row.next_poll_at - EARLY_SLACK:
            return Next.stop("early: another poll owns this job")
        # Claim this poll: of two hints for the same job, only one gets past here.
        if not claim_poll(session, job_id, seen=row.next_poll_at, lease_until=now + poll_lease(rt)):
            return Next.stop("another poll claimed this job")

    logcontext.bind(job_id=row.id, correlation_id=row.correlation_id)
    rt.metrics.polled(row.endpoint_name)
    try:
        state = rt.runpod.status(row.endpoint_id, row.runpod_job_id)
    except RunPodNotFound as exc:
        rt.metrics.finished(row.endpoint_name, JobStatus.EXPIRED.value, row.created_at)
        with session_scope(rt.engine) as session:
            transition(session, job_id, to=JobStatus.EXPIRED, source=Source.POLL,
                       detail=f"RunPod no longer knows the job (404: result retention or ttl passed): {exc}",
                       values={"finished_at": utcnow(), "next_poll_at": None, "poll_count": row.poll_count + 1})
        return Next.stop("expired")
    except RunPodError as exc:
        rt.metrics.runpod_error("status", exc)
        return _poll_failed(rt, row, exc, rand)

    return _store_status(rt, row, state, rand)


def _poll_failed(rt: Runtime, row: JobRow, exc: RunPodError, rand: Any) -> Next:
    """A failed poll changes nothing but the schedule: RunPod's silence is not a job outcome."""
    errors = row.poll_errors + 1
    retry_after = exc.retry_after if isinstance(exc, RunPodTransient) else None
    schedule = rt.schedule_for(webhooks=row.webhook_token_hash is not None)
    delay = poll_error_delay(schedule, consecutive_errors=errors, retry_after=retry_after, rand=rand)
    if isinstance(exc, RunPodAuthError | RunPodRejected | RunPodProtocolError):
        log.error("job %s: polling RunPod failed and will not fix itself: %s", row.id, exc)
    with session_scope(rt.engine) as session:
        update_fields(session, row.id, while_status=AT_RUNPOD, values={
            "poll_errors": errors, "poll_count": row.poll_count + 1,
            "next_poll_at": utcnow() + timedelta(seconds=delay),
        })
    return Next(poll_in=delay, reason=f"poll failed: {type(exc).__name__}")


def _store_status(rt: Runtime, row: JobRow, state: JobState, rand: Any) -> Next:
    now = utcnow()
    status = FROM_RUNPOD[state.status]
    chunks: list[Any] = []
    if row.stream and (status is JobStatus.IN_PROGRESS or status.is_terminal):
        try:
            chunks = rt.runpod.stream(row.endpoint_id, row.runpod_job_id or "", wait_ms=1000).chunks
        except RunPodError as exc:
            if status.is_terminal:
                # Finishing now would end the event stream before its last chunks: try again.
                rt.metrics.runpod_error("stream", exc)
                return _poll_failed(rt, row, exc, rand)
            log.warning("job %s: /stream failed (%s); its chunks wait at RunPod for the next poll", row.id, exc)
    changed = state.status.value != row.last_runpod_status
    polls_since_change = 0 if changed else row.polls_since_change + 1
    values: dict[str, Any] = {
        "poll_count": row.poll_count + 1,
        "poll_errors": 0,
        "polls_since_change": polls_since_change,
        "last_runpod_status": state.status.value,
    }
    for name, value in (("delay_time_ms", state.delay_time_ms), ("execution_time_ms", state.execution_time_ms),
                        ("worker_id", state.worker_id)):
        if value is not None:
            values[name] = value
    if status is JobStatus.IN_PROGRESS and row.started_at is None:
        values["started_at"] = now
    progressed = status is JobStatus.IN_PROGRESS and state.output is not None and state.output != row.progress
    if progressed:
        values["progress"] = state.output  # RunPod shows progress updates as output while running
    if status.is_terminal:
        values.update(finished_at=now, next_poll_at=None, output=state.output, error=_error_text(state.error))

    past_deadline = row.deadline_at is not None and now > row.deadline_at
    if not status.is_terminal and past_deadline:
        status = JobStatus.EXPIRED
        values.update(finished_at=now, next_poll_at=None)

    schedule = rt.schedule_for(webhooks=row.webhook_token_hash is not None)
    delay = poll_delay(schedule, polls_since_change=polls_since_change, rand=rand)
    if not status.is_terminal:
        values["next_poll_at"] = now + timedelta(seconds=delay)

    extra = [(streams.PROGRESS, state.output)] if progressed else []
    extra += [(streams.OUTPUT, chunk) for chunk in chunks]
    detail = "ttl deadline passed and RunPod still answers" if past_deadline else _detail(state)
    with session_scope(rt.engine) as session:
        # Lock the row first (PostgreSQL; SQLite's write lock is already held): stream events get
        # their sequence numbers from one writer at a time.
        session.exec(select(JobRow.id).where(JobRow.id == row.id).with_for_update()).first()
        stored = _write_poll(session, row, status, values, extra, detail, now)
        current = get_row(session, row.id) if not stored else None
    if stored and changed:
        log.info("job %s: RunPod says %s", row.id, state.status.value)
    if stored and status.is_terminal:
        rt.metrics.finished(row.endpoint_name, status.value, row.created_at)
    if not stored:
        # The row moved under us (a cancel, or another poll). Keep polling only if it still needs it.
        if current is not None and current.status in AT_RUNPOD:
            return Next(poll_in=delay, reason="row moved; polling on")
        return Next.stop("row moved to a final status")
    return Next.stop(f"final: {status}") if status.is_terminal else Next(poll_in=delay, reason=str(status))


def _write_poll(session: Any, row: JobRow, status: JobStatus, values: dict[str, Any],
                extra: list[tuple[str, Any]], detail: str, now: Any) -> bool:
    """Store one poll's findings so the event stream reads started, progress/output, then end|error.

    A job seen finished straight from IN_QUEUE with chunks to deliver is first moved to IN_PROGRESS,
    which is true (it ran) and puts `started` before its chunks.
    """
    current = row.status
    if status is not current and (status is JobStatus.IN_PROGRESS or (status.is_terminal and extra)) \
            and current is JobStatus.IN_QUEUE:
        step = values if status is JobStatus.IN_PROGRESS else {"started_at": now}
        moved = transition(session, row.id, to=JobStatus.IN_PROGRESS, source=Source.POLL, expected={current},
                           detail=detail if status is JobStatus.IN_PROGRESS else "seen running by its output",
                           values=step)
        if moved is None:
            return False
        current = JobStatus.IN_PROGRESS
        if status is JobStatus.IN_PROGRESS:
            streams.append(session, row.id, row.attempt, extra)
            return True
    streams.append(session, row.id, row.attempt, extra)
    if status is current:
        return update_fields(session, row.id, while_status={current}, values=values)
    return transition(session, row.id, to=status, source=Source.POLL, detail=detail, expected={current},
                      values=values) is not None


def _detail(state: JobState) -> str:
    parts = [f"RunPod says {state.status.value}"]
    if state.status is RunPodStatus.COMPLETED and not state.has_output:
        parts.append("with no output")
    if state.execution_time_ms is not None:
        parts.append(f"ran {state.execution_time_ms} ms")
    return ", ".join(parts)


def _error_text(error: Any) -> str | None:
    if error is None or isinstance(error, str):
        return error
    return json.dumps(error, default=str)


# -- cancel -----------------------------------------------------------------------------------------------


def cancel_on_runpod(rt: Runtime, job_id: str) -> Next:
    """Tell RunPod to stop a job that our table already says is CANCELLED."""
    with session_scope(rt.engine) as session:
        row = get_row(session, job_id)
    if row is None or row.status is not JobStatus.CANCELLED or row.runpod_job_id is None:
        return Next.stop("nothing to cancel at RunPod")
    try:
        state = rt.runpod.cancel(row.endpoint_id, row.runpod_job_id)
    except RunPodNotFound:
        detail = "RunPod no longer knows the job"
    except RunPodTransient as exc:
        return Next(again_in=poll_error_delay(rt.schedule_for(webhooks=False), consecutive_errors=1,
                                              retry_after=exc.retry_after),
                    reason="RunPod unavailable")
    except RunPodError as exc:
        detail = f"RunPod refused the cancel: {exc}"
    else:
        detail = f"RunPod answered {state.status.value}"
    with session_scope(rt.engine) as session:
        record_event(session, job_id, from_status=JobStatus.CANCELLED, to_status=JobStatus.CANCELLED,
                     source=Source.CANCEL, detail=f"cancel sent to RunPod: {detail}")
    return Next.stop(detail)
