"""The RunPod simulator over real HTTP, with plain httpx: every operation, status, limit and fault.

Long waits (ttl, retention, idle timeout, handler sleeps, webhook retry spacing) are skipped with the
simulator's clock-advance control, never slept through.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest

from tests.conftest import SimulatorProcess, endpoint_flags, wait_until

pytestmark = pytest.mark.integration

WEEK_MS = 7 * 24 * 3600 * 1000


@dataclass
class Api:
    """Plain-httpx access to one endpoint of a simulator, plus its control API."""

    sim: SimulatorProcess
    http: httpx.Client
    endpoint: str

    def post(self, op: str, body: Any = None, **kwargs: Any) -> httpx.Response:
        return self.http.post(f"/{self.endpoint}/{op}", json=body, **kwargs)

    def get(self, op: str, **kwargs: Any) -> httpx.Response:
        return self.http.get(f"/{self.endpoint}/{op}", **kwargs)

    def run(self, job_input: Any, **extra: Any) -> str:
        response = self.post("run", {"input": job_input, **extra})
        assert response.status_code == 200, response.text
        return str(response.json()["id"])

    def status(self, job_id: str) -> dict[str, Any]:
        response = self.get(f"status/{job_id}")
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        return body

    def wait_status(self, job_id: str, *statuses: str, timeout: float = 10) -> dict[str, Any]:
        def reached() -> dict[str, Any] | None:
            body = self.status(job_id)
            return body if body["status"] in statuses else None

        found: dict[str, Any] = wait_until(reached, timeout=timeout, what=f"{job_id} to be {statuses}")  # type: ignore[assignment]
        return found

    def health(self) -> dict[str, Any]:
        response = self.get("health")
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        return body

    def workers(self) -> dict[str, int]:
        return {state: n for state, n in self.health()["workers"].items() if n}

    def configure(self, **settings: Any) -> None:
        self.sim.configure_endpoint(self.endpoint, **settings)

    def advance(self, seconds: float) -> None:
        self.sim.advance(seconds)

    def record(self, job_id: str) -> dict[str, Any]:
        (found,) = [job for job in self.sim.jobs(self.endpoint) if job["id"] == job_id]
        return found

    def held_open(self, call: Callable[[], httpx.Response], job_id: str) -> Future[httpx.Response]:
        """Make a long-poll ``call`` in the background; return once the simulator holds it for ``job_id``."""
        pending = BACKGROUND.submit(call)
        wait_until(lambda: pending.done() or self.record(job_id)["held_requests"] == 1, timeout=10,
                   what=f"a request held open for {job_id}")
        assert not pending.done(), pending.result().text
        return pending


#: Threads for requests that a test keeps open while it moves the simulator's clock.
BACKGROUND = ThreadPoolExecutor(max_workers=4, thread_name_prefix="held-request")


@contextlib.contextmanager
def open_api(sim: SimulatorProcess, *, cold_start_seconds: float = 0.0, timeout: float = 15) -> Iterator[Api]:
    endpoint = sim.create_endpoint(cold_start_seconds=cold_start_seconds)
    headers = {"Authorization": f"Bearer {sim.api_key}"}
    with httpx.Client(base_url=sim.base_url, headers=headers, timeout=timeout) as http:
        yield Api(sim, http, endpoint)


@pytest.fixture
def api(simulator: SimulatorProcess) -> Iterator[Api]:
    """A fresh endpoint on the shared simulator, with instant cold starts unless a test sets them."""
    with open_api(simulator) as opened:
        yield opened


@pytest.fixture(scope="module")
def _tuned(start_simulator: Callable[..., SimulatorProcess]) -> SimulatorProcess:
    return start_simulator(
        "--execution-timeout-status", "TIMED_OUT",
        "--rate-limit-scale", "0.01",
        "--webhook-interval-seconds", "0.3",
        "--cold-start-seconds", "0",
    )  # fmt: skip


@pytest.fixture
def tuned(_tuned: SimulatorProcess) -> Iterator[Api]:
    """A simulator with TIMED_OUT execution timeouts, 1 % of RunPod's rate limits, fast webhook retries."""
    _tuned.reset()
    with open_api(_tuned) as opened:
        yield opened


class Receiver:
    """A webhook receiver on 127.0.0.1 answering the given status codes in turn (then 200)."""

    def __init__(self, answers: list[int]) -> None:
        self.answers = list(answers)
        self.bodies: list[dict[str, Any]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("content-length", 0))
                receiver.bodies.append(json.loads(self.rfile.read(length)))
                code = receiver.answers.pop(0) if receiver.answers else 200
                self.send_response(code)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook?token=t0k"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver_factory() -> Iterator[Callable[[list[int]], Receiver]]:
    started: list[Receiver] = []

    def start(answers: list[int]) -> Receiver:
        started.append(Receiver(answers))
        return started[-1]

    yield start
    for receiver in started:
        receiver.close()


def webhook_log(sim: SimulatorProcess) -> list[dict[str, Any]]:
    return list(sim.control.get("/_sim/webhooks").json()["webhooks"])


# -- job lifecycle and shapes ---------------------------------------------------------------------------


def test_run_answers_an_id_in_queue_and_the_job_completes_with_timings_and_a_worker(api: Api) -> None:
    response = api.post("run", {"input": {"sleep": 0.3, "output": {"url": "s3://b/k"}}})

    assert response.status_code == 200
    job_id = response.json()["id"]
    assert response.json() == {"id": job_id, "status": "IN_QUEUE"}
    assert job_id.endswith("-u1") and uuid.UUID(job_id.removesuffix("-u1"))
    done = api.wait_status(job_id, "COMPLETED")
    assert set(done) == {"id", "status", "delayTime", "executionTime", "output", "workerId"}
    assert done["output"] == {"url": "s3://b/k"} and done["executionTime"] >= 250


def test_a_running_job_shows_in_progress_with_its_delay_and_worker_but_no_execution_time(api: Api) -> None:
    job_id = api.run({"sleep": 60})

    running = api.wait_status(job_id, "IN_PROGRESS")

    assert set(running) == {"id", "status", "delayTime", "workerId"}
    assert api.health()["jobs"]["inProgress"] == 1


def test_a_failing_handler_ends_failed_with_its_error(api: Api) -> None:
    job_id = api.run({"fail": "CUDA out of memory"})

    failed = api.wait_status(job_id, "FAILED")

    assert failed["error"] == "CUDA out of memory" and "output" not in failed
    assert api.health()["jobs"]["failed"] == 1


def test_status_and_stream_answer_post_as_older_docs_say(api: Api) -> None:
    job_id = api.run({})
    api.wait_status(job_id, "COMPLETED")

    assert api.post(f"status/{job_id}").json()["status"] == "COMPLETED"
    assert api.post(f"stream/{job_id}").json() == {"status": "COMPLETED", "stream": []}


def test_an_unknown_job_or_another_endpoints_job_is_a_json_404(api: Api) -> None:
    job_id = api.run({})
    api.sim.create_endpoint("someone-else")

    other = api.http.get(f"/someone-else/status/{job_id}")
    unknown = api.get("status/not-a-job")

    assert other.status_code == unknown.status_code == 404
    assert "error" in other.json() and "error" in unknown.json()
    assert api.http.get("/x/nonsense").status_code == 404
    assert api.http.get(f"/{api.endpoint}/run").status_code == 405


def test_an_endpoint_that_was_never_created_is_404_on_every_operation_as_on_runpod(api: Api) -> None:
    job_id = api.run({})
    calls = {
        "run": lambda: api.http.post("/no-such-endpoint/run", json={"input": {}}),
        "runsync": lambda: api.http.post("/no-such-endpoint/runsync", json={"input": {}}),
        "status": lambda: api.http.get(f"/no-such-endpoint/status/{job_id}"),
        "status-sync": lambda: api.http.get(f"/no-such-endpoint/status-sync/{job_id}"),
        "stream": lambda: api.http.get(f"/no-such-endpoint/stream/{job_id}"),
        "cancel": lambda: api.http.post(f"/no-such-endpoint/cancel/{job_id}"),
        "retry": lambda: api.http.post(f"/no-such-endpoint/retry/{job_id}"),
        "purge-queue": lambda: api.http.post("/no-such-endpoint/purge-queue"),
        "health": lambda: api.http.get("/no-such-endpoint/health"),
    }

    answers = {op: call() for op, call in calls.items()}

    assert {op: r.status_code for op, r in answers.items()} == dict.fromkeys(calls, 404)
    assert all("check your endpoint ID" in r.json()["error"] for r in answers.values())
    assert [job["id"] for job in api.sim.jobs()] == [job_id]
    assert api.sim.control.get("/_sim/endpoints/no-such-endpoint").status_code == 404


def test_an_endpoint_created_through_the_control_api_answers_from_then_on(api: Api) -> None:
    assert api.http.get("/made-later/health").status_code == 404

    created = api.sim.control.post("/_sim/endpoints/made-later", json={"workers_max": 1})

    assert created.json()["workers_max"] == 1 and created.json()["cold_start_seconds"] == 0.2
    assert api.http.get("/made-later/health").json()["workers"]["idle"] == 1
    assert api.http.post("/made-later/runsync", json={"input": {"output": 1}}).json()["output"] == 1


# -- auth -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("header", [None, "Bearer wrong-key", "wrong-key", "Bearer", "Basic abc"])
def test_a_missing_or_wrong_key_is_401_unauthorized(simulator: SimulatorProcess, header: str | None) -> None:
    headers = {"Authorization": header} if header is not None else {}

    responses = [
        httpx.post(f"{simulator.base_url}/ep/run", json={"input": {}}, headers=headers),
        httpx.get(f"{simulator.base_url}/ep/health", headers=headers),
    ]

    assert [r.status_code for r in responses] == [401, 401]
    assert responses[0].json() == {"error": "Unauthorized"}
    assert simulator.api_key not in responses[0].text
    assert simulator.jobs() == []


@pytest.mark.parametrize("scheme", ["Bearer {key}", "bearer {key}", "{key}"])
def test_the_key_is_accepted_as_bearer_or_bare_as_runpods_docs_show(simulator: SimulatorProcess, scheme: str) -> None:
    headers = {"Authorization": scheme.format(key=simulator.api_key)}

    response = httpx.post(f"{simulator.base_url}/ep/run", json={"input": {}}, headers=headers)

    assert response.status_code == 200


# -- request validation ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "complaint"),
    [(b'{"webhook": "http://x"}', "input"), (b"{not json", "JSON"), (b'["input"]', "object"), (b"", "JSON")],
)
def test_a_body_without_input_or_not_json_is_400(api: Api, content: bytes, complaint: str) -> None:
    for op in ("run", "runsync"):
        response = api.http.post(f"/{api.endpoint}/{op}", content=content)

        assert response.status_code == 400
        assert complaint in response.json()["error"]
    assert api.sim.jobs() == []


@pytest.mark.parametrize(
    ("policy", "field"),
    [
        ({"ttl": 9_999}, "ttl"),
        ({"executionTimeout": 4_999}, "executionTimeout"),
        ({"ttl": WEEK_MS + 1}, "ttl"),
        ({"executionTimeout": WEEK_MS + 1}, "executionTimeout"),
    ],
)
def test_policy_values_outside_runpods_limits_are_400_naming_the_field(
    api: Api, policy: dict[str, int], field: str
) -> None:
    response = api.post("run", {"input": {}, "policy": policy})

    assert response.status_code == 400 and field in response.json()["error"]


def test_policy_values_at_runpods_limits_are_accepted(api: Api) -> None:
    low = api.post("run", {"input": {}, "policy": {"ttl": 10_000, "executionTimeout": 5_000}})
    high = api.post("run", {"input": {}, "policy": {"ttl": WEEK_MS, "executionTimeout": WEEK_MS}})

    assert low.status_code == high.status_code == 200


def test_payloads_over_10_mb_on_run_and_20_mb_on_runsync_are_413(api: Api) -> None:
    blob = "x" * (10 * 1024 * 1024)

    too_big_for_run = api.post("run", {"input": {"blob": blob}})
    fine_for_runsync = api.post("runsync", {"input": {"blob": blob, "output": "ok"}})
    too_big_for_runsync = api.post("runsync", {"input": {"blob": blob * 2}})

    assert too_big_for_run.status_code == 413 and "error" in too_big_for_run.json()
    assert fine_for_runsync.status_code == 200 and fine_for_runsync.json()["output"] == "ok"
    assert too_big_for_runsync.status_code == 413
    assert len(api.sim.jobs()) == 1


# -- runsync --------------------------------------------------------------------------------------------


def test_runsync_answers_the_finished_job_with_a_sync_id(api: Api) -> None:
    response = api.post("runsync", {"input": {"sleep": 0.2, "output": [1, 2]}})

    body = response.json()
    assert response.status_code == 200 and body["status"] == "COMPLETED" and body["output"] == [1, 2]
    assert body["id"].startswith("sync-") and body["id"].endswith("-u1")
    assert {"delayTime", "executionTime", "workerId"} <= set(body)
    assert api.status(body["id"]) == body


@pytest.mark.parametrize("wait", ["999", "300001", "soon", "-5"])
def test_runsync_wait_outside_1000_to_300000_ms_is_400_with_runpods_message(api: Api, wait: str) -> None:
    response = api.post("runsync", {"input": {}}, params={"wait": wait})

    assert response.status_code == 400
    assert response.json() == {"error": "wait is invalid; must be between 1000 and 300000"}


def test_runsync_that_outlives_its_wait_answers_a_non_final_status_and_the_job_keeps_running(api: Api) -> None:
    started = time.monotonic()
    response = api.post("runsync", {"input": {"sleep": 30, "output": "late"}}, params={"wait": 1000})

    body = response.json()
    assert 0.9 <= time.monotonic() - started < 5
    assert body == {"id": body["id"], "status": "IN_PROGRESS"}
    api.advance(31)
    assert api.wait_status(body["id"], "COMPLETED")["output"] == "late"


def test_a_runsync_result_is_gone_after_one_minute_and_a_run_result_after_thirty(api: Api) -> None:
    sync_id = api.post("runsync", {"input": {}}).json()["id"]
    run_id = api.run({})
    api.wait_status(run_id, "COMPLETED")

    api.advance(59)
    assert api.get(f"status/{sync_id}").status_code == 200
    api.advance(2)
    assert api.get(f"status/{sync_id}").status_code == 404
    assert api.get(f"status/{run_id}").status_code == 200
    api.advance(30 * 60)
    assert api.get(f"status/{run_id}").status_code == 404
    assert [job["deleted_reason"] for job in api.sim.jobs()] == ["retention", "retention"]


# -- ttl and execution timeout --------------------------------------------------------------------------


def test_a_job_past_its_ttl_is_404_whether_it_was_queued_or_running(api: Api) -> None:
    api.configure(workers_max=1)
    running = api.run({"sleep": 600}, policy={"ttl": 10_000})
    queued = api.run({"sleep": 600}, policy={"ttl": 10_000})
    api.wait_status(running, "IN_PROGRESS")
    assert api.status(queued)["status"] == "IN_QUEUE"

    api.advance(11)

    assert api.get(f"status/{running}").status_code == api.get(f"status/{queued}").status_code == 404
    records = api.sim.jobs()
    assert [(r["deleted"], r["deleted_reason"]) for r in records] == [(True, "ttl"), (True, "ttl")]
    assert api.health()["jobs"] == {
        "completed": 0,
        "failed": 0,
        "inProgress": 0,
        "inQueue": 0,
        "retried": 0,
    }


def test_a_job_over_its_execution_timeout_ends_failed_by_default(api: Api) -> None:
    job_id = api.run({"sleep": 60}, policy={"executionTimeout": 5_000})
    api.wait_status(job_id, "IN_PROGRESS")

    api.advance(6)

    failed = api.status(job_id)
    assert failed["status"] == "FAILED" and "execution timeout" in failed["error"]


def test_a_job_over_its_execution_timeout_ends_timed_out_when_configured(tuned: Api) -> None:
    job_id = tuned.run({"sleep": 60}, policy={"executionTimeout": 5_000})

    tuned.advance(6)

    timed_out = tuned.status(job_id)
    assert timed_out["status"] == "TIMED_OUT" and "execution timeout" in timed_out["error"]


# -- cancel, retry, purge -------------------------------------------------------------------------------


def test_cancel_removes_a_queued_job_and_stops_a_running_one(api: Api) -> None:
    api.configure(workers_max=1)
    running, queued = api.run({"sleep": 60, "output": "never"}), api.run({"sleep": 60})
    api.wait_status(running, "IN_PROGRESS")

    answers = [api.post(f"cancel/{job_id}").json() for job_id in (queued, running)]

    assert answers == [{"id": queued, "status": "CANCELLED"}, {"id": running, "status": "CANCELLED"}]
    api.advance(61)
    assert api.status(running)["status"] == "CANCELLED" and "output" not in api.status(running)
    assert api.health()["jobs"]["completed"] == 0 and api.workers() == {"idle": 1}


def test_cancelling_a_finished_job_answers_its_status_unchanged(api: Api) -> None:
    job_id = api.run({"output": 1})
    api.wait_status(job_id, "COMPLETED")

    response = api.post(f"cancel/{job_id}")

    assert response.status_code == 200 and response.json() == {"id": job_id, "status": "COMPLETED"}
    assert api.status(job_id)["output"] == 1


def test_retry_requeues_a_failed_job_under_the_same_id_with_its_input_and_counts_it(api: Api) -> None:
    job_id = api.run({"fail": "flaky", "sleep": 0.1})
    api.wait_status(job_id, "FAILED")

    response = api.post(f"retry/{job_id}")

    assert response.status_code == 200 and response.json() == {"id": job_id, "status": "IN_QUEUE"}
    assert "error" not in api.status(job_id)
    again = api.wait_status(job_id, "FAILED")
    assert again["error"] == "flaky"
    assert api.record(job_id)["attempts"] == 2 and api.record(job_id)["input"] == {"fail": "flaky", "sleep": 0.1}
    assert api.health()["jobs"]["retried"] == 1 and api.health()["jobs"]["failed"] == 2


def test_retry_of_a_job_that_did_not_fail_is_400_and_of_an_expired_job_404(api: Api) -> None:
    done = api.run({})
    failed = api.run({"fail": "x"})
    api.wait_status(done, "COMPLETED")
    api.wait_status(failed, "FAILED")

    refused = api.post(f"retry/{done}")
    api.advance(1801)
    expired = api.post(f"retry/{failed}")

    assert refused.status_code == 400 and "FAILED or TIMED_OUT" in refused.json()["error"]
    assert expired.status_code == 404


def test_purge_queue_cancels_only_queued_jobs(api: Api) -> None:
    api.configure(workers_max=1)
    running = api.run({"sleep": 60})
    api.wait_status(running, "IN_PROGRESS")
    queued = [api.run({}) for _ in range(3)]

    response = api.post("purge-queue")

    assert response.json() == {"removed": 3, "status": "completed"}
    assert [api.status(job_id)["status"] for job_id in queued] == ["CANCELLED"] * 3
    assert api.status(running)["status"] == "IN_PROGRESS"
    assert api.health()["jobs"]["inQueue"] == 0


# -- stream and progress --------------------------------------------------------------------------------


def test_stream_holds_until_a_chunk_arrives_then_drains_and_status_shows_an_empty_output(api: Api) -> None:
    job_id = api.run({"sleep": 0.6, "stream": ["Hello", "stream", "world"]})
    started = time.monotonic()

    first = api.get(f"stream/{job_id}").json()
    seen = [item["output"] for item in first["stream"]]
    assert seen and time.monotonic() - started < 5
    for _ in range(10):  # each poll is held until a chunk comes or the job ends, so this never spins
        batch = api.get(f"stream/{job_id}").json()
        seen += [item["output"] for item in batch["stream"]]
        if batch["status"] == "COMPLETED" and not batch["stream"]:
            break

    assert seen == ["Hello", "stream", "world"]
    assert api.status(job_id)["output"] == []  # RunPod: a generator's chunks are only in /stream by default


def test_an_endpoint_set_to_return_aggregate_stream_shows_every_chunk_in_status(api: Api) -> None:
    api.configure(return_aggregate_stream=True)
    aggregated = api.run({"stream": ["a", "b"]})
    opted_out = api.run({"stream": ["a", "b"], "return_aggregate_stream": False})

    assert api.wait_status(aggregated, "COMPLETED")["output"] == ["a", "b"]
    assert api.wait_status(opted_out, "COMPLETED")["output"] == []
    assert [c["output"] for c in api.get(f"stream/{aggregated}").json()["stream"]] == ["a", "b"]


def test_an_empty_stream_poll_is_held_for_the_wait_and_answers_no_chunks(api: Api) -> None:
    api.configure(workers_max=0)
    job_id = api.run({"stream": ["a"]})
    started = time.monotonic()

    response = api.get(f"stream/{job_id}", params={"wait": 1000})

    assert 0.9 <= time.monotonic() - started < 5
    assert response.json() == {"status": "IN_QUEUE", "stream": []}
    assert api.get(f"stream/{job_id}", params={"wait": 500}).status_code == 400


def test_status_shows_the_latest_progress_update_while_the_job_runs(api: Api) -> None:
    job_id = api.run({"sleep": 30, "progress": ["loading model", "50%"], "output": "final"})
    api.wait_status(job_id, "IN_PROGRESS")

    api.advance(11)
    first = api.status(job_id)
    api.advance(10)
    second = api.status(job_id)
    api.advance(10)

    assert (first["status"], first["output"]) == ("IN_PROGRESS", "loading model")
    assert (second["status"], second["output"]) == ("IN_PROGRESS", "50%")
    assert api.status(job_id)["output"] == "final"


# -- status-sync ----------------------------------------------------------------------------------------


def test_status_sync_holds_until_the_job_is_final_and_answers_what_status_shows(api: Api) -> None:
    job_id = api.run({"sleep": 30, "output": "done"})
    api.wait_status(job_id, "IN_PROGRESS")
    held = api.held_open(lambda: api.get(f"status-sync/{job_id}", params={"wait": 60_000}), job_id)

    api.advance(10)
    assert api.record(job_id)["held_requests"] == 1  # IN_PROGRESS is not final: still held
    api.advance(21)

    answer = held.result(timeout=10)
    assert answer.status_code == 200 and answer.json() == api.status(job_id)
    assert answer.json()["status"] == "COMPLETED" and answer.json()["output"] == "done"


def test_status_sync_answers_the_current_status_when_its_wait_runs_out(api: Api) -> None:
    api.configure(workers_max=0)
    job_id = api.run({})
    held = api.held_open(lambda: api.http.post(f"/{api.endpoint}/status-sync/{job_id}", params={"wait": 5000}), job_id)

    api.advance(5)

    assert held.result(timeout=10).json() == {"id": job_id, "status": "IN_QUEUE"}


def test_status_sync_of_a_finished_job_answers_at_once(api: Api) -> None:
    job_id = api.run({"output": 7})
    api.wait_status(job_id, "COMPLETED")
    started = time.monotonic()

    answer = api.get(f"status-sync/{job_id}", params={"wait": 90_000})

    assert answer.json()["output"] == 7 and time.monotonic() - started < 5


@pytest.mark.parametrize("wait", ["999", "90001", "soon"])
def test_status_sync_wait_outside_the_js_sdks_1000_to_90000_ms_is_400(api: Api, wait: str) -> None:
    job_id = api.run({})

    response = api.get(f"status-sync/{job_id}", params={"wait": wait})

    assert response.status_code == 400
    assert response.json() == {"error": "wait is invalid; must be between 1000 and 90000"}


def test_status_sync_of_an_unknown_job_is_404(api: Api) -> None:
    assert api.get("status-sync/not-a-job", params={"wait": 1000}).status_code == 404


# -- health and workers ---------------------------------------------------------------------------------


def test_health_follows_a_cold_start_a_running_job_and_the_idle_timeout(api: Api) -> None:
    api.configure(cold_start_seconds=5)
    assert api.workers() == {"idle": 3}  # RunPod's idle: scaled down, waiting for requests
    job_id = api.run({"sleep": 10})

    assert api.health() == {
        "jobs": {"completed": 0, "failed": 0, "inProgress": 0, "inQueue": 1, "retried": 0},
        "workers": {"idle": 2, "initializing": 1, "ready": 0, "running": 0, "throttled": 0, "unhealthy": 0},
    }
    api.advance(5.5)
    assert api.workers() == {"running": 1, "idle": 2} and api.health()["jobs"]["inProgress"] == 1
    api.advance(10)
    assert api.workers() == {"ready": 1, "idle": 2} and api.health()["jobs"]["completed"] == 1
    assert api.status(job_id)["delayTime"] == pytest.approx(5000, abs=300)
    api.advance(5.5)
    assert api.workers() == {"idle": 3}


def test_active_workers_are_reported_ready_and_never_idle_out(api: Api) -> None:
    api.configure(workers_min=2)
    wait_until(lambda: api.workers() == {"ready": 2, "idle": 1}, timeout=5, what="two ready workers")

    api.advance(3600)

    assert api.workers() == {"ready": 2, "idle": 1}


def test_unhealthy_workers_crash_loop_and_jobs_stay_in_queue(api: Api) -> None:
    api.configure(unhealthy=True, workers_max=2)
    jobs = [api.run({}) for _ in range(3)]

    api.advance(60)

    assert api.workers() == {"unhealthy": 2}
    assert [api.status(job_id)["status"] for job_id in jobs] == ["IN_QUEUE"] * 3
    api.configure(unhealthy=False)
    for job_id in jobs:
        api.wait_status(job_id, "COMPLETED")


def test_throttled_workers_cannot_start_and_jobs_stay_in_queue(api: Api) -> None:
    api.configure(throttled=True)
    job_id = api.run({})

    api.advance(60)

    assert api.workers() == {"throttled": 1, "idle": 2} and api.status(job_id)["status"] == "IN_QUEUE"


# -- webhooks -------------------------------------------------------------------------------------------


def test_a_webhook_that_fails_once_is_retried_after_the_interval_and_every_attempt_is_recorded(
    api: Api, receiver_factory: Callable[[list[int]], Receiver]
) -> None:
    receiver = receiver_factory([500])
    job_id = api.run({"output": {"ok": True}}, webhook=receiver.url)
    wait_until(lambda: len(webhook_log(api.sim)) == 1, timeout=10, what="the first webhook attempt")

    api.advance(10)  # RunPod's 10 s between attempts

    wait_until(lambda: len(webhook_log(api.sim)) == 2, timeout=10, what="the second webhook attempt")
    attempts = webhook_log(api.sim)
    assert [(a["job_id"], a["attempt"], a["status_code"]) for a in attempts] == [(job_id, 1, 500), (job_id, 2, 200)]
    assert attempts[0]["url"] == receiver.url and attempts[1]["delivered"] and attempts[0]["at"].endswith("Z")
    body = receiver.bodies[-1]
    assert body == receiver.bodies[0]
    assert {k: body[k] for k in ("id", "status", "output", "input", "webhook")} == {
        "id": job_id,
        "status": "COMPLETED",
        "output": {"ok": True},
        "input": {"output": {"ok": True}},
        "webhook": receiver.url,
    }
    assert {"delayTime", "executionTime"} <= set(body)


def test_webhook_attempts_are_spaced_by_the_configured_interval_and_stop_after_three(
    tuned: Api, receiver_factory: Callable[[list[int]], Receiver]
) -> None:
    receiver = receiver_factory([503, 503, 503, 503])
    job_id = tuned.run({"fail": "broken"}, webhook=receiver.url)

    wait_until(lambda: len(webhook_log(tuned.sim)) == 3, timeout=10, what="three webhook attempts")

    assert [a["status_code"] for a in webhook_log(tuned.sim)] == [503, 503, 503]
    assert receiver.bodies[0]["status"] == "FAILED" and receiver.bodies[0]["error"] == "broken"
    assert receiver.bodies[0]["id"] == job_id
    times = [datetime.fromisoformat(a["at"]) for a in webhook_log(tuned.sim)]
    assert all((later - earlier).total_seconds() >= 0.29 for earlier, later in itertools.pairwise(times))


def test_an_unreachable_webhook_is_recorded_with_its_error(api: Api) -> None:
    api.run({}, webhook="http://127.0.0.1:9/nothing-listens-here")

    wait_until(lambda: webhook_log(api.sim), timeout=10, what="a webhook attempt")

    (attempt,) = webhook_log(api.sim)
    assert attempt["status_code"] is None and attempt["error"] and not attempt["delivered"]


# -- rate limits ----------------------------------------------------------------------------------------


def test_over_the_rate_limit_is_429_with_retry_after_until_the_window_passes(tuned: Api) -> None:
    answers = [tuned.post("run", {"input": {}}) for _ in range(11)]

    assert [r.status_code for r in answers] == [200] * 10 + [429]
    refused = answers[-1]
    assert "error" in refused.json() and 1 <= int(refused.headers["Retry-After"]) <= 10
    assert len(tuned.sim.jobs()) == 10
    tuned.advance(10)
    assert tuned.post("run", {"input": {}}).status_code == 200


def test_status_sync_counts_against_the_status_rate_limit(tuned: Api) -> None:
    job_id = tuned.post("runsync", {"input": {}}).json()["id"]
    allowed = [tuned.get(f"status/{job_id}").status_code for _ in range(20)]  # 1 % of 2000 per 10 s

    refused = tuned.get(f"status-sync/{job_id}", params={"wait": 1000})
    tuned.advance(10)

    assert allowed == [200] * 20
    assert refused.status_code == 429 and "status" in refused.json()["error"]
    assert tuned.get(f"status-sync/{job_id}", params={"wait": 1000}).status_code == 200


def test_purge_queue_allows_only_a_couple_of_calls_per_ten_seconds(api: Api) -> None:
    answers = [api.post("purge-queue").status_code for _ in range(3)]

    assert answers == [200, 200, 429]


def test_run_is_refused_with_429_once_more_than_50_jobs_wait_and_there_are_no_workers(api: Api) -> None:
    api.configure(workers_max=0)
    for _ in range(51):
        api.run({})

    refused = api.post("run", {"input": {}})

    assert refused.status_code == 429 and "queue" in refused.json()["error"]
    assert api.health()["jobs"]["inQueue"] == 51


# -- faults ---------------------------------------------------------------------------------------------


def test_a_before_fault_fails_run_without_enqueuing_anything(api: Api) -> None:
    api.sim.set_faults({"op": "run", "kind": "5xx", "status": 502})

    response = api.post("run", {"input": {}})

    assert response.status_code == 502 and "error" in response.json()
    assert api.sim.jobs() == []


def test_an_after_5xx_fault_answers_503_although_the_job_was_enqueued_and_runs(api: Api) -> None:
    api.sim.set_faults({"op": "run", "kind": "5xx", "when": "after"})

    response = api.post("run", {"input": {"output": "ran anyway"}})

    assert response.status_code == 503
    (record,) = api.sim.jobs()
    assert api.wait_status(record["id"], "COMPLETED")["output"] == "ran anyway"


def test_a_429_fault_carries_its_retry_after(api: Api) -> None:
    api.sim.set_faults({"op": "status", "kind": "429", "retry_after": 7})

    response = api.get("status/anything")

    assert response.status_code == 429 and response.headers["Retry-After"] == "7"


def test_a_slow_after_fault_makes_the_client_time_out_but_the_job_exists(api: Api) -> None:
    api.sim.set_faults({"op": "run", "kind": "slow", "delay": 3, "when": "after"})

    with pytest.raises(httpx.ReadTimeout):
        api.post("run", {"input": {}}, timeout=0.5)

    assert len(api.sim.jobs(api.endpoint)) == 1


def test_a_dropped_connection_after_run_leaves_the_job_enqueued(api: Api) -> None:
    api.sim.set_faults({"op": "run", "kind": "drop", "when": "after"})

    with pytest.raises(httpx.RemoteProtocolError):
        api.post("run", {"input": {}})

    assert len(api.sim.jobs(api.endpoint)) == 1


def test_a_dropped_connection_before_cancel_leaves_the_job_untouched(api: Api) -> None:
    job_id = api.run({"sleep": 60})
    api.sim.set_faults({"op": "cancel", "kind": "drop"})

    with pytest.raises(httpx.RemoteProtocolError):
        api.post(f"cancel/{job_id}")

    assert api.status(job_id)["status"] in ("IN_QUEUE", "IN_PROGRESS")


def test_a_counted_fault_on_one_endpoint_expires_and_spares_other_endpoints(api: Api) -> None:
    api.sim.set_faults({"op": "*", "endpoint": api.endpoint, "kind": "5xx", "count": 2})

    other_endpoint = api.sim.create_endpoint()
    mine = [api.get("health").status_code for _ in range(3)]
    other = api.http.get(f"/{other_endpoint}/health").status_code

    assert mine == [503, 503, 200] and other == 200
    assert api.sim.control.get("/_sim/faults").json() == {"faults": []}


def test_deleting_faults_clears_them_and_malformed_rules_are_400(api: Api) -> None:
    api.sim.set_faults({"kind": "5xx"})
    assert api.get("health").status_code == 503

    assert api.sim.control.delete("/_sim/faults").status_code == 200
    assert api.get("health").status_code == 200
    bad = api.sim.control.post("/_sim/faults", json={"faults": [{"kind": "meteor"}]})
    assert bad.status_code == 400 and "kind" in bad.json()["error"]


# -- user handlers --------------------------------------------------------------------------------------


def test_a_users_plain_handler_runs_with_the_sdks_result_and_error_semantics(
    start_simulator: Callable[..., SimulatorProcess],
) -> None:
    sim = start_simulator("--handler", "tests.integration.simulator_handlers:plain", "--cold-start-seconds", "0")
    with open_api(sim) as api:
        _check_plain_handler(api)


def _check_plain_handler(api: Api) -> None:

    ok = api.post("runsync", {"input": {"x": 1}}).json()
    soft = api.post("runsync", {"input": {"soft_error": "bad input"}}).json()
    crash = api.post("runsync", {"input": {"raise": "kaboom"}}).json()

    assert ok["status"] == "COMPLETED" and ok["output"] == {"handled": {"x": 1}, "job_id": ok["id"]}
    assert (soft["status"], soft["error"], soft["output"]) == ("FAILED", "bad input", {"partial": True})
    error = json.loads(crash["error"])
    assert crash["status"] == "FAILED" and error["error_type"] == "<class 'RuntimeError'>"
    assert error["error_message"] == "kaboom" and "Traceback" in error["error_traceback"]


def test_a_users_generator_handler_streams_its_items_and_fails_with_the_sdks_string_when_it_raises(
    start_simulator: Callable[..., SimulatorProcess],
) -> None:
    sim = start_simulator("--handler", "tests.integration.simulator_handlers:tokens", "--cold-start-seconds", "0")
    with open_api(sim) as api:
        _check_generator_handler(api)


def _check_generator_handler(api: Api) -> None:
    job_id = api.run({"text": "one two three"})
    broken = api.run({"text": "partial", "raise": "tokenizer crashed"})

    done = api.wait_status(job_id, "COMPLETED")
    streamed = api.get(f"stream/{job_id}").json()
    failed = api.wait_status(broken, "FAILED")

    # The worker file's start() does not set return_aggregate_stream: the chunks are only in /stream.
    assert done["output"] == []
    assert streamed == {"status": "COMPLETED", "stream": [{"output": w} for w in ("one", "two", "three")]}
    assert failed["error"].startswith("handler: tokenizer crashed \ntraceback: Traceback (most recent call last):")
    assert failed["error"].rstrip().endswith("RuntimeError: tokenizer crashed") and "output" not in failed
    assert api.get(f"stream/{broken}").json()["stream"] == [{"output": "partial"}]


def test_a_worker_file_that_sets_return_aggregate_stream_gets_its_items_as_the_output(
    start_simulator: Callable[..., SimulatorProcess],
) -> None:
    sim = start_simulator("--handler", "tests.integration.simulator_handlers_aggregating:tokens",
                          "--cold-start-seconds", "0")
    with open_api(sim) as api:
        job_id = api.run({"text": "one two"})

        assert api.wait_status(job_id, "COMPLETED")["output"] == ["one", "two"]
        assert [c["output"] for c in api.get(f"stream/{job_id}").json()["stream"]] == ["one", "two"]


# -- result and chunk limits, startup endpoints, the other readings --------------------------------------


@pytest.fixture(scope="module")
def _variant(start_simulator: Callable[..., SimulatorProcess]) -> SimulatorProcess:
    return start_simulator(
        "--cold-start-seconds", "0",
        "--max-result-bytes", "200",
        "--max-stream-chunk-bytes", "16",
        "--status-sync-mode", "change",
        "--return-aggregate-stream",
        *endpoint_flags("startup-a", "startup-b"),
    )  # fmt: skip


@pytest.fixture
def variant(_variant: SimulatorProcess) -> Iterator[Api]:
    """A simulator with tiny result and chunk limits, status-sync answering on change, aggregated streams."""
    _variant.reset()
    with open_api(_variant) as opened:
        yield opened


def test_a_result_over_the_limit_is_dropped_and_the_job_shows_completed_without_output(variant: Api) -> None:
    fits = variant.run({"output": "x" * 150})
    too_big = variant.run({"output": "x" * 200})

    assert variant.wait_status(fits, "COMPLETED")["output"] == "x" * 150
    dropped = variant.wait_status(too_big, "COMPLETED")
    assert set(dropped) == {"id", "status", "delayTime", "executionTime", "workerId"}
    assert variant.record(too_big)["dropped_result_bytes"] == len('{"output": ""}') + 200
    assert variant.record(fits)["dropped_result_bytes"] is None
    assert variant.health()["jobs"]["completed"] == 2 and variant.health()["jobs"]["failed"] == 0


def test_a_streamed_chunk_over_the_limit_arrives_as_string_pieces_and_the_output_keeps_it_whole(
    variant: Api,
) -> None:
    chunks = ["short", "é" * 10, {"text": "x" * 12}]
    job_id = variant.run({"stream": chunks})

    done = variant.wait_status(job_id, "COMPLETED")
    pieces = [item["output"] for item in variant.get(f"stream/{job_id}").json()["stream"]]

    assert pieces == ["short", "é" * 8, "é" * 2, '{"text": "xxxxxx', 'xxxxxx"}']
    assert all(len(piece.encode()) <= 16 for piece in pieces)
    assert done["output"] == chunks  # aggregated by the worker, before any streaming limit


def test_the_aggregate_flag_is_each_new_endpoints_default_and_can_be_switched_off(variant: Api) -> None:
    aggregated = variant.run({"stream": ["a"]})
    variant.configure(return_aggregate_stream=False)
    not_aggregated = variant.run({"stream": ["a"]})

    assert variant.wait_status(aggregated, "COMPLETED")["output"] == ["a"]
    assert variant.wait_status(not_aggregated, "COMPLETED")["output"] == []


def test_status_sync_in_change_mode_answers_as_soon_as_the_status_moves(variant: Api) -> None:
    variant.configure(workers_max=0)
    job_id = variant.run({"sleep": 60})
    held = variant.held_open(lambda: variant.get(f"status-sync/{job_id}", params={"wait": 60_000}), job_id)

    variant.configure(workers_max=1)

    answer = held.result(timeout=10).json()
    assert answer["status"] == "IN_PROGRESS" and answer["id"] == job_id


def test_startup_endpoints_exist_at_once_and_come_back_with_their_startup_settings_after_reset(
    variant: Api,
) -> None:
    variant.sim.configure_endpoint("startup-a", workers_max=0)
    created = variant.endpoint

    variant.sim.reset()

    endpoints = {ep["id"]: ep for ep in variant.sim.control.get("/_sim/endpoints").json()["endpoints"]}
    assert sorted(endpoints) == ["startup-a", "startup-b"] and created not in endpoints
    assert endpoints["startup-a"]["workers_max"] == 3 and endpoints["startup-a"]["return_aggregate_stream"] is True
    assert variant.http.post("/startup-b/runsync", json={"input": {"output": 1}}).json()["output"] == 1


# -- control API ----------------------------------------------------------------------------------------


def test_sim_jobs_lists_every_job_with_its_request_and_iso_timestamps(api: Api) -> None:
    run_id = api.run({"a": 1}, policy={"ttl": 60_000}, webhook="http://127.0.0.1:9/h")
    sync_id = api.post("runsync", {"input": {"b": 2}}).json()["id"]
    api.http.post(f"/{api.sim.create_endpoint()}/run", json={"input": {}})
    api.wait_status(run_id, "COMPLETED")

    records = api.sim.jobs(api.endpoint)

    assert [r["id"] for r in records] == [run_id, sync_id] and len(api.sim.jobs()) == 3
    first = records[0]
    assert (
        first["input"] == {"a": 1} and first["policy"] == {"ttl": 60_000} and first["webhook"] == "http://127.0.0.1:9/h"
    )
    assert (first["sync"], records[1]["sync"], first["attempts"], first["deleted"]) == (False, True, 1, False)
    assert first["created_at"].endswith("Z") and first["finished_at"] >= first["started_at"] >= first["created_at"]


def test_reset_forgets_jobs_faults_the_clock_and_created_endpoints_but_keeps_startup_ones_as_started(
    api: Api,
) -> None:
    api.run({"sleep": 60})
    api.sim.configure_endpoint("ep", workers_max=0)  # "ep" is one of the shared simulator's --endpoint ids
    api.sim.set_faults({"op": "status", "kind": "5xx"})
    advanced = api.sim.control.post("/_sim/clock/advance", json={"seconds": 100}).json()

    api.sim.reset()

    assert advanced["offset"] == pytest.approx(100, abs=1)
    assert api.sim.jobs() == [] and api.sim.control.get("/_sim/faults").json() == {"faults": []}
    assert api.sim.control.get(f"/_sim/endpoints/{api.endpoint}").status_code == 404
    assert api.get("health").status_code == 404
    assert api.sim.control.get("/_sim/endpoints/ep").json()["workers_max"] == 3
    assert api.sim.control.post("/_sim/clock/advance", json={"seconds": 0}).json()["offset"] == 0
