"""The default handler and the adapter for users' RunPod handlers, following runpod SDK 1.12 semantics."""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import pytest

from jobs.simulator import transfers
from jobs.simulator.handlers import Outcome, default_handler, load_handler, outcome_from_return, wrap_user_handler
from tests.object_server import Misbehave, ObjectServer, serving


class Recorder:
    """A JobRuntime that records what the handler reported and sleeps for no real time."""

    worker_id = "w-test"

    def __init__(self, *, return_aggregate_stream: bool = False) -> None:
        self.return_aggregate_stream = return_aggregate_stream
        self.events: list[tuple[str, Any]] = []
        self.slept = 0.0

    def progress(self, update: Any) -> None:
        self.events.append(("progress", update))

    def emit(self, chunk: Any) -> None:
        self.events.append(("chunk", chunk))

    async def sleep(self, seconds: float) -> None:
        self.slept += seconds


def run(handler: Any, job_input: Any, *, return_aggregate_stream: bool = False) -> tuple[Outcome, Recorder]:
    rt = Recorder(return_aggregate_stream=return_aggregate_stream)
    outcome = asyncio.run(handler({"id": "job-1", "input": job_input}, rt))
    return outcome, rt


# -- SDK return-value semantics -------------------------------------------------------------------------


def test_a_returned_error_fails_the_job_and_the_rest_is_output_without_refresh_worker() -> None:
    outcome = outcome_from_return({"error": "bad", "partial": 1, "refresh_worker": True})

    assert outcome.failed and outcome.error == "bad" and outcome.output == {"partial": 1}


def test_an_empty_dict_output_is_dropped_like_the_sdk_does() -> None:
    outcome = outcome_from_return({"refresh_worker": True})

    assert not outcome.has_output and not outcome.failed


def test_a_falsy_error_does_not_fail_the_job() -> None:
    outcome = outcome_from_return({"error": "", "value": 2})

    assert not outcome.failed and outcome.output == {"value": 2}


# -- default handler ------------------------------------------------------------------------------------


def test_the_default_handler_echoes_its_input_after_sleeping() -> None:
    outcome, rt = run(default_handler, {"sleep": 2})

    assert outcome.output == {"echo": {"sleep": 2}} and rt.slept == pytest.approx(2)


def test_the_default_handler_echoes_a_non_dict_input() -> None:
    outcome, _ = run(default_handler, "hello")

    assert outcome.output == {"echo": "hello"}


def test_the_default_handler_spreads_progress_and_chunks_over_the_sleep_and_outputs_an_empty_list() -> None:
    outcome, rt = run(default_handler, {"sleep": 3, "progress": ["p1", "p2"], "stream": ["a", "b"]})

    assert rt.events == [("progress", "p1"), ("chunk", "a"), ("progress", "p2"), ("chunk", "b")]
    assert outcome.output == [] and rt.slept == pytest.approx(3)


def test_the_default_handler_outputs_the_chunks_when_the_endpoint_aggregates_unless_the_job_opts_out() -> None:
    aggregated, _ = run(default_handler, {"stream": ["a", "b"]}, return_aggregate_stream=True)
    opted_out, _ = run(default_handler, {"stream": ["a"], "return_aggregate_stream": False},
                       return_aggregate_stream=True)
    opted_in, _ = run(default_handler, {"stream": ["a"], "return_aggregate_stream": True})

    assert (aggregated.output, opted_out.output, opted_in.output) == (["a", "b"], [], ["a"])


def test_a_failing_streaming_default_job_fails_like_a_yielded_error_with_a_string_and_no_output() -> None:
    outcome, rt = run(default_handler, {"stream": ["a"], "fail": "lost", "error_dict": True},
                      return_aggregate_stream=True)

    assert rt.events == [("chunk", "a")]
    assert outcome.error == "{'message': 'lost'}" and not outcome.has_output


def test_the_default_handler_fails_with_a_string_or_a_dict_error() -> None:
    as_string, _ = run(default_handler, {"fail": "out of memory"})
    as_dict, _ = run(default_handler, {"fail": "out of memory", "error_dict": True})

    assert as_string.error == "out of memory" and not as_string.has_output
    assert as_dict.error == {"message": "out of memory"}


def test_bad_file_transfer_input_fails_the_job_listing_every_problem_before_any_work() -> None:
    outcome, rt = run(default_handler, {
        "sleep": 5,
        "read_inputs": {"audio": "ftp://host/a.wav"},
        "write_output": [{"name": "", "bytes": -1, "url": "not a url"}, "x",
                         {"name": "v.mp4", "bytes": 1, "url": "http://h/v", "content_type": "video/mp4"},
                         {"name": "v.mp4", "bytes": 2, "url": "http://h/w", "content_type": "video/mp4"}],
    })

    assert outcome.error == (
        "bad file transfer input: read_inputs.audio: must be an http(s) URL; "
        "write_output[0].name: must be a non-empty string; write_output[0].bytes: must be a whole number from 0; "
        "write_output[0].url: must be an http(s) URL; write_output[0].content_type: must be a non-empty string; "
        "write_output[1]: must be an object with name, bytes, url, content_type; "
        "write_output: name 'v.mp4' appears more than once")
    assert not outcome.has_output and rt.slept == 0


def test_an_upload_is_sent_unchunked_with_exactly_the_signed_headers_and_reports_its_sha256() -> None:
    seen: list[httpx.Request] = []
    bodies: list[bytes] = []

    async def receive(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        bodies.append(b"".join([chunk async for chunk in request.stream]))  # type: ignore[union-attr]
        return httpx.Response(200)

    async def send() -> dict[str, Any]:
        async with httpx.AsyncClient(transport=httpx.MockTransport(receive)) as client:
            return await transfers.upload(client, transfers.Upload("v.mp4", 200_000, "http://s3/b/k?sig=1",
                                                                   {"Content-Type": "video/mp4"}))

    report = asyncio.run(send())

    (request,), (body,) = seen, bodies
    assert request.method == "PUT" and "transfer-encoding" not in request.headers
    assert (request.headers["content-type"], request.headers["content-length"]) == ("video/mp4", "200000")
    assert report == {"bytes": 200_000, "sha256": hashlib.sha256(body).hexdigest()}
    assert report["sha256"] == transfers.generated_sha256("v.mp4", 200_000) != transfers.generated_sha256("w", 200_000)


def test_a_url_in_a_message_loses_its_query() -> None:
    assert transfers.without_query("https://b.s3.example/k/v.mp4?X-Amz-Signature=abc#f") == \
        "https://b.s3.example/k/v.mp4"


# -- the default handler and rpq's block ------------------------------------------------------------------


@pytest.fixture
def server() -> Iterator[ObjectServer]:
    with serving() as running:
        yield running


def rpq_block(server: ObjectServer, files: dict[str, bytes] | None = None,
              outputs: dict[str, str] | None = None, **extra: Any) -> dict[str, Any]:
    """rpq's block for inputs served by ``server`` and outputs ({name: content type}) to be PUT there."""
    for name, data in (files or {}).items():
        server.objects[f"/in/{name}"] = data
    return {"version": 1, **extra,
            "files": {name: {"url": server.url(f"in/{name}"), "size": len(data)}
                      for name, data in (files or {}).items()},
            "outputs": {name: {"url": server.url(f"out/{name}"), "method": "PUT",
                               "headers": {"Content-Type": content_type}}
                        for name, content_type in (outputs or {}).items()}}


def report(data: bytes) -> dict[str, Any]:
    return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def test_read_inputs_true_reads_every_file_rpq_sent(server: ObjectServer) -> None:
    files = {"audio.wav": b"RIFF" * 1000, "frames/0001.png": b"\x89PNG"}

    outcome, _ = run(default_handler, {"read_inputs": True, "rpq": rpq_block(server, files)})

    assert outcome.output == {"inputs": {name: report(data) for name, data in files.items()}}
    assert [seen.path for seen in server.seen] == ["/in/audio.wav", "/in/frames/0001.png"]


def test_a_job_with_files_echoes_its_input_without_the_block_and_its_urls(server: ObjectServer) -> None:
    outcome, _ = run(default_handler, {"text": "hi", "rpq": rpq_block(server, {"a.wav": b"a"})})

    assert outcome.output == {"echo": {"text": "hi"}} and server.seen == []


def test_a_write_output_without_a_url_goes_where_rpq_declared_it_with_the_declared_headers(
        server: ObjectServer) -> None:
    block = rpq_block(server, outputs={"video.mp4": "video/mp4", "frames/0001.png": "image/png"})
    block["outputs"]["video.mp4"]["headers"]["x-amz-meta-job"] = "job-1"

    outcome, _ = run(default_handler, {"rpq": block, "output": {"model": "v1"}, "write_output": [
        {"name": "video.mp4", "bytes": 300_000},
        {"name": "frames/0001.png", "bytes": 10, "content_type": "image/png"}]})

    video, frame = server.requests("PUT", "out/video.mp4")[0], server.requests("PUT", "out/frames/0001.png")[0]
    assert outcome.output == {"model": "v1", "outputs": {
        "video.mp4": report(server.objects["/out/video.mp4"]), "frames/0001.png": report(server.objects[
            "/out/frames/0001.png"])}}
    assert (video.header("Content-Type"), video.header("Content-Length"), video.header("x-amz-meta-job")) == (
        "video/mp4", "300000", "job-1")
    assert (frame.header("Content-Type"), frame.body_size, frame.header("Transfer-Encoding")) == ("image/png", 10, None)
    assert video.query == "X-Amz-Signature=s3cr3t-signature&X-Amz-Credential=AKIA%2Fsecret"


def test_an_output_that_was_not_declared_fails_the_job_before_any_work_naming_it(server: ObjectServer) -> None:
    outcome, rt = run(default_handler, {"sleep": 5, "rpq": rpq_block(server, outputs={"video.mp4": "video/mp4"}),
                                        "write_output": {"name": "x.mp4", "bytes": 10}})

    assert outcome.error == ("bad file transfer input: write_output: output 'x.mp4' was not declared at submit; "
                             "declared: 'video.mp4'")
    assert rt.slept == 0 and server.seen == []


def test_declared_transfers_without_a_block_or_against_its_headers_list_every_problem(server: ObjectServer) -> None:
    no_block, _ = run(default_handler, {"read_inputs": True, "write_output": {"name": "v.mp4", "bytes": 1}})
    block = rpq_block(server, outputs={"v.mp4": "video/mp4"})
    block["outputs"]["v.mp4"]["headers"]["Content-Length"] = "100"
    against, _ = run(default_handler, {"rpq": block, "write_output": {"name": "v.mp4", "bytes": 99,
                                                                      "content_type": "video/webm"}})

    assert no_block.error == (
        "bad file transfer input: read_inputs: true reads the files rpq sent, but the input has no 'rpq' block "
        "(the job was submitted without files); write_output: output 'v.mp4' was not declared at submit; "
        "declared: none (the input has no 'rpq' block: the job was submitted without files)")
    assert against.error == (
        "bad file transfer input: write_output.content_type: output 'v.mp4' was declared with Content-Type "
        "'video/mp4'; leave content_type out to send the declared one; write_output.bytes: output 'v.mp4' was "
        "declared as 100 bytes")
    assert server.seen == []


def test_a_malformed_block_fails_the_job_with_the_parsers_problems() -> None:
    outcome, rt = run(default_handler, {"sleep": 1, "rpq": {"version": 2}})

    assert outcome.error == ("bad file transfer input: input.rpq.version: 2 is not the version this rpq_worker "
                             "speaks (1); use the rpq_worker.py of the rpq that sent the job")
    assert rt.slept == 0


def test_an_offloaded_input_is_fetched_and_its_directives_followed_as_if_inline(server: ObjectServer) -> None:
    server.objects["/in/failing.json"] = json.dumps({"sleep": 2, "progress": ["half"], "fail": "boom"}).encode()
    server.objects["/in/writing.json"] = json.dumps({"write_output": {"name": "v.mp4", "bytes": 1000},
                                                    "output": {"model": "v2"}}).encode()
    server.objects["/in/list.json"] = b"[1, 2]"

    failing, rt = run(default_handler, {"rpq": rpq_block(server, input_url=server.url("in/failing.json"))})
    writing, _ = run(default_handler, {"rpq": rpq_block(server, outputs={"v.mp4": "video/mp4"},
                                                        input_url=server.url("in/writing.json"))})
    echoed, _ = run(default_handler, {"rpq": rpq_block(server, input_url=server.url("in/list.json"))})

    assert failing.error == "boom" and rt.slept == pytest.approx(2) and rt.events == [("progress", "half")]
    assert writing.output == {"model": "v2", "outputs": {"v.mp4": report(server.objects["/out/v.mp4"])}}
    assert echoed.output == {"echo": [1, 2]}


@pytest.mark.parametrize(("document", "expected"), [
    (None, "answered HTTP 403"), (b"{not json", "is not JSON (Expecting property name enclosed in double quotes")])
def test_an_offloaded_input_that_cannot_be_read_fails_the_job_without_the_url_query(
        server: ObjectServer, document: bytes | None, expected: str) -> None:
    if document is None:
        server.then("in/input.json", Misbehave(status=403))
    else:
        server.objects["/in/input.json"] = document

    outcome, rt = run(default_handler, {"rpq": rpq_block(server, input_url=server.url("in/input.json"))})

    assert outcome.error.startswith("job input: ") and expected in outcome.error
    assert f"http://127.0.0.1:{server.port}/in/input.json" in outcome.error
    assert "s3cr3t" not in outcome.error and "X-Amz" not in outcome.error and rt.slept == 0


# -- user handlers --------------------------------------------------------------------------------------


def plain(job: dict[str, Any]) -> dict[str, Any]:
    return {"got": job["input"], "id": job["id"], "refresh_worker": True}


def broken(job: dict[str, Any]) -> None:
    raise ValueError("no GPU")


def counting(job: dict[str, Any]) -> Iterator[int]:
    yield from range(job["input"]["n"])


def breaking(job: dict[str, Any]) -> Iterator[int]:
    yield 1
    raise ValueError("disk full")


async def async_breaking(job: dict[str, Any]) -> AsyncIterator[int]:
    yield 1
    raise ValueError("disk full")


async def async_plain(job: dict[str, Any]) -> str:
    await asyncio.sleep(0)
    return "async ok"


async def async_counting(job: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
    yield {"token": "a"}
    yield {"error": "stream broke"}
    yield {"token": "never"}


def test_a_plain_user_handler_runs_in_a_thread_and_its_return_is_mapped() -> None:
    outcome, _ = run(wrap_user_handler(plain), {"x": 1})

    assert outcome.output == {"got": {"x": 1}, "id": "job-1"}


def test_an_exception_becomes_the_sdks_json_error_string() -> None:
    outcome, _ = run(wrap_user_handler(broken), {})

    error = json.loads(outcome.error)
    assert set(error) == {"error_type", "error_message", "error_traceback", "hostname", "worker_id", "runpod_version"}
    assert error["error_type"] == "<class 'ValueError'>" and error["error_message"] == "no GPU"
    assert error["worker_id"] == "w-test" and "no GPU" in error["error_traceback"]


def test_a_generator_handler_streams_each_item_and_its_output_is_an_empty_list_as_the_sdk_sends() -> None:
    outcome, rt = run(wrap_user_handler(counting), {"n": 3})

    assert rt.events == [("chunk", 0), ("chunk", 1), ("chunk", 2)] and outcome.output == []


def test_a_generator_handler_of_a_worker_that_aggregates_returns_every_item() -> None:
    outcome, rt = run(wrap_user_handler(counting, return_aggregate_stream=True), {"n": 3})

    assert rt.events == [("chunk", 0), ("chunk", 1), ("chunk", 2)] and outcome.output == [0, 1, 2]


def sdk_generator_error(handler: Any) -> str:
    """What the SDK itself (rp_job.run_job_generator) yields as the error of a generator that raises."""
    from runpod.serverless.modules.rp_job import run_job_generator

    async def items() -> list[dict[str, Any]]:
        return [item async for item in run_job_generator(handler, {"id": "job-1", "input": {}})]

    return str(asyncio.run(items())[-1]["error"])


@pytest.mark.parametrize("handler", [breaking, async_breaking])
def test_an_exception_in_a_generator_fails_with_the_sdks_plain_handler_traceback_string(handler: Any) -> None:
    outcome, rt = run(wrap_user_handler(handler, return_aggregate_stream=True), {})

    assert rt.events == [("chunk", 1)] and not outcome.has_output
    ours, sdks = outcome.error.splitlines(), sdk_generator_error(handler).splitlines()
    assert ours[:2] == sdks[:2] == ["handler: disk full ", "traceback: Traceback (most recent call last):"]
    assert ours[-1] == sdks[-1] == "ValueError: disk full"  # the frames in between are each runner's own


def test_an_async_handler_is_awaited() -> None:
    outcome, _ = run(wrap_user_handler(async_plain), {})

    assert outcome.output == "async ok"


def test_a_streamed_error_ends_an_async_generator_job_as_failed() -> None:
    outcome, rt = run(wrap_user_handler(async_counting), {})

    assert rt.events == [("chunk", {"token": "a"})]
    assert outcome.failed and outcome.error == "stream broke"


def test_load_handler_follows_the_return_aggregate_stream_flag_of_the_worker_files_start_call() -> None:
    aggregating, _ = run(load_handler("tests.unit.simulator_worker_aggregating:words"), {"text": "a b"})
    again, _ = run(load_handler("tests.unit.simulator_worker_aggregating:words"), {"text": "c"})
    plain_worker, _ = run(load_handler(f"{__name__}:counting"), {"n": 2})

    assert (aggregating.output, again.output, plain_worker.output) == (["a", "b"], ["c"], [])


def test_load_handler_imports_module_colon_function_and_refuses_anything_else() -> None:
    outcome, _ = run(load_handler(f"{__name__}:plain"), 5)

    assert outcome.output == {"got": 5, "id": "job-1"}
    assert load_handler(None) is default_handler
    with pytest.raises(ValueError, match="module:function"):
        load_handler("no_colon")
