"""What the submit, poll and cancel tasks do, without Celery.

Each function reads the row, talks to RunPod outside any transaction, and writes the result with
a compare-and-set. Each returns a `Next` telling its task what to schedule; the task only obeys.
Any message may arrive twice or never, and any answer may arrive late: a duplicate finds the row
already moved and does nothing, a lost one is found again by the reconciler from the table alone,
and every write made on behalf of a RunPod job is fenced to the attempt and RunPod job it is about
(`store.Fence`), so a late answer about an older attempt never lands on a newer one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import urlencode

from sqlalchemy import CursorResult, case, update
from sqlmodel import Session, col, select

from jobs.bucket import jobfiles
from jobs.errors import (
    ConfigError,
    ObjectStoreError,
    RpqError,
    RunOutcomeUnknown,
    RunPodAuthError,
    RunPodBudgetExhausted,
    RunPodError,
    RunPodNotFound,
    RunPodProtocolError,
    RunPodRejected,
    RunPodTransient,
    StreamReadUnknown,
)
from jobs.flow.backoff import poll_delay, poll_error_delay
from jobs.flow.pollplan import LONG_WAIT_CAP_SECONDS, JobSeen, Mode, Plan, plan_next_poll
from jobs.jsonsafe import storable_json, storable_text
from jobs.observability import logcontext
from jobs.runpod import cost
from jobs.runpod.client import JobState, RunPodStatus
from jobs.runtime import CANCEL_TASK, POLL_DUE_TASK, Runtime
from jobs.states import AT_RUNPOD, FROM_RUNPOD, JobStatus
from jobs.storage import filerows, streams
from jobs.storage.db import session_scope, unreachable
from jobs.storage.models import JobRow, RunPodCancel, utcnow
from jobs.storage.store import (
    JOBS,
    Fence,
    Source,
    add_runpod_cancel,
    claim_poll,
    get_row,
    open_runpod_cancels,
    record_event,
    side_rows_together,
    transition,
    transition_all,
    unless_due_now,
    update_fields,
)

log = logging.getLogger("rpq.lifecycle")

#: RunPod's default ttl. rpq always sends a ttl (this one when the job's policy sets none), so the
#: poll deadline never rests on a guess about the endpoint's own setting, which may be longer.
DEFAULT_TTL_MS = 24 * 3600 * 1000
#: Past ttl, RunPod has deleted the job; poll a little longer to see its 404 rather than guess.
DEADLINE_GRACE = timedelta(minutes=5)
#: A poll hint that arrives this much before the job's next_poll_at is a duplicate: drop it.
EARLY_SLACK = timedelta(seconds=1)
#: RunPod keeps a result 30 minutes; past 25 its /retry may not find the job any more.
RUNPOD_RETRY_WINDOW = timedelta(minutes=25)
#: How long a poll's /stream read may wait at RunPod for new chunks.
STREAM_WAIT_MS = 1000
#: A finished streaming job's last /stream read is tried this many times before the job is stored
#: as finished anyway (with an event saying chunks may be missing): never past RunPod's retention.
FINAL_DRAIN_TRIES = 5
#: The database's integer columns hold timings up to this; a larger (or negative) one is not a timing.
MAX_STORED_MS = 2**31 - 1
MAX_WORKER_ID_LENGTH = 128
#: How long a batch's answers wait for a database that does not answer before they are given up. RunPod's answers
#: (a /run's job id above all) exist nowhere else; a /run stored this late is still adopted (SUBMIT_UNKNOWN ->
#: IN_QUEUE), so the wait may outlast the reconciler's bound on a submit.
STORE_RETRY_SECONDS = 90.0
#: The first pause before storing them again; it doubles up to STORE_RETRY_MAX_PAUSE.
STORE_RETRY_FIRST_PAUSE = 0.5
STORE_RETRY_MAX_PAUSE = 5.0


def poll_lease(rt: Runtime) -> timedelta:
    """How long a claimed poll owns its job: two RunPod timeouts and a margin. A worker killed
    mid-poll is healed by the reconciler once this has passed; a poll that overruns it (retrying a
    slow RunPod) at worst overlaps one other poll, whose fenced compare-and-set writes make that harmless."""
    return timedelta(seconds=2 * rt.settings.runpod_timeout_seconds + 5)


@dataclass(frozen=True)
class Next:
    """What a task should do after its step: poll in N seconds, run again in N seconds, or stop."""

    poll_in: float | None = None
    again_in: float | None = None
    reason: str = ""

    @classmethod
    def stop(cls, reason: str) -> Next:
        return cls(reason=reason)


#: What to do once the transaction a job's findings were written in has committed: metrics, log lines,
#: messages, and what its task should do next.
Then = Callable[[], Next]


@dataclass(frozen=True)
class Findings:
    """What one submit or poll learned from RunPod, not yet stored. `store` writes it with the session
    it is given, every write fenced as usual, and returns what to do once that transaction has
    committed. Asking and storing are apart so that a batch's answers, asked for concurrently, are
    stored in one transaction (`store_together`). `store` may run twice (see there): it only writes."""

    job_id: str
    correlation_id: str | None
    store: Callable[[Session], Then]
    tenant: str | None = None


def _findings(row: JobRow, store: Callable[[Session], Then]) -> Findings:
    return Findings(row.id, row.correlation_id, store, row.tenant)


def _nothing_to_store(row: JobRow, step: Next) -> Findings:
    return _findings(row, lambda _session: lambda: step)


def store_together(rt: Runtime, findings: Sequence[Findings]) -> list[Next]:
    """Store every job's findings in one transaction, then do what each asks for once it committed;
    returns each one's next step, in order. Each write is the same fenced compare-and-set as on its
    own, so one that no longer matches (a late answer about an older attempt, a job cancelled
    meanwhile) changes nothing, and the others are stored all the same.

    A batch costs one BEGIN and one COMMIT instead of one each per job, and its event rows and stream
    events are written together at its end (`store.side_rows_together`). Should the database not answer
    (down, restarting, the connection cut), the transaction is tried again until it does, for up to
    STORE_RETRY_SECONDS: RunPod's answers are known nowhere else. Should it fail otherwise (a row no
    write can store), it is rolled back and each job's
    findings are stored in a transaction of their own, so one job's failure costs the others nothing;
    the first error is raised after the others are stored and done with (the failed job keeps its
    claim, which the poller or the reconciler takes up again when it runs out)."""
    if not findings:
        return []
    # Rows are written in id order: two transactions that lock some of the same rows then lock them in
    # the same order, and never deadlock.
    order = sorted(range(len(findings)), key=lambda i: findings[i].job_id)
    failures: list[Exception] = []
    try:
        with session_scope(rt.engine) as session, side_rows_together(session):
            thens = {i: findings[i].store(session) for i in order}
    except Exception as exc:
        if unreachable(exc):
            thens = _store_when_back(rt, findings, order, exc)
        elif len(findings) == 1:
            raise
        else:
            log.warning("storing %d jobs' RunPod answers in one transaction failed (%s: %s); storing each on its "
                        "own", len(findings), type(exc).__name__, exc)
            thens = _store_each(rt, findings, order, failures)
    steps: dict[int, Next] = {}
    for i in order:
        if i not in thens:
            continue
        with logcontext.scope():  # each job's log lines carry its own id
            logcontext.bind(job_id=findings[i].job_id, correlation_id=findings[i].correlation_id,
                            tenant=findings[i].tenant)
            try:
                steps[i] = thens[i]()
            except Exception as exc:  # a message not sent, say: the other jobs' steps are still taken
                failures.append(exc)
    if failures:
        raise failures[0]
    return [steps[i] for i in range(len(findings))]


def _store_when_back(rt: Runtime, findings: Sequence[Findings], order: list[int], error: Exception
                     ) -> dict[int, Then]:
    """The batch's transaction again, with growing pauses, while the database does not answer (a restart, a
    failover): what RunPod answered is known only here, and a /run's answer lost would leave its job
    SUBMIT_UNKNOWN though RunPod has it. After STORE_RETRY_SECONDS the error is raised; the jobs keep their claims."""
    log.warning("the database did not answer (%s); storing %d jobs' RunPod answers again when it does",
                type(error).__name__, len(findings))
    deadline = time.monotonic() + STORE_RETRY_SECONDS
    pause = STORE_RETRY_FIRST_PAUSE
    while time.monotonic() + pause < deadline:
        time.sleep(pause)
        pause = min(2 * pause, STORE_RETRY_MAX_PAUSE)
        try:
            with session_scope(rt.engine) as session, side_rows_together(session):
                thens = {i: findings[i].store(session) for i in order}
        except Exception as exc:
            if not unreachable(exc):
                raise
            error = exc
            continue
        log.info("stored %d jobs' RunPod answers once the database answered again", len(findings))
        return thens
    raise error


def _store_each(rt: Runtime, findings: Sequence[Findings], order: list[int], failures: list[Exception]
                ) -> dict[int, Then]:
    """Each job's findings in a transaction of its own; a failure is logged, added to `failures`, and
    costs the other jobs nothing."""
    thens: dict[int, Then] = {}
    for i in order:
        try:
            with session_scope(rt.engine) as session, side_rows_together(session):
                thens[i] = findings[i].store(session)
        except Exception as exc:
            log.error("job %s: storing its RunPod answer failed (%s: %s); it stays claimed until its claim "
                      "runs out", findings[i].job_id, type(exc).__name__, exc)
            failures.append(exc)
    return thens


# -- submit ---------------------------------------------------------------------------------------------


def submit_job(rt: Runtime, job_id: str, *, rand: Any = random.random) -> Next:
    """Send one PENDING job to RunPod, exactly once, and hand it to the poller. (The dispatcher,
    `jobs.flow.dispatch`, does the same for an endpoint's next PENDING jobs, claimed together.)"""
    token = new_webhook_token(rt)
    with session_scope(rt.engine) as session:
        claimed = claim_submit(session, job_id, token)
        row = get_row(session, job_id)
    if row is None:
        return Next.stop("no such job")
    if not claimed:
        return Next.stop(f"job is {row.status}, not PENDING: nothing to submit")
    return submit_claimed(rt, row, token, rand=rand)


def endpoint_of(rt: Runtime, job_id: str) -> str | None:
    """The RunPod endpoint id of a job (None when there is no such job)."""
    with session_scope(rt.engine, read_only=True) as session:
        return session.exec(select(JobRow.endpoint_id).where(JobRow.id == job_id)).first()


def new_webhook_token(rt: Runtime) -> str | None:
    """The secret for the webhook URL of one /run, when webhooks are on."""
    return secrets.token_urlsafe(32) if rt.settings.runpod_webhook_base_url else None


def claim_submit(session: Session, job_id: str, token: str | None) -> bool:
    """Take a PENDING job for submission (PENDING -> SUBMITTING): exactly one of several racing
    claims succeeds. Stores the hash of the webhook token its /run will carry."""
    return claim_submits(session, {job_id: token}) == [job_id]


def claim_submits(session: Session, tokens: dict[str, str | None]) -> list[str]:
    """`claim_submit` for many jobs (job id -> its webhook token) in one statement; the ids claimed."""
    hashes = {job_id: hash_token(token) for job_id, token in tokens.items() if token is not None}
    values: dict[str, Any] = {"submitted_at": utcnow()}
    if hashes:
        # The claim stores each new token's hash before /run is sent, so a webhook can prove the job ours
        # even if /run's answer is lost. Not for a job with its own webhook, nor for one whose RunPod job
        # is requeued by /retry (it keeps its original webhook, and that token's hash).
        kept = JOBS.c.webhook_token_hash
        ours = JOBS.c.webhook.is_(None) & JOBS.c.runpod_retry_of.is_(None)
        values["webhook_token_hash"] = case((ours, case(hashes, value=JOBS.c.id, else_=kept)), else_=kept)
    return transition_all(session, list(tokens), to=JobStatus.SUBMITTING, source=Source.SUBMIT,
                          expected={JobStatus.PENDING}, values=values)


def submit_claimed(rt: Runtime, row: JobRow, token: str | None, *, rand: Any = random.random) -> Next:
    """Send a job this process claimed (SUBMITTING, as `row` shows it just after the claim) to RunPod,
    and store its answer."""
    return store_together(rt, [send_claimed(rt, row, token, rand=rand)])[0]


def send_claimed(rt: Runtime, row: JobRow, token: str | None, *, rand: Any = random.random) -> Findings:
    """Send a claimed job to RunPod; its answer, not yet stored (the dispatcher stores a batch's together)."""
    # Everything this submit writes from here on is about this attempt, before RunPod named its job.
    fence = Fence(attempt=row.attempt, runpod_job_id=None)
    logcontext.bind(job_id=row.id, correlation_id=row.correlation_id, tenant=row.tenant)
    sent: Any = row.input
    checks: list[jobfiles.InputCheck] = []
    s3_config: dict[str, str] | None = None
    if row.has_files:
        try:
            sent, checks = _with_files(rt, row)
            s3_config = worker_s3_config(rt) if row.worker_s3 else None
        except jobfiles.InputFilesRejected as exc:
            rt.metrics.submitted(row.endpoint_name, "rejected")
            return _refused(rt, row, fence, f"not sent: {exc}")
        except (ObjectStoreError, ConfigError) as exc:
            rt.metrics.submitted(row.endpoint_name, "deferred")
            log.warning("job %s: its files could not be prepared for /run (%s); trying again later", row.id, exc)
            errors = row.poll_errors + 1
            delay = poll_error_delay(rt.schedule_for(webhooks=False), consecutive_errors=errors, retry_after=None,
                                     rand=rand)
            return _later(row, fence, f"its files could not be prepared ({exc}); next try in {delay:.0f}s",
                          delay=delay, errors=errors)
    try:
        state = _send(rt, row, fence, token if token and row.webhook_token_hash == hash_token(token) else None, sent,
                      s3_config)
    except RunPodError as exc:
        rt.metrics.runpod_error("run", exc)
        rt.metrics.submitted(row.endpoint_name, _submit_outcome(exc))
        return _submit_failed(rt, row, fence, exc, rand)
    if state is None:
        return _nothing_to_store(row, Next.stop("row moved before /run: nothing sent"))
    rt.metrics.submitted(row.endpoint_name, "accepted")
    log.info("job %s is RunPod job %s (attempt %d)", row.id, state.id, row.attempt)
    return _accepted(rt, row, fence, state, rand, checks)


def _with_files(rt: Runtime, row: JobRow) -> tuple[Any, list[jobfiles.InputCheck]]:
    """The input to send with its files' fresh URLs, once each input named by key is checked by HEAD.
    The URLs exist only in this /run's body: never stored, logged or put in a message."""
    with session_scope(rt.engine, read_only=True) as session:
        files = filerows.of_job(session, row.id)
    store = rt.objects
    checks = jobfiles.check_inputs(store, files)
    expires = jobfiles.url_seconds(ttl_ms(row.policy), rt.settings.presign_seconds)
    return jobfiles.run_input(store, row, files, checks, expires=expires), checks


def _submit_outcome(exc: RunPodError) -> str:
    if isinstance(exc, RunOutcomeUnknown | RunPodProtocolError):
        return "unknown"
    return "deferred" if isinstance(exc, RunPodTransient) else "rejected"


def _submit_failed(rt: Runtime, row: JobRow, fence: Fence, exc: RunPodError, rand: Any) -> Findings:
    if isinstance(exc, RunPodTransient) and not isinstance(exc, RunOutcomeUnknown):
        # For /run only errors RunPod provably never acted on get here (see jobs.runpod.client): send later.
        if isinstance(exc, RunPodBudgetExhausted):  # not RunPod's failure: no backoff
            errors, delay = row.poll_errors, (exc.retry_after or 0.0) + rand()
        else:
            errors = row.poll_errors + 1
            delay = poll_error_delay(rt.schedule_for(webhooks=False), consecutive_errors=errors,
                                     retry_after=exc.retry_after, rand=rand)
        return _later(row, fence, f"RunPod unavailable ({exc}); next try in {delay:.0f}s", delay=delay, errors=errors)
    if isinstance(exc, RunPodRejected | RunPodAuthError | RunPodNotFound):
        return _refused(rt, row, fence, f"RunPod does not know endpoint {row.endpoint_id} (404): it was deleted, or "
                        "the id is wrong" if isinstance(exc, RunPodNotFound) else f"RunPod refused the job: {exc}")
    # RunOutcomeUnknown, an unreadable answer, or anything unforeseen: a job may exist at RunPod.
    detail = (f"{exc}" if isinstance(exc, RunOutcomeUnknown)
              else f"RunPod's answer could not be read ({exc}); a job may exist")
    if row.has_files:
        detail = jobfiles.scrub(detail)

    def unknown(session: Session) -> Then:
        _move(session, row.id, fence, JobStatus.SUBMIT_UNKNOWN, f"{detail}; not resubmitted: adopted if RunPod's "
              "answer or webhook still comes, else an operator decides")

        def then() -> Next:
            adopt_named(rt, row.id)  # reads the committed row, and may ask RunPod: after the commit
            return Next.stop("outcome unknown")
        return then

    return _findings(row, unknown)


def _later(row: JobRow, fence: Fence, detail: str, *, delay: float, errors: int) -> Findings:
    """Nothing was sent: back to PENDING, to be sent again in `delay` seconds."""
    retry_at = utcnow() + timedelta(seconds=delay)
    if row.has_files:  # RunPod's answer to a /run may quote the body it was sent, URLs and all
        detail = jobfiles.scrub(detail)

    def later(session: Session) -> Then:
        _move(session, row.id, fence, JobStatus.PENDING, detail,
              values={"next_poll_at": retry_at, "poll_errors": errors})
        return lambda: Next(again_in=delay, reason="transient")

    return _findings(row, later)


def _refused(rt: Runtime, row: JobRow, fence: Fence, reason: str) -> Findings:
    """The job cannot be sent as it is: FAILED, with the reason as its error (a retry may send it again)."""
    failed_at = utcnow()
    if row.has_files:  # RunPod's answer to a /run may quote the body it was sent, URLs and all
        reason = jobfiles.scrub(reason)

    def refused(session: Session) -> Then:
        moved = _move(session, row.id, fence, JobStatus.FAILED, reason,
                      values={"error": reason, "finished_at": failed_at})

        def then() -> Next:
            if moved:
                rt.metrics.finished(row.endpoint_name, JobStatus.FAILED.value, row.created_at)
            return Next.stop("rejected")
        return then

    return _findings(row, refused)


def adopt_named(rt: Runtime, job_id: str) -> str:
    """A SUBMIT_UNKNOWN job whose webhook came while /run's answer was still awaited (a fast job): the
    RunPod id it named is the proof the submit lacked, once /status confirms it."""
    with session_scope(rt.engine, read_only=True) as session:
        row = get_row(session, job_id)
    if row is None or row.status is not JobStatus.SUBMIT_UNKNOWN or row.webhook_runpod_job_id is None:
        return "nothing named"
    try:
        return adopt_from_webhook(rt, job_id, row.webhook_runpod_job_id)
    except RunPodError as exc:
        log.warning("job %s: could not confirm the RunPod job its webhook named (%s); left SUBMIT_UNKNOWN",
                    job_id, exc)
        return "not confirmed"


def _send(rt: Runtime, row: JobRow, fence: Fence, token: str | None, sent: Any,
          s3_config: dict[str, str] | None = None) -> JobState | None:
    """`/retry` the previous RunPod job when a retry can reuse it (it keeps its webhook), else `/run`
    a new one. Returns RunPod's answer; None when the row moved on before anything was sent."""
    if row.runpod_retry_of:
        adopted = _runpod_retry(rt, row.endpoint_id, row.runpod_retry_of)
        if adopted is not None:
            return adopted
        if row.webhook is None and rt.settings.runpod_webhook_base_url:
            # A fresh /run after all: its webhook needs a token of its own, stored before /run as usual.
            token = secrets.token_urlsafe(32)
            with session_scope(rt.engine) as session:
                if not update_fields(session, row.id, while_status={JobStatus.SUBMITTING}, fence=fence,
                                     values={"webhook_token_hash": hash_token(token)}):
                    return None
    webhook = row.webhook
    if webhook is None and token is not None and rt.settings.runpod_webhook_base_url:
        webhook = webhook_url(rt.settings.runpod_webhook_base_url, token, row.correlation_id)
    return rt.runpod.run(row.endpoint_id, sent, webhook=webhook, policy=runpod_policy(row.policy),
                         s3_config=s3_config,
                         budget_seconds=rt.settings.submit_budget_seconds)


def worker_s3_config(rt: Runtime) -> dict[str, str]:
    """RunPod's s3Config for a job submitted with s3_config=True: the worker's own credentials (RPQ_WORKER_S3_*),
    revealed here alone, into the /run body. Never stored, logged or put in a message."""
    settings = rt.settings
    if settings.worker_s3_access_key_id is None or settings.worker_s3_secret_access_key is None:
        raise ConfigError(["RPQ_WORKER_S3_ACCESS_KEY_ID and RPQ_WORKER_S3_SECRET_ACCESS_KEY: not set, and a job "
                           "submitted with s3_config=True needs them"])
    region = settings.s3_region or "us-east-1"
    return {"accessId": settings.worker_s3_access_key_id.reveal(),
            "accessSecret": settings.worker_s3_secret_access_key.reveal(),
            "bucketName": rt.objects.bucket,
            "endpointUrl": settings.s3_endpoint_url or f"https://s3.{region}.amazonaws.com"}


def runpod_policy(policy: dict[str, Any] | None) -> dict[str, Any]:
    """The policy sent to RunPod: the job's own, always with an explicit ttl."""
    return {**(policy or {}), "ttl": ttl_ms(policy)}


def ttl_ms(policy: dict[str, Any] | None) -> int:
    ttl = (policy or {}).get("ttl")
    return ttl if isinstance(ttl, int) and not isinstance(ttl, bool) else DEFAULT_TTL_MS


def webhook_url(base: str, token: str, correlation_id: str | None) -> str:
    """The webhook URL for a job: the token in its path, its correlation id in the query (RunPod's API
    has no metadata field, and this puts it in the one place RunPod keeps and shows beside the job)."""
    url = f"{base.rstrip('/')}/v1/webhooks/runpod/{token}"
    if correlation_id:
        url += "?" + urlencode({"correlation_id": correlation_id})
    return url


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
    except RunPodBudgetExhausted:
        raise  # nothing was sent: the submit sends it later
    except RunPodTransient as exc:
        # The /retry may have requeued the job: like an unknown /run, leave it to an operator.
        raise RunOutcomeUnknown(f"retry of RunPod job {runpod_job_id} got no clear answer ({exc})") from exc


def _accepted(rt: Runtime, row: JobRow, fence: Fence, state: JobState, rand: Any,
              checks: Sequence[jobfiles.InputCheck] = ()) -> Findings:
    now = utcnow()
    first = _poll_in(rt, row, FROM_RUNPOD[state.status], now=now, polls=0, polls_since_change=0, started_at=None,
                     delay_ms=state.delay_time_ms, rand=rand)
    values = _at_runpod_values(row, state, poll_at=now + timedelta(seconds=first))

    def store(session: Session) -> Then:
        moved = transition(session, row.id, to=JobStatus.IN_QUEUE, source=Source.SUBMIT,
                           expected={JobStatus.SUBMITTING}, fence=fence, detail=f"RunPod job {state.id}",
                           values=values)
        if moved is None:
            # The reconciler may have called this submit lost while /run was still answering: its
            # answer is the proof that was missing.
            moved = transition(session, row.id, to=JobStatus.IN_QUEUE, source=Source.SUBMIT,
                               expected={JobStatus.SUBMIT_UNKNOWN}, fence=fence, values=values,
                               detail=f"RunPod job {state.id}: /run's answer came late; adopted")
        if moved is None:
            _orphaned(session, row, fence, state.id)
        elif checks:
            filerows.record_inputs_checked(session, row.id, [(c.name, c.info.size, c.info.etag, c.info.content_type)
                                                             for c in checks], now)

        def then() -> Next:
            if moved is not None:
                return Next(poll_in=first, reason="submitted")
            rt.publish(CANCEL_TASK, row.id, None)
            return Next.stop("row moved during submit: its RunPod job is being cancelled")
        return then

    return _findings(row, store)


def _at_runpod_values(row: JobRow, state: JobState, *, poll_at: datetime | None) -> dict[str, Any]:
    """The fields a job gets when it becomes known at RunPod. The deadline runs from now: for a /retry
    that is the later of RunPod's two possible readings (ttl restarts, or runs from the first submit)."""
    return {
        "runpod_job_id": state.id,
        "last_runpod_status": state.status.value,
        "next_poll_at": poll_at,
        "deadline_at": utcnow() + timedelta(milliseconds=ttl_ms(row.policy)) + DEADLINE_GRACE,
        "polls_since_change": 0,
        "poll_errors": 0,
    }


def _orphaned(session: Session, row: JobRow, fence: Fence, runpod_job_id: str) -> None:
    """A RunPod job was created for an attempt that no longer owns the row (cancelled while /run was in
    flight, perhaps retried since): record it and put it in the cancel outbox, in one transaction."""
    current = get_row(session, row.id)
    if current is None:
        return
    if current.attempt == fence.attempt:
        # The same attempt, cancelled meanwhile: keep RunPod's id on it, so its history is whole.
        update_fields(session, row.id, while_status=set(JobStatus), fence=fence,
                      values={"runpod_job_id": runpod_job_id})
    add_runpod_cancel(session, current, attempt=fence.attempt, runpod_job_id=runpod_job_id,
                      reason=f"created for attempt {fence.attempt} after the job became {current.status} "
                             f"(attempt {current.attempt})")
    record_event(session, row.id, from_status=current.status, to_status=current.status, source=Source.SUBMIT,
                 detail=f"RunPod job {runpod_job_id} was created for attempt {fence.attempt}, which no longer "
                        f"owns the job; cancelling it at RunPod")


def _move(session: Session, job_id: str, fence: Fence, to: JobStatus, detail: str, *,
          values: dict[str, Any] | None = None) -> bool:
    return transition(session, job_id, to=to, source=Source.SUBMIT, detail=detail,
                      expected={JobStatus.SUBMITTING}, fence=fence, values=values) is not None


# -- poll -------------------------------------------------------------------------------------------------


def poll_job(rt: Runtime, job_id: str, *, rand: Any = random.random) -> Next:
    """Ask RunPod about one job now, store what it says, and say when to ask again. (The poller,
    `jobs.flow.poller`, does the same for an endpoint's jobs that are due, claimed together.)"""
    now = utcnow()
    with session_scope(rt.engine) as session:
        row = get_row(session, job_id)
        if row is None or row.status not in AT_RUNPOD or row.runpod_job_id is None:
            return Next.stop("not at RunPod")
        if row.next_poll_at is not None and now < row.next_poll_at - EARLY_SLACK:
            return Next.stop("early: another poll owns this job")
        # Claim this poll: of two hints for the same job, only one gets past here.
        if not claim_poll(session, job_id, seen=row.next_poll_at, lease_until=now + poll_lease(rt),
                          fence=Fence.of(row)):
            return Next.stop("another poll claimed this job")
    return poll_claimed(rt, row, rand=rand)


def poll_claimed(rt: Runtime, row: JobRow, *, rand: Any = random.random) -> Next:
    """Poll a job whose poll this process claimed (`row` as it was just before the claim), and store
    the answer."""
    return store_together(rt, [ask_status(rt, row, rand=rand)])[0]


def ask_status(rt: Runtime, row: JobRow, *, rand: Any = random.random) -> Findings:
    """Ask RunPod about a job whose poll this process claimed; its answer, not yet stored (the poller
    stores a batch's together)."""
    fence = Fence.of(row)
    logcontext.bind(job_id=row.id, correlation_id=row.correlation_id, tenant=row.tenant)
    rt.metrics.polled(row.endpoint_name)
    try:
        state = rt.runpod.status(row.endpoint_id, row.runpod_job_id or "")
    except RunPodNotFound as exc:
        return _status_not_found(rt, row, fence, exc, rand)
    except RunPodError as exc:
        rt.metrics.runpod_error("status", exc)
        return _poll_failed(rt, row, fence, exc, rand)
    return _status_found(rt, row, fence, state, rand)


def _status_not_found(rt: Runtime, row: JobRow, fence: Fence, exc: RunPodNotFound, rand: Any) -> Findings:
    """A 404 from /status means the job is gone (retention or ttl) or the endpoint is: ask /health which."""
    try:
        rt.runpod.health(row.endpoint_id)
    except RunPodNotFound as endpoint_gone:
        rt.metrics.runpod_error("status", endpoint_gone)
        reason = (f"RunPod does not know endpoint {row.endpoint_id} (404 from /status and /health): it was "
                  "deleted, or the id is wrong")
        now = utcnow()
        if row.deadline_at is not None and now > row.deadline_at:
            def give_up(session: Session) -> Then:
                transition(session, row.id, to=JobStatus.FAILED, source=Source.POLL, fence=fence,
                           detail=f"{reason}; the job's ttl has passed, so it cannot be followed any more",
                           values={"error": reason, "finished_at": now, "next_poll_at": None,
                                   "poll_count": row.poll_count + 1})
                return lambda: Next.stop("endpoint unknown past the deadline")

            return _findings(row, give_up)
        log.error("job %s: %s; holding the job and asking again slowly", row.id, reason)
        return _poll_failed(rt, row, fence, endpoint_gone, rand,
                            note=f"{reason}; holding the job and asking again slowly until its ttl passes")
    except RunPodError as health_failed:
        rt.metrics.runpod_error("health", health_failed)
        return _poll_failed(rt, row, fence, health_failed, rand)
    rt.metrics.runpod_error("status", exc)
    now = utcnow()

    def expire(session: Session) -> Then:
        expired = transition(session, row.id, to=JobStatus.EXPIRED, source=Source.POLL, fence=fence,
                             detail=f"RunPod no longer knows the job (404: result retention or ttl passed): {exc}",
                             values={"finished_at": now, "next_poll_at": None, "poll_count": row.poll_count + 1})

        def then() -> Next:
            if expired is not None:
                rt.metrics.finished(row.endpoint_name, JobStatus.EXPIRED.value, row.created_at)
            return Next.stop("expired")
        return then

    return _findings(row, expire)


def _poll_failed(rt: Runtime, row: JobRow, fence: Fence, exc: RpqError, rand: Any, *,
                 note: str | None = None) -> Findings:
    """A failed poll changes nothing but the schedule (and, with a `note`, the job's history): RunPod's
    silence is not a job outcome."""
    retry_after = exc.retry_after if isinstance(exc, RunPodTransient) else None
    if isinstance(exc, RunPodBudgetExhausted):
        # Nothing was sent: not RunPod's failure, so no backoff; ask again once a token is free.
        errors, delay = row.poll_errors, (retry_after or 0.0) + rand()
    else:
        errors = row.poll_errors + 1
        schedule = rt.schedule_for(webhooks=row.webhook_token_hash is not None)
        delay = poll_error_delay(schedule, consecutive_errors=errors, retry_after=retry_after, rand=rand)
    if isinstance(exc, RunPodAuthError | RunPodRejected | RunPodProtocolError):
        log.error("job %s: polling RunPod failed and will not fix itself: %s", row.id, exc)
    poll_at = utcnow() + timedelta(seconds=delay)

    def store(session: Session) -> Then:
        written = update_fields(session, row.id, while_status=AT_RUNPOD, fence=fence, values={
            "poll_errors": errors, "poll_count": row.poll_count + 1, "next_poll_at": unless_due_now(poll_at),
        })
        if written and note:
            record_event(session, row.id, from_status=row.status, to_status=row.status, source=Source.POLL,
                         detail=note, coalesce=True)
        if not written:
            return lambda: Next.stop("the job moved on while RunPod was asked")
        return lambda: Next(poll_in=delay, reason=f"poll failed: {type(exc).__name__}")

    return _findings(row, store)


@dataclass
class _Drained:
    """What a poll read from /stream: the chunks, and a note when some may be missing."""

    chunks: list[Any]
    missing_note: str | None = None


def _status_found(rt: Runtime, row: JobRow, fence: Fence, state: JobState, rand: Any) -> Findings:
    now = utcnow()
    status = FROM_RUNPOD[state.status]
    drained = _Drained(chunks=[])
    if _should_drain(row, state, status):
        try:
            batch = rt.runpod.stream(row.endpoint_id, row.runpod_job_id or "", wait_ms=STREAM_WAIT_MS)
            drained.chunks = [storable_json(jobfiles.scrub(chunk) if row.has_files else chunk)
                              for chunk in batch.chunks]
        except RunPodError as exc:
            rt.metrics.runpod_error("stream", exc)
            if isinstance(exc, StreamReadUnknown):
                drained.missing_note = f"{exc}: chunks RunPod handed out may be missing from the job's stream"
                rt.metrics.stream_gap(row.endpoint_name)
            if row.stream and status.is_terminal and row.poll_errors + 1 < FINAL_DRAIN_TRIES:
                # Finishing now would end the event stream before its last chunks: read again later.
                return _poll_failed(rt, row, fence, exc, rand, note=drained.missing_note)
            log.warning("job %s: /stream failed (%s)%s", row.id, exc,
                        "" if status.is_terminal or drained.missing_note else
                        "; its chunks wait at RunPod for the next poll")
            if row.stream and status.is_terminal:
                drained.missing_note = (drained.missing_note or
                                        f"the last /stream read failed {FINAL_DRAIN_TRIES} times ({exc}); "
                                        "stored as finished, the last chunks may be missing")

    changed = state.status.value != row.last_runpod_status
    polls_since_change = 0 if changed else row.polls_since_change + 1
    values: dict[str, Any] = {
        "poll_count": row.poll_count + 1,
        "poll_errors": 0,
        "polls_since_change": polls_since_change,
        "last_runpod_status": state.status.value,
    }
    for name, ms in (("delay_time_ms", state.delay_time_ms), ("execution_time_ms", state.execution_time_ms)):
        if ms is not None and 0 <= ms <= MAX_STORED_MS:
            values[name] = ms
    if state.worker_id is not None:
        values["worker_id"] = storable_text(state.worker_id)[:MAX_WORKER_ID_LENGTH]
    if status is JobStatus.IN_PROGRESS and row.started_at is None:
        values["started_at"] = now
    if row.has_files:  # never store the job's own presigned URLs, should its handler echo them
        state = replace(state, output=jobfiles.scrub(state.output), error=jobfiles.scrub(state.error))
    progress = storable_json(state.output) if status is JobStatus.IN_PROGRESS else None
    progressed = progress is not None and progress != row.progress
    if progressed:
        values["progress"] = progress  # RunPod shows progress updates as output while running
    if status.is_terminal:
        values.update(finished_at=now, next_poll_at=None, output=storable_json(state.output),
                      error=_error_text(state.error))
        # What it cost at list price, when the collectors have stored its endpoint's price (else None).
        job_cost = cost.estimate(values.get("execution_time_ms", row.execution_time_ms),
                                 rt.prices.get(rt.engine, row.endpoint_id))
        if job_cost is not None:
            values["cost_usd"] = job_cost

    finished_files = _FinishedFiles()
    if status is JobStatus.COMPLETED and (row.has_files or rt.has_files):
        try:
            finished_files = _finish_files(rt, row, values["output"])
        except (ObjectStoreError, ConfigError) as exc:
            if row.poll_errors + 1 < FINAL_DRAIN_TRIES:
                # RunPod keeps the result 30 minutes: ask again rather than store the job without its files.
                return _poll_failed(rt, row, fence, exc, rand,
                                    note=f"the job's files could not be checked ({exc}); trying again")
            finished_files = _FinishedFiles(values={"files_missing": row.has_files}, note=(
                f"the job's files could not be checked {FINAL_DRAIN_TRIES} times ({exc}); stored as completed "
                "with its output in the row" + (", flagged files_missing" if row.has_files else "")))
        values.update(finished_files.values)

    past_deadline = row.deadline_at is not None and now > row.deadline_at
    if not status.is_terminal and past_deadline:
        status = JobStatus.EXPIRED
        values.update(finished_at=now, next_poll_at=None)

    delay = _poll_in(rt, row, status, now=now, polls=row.poll_count + 1, polls_since_change=polls_since_change,
                     started_at=values.get("started_at", row.started_at),
                     delay_ms=values.get("delay_time_ms", row.delay_time_ms),
                     reports_progress=progress is not None or row.progress is not None, rand=rand)
    if not status.is_terminal:
        values["next_poll_at"] = unless_due_now(now + timedelta(seconds=delay))

    extra = [(streams.PROGRESS, progress)] if progressed else []
    extra += [(streams.OUTPUT, chunk) for chunk in drained.chunks]

    def store(session: Session) -> Then:
        written = values
        if status is JobStatus.COMPLETED:
            written = {**values, **_settled_output(session, row, state, drained.chunks)}
        detail = "ttl deadline passed and RunPod still answers" if past_deadline else _detail(state, written)
        stored = _write_poll(session, row, fence, status, written, extra, detail)
        if stored and drained.missing_note:
            record_event(session, row.id, from_status=status, to_status=status, source=Source.POLL,
                         detail=drained.missing_note, coalesce=True)
        if stored and finished_files.rows:
            filerows.add(session, finished_files.rows)
        if stored and finished_files.note:
            record_event(session, row.id, from_status=status, to_status=status, source=Source.POLL,
                         detail=finished_files.note)
        current = get_row(session, row.id) if not stored else None
        return lambda: _status_stored(rt, row, fence, status, written, stored=stored, current=current,
                                      changed=changed, delay=delay, dropped=len(drained.chunks))

    return _findings(row, store)


@dataclass(frozen=True)
class _FinishedFiles:
    """What a completed attempt's files come to: fields for its row, job_files rows, a line for its history."""

    values: dict[str, Any] = field(default_factory=dict)
    rows: list[dict[str, Any]] = field(default_factory=list)
    note: str | None = None


def _finish_files(rt: Runtime, row: JobRow, output: Any) -> _FinishedFiles:
    """Check the attempt's declared outputs by HEAD, and move an output too large for the row to the bucket.
    Talks to the bucket, so it runs before the poll's transaction; ObjectStoreError when it cannot."""
    values: dict[str, Any] = {}
    rows: list[dict[str, Any]] = []
    notes: list[str] = []
    if row.has_files:
        with session_scope(rt.engine, read_only=True) as session:
            files = filerows.of_job(session, row.id)
        if jobfiles.declares_outputs(files):
            found = jobfiles.check_outputs(rt.objects, row, files)
            rows += found.rows
            notes.append(found.detail)
            values["files_missing"] = bool(found.missing)
    if rt.has_files and output is not None:
        size = jobfiles.encoded_size(output)
        if size > rt.settings.inline_output_max_bytes:
            moved = jobfiles.move_result(rt.objects, row, output)
            rows.append(moved)
            values.update(output=None, output_key=moved["key"])
            notes.append(f"output of {size} bytes moved to the bucket (over RPQ_INLINE_OUTPUT_MAX_BYTES): "
                         f"{moved['key']}")
    return _FinishedFiles(values, rows, "; ".join(notes) or None)


def _status_stored(rt: Runtime, row: JobRow, fence: Fence, status: JobStatus, values: dict[str, Any], *,
                   stored: bool, current: JobRow | None, changed: bool, delay: float, dropped: int) -> Next:
    """What a poll's answer means once its transaction committed: metrics, a log line, what comes next."""
    if not stored:
        if dropped:
            log.warning("job %s: %d chunk(s) read for attempt %d dropped: the job moved on", row.id, dropped,
                        fence.attempt)
        if current is not None and current.status in AT_RUNPOD and Fence.of(current) == fence:
            return Next(poll_in=delay, reason="row changed; polling on")
        return Next.stop("the job moved on: this poll's answer is about an attempt that no longer owns it")
    if changed:
        log.info("job %s: RunPod says %s", row.id, values["last_runpod_status"])
    if status.is_terminal:
        rt.metrics.finished(row.endpoint_name, status.value, row.created_at)
        if values.get("output_missing"):
            rt.metrics.output_missing(row.endpoint_name)
        if values.get("cost_usd") is not None:
            rt.metrics.cost(row.endpoint_name, values["cost_usd"])
        if values.get("files_missing"):
            rt.metrics.files_missing(row.endpoint_name)
            log.warning("job %s completed without all its declared output files: see its events", row.id)
    return Next.stop(f"final: {status}") if status.is_terminal else Next(poll_in=delay, reason=str(status))


def _poll_in(rt: Runtime, row: JobRow, status: JobStatus, *, now: datetime, polls: int, polls_since_change: int,
             started_at: datetime | None, delay_ms: int | None, rand: Any, reports_progress: bool = False) -> float:
    """Seconds until the job's next poll: where its endpoint's recent jobs say it is likely to end
    (jobs.flow.pollplan). A job a webhook will wake keeps the fixed schedule; so does one whose stream is
    drained, or whose progress is shown, as it comes."""
    webhooks = row.webhook_token_hash is not None
    if webhooks or row.stream or reports_progress:
        # Chunks and progress come while the job runs, a webhook only at its end: a streaming job keeps
        # the fast schedule even with a webhook; for any other job with one, polls are a safety net.
        schedule = rt.schedule_for(webhooks=webhooks and not (row.stream or reports_progress))
        return schedule.first if polls == 0 else poll_delay(schedule, polls_since_change=polls_since_change,
                                                            rand=rand)
    return _learned_plan(rt, row, JobSeen(status, row.submitted_at, started_at,
                                          None if delay_ms is None else delay_ms / 1000, polls,
                                          polls_since_change), now=now, rand=rand).delay


def _learned_plan(rt: Runtime, row: JobRow, seen: JobSeen, *, now: datetime, rand: Any) -> Plan:
    schedule = rt.schedule
    # The floor is the schedule's own shortest gap; the cap lets a learned wait pass RPQ_POLL_MAX_SECONDS.
    return plan_next_poll(seen, rt.endpoint_times.get(rt.engine, row.endpoint_id), schedule=schedule, now=now,
                          floor=schedule.base / 2, cap=max(LONG_WAIT_CAP_SECONDS, schedule.cap), rand=rand)


def planned_wait(rt: Runtime, row: JobRow, *, now: datetime, rand: Any = random.random) -> float | None:
    """Seconds a due poll should wait instead of being made, judged now: when its endpoint's recent jobs
    say the job is unlikely to be over yet (a wait planned from a history it did not have when the poll
    was placed, e.g. a new endpoint's first ends). None: make the poll. Only for jobs on the learned
    plan, and never a job's first poll."""
    if row.poll_count == 0 or row.webhook_token_hash is not None or row.stream or row.progress is not None:
        return None
    seen = JobSeen(row.status, row.submitted_at, row.started_at,
                   None if row.delay_time_ms is None else row.delay_time_ms / 1000, row.poll_count,
                   row.polls_since_change)
    plan = _learned_plan(rt, row, seen, now=now, rand=rand)
    return plan.delay if plan.mode is Mode.WAIT else None


def _should_drain(row: JobRow, state: JobState, status: JobStatus) -> bool:
    """Read /stream for a streaming job while it runs and once it is final; and once for any other job
    that completed without output, in case a generator handler left its results only there (RunPod's
    default when the worker does not set return_aggregate_stream)."""
    if row.stream:
        return status is JobStatus.IN_PROGRESS or status.is_terminal
    return status is JobStatus.COMPLETED and _empty(state.output)


def _empty(output: Any) -> bool:
    return output is None or output == []


def _settled_output(session: Session, row: JobRow, state: JobState, chunks: list[Any]) -> dict[str, Any]:
    """A completed job's output: RunPod's, or when RunPod gives none, the chunks its handler streamed.
    With neither, the job is flagged `output_missing`: RunPod drops results over about 20 MB this way.
    Returns the fields to add to the poll's write."""
    if not _empty(state.output):
        return {}
    streamed = (streams.outputs(session, row.id, attempt=row.attempt) if row.stream else []) + chunks
    if streamed:
        return {"output": streamed}
    return {"output_missing": True} if state.output is None else {}


def _write_poll(session: Session, row: JobRow, fence: Fence, status: JobStatus, values: dict[str, Any],
                extra: list[tuple[str, Any]], detail: str) -> bool:
    """Store one poll's findings, fenced to the attempt and RunPod job polled, so the event stream reads
    started, progress/output, then end|error; nothing (chunks included) is written if the row moved on.

    A job seen finished straight from IN_QUEUE with chunks to deliver is first moved to IN_PROGRESS,
    which is true (it ran) and puts `started` before its chunks.
    """
    current = row.status
    if status is current:
        if not update_fields(session, row.id, while_status={current}, fence=fence, values=values):
            return False
        streams.append(session, row.id, row.attempt, extra)
        return True
    if current is JobStatus.IN_QUEUE and status.is_terminal and extra:
        if transition(session, row.id, to=JobStatus.IN_PROGRESS, source=Source.POLL, expected={current},
                      fence=fence, detail="seen running by its output", values={"started_at": utcnow()}) is None:
            return False
        current = JobStatus.IN_PROGRESS
    return transition(session, row.id, to=status, source=Source.POLL, detail=detail, expected={current},
                      fence=fence, values=values, chunks=extra) is not None


def _detail(state: JobState, values: dict[str, Any]) -> str:
    parts = [f"RunPod says {state.status.value}"]
    if values.get("output_missing"):
        parts.append("with no output (RunPod drops a result over about 20 MB this way): flagged output_missing")
    elif state.status is RunPodStatus.COMPLETED and _empty(state.output) and "output" in values \
            and not _empty(values["output"]):
        parts.append("with no output of its own: the output is the chunks its handler streamed")
    if state.execution_time_ms is not None:
        parts.append(f"ran {state.execution_time_ms} ms")
    return ", ".join(parts)


def _error_text(error: Any) -> str | None:
    if error is None:
        return None
    text = error if isinstance(error, str) else json.dumps(storable_json(error), default=str)
    return storable_text(text)


# -- the webhook: proof for a submit whose answer was lost ------------------------------------------------


def adopt_from_webhook(rt: Runtime, job_id: str, runpod_job_id: str) -> str:
    """RunPod called the webhook of a SUBMIT_UNKNOWN job: the token in its URL was given to that
    attempt's /run alone, so RunPod has the job. The id the body names is never trusted: /status must
    confirm RunPod knows it on this endpoint before the job is adopted. Says what happened; raises
    RunPodTransient when RunPod could not be asked (the webhook should then be sent again)."""
    with session_scope(rt.engine, read_only=True) as session:
        row = get_row(session, job_id)
    if row is None or row.status is not JobStatus.SUBMIT_UNKNOWN or row.runpod_job_id is not None:
        return "nothing to adopt"
    fence = Fence(attempt=row.attempt, runpod_job_id=None)
    try:
        state = rt.runpod.status(row.endpoint_id, runpod_job_id)
    except (RunPodNotFound, RunPodRejected, RunPodProtocolError) as exc:
        with session_scope(rt.engine) as session:
            record_event(session, row.id, from_status=row.status, to_status=row.status, source=Source.WEBHOOK,
                         detail=f"the webhook named a RunPod job that /status does not confirm ({exc}); not adopted",
                         coalesce=True)
        return "not confirmed by /status"
    values = _at_runpod_values(row, state, poll_at=None)  # due now: the poller's most urgent claim
    values["last_runpod_status"] = None  # the poll that follows stores what /status says, as a change
    with session_scope(rt.engine) as session:
        adopted = transition(session, row.id, to=JobStatus.IN_QUEUE, source=Source.WEBHOOK,
                             expected={JobStatus.SUBMIT_UNKNOWN}, fence=fence, values=values,
                             detail=f"RunPod called this attempt's webhook for RunPod job {state.id}, and /status "
                                    f"confirms it ({state.status.value}): adopted")
    if adopted is None:
        return "the job moved on"
    rt.wake(POLL_DUE_TASK, row.endpoint_id)
    return "adopted"


# -- cancel -----------------------------------------------------------------------------------------------


def cancel_on_runpod(rt: Runtime, job_id: str) -> Next:
    """Tell RunPod to stop every RunPod job in the job's cancel outbox: the one of a job cancelled
    here, and any created for an attempt that no longer owned the row."""
    with session_scope(rt.engine, read_only=True) as session:
        pending = list(open_runpod_cancels(session, job_id))
    if not pending:
        return Next.stop("nothing to cancel at RunPod")
    again: float | None = None
    for cancel in pending:
        try:
            state = rt.runpod.cancel(cancel.endpoint_id, cancel.runpod_job_id)
        except RunPodNotFound:
            result = "RunPod no longer knows the job"
        except RunPodTransient as exc:
            delay = poll_error_delay(rt.schedule_for(webhooks=False), consecutive_errors=cancel.tries + 1,
                                     retry_after=exc.retry_after)
            _cancel_tried(rt, cancel, delay)
            again = delay if again is None else min(again, delay)
            continue
        except RunPodError as exc:
            result = f"RunPod refused the cancel: {exc}"
        else:
            result = f"RunPod answered {state.status.value}"
        _cancel_done(rt, cancel, result)
    if again is not None:
        return Next(again_in=again, reason="RunPod unavailable")
    return Next.stop(f"{len(pending)} cancel(s) sent to RunPod")


def _cancel_tried(rt: Runtime, cancel: RunPodCancel, delay: float) -> None:
    with session_scope(rt.engine) as session:
        session.execute(update(RunPodCancel).where(col(RunPodCancel.id) == cancel.id)
                        .values(tries=RunPodCancel.tries + 1, next_try_at=utcnow() + timedelta(seconds=delay)))


def _cancel_done(rt: Runtime, cancel: RunPodCancel, result: str) -> None:
    with session_scope(rt.engine) as session:
        marked: CursorResult[Any] = session.execute(  # type: ignore[assignment]
            update(RunPodCancel).where(col(RunPodCancel.id) == cancel.id, col(RunPodCancel.done_at).is_(None))
            .values(done_at=utcnow(), tries=RunPodCancel.tries + 1, result=storable_text(result))
        )
        done = marked.rowcount == 1
        row = get_row(session, cancel.job_id)
        if done and row is not None:
            record_event(session, cancel.job_id, from_status=row.status, to_status=row.status, source=Source.CANCEL,
                         detail=f"cancel of RunPod job {cancel.runpod_job_id} (attempt {cancel.attempt}) sent to "
                                f"RunPod: {result}")
