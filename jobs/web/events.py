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
from jobs.storage.streams import FINAL_KINDS, end_data
from jobs.web.schemas import ErrorBody, header_schema

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


def router(require_token: Any, api_error: Any) -> tuple[APIRouter, APIRouter]:
    """The SSE route (behind the bearer token) and the webhook route (behind its path token)."""
    events = APIRouter(prefix="/v1", dependencies=[Depends(require_token)])
    webhooks = APIRouter(prefix="/v1")

    @events.get(
        "/jobs/{job_id}/events",
        summary="Follow a job as Server-Sent Events",
        description="Events `started`, `progress`, `output`, then exactly one of `end` or `error`; the "
        "stream then closes. Reconnect with `Last-Event-ID` to resume without gaps or repeats.",
        response_class=StreamingResponse,
        responses={200: {"content": {"text/event-stream": {}}},
                   **{code: {"model": ErrorBody, "description": HTTPStatus(code).phrase} for code in (401, 404, 422)}},
    )
    async def job_events(
        job_id: JobId,
        request: Request,
        runtime: RuntimeDep,
        last_event_id: Annotated[str | None, Header(
            alias="Last-Event-ID", description="Resume after this event (an id this stream sent).",
            json_schema_extra=header_schema(pattern="^" + _EVENT_ID.pattern + "$"))] = None,
    ) -> StreamingResponse:
        after = 0
        if last_event_id is not None:
            if not _EVENT_ID.fullmatch(last_event_id.strip()):
                raise api_error(422, [Problem("Last-Event-ID", "format", "must be an event id this stream sent")])
            after = int(last_event_id)
        job, first = await run_in_threadpool(jobs.stream_events, job_id, after=after, runtime=runtime)
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
    while True:
        for item in batch:
            yield _event(item)
            after = item.seq
            last_write = time.monotonic()
            if item.kind in FINAL_KINDS:
                return
        if job.is_terminal and not batch:
            _, everything = await run_in_threadpool(jobs.stream_events, job_id, after=0, runtime=runtime)
            if not any(item.kind in FINAL_KINDS for item in everything):
                # Finished, yet its stream has no end or error (a job older than streams): say how it ended.
                yield _closing(job).encode()
            return  # else the client already has the final event: it resumed after it
        if await request.is_disconnected():
            return
        if time.monotonic() - last_write >= HEARTBEAT_SECONDS:
            yield b": still here\n\n"
            last_write = time.monotonic()
        await anyio.sleep(POLL_SECONDS)
        job, batch = await run_in_threadpool(jobs.stream_events, job_id, after=after, runtime=runtime)


async def _named_job(request: Request) -> str | None:
    """The RunPod job id a webhook's body names, if it is readable and looks like one; else None.
    Read with a bound (RunPod's payload carries the job's input and output); never trusted as such."""
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_WEBHOOK_BODY_BYTES:
            return None
    try:
        payload = json.loads(body)
    except (ValueError, RecursionError):
        return None
    named = payload.get("id") if isinstance(payload, dict) else None
    return named if is_job_id(named) else None


def _event(item: jobs.StreamItem) -> bytes:
    data = json.dumps(item.data, ensure_ascii=False, separators=(",", ":"))
    return f"id: {item.seq}\nevent: {item.kind}\ndata: {data}\n\n".encode()


def _closing(job: jobs.Job) -> str:
    if job.status.value == "COMPLETED":
        return f'event: end\ndata: {json.dumps(end_data(job.status, output_missing=job.output_missing))}\n\n'
    return f'event: error\ndata: {json.dumps({"status": job.status.value, "error": job.error})}\n\n'
