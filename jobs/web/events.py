"""Server-Sent Events of a job, and the receiver of RunPod's webhooks.

`GET /v1/jobs/{id}/events` replays the job's current attempt from the table (`jobs.storage.streams`):
`started`, then `progress` and `output`, then exactly one of `end` or `error`, after which the
stream closes. Each event's id is its sequence number, so a client that reconnects with
`Last-Event-ID` gets the events after it, without gaps or repeats. Each event is written whole,
as one UTF-8 chunk, so no character is ever split across writes.

`POST /v1/webhooks/runpod/{token}` is what RunPod calls when a job ends. It needs no bearer token
(RunPod cannot send one): the unguessable per-job token in the path is the credential. It never
sets state from the body; it wakes the job's poll. The token was in one /run alone, so the call also
proves that /run reached RunPod: for a job whose submit outcome is unknown, the RunPod id the body
names is adopted once /status confirms it.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import AsyncIterator
from http import HTTPStatus
from typing import Annotated, Any

import anyio
from fastapi import APIRouter, Depends, Header, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

import jobs
from jobs.api import JobNotFound
from jobs.errors import Problem, RunPodTransient
from jobs.jsonsafe import text_problems
from jobs.runpod.client import MAX_RUNSYNC_PAYLOAD_BYTES, is_job_id
from jobs.runtime import Runtime
from jobs.states import JobStatus
from jobs.storage.models import FileRole, utcnow
from jobs.storage.streams import END, ERROR, FINAL_KINDS, OUTPUT, PROGRESS, STARTED
from jobs.web.auth import Grant
from jobs.web.bodies import read_bounded
from jobs.web.schemas import ErrorBody, ErrorCode, header_schema

#: The key context and purpose of an events URL's signed access (jobs.web.signing), under RPQ_API_SECRET.
EVENTS_URL_CONTEXT = b"rpq events-url v1"
EVENTS_URL_PURPOSE = "events"
#: How often an open stream looks for new events in the table.
POLL_SECONDS = 0.5
#: A comment line this often keeps proxies from closing a quiet stream.
HEARTBEAT_SECONDS = 15.0
#: RunPod's webhook carries the job's input and output; a result is at most about 20 MB.
MAX_WEBHOOK_BODY_BYTES = MAX_RUNSYNC_PAYLOAD_BYTES + 1_000_000
#: An event id this stream could have sent: decimal digits, fewer than a 64-bit integer holds.
_EVENT_ID = re.compile(r"[0-9]{1,18}")


# `async def` although they never wait: FastAPI runs a plain `def` dependency in the thread pool.
async def _runtime(request: Request) -> Runtime:
    runtime: Runtime = request.app.state.runtime
    return runtime


RuntimeDep = Annotated[Runtime, Depends(_runtime)]


async def _job_id(job_id: str) -> str:
    """A job id from the path. No job has an id that is not text a database keeps (a %00 in the path,
    say): that is a 404 here, never a query the database refuses."""
    if text_problems(job_id, "id"):
        raise JobNotFound(job_id)
    return job_id


#: The `{job_id}` of every route that has one.
JobId = Annotated[str, Depends(_job_id)]


def router(read_scope: Any, api_error: Any) -> tuple[APIRouter, APIRouter]:
    """The SSE route (behind `read_scope`, a dependency giving the request's Grant: a bearer token with the read
    scope, or an events URL's signed access) and the webhook route (behind its path token)."""
    events = APIRouter(prefix="/v1")
    webhooks = APIRouter(prefix="/v1")

    @events.get(
        "/jobs/{job_id}/events",
        summary="Follow a job as Server-Sent Events",
        description="Events `started` (StartedEvent), `progress` (what the handler reported), `output` "
        "(OutputEvent), then `metrics` (MetricsEvent, when the job ran) and exactly one of `end` (EndEvent) or "
        "`error` (ErrorEvent, with a code from ErrorCode); the stream then closes. Each `data` is JSON of the "
        "schema named, in this document's components. Reconnect with `Last-Event-ID` to resume without gaps or "
        "repeats.",
        response_class=StreamingResponse,
        responses={200: {"content": {"text/event-stream": {}}},
                   **{code: {"model": ErrorBody, "description": HTTPStatus(code).phrase}
                      for code in (401, 403, 404, 422)}},
    )
    async def job_events(
        job_id: JobId,
        request: Request,
        runtime: RuntimeDep,
        grant: Grant = read_scope,
        last_event_id: Annotated[str | None, Header(
            alias="Last-Event-ID", description="Resume after this event (an id this stream sent).",
            json_schema_extra=header_schema(pattern="^" + _EVENT_ID.pattern + "$"))] = None,
    ) -> StreamingResponse:
        after = 0
        if last_event_id is not None:
            if not _EVENT_ID.fullmatch(last_event_id.strip()):
                raise api_error(422, [Problem("Last-Event-ID", "format", "must be an event id this stream sent")])
            after = int(last_event_id)
        job, first = await run_in_threadpool(jobs.stream_events, job_id, after=after, tenant=grant.sees,
                                             runtime=runtime)
        # The job's tenant never changes: checked here once, the stream then reads by id.
        return StreamingResponse(
            _follow(request, runtime, job_id, after, job, first),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    @webhooks.post(
        "/webhooks/runpod/{token}",
        summary="RunPod's webhook: wakes the job's poll",
        description="The per-job token in the path is the credential. The body never sets state: the status "
        "always comes from RunPod's /status. Its `id` matters only for a job whose submit outcome is unknown: "
        "that RunPod job is adopted once /status confirms it. Unknown tokens get 404; 503 asks RunPod to send "
        "it again.",
        responses={404: {"description": "No job has this token"},
                   503: {"description": "RunPod could not be asked to confirm the job; send again"}},
    )
    async def runpod_webhook(token: str, request: Request, runtime: RuntimeDep) -> JSONResponse:
        named = await _named_job(request)
        try:
            known = await run_in_threadpool(jobs.webhook_received, token, runpod_job_id=named, runtime=runtime)
        except RunPodTransient:
            # RunPod sends a webhook again (twice, 10 s apart) unless it gets a 200.
            raise api_error(503, [Problem("runpod", "upstream", "RunPod could not be asked; send again")],
                            {"Retry-After": "10"}) from None
        if not known:
            raise api_error(404, [Problem("token", "known", "no job has this webhook")])
        return JSONResponse({"ok": True})

    return events, webhooks


async def _follow(request: Request, runtime: Runtime, job_id: str, after: int, job: jobs.Job,
                  batch: list[jobs.StreamItem]) -> AsyncIterator[bytes]:
    last_write = time.monotonic()
    render = _Renderer(runtime, job, outputs_before=await run_in_threadpool(
        jobs.stream_outputs_before, job_id, attempt=job.attempt, seq=after, runtime=runtime) if after else 0)
    while True:
        render.job = job
        for item in batch:
            for chunk in await run_in_threadpool(render, item):
                yield chunk
            after = item.seq
            last_write = time.monotonic()
            if render.ended:
                return
        if job.is_terminal and not batch:
            _, everything = await run_in_threadpool(jobs.stream_events, job_id, after=0, runtime=runtime)
            if not any(item.kind in FINAL_KINDS for item in everything):
                # Finished, yet its stream has no end or error (a job older than streams): say how it ended.
                for chunk in await run_in_threadpool(render.closing):
                    yield chunk
            return  # else the client already has the final event: it resumed after it
        if await request.is_disconnected():
            return
        if time.monotonic() - last_write >= HEARTBEAT_SECONDS:
            yield b": still here\n\n"
            last_write = time.monotonic()
        await anyio.sleep(POLL_SECONDS)
        job, batch = await run_in_threadpool(jobs.stream_events, job_id, after=after, runtime=runtime)


class _Renderer:
    """Turns the stored events of one job's stream into what the client gets (the shapes in
    `jobs.web.schemas.STREAM_EVENTS`), from the event and the job row read with it. Rendered when served, not
    when stored, so a stream stored before these shapes existed is served in them too."""

    def __init__(self, runtime: Runtime, job: jobs.Job, *, outputs_before: int) -> None:
        self.runtime, self.job, self.ended = runtime, job, False
        self.attempt, self.next_output = job.attempt, outputs_before

    def __call__(self, item: jobs.StreamItem) -> list[bytes]:
        job = self.job
        if job.attempt != self.attempt:  # a retry began a new stream: its outputs count from 0
            self.attempt, self.next_output = job.attempt, 0
        data: Any = item.data
        seq = item.seq or None  # 0: an event made up when served (closing), with no id of its own
        if item.kind == STARTED:
            return [_event(seq, item.kind, {"job_id": job.id, "endpoint": job.endpoint, "attempt": job.attempt,
                                            "started_at": (job.started_at or item.at).isoformat()})]
        if item.kind == OUTPUT:
            self.next_output += 1
            return [_event(seq, item.kind, {"i": self.next_output - 1, "data": data})]
        if item.kind == PROGRESS:
            return [_event(seq, item.kind, data)]
        stored = data if isinstance(data, dict) else {}
        status = str(stored.get("status") or job.status.value)
        if status == JobStatus.SUBMIT_UNKNOWN and job.status is not JobStatus.SUBMIT_UNKNOWN:
            return []  # the unknown submit was settled since (adopted or resubmitted): the stream goes on
        self.ended = True
        if item.kind == END and not stored.get("output_missing"):
            end: dict[str, Any] = {"status": status, "execution_ms": job.execution_time_ms}
            if job.files_missing or any(f.role == FileRole.OUTPUT for f in self._files()):
                end["files"] = [{"name": f.name, "state": f.state, "size": f.size, "content_type": f.content_type}
                                for f in self._files() if f.role == FileRole.OUTPUT]
            return [*self._metrics(), _event(seq, END, end)]
        code, message = _error_of(job, status, stored)
        return [*self._metrics(), _event(seq, ERROR, {"code": code, "message": message, "status": status})]

    def closing(self) -> list[bytes]:
        """The final event of a finished job whose stream has none (stored before streams existed)."""
        job = self.job
        kind = END if job.status is JobStatus.COMPLETED and not job.output_missing else ERROR
        return self(jobs.StreamItem(0, kind, {"status": job.status.value, "error": job.error,
                                              "output_missing": job.output_missing}, job.finished_at or utcnow()))

    def _metrics(self) -> list[bytes]:
        job = self.job
        if job.delay_time_ms is None and job.execution_time_ms is None:
            return []  # it never ran: there is nothing to measure
        return [_event(None, "metrics", {"delay_ms": job.delay_time_ms, "execution_ms": job.execution_time_ms,
                                         "cost_usd": job.cost_usd})]

    def _files(self) -> list[jobs.JobFileInfo]:
        if not hasattr(self, "_found"):
            self._found = jobs.files(self.job.id, runtime=self.runtime)
        return self._found


def _error_of(job: jobs.Job, status: str, stored: dict[str, Any]) -> tuple[ErrorCode, str]:
    """The error code and message of a stream's final `error` (see ErrorCode for the list)."""
    said = str(stored.get("error") or job.error or "")
    if stored.get("output_missing"):
        return ErrorCode.OUTPUT_MISSING, ("RunPod said COMPLETED but gave no output (RunPod drops a result over "
                                          "about 20 MB)")
    if status == JobStatus.FAILED:
        if job.runpod_job_id is None:  # RunPod never accepted it: /run refused, or an input failed its check
            return ErrorCode.REJECTED, said or "the job was refused before it ran"
        return ErrorCode.HANDLER_FAILED, said or "the handler failed"
    codes = {JobStatus.TIMED_OUT: (ErrorCode.TIMED_OUT, "RunPod's execution timeout cut the job"),
             JobStatus.CANCELLED: (ErrorCode.CANCELLED, "the job was cancelled"),
             JobStatus.EXPIRED: (ErrorCode.EXPIRED, "RunPod no longer knows the job (its ttl or retention passed)"),
             JobStatus.SUBMIT_UNKNOWN: (ErrorCode.SUBMIT_UNKNOWN, "/run's outcome is unknown: the job is not sent "
                                                                  "again by itself; an operator decides")}
    code, default = codes.get(JobStatus(status), (ErrorCode.HANDLER_FAILED, "the job failed"))
    return code, said or default


async def _named_job(request: Request) -> str | None:
    """The RunPod job id a webhook's body names, if it is readable and looks like one; else None.
    Read with a bound (RunPod's payload carries the job's input and output); never trusted as such."""
    body = await read_bounded(request, MAX_WEBHOOK_BODY_BYTES)
    if body is None:
        return None
    try:
        payload = json.loads(body)
    except (ValueError, RecursionError):
        return None
    named = payload.get("id") if isinstance(payload, dict) else None
    return named if is_job_id(named) else None


def _event(seq: int | None, kind: str, data: Any) -> bytes:
    """One SSE event, written whole. `seq` None: no id line, so the client's Last-Event-ID stays the one before."""
    body = json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    head = f"id: {seq}\n" if seq is not None else ""
    return f"{head}event: {kind}\ndata: {body}\n\n".encode()
