"""Over HTTP with a real worker: the SSE event stream, RunPod's webhooks, correlation ids end to end."""

from __future__ import annotations

import json
import uuid
from datetime import datetime

import httpx
import pytest
from hypothesis import HealthCheck, given, settings

import jobs
from jobs.jsonsafe import MAX_DEPTH
from jobs.states import JobStatus
from tests.conftest import ENDPOINT_ID, Pipeline, wait_until
from tests.integration.strategies import json_within

# SQLite alone: a real worker and `rpq api` over HTTP, for the wiring (SSE, webhooks, correlation ids). What the
# storage does underneath is held to both databases in-process (test_streams_and_webhooks.py, test_http_api.py),
# and test_topology.py runs the API and workers on PostgreSQL; the suite's time is short.
pytestmark = [pytest.mark.integration, pytest.mark.parametrize("web_pipeline", ["sqlite"], indirect=True)]


def read_events(client: httpx.Client, job_id: str, *, last_event_id: int | None = None,
                stop_after: int | None = None) -> list[dict[str, object]]:
    """Read an SSE stream as raw bytes and parse it only at the end: proof no character was split."""
    headers = {"Last-Event-ID": str(last_event_id)} if last_event_id is not None else {}
    raw = bytearray()
    with client.stream("GET", f"/v1/jobs/{job_id}/events", headers=headers, timeout=60) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        for chunk in response.iter_bytes():
            raw += chunk
            if stop_after is not None and raw.count(b"\n\n") >= stop_after:
                break
    events = []
    for block in raw.decode("utf-8").split("\n\n"):
        # SSE ends lines with \n only; splitlines() would also split a U+2028 inside a JSON string.
        fields = dict(line.split(": ", 1) for line in block.split("\n") if line and not line.startswith(":"))
        if fields:
            events.append({"id": int(fields["id"]) if "id" in fields else None, "event": fields["event"],
                           "data": json.loads(fields["data"])})
    return events[:stop_after] if stop_after is not None else events


def submit(web_pipeline: Pipeline, body: dict[str, object], **headers: str) -> httpx.Response:
    with web_pipeline.api_client() as client:
        return client.post("/v1/jobs", json=body, headers=headers)


def test_a_streaming_job_arrives_as_started_chunks_in_order_then_one_end(web_pipeline: Pipeline) -> None:
    chunks = ["Καλη", "μέρα ", "🐉🐉 ", "日本語の", "テキスト", " ✓"]
    answer = submit(web_pipeline, {"endpoint": "tts", "input": {"sleep": 2, "stream": chunks}, "stream": True})
    job_id = answer.json()["id"]

    with web_pipeline.api_client() as client:
        events = read_events(client, job_id)

    done = jobs.get(job_id, runtime=web_pipeline.runtime)
    assert [e["event"] for e in events] == ["started", *["output"] * len(chunks), "metrics", "end"]
    assert events[0]["data"] == {"job_id": job_id, "endpoint": "tts", "attempt": 1,
                                 "started_at": done.started_at.isoformat() if done.started_at else None}
    assert [e["data"] for e in events if e["event"] == "output"] == [{"i": i, "data": c} for i, c in enumerate(chunks)]
    assert events[-2]["data"] == {"delay_ms": done.delay_time_ms, "execution_ms": done.execution_time_ms,
                                  "cost_usd": done.cost_usd} and events[-2]["id"] is None
    assert events[-1]["data"] == {"status": "COMPLETED", "execution_ms": done.execution_time_ms}
    ids = [e["id"] for e in events if e["id"] is not None]
    assert ids == sorted(set(ids)) and len(ids) == len(events) - 1  # increasing, no repeats; metrics has none


def test_every_event_is_what_the_openapi_document_says_its_kind_carries(web_pipeline: Pipeline) -> None:
    from jsonschema import Draft202012Validator

    ok = submit(web_pipeline, {"endpoint": "tts", "input": {"sleep": 0.2, "stream": ["a", {"b": 1}]},
                               "stream": True}).json()["id"]
    failed = submit(web_pipeline, {"endpoint": "tts", "input": {"sleep": 0.2, "fail": "OOM"}}).json()["id"]
    with web_pipeline.api_client() as client:
        document = client.get("/openapi.json").json()
        events = read_events(client, ok) + read_events(client, failed)

    components = document["components"]["schemas"]
    names = {"started": "StartedEvent", "output": "OutputEvent", "metrics": "MetricsEvent", "end": "EndEvent",
             "error": "ErrorEvent"}
    assert {e["event"] for e in events} == set(names)
    for event in events:
        schema = {**components[names[str(event["event"])]], "components": document["components"]}
        errors = list(Draft202012Validator(schema).iter_errors(event["data"]))
        assert not errors, (event, errors)
    assert "submit_unknown" in components["ErrorCode"]["enum"]


def test_a_failing_job_streams_exactly_one_error_and_no_end(web_pipeline: Pipeline) -> None:
    job_id = submit(web_pipeline, {"endpoint": "tts", "input": {"sleep": 0.5, "fail": "OOM"}}).json()["id"]

    with web_pipeline.api_client() as client:
        events = read_events(client, job_id)

    kinds = [e["event"] for e in events]
    assert kinds[0] == "started" and kinds[-1] == "error" and "end" not in kinds
    assert events[-1]["data"] == {"code": "handler_failed", "message": "OOM", "status": "FAILED"}
    assert kinds[-2] == "metrics"


def test_a_client_that_reconnects_with_last_event_id_resumes_without_gaps_or_repeats(web_pipeline: Pipeline) -> None:
    chunks = [f"part {n} · ü" for n in range(8)]
    job_id = submit(web_pipeline, {"endpoint": "tts", "input": {"sleep": 3, "stream": chunks},
                                   "stream": True}).json()["id"]

    with web_pipeline.api_client() as client:
        first = read_events(client, job_id, stop_after=3)
        rest = read_events(client, job_id, last_event_id=int(str(first[-1]["id"])))
        everything = read_events(client, job_id)

    assert first + rest == everything  # the resumed stream numbers its outputs on from where the first left off
    assert [e["data"] for e in everything if e["event"] == "output"] == [{"i": i, "data": c}
                                                                          for i, c in enumerate(chunks)]


def test_webhooks_from_runpod_end_polling_early(web_pipeline: Pipeline) -> None:
    job_id = submit(web_pipeline, {"endpoint": "tts", "input": {"sleep": 2, "output": "fast"}}).json()["id"]

    done = jobs.wait(job_id, timeout=60, runtime=web_pipeline.runtime)

    [at_runpod] = [j for j in web_pipeline.simulator.jobs(ENDPOINT_ID) if j["id"] == done.runpod_job_id]
    runpod_finished = datetime.fromisoformat(str(at_runpod["finished_at"]))
    lag = (done.finished_at - runpod_finished).total_seconds() if done.finished_at else None
    # Without the webhook the first safety-net poll comes 5 s after submission, then 5-10 s apart.
    assert done.status is JobStatus.COMPLETED and lag is not None and lag < 2.0, lag
    assert done.poll_count <= 2
    assert "webhook" in [e.source for e in jobs.events(job_id, runtime=web_pipeline.runtime)]


def test_forged_and_duplicate_webhooks_are_harmless(web_pipeline: Pipeline) -> None:
    job_id = submit(web_pipeline, {"endpoint": "tts", "input": {"sleep": 30}}).json()["id"]
    wait_until(lambda: jobs.get(job_id, runtime=web_pipeline.runtime).runpod_job_id, timeout=30, what="submission")
    runpod_id = jobs.get(job_id, runtime=web_pipeline.runtime).runpod_job_id
    [at_runpod] = [j for j in web_pipeline.simulator.jobs(ENDPOINT_ID) if j["id"] == runpod_id]
    real = str(at_runpod["webhook"]).split("?")[0]
    forged = real.rsplit("/", 1)[0] + "/" + "A" * 43
    polls_before = jobs.get(job_id, runtime=web_pipeline.runtime).poll_count

    with httpx.Client(timeout=10) as anyone:
        assert anyone.post(forged, json={"id": runpod_id, "status": "COMPLETED", "output": "fake"}).status_code == 404
        assert anyone.post(real, content=b"{not json").status_code == 200  # the body never sets state
        assert anyone.post(real, json={"status": "COMPLETED", "output": "lies"}).status_code == 200

    # The real webhooks woke a poll; once it has run, the job must still be what /status says.
    wait_until(lambda: jobs.get(job_id, runtime=web_pipeline.runtime).poll_count > polls_before, timeout=20,
               what="the woken poll")
    job = jobs.get(job_id, runtime=web_pipeline.runtime)
    assert job.status in (JobStatus.IN_QUEUE, JobStatus.IN_PROGRESS) and job.output is None
    jobs.cancel(job_id, runtime=web_pipeline.runtime)


def test_the_correlation_id_goes_from_the_request_to_runpod_and_every_log_line(web_pipeline: Pipeline) -> None:
    correlation_id = f"web-{uuid.uuid4().hex[:10]}"

    answer = submit(web_pipeline, {"endpoint": "tts", "input": {"sleep": 0.3, "output": 1}},
                    **{"X-Correlation-ID": correlation_id})
    job_id = answer.json()["id"]
    done = jobs.wait(job_id, timeout=60, runtime=web_pipeline.runtime)

    assert answer.headers["X-Correlation-ID"] == correlation_id
    assert done.correlation_id == correlation_id
    [at_runpod] = [j for j in web_pipeline.simulator.jobs(ENDPOINT_ID) if j["id"] == done.runpod_job_id]
    assert f"correlation_id={correlation_id}" in str(at_runpod["webhook"])
    worker_lines = [line for line in web_pipeline.logs(tail=None).splitlines() if job_id in line]
    assert worker_lines and all(f"cid={correlation_id}" in line for line in worker_lines)
    with web_pipeline.api_client() as client:
        assert client.get(f"/v1/jobs/{job_id}").headers["X-Correlation-ID"]


def test_a_submit_whose_answer_was_lost_resolves_itself_when_runpods_webhook_arrives(web_pipeline: Pipeline) -> None:
    # /run reaches RunPod, but its answer comes after the worker's 2 s timeout: the outcome is unknown.
    web_pipeline.simulator.set_faults({"op": "run", "kind": "slow", "delay": 4, "count": 1, "when": "after"})
    job_id = submit(web_pipeline, {"endpoint": "tts", "input": {"sleep": 1, "output": "kept"}}).json()["id"]
    wait_until(lambda: JobStatus.SUBMIT_UNKNOWN in [e.to_status for e in jobs.events(job_id,
               runtime=web_pipeline.runtime)], timeout=30, what="the submit to be called unknown")

    # RunPod finishes the job and calls the webhook only that /run carried: proof enough, once /status agrees.
    done = jobs.wait(job_id, timeout=60, runtime=web_pipeline.runtime)

    assert (done.status, done.output) == (JobStatus.COMPLETED, "kept")
    assert [j["id"] for j in web_pipeline.simulator.jobs(ENDPOINT_ID) if j["input"] == {"sleep": 1, "output": "kept"}
            ] == [done.runpod_job_id]  # adopted, never sent twice
    assert "adopted" in " ".join(e.detail or "" for e in jobs.events(job_id, runtime=web_pipeline.runtime))


@settings(max_examples=3, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(output=json_within(MAX_DEPTH - 1).filter(lambda value: value is not None))
def test_an_odd_output_arrives_through_runpod_the_table_and_sse_exactly_as_sent(
    web_pipeline: Pipeline, output: object
) -> None:
    # The simulator's handler answers with the input's `output`: odd JSON goes to RunPod and comes back.
    job_id = submit(web_pipeline, {"endpoint": "tts", "input": {"output": output}}).json()["id"]

    with web_pipeline.api_client() as client:
        events = read_events(client, job_id)
        read = client.get(f"/v1/jobs/{job_id}").json()

    assert [e["event"] for e in events] == ["started", "output", "metrics", "end"]
    assert events[1]["data"]["i"] == 0  # type: ignore[index]
    assert json.dumps(events[1]["data"]["data"], sort_keys=True) == json.dumps(output, sort_keys=True)  # type: ignore[index]
    assert read["status"] == "COMPLETED" and json.dumps(read["output"], sort_keys=True) == json.dumps(output,
                                                                                                      sort_keys=True)
