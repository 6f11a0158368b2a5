"""What a simulated worker runs: the default scripted handler, or a user's real RunPod handler.

Both are adapted to one shape, :data:`Handler`: an async callable taking the job dict ``{"id", "input"}``
and a :class:`JobRuntime` (progress, stream chunks, clock-aware sleep) and returning an :class:`Outcome`.
The mapping from handler return values to job results follows the runpod SDK 1.12 (``rp_job.run_job`` and
``handle_job``): a returned dict's ``error`` fails the job and the rest is the output, ``refresh_worker`` is
stripped, an empty dict output is dropped, and an exception becomes a JSON error string.

Generator (streaming) handlers follow ``handle_job`` and ``run_job_generator``: each item is streamed; the
job's output is the list of items only when the worker sets ``return_aggregate_stream``, else ``[]`` (RunPod
docs: "By default, outputs from streaming handlers are only available using the /stream operation"). An item
that is a dict with a truthy ``error`` fails the job with ``str(error)``, and an exception fails it with the
plain string ``"handler: <message> \ntraceback: <traceback>"``; either way the job has no output.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import importlib.metadata
import importlib.util
import inspect
import json
import logging
import os
import sys
import threading
import traceback
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import rpq_worker
from jobs.simulator import transfers

#: Marks "no output" (distinct from an output of ``None``).
_MISSING: Any = object()


class JobRuntime(Protocol):
    """What a running job may do besides returning: report progress, stream chunks, sleep."""

    worker_id: str
    #: The endpoint's ``return_aggregate_stream`` setting, which the default handler follows.
    return_aggregate_stream: bool

    def progress(self, update: Any) -> None: ...

    def emit(self, chunk: Any) -> None: ...

    async def sleep(self, seconds: float) -> None: ...


@dataclass
class Outcome:
    """How a handler run ended. ``error`` set means FAILED; otherwise COMPLETED."""

    output: Any = _MISSING
    error: Any = None

    @property
    def has_output(self) -> bool:
        return self.output is not _MISSING

    @property
    def failed(self) -> bool:
        # The SDK fails a job only on a truthy error (`if error_msg:`).
        return bool(self.error)


Handler = Callable[[dict[str, Any], JobRuntime], Awaitable[Outcome]]


def _runpod_version() -> str:
    try:
        return importlib.metadata.version("runpod")
    except importlib.metadata.PackageNotFoundError:
        return "rpq-simulator"


def exception_error(exc: BaseException, worker_id: str) -> str:
    """The SDK's error string for an uncaught handler exception (rp_job.run_job)."""
    return json.dumps(
        {
            "error_type": str(type(exc)),
            "error_message": str(exc),
            "error_traceback": "".join(traceback.format_exception(exc)),
            "hostname": "rpq-simulator",
            "worker_id": worker_id,
            "runpod_version": _runpod_version(),
        }
    )


def generator_exception_error(exc: BaseException) -> str:
    """The SDK's error string for an exception raised inside a generator handler (rp_job.run_job_generator)."""
    return f"handler: {exc} \ntraceback: {''.join(traceback.format_exception(exc))}"


def outcome_from_return(value: Any) -> Outcome:
    """Turn a (non-generator) handler's return value into an outcome, as the SDK does."""
    if isinstance(value, dict):
        value = dict(value)
        error = value.pop("error", None)
        value.pop("refresh_worker", None)
        outcome = Outcome(output=value, error=error)
    else:
        outcome = Outcome(output=value)
    if outcome.output == {}:
        outcome.output = _MISSING
    return outcome


async def default_handler(job: dict[str, Any], rt: JobRuntime) -> Outcome:
    """A scripted stand-in for a model, driven by the job's input.

    Input keys (all optional; a non-dict input is simply echoed)::

        sleep: seconds of "work", on the simulator clock
        progress: [updates]   reported evenly over the sleep
        stream: [chunks]      a generator handler: the chunks are yielded evenly over the sleep; the output
                              is [] (RunPod's default) or, with return_aggregate_stream, the list of chunks
        return_aggregate_stream: bool   with stream: overrides the endpoint's setting for this job
        fail: "message"       fail with this error after the work (a streaming job: as a yielded
                              {"error": ...} item, so the error is str()'d and there is no output)
        error_dict: true      with fail: the error is {"message": ...} instead of a string
        output: any           the output (default {"echo": input})
        read_inputs: {name: url}   before the work, GET each URL; the output gains
                              {"inputs": {name: {"bytes", "sha256"}}}
        read_inputs: true     the same for every file in rpq's block (input["rpq"]["files"])
        write_output: {name, bytes, url, content_type} or a list of them   after the work (unless it
                              fails), PUT that many deterministic bytes with exactly that Content-Type
                              and Content-Length; the output gains {"outputs": {name: {"bytes", "sha256"}}}
        write_output: {name, bytes} (no url)   the same, to the URL and with the headers rpq's block
                              declares for that output; a name it does not declare fails the job

    The input rpq sends a job with files carries its reserved block under "rpq" (see rpq_worker); the
    directives are the rest of the input. When rpq offloaded the input (the block, with an input_url, is
    all there is), the document at input_url is fetched first and its directives are followed as if they
    had come inline. An echo never includes the block: its URLs are credentials until they expire.

    File reports are merged into a dict output (a non-dict output moves under "output"; with no output
    given, the reports alone, not an echo of the URLs); a streaming job's output stays the list of chunks.
    A transfer that fails fails the job, naming the file.
    """
    inp = job["input"]
    if not isinstance(inp, dict):
        return Outcome(output={"echo": inp})
    try:
        block = rpq_worker.read_block(inp)
    except rpq_worker.ProtocolError as exc:
        return Outcome(error=f"bad file transfer input: {exc}")
    if block is not None and block.input_url is not None:
        try:
            inp = await transfers.fetch_input(block.input_url)
        except transfers.TransferError as exc:
            return Outcome(error=str(exc))
        if not isinstance(inp, dict):
            return Outcome(output={"echo": inp})
    elif block is not None:
        inp = {key: value for key, value in inp.items() if key != rpq_worker.RESERVED_KEY}
    reads, uploads, problems = transfers.parse(inp, block)
    if problems:
        return Outcome(error="bad file transfer input: " + "; ".join(problems))
    files: dict[str, Any] = {}
    try:
        if reads:
            files["inputs"] = await transfers.read_all(reads)
    except transfers.TransferError as exc:
        return Outcome(error=str(exc))
    seconds = float(inp.get("sleep", 0) or 0)
    progress = list(inp.get("progress") or [])
    chunks = inp.get("stream")
    stream = list(chunks) if isinstance(chunks, list) else []
    aggregate = inp.get("return_aggregate_stream")
    if not isinstance(aggregate, bool):
        aggregate = rt.return_aggregate_stream
    steps = max(len(progress), len(stream))
    slice_ = seconds / (steps + 1)
    for i in range(steps):
        await rt.sleep(slice_)
        if i < len(progress):
            rt.progress(progress[i])
        if i < len(stream):
            rt.emit(stream[i])
    await rt.sleep(slice_)
    if inp.get("fail") is not None:
        message = str(inp["fail"])
        error: Any = {"message": message} if inp.get("error_dict") else message
        if isinstance(chunks, list):
            return Outcome(error=str(error))  # SDK handle_job: a streamed error item ends as {"error": str(...)}
        return Outcome(error=error)
    try:
        if uploads:
            files["outputs"] = await transfers.write_all(uploads)
    except transfers.TransferError as exc:
        return Outcome(error=str(exc))
    if isinstance(chunks, list):
        return Outcome(output=stream if aggregate else [])
    if not files:
        return Outcome(output=inp.get("output", {"echo": inp}))
    # No echo by default here: it would repeat the presigned URLs, which are credentials until they expire.
    output = inp.get("output", {})
    output = {**output, **files} if isinstance(output, dict) else {"output": output, **files}
    return Outcome(output=output)


# -- user handlers --------------------------------------------------------------------------------------


class _ThreadDone:
    """Sentinel put on the queue when a thread-run handler finishes."""

    def __init__(self, value: Any = None, exc: BaseException | None = None) -> None:
        self.value = value
        self.exc = exc


def _in_thread(fn: Callable[[], Any], on_item: Callable[[Any], None] | None) -> asyncio.Queue[Any]:
    """Run ``fn`` in a daemon thread, feeding generator items and the end marker to an asyncio queue.

    A daemon thread (rather than the loop's executor) so that a handler which never returns cannot block
    the simulator's shutdown; a cancelled job simply stops listening to it.
    """
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[Any] = asyncio.Queue()

    def put(item: Any) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: the simulator stopped
            loop.call_soon_threadsafe(queue.put_nowait, item)

    def target() -> None:
        try:
            result = fn()
            if on_item is not None:
                for item in result:
                    put(item)
                put(_ThreadDone())
            else:
                put(_ThreadDone(value=result))
        except BaseException as exc:
            put(_ThreadDone(exc=exc))

    threading.Thread(target=target, name="sim-handler", daemon=True).start()
    return queue


def wrap_user_handler(fn: Callable[..., Any], *, return_aggregate_stream: bool = False) -> Handler:
    """Adapt a RunPod handler (function, generator, async function or async generator) to :data:`Handler`.

    ``return_aggregate_stream`` is the worker's ``runpod.serverless.start()`` flag: a generator's items
    become its output only when it is set; otherwise the output is ``[]``, as the SDK sends it.
    """

    def streamed(chunks: list[Any]) -> Outcome:
        return Outcome(output=chunks if return_aggregate_stream else [])

    async def run(job: dict[str, Any], rt: JobRuntime) -> Outcome:
        payload = dict(job)
        chunks: list[Any] = []
        if inspect.isasyncgenfunction(fn):
            try:
                async for chunk in fn(payload):
                    if (failure := _chunk_error(chunk)) is not None:
                        return Outcome(error=failure)
                    chunks.append(chunk)
                    rt.emit(chunk)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                return Outcome(error=generator_exception_error(exc))
            return streamed(chunks)
        if inspect.isgeneratorfunction(fn):
            queue = _in_thread(lambda: fn(payload), on_item=lambda _: None)
            while not isinstance(item := await queue.get(), _ThreadDone):
                if (failure := _chunk_error(item)) is not None:
                    return Outcome(error=failure)
                chunks.append(item)
                rt.emit(item)
            if isinstance(item.exc, Exception):
                return Outcome(error=generator_exception_error(item.exc))
            if item.exc is not None:
                raise item.exc
            return streamed(chunks)
        try:
            if inspect.iscoroutinefunction(fn):
                return outcome_from_return(await fn(payload))
            done = await _in_thread(lambda: fn(payload), on_item=None).get()
            if done.exc is not None:
                raise done.exc
            value = done.value
            if inspect.isawaitable(value):
                value = await value
            return outcome_from_return(value)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            return Outcome(error=exception_error(exc, rt.worker_id))

    return run


def _chunk_error(chunk: Any) -> str | None:
    """A streamed dict carrying a truthy ``error`` ends the job as FAILED (SDK ``handle_job``)."""
    if isinstance(chunk, dict) and chunk.get("error"):
        return str(chunk["error"])
    return None


def load_handler(spec: str | None) -> Handler:
    """The default handler, or ``module:function`` imported and wrapped.

    The current directory is put on ``sys.path`` first (as uvicorn does for apps), so a worker file next
    to where ``rpq simulator`` runs can be named directly. Worker files usually end with
    ``runpod.serverless.start({"handler": handler, ...})``; that call only records its config during the
    import, so the SDK does not start a real worker inside the simulator, and the config's
    ``return_aggregate_stream`` applies to the named handler as it would to the worker's. (A module that was
    imported before, outside this function, made no recorded start() call: its flag reads as unset.)
    """
    if spec is None:
        return default_handler
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"handler must look like module:function, got {spec!r}")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    with _runpod_start_recorded() as started:
        module = importlib.import_module(module_name)
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ValueError(f"{spec!r} is not a callable")
    # The last start() wins: it is the worker file's own, made after whatever its imports did.
    worker_config = _worker_configs.setdefault(module_name, started[-1] if started else {})
    return wrap_user_handler(fn, return_aggregate_stream=bool(worker_config.get("return_aggregate_stream", False)))


#: The start() config each worker module made while :func:`load_handler` imported it (a module runs once).
_worker_configs: dict[str, dict[str, Any]] = {}


@contextlib.contextmanager
def _runpod_start_recorded() -> Iterator[list[dict[str, Any]]]:
    """Swap ``runpod.serverless.start`` for a recorder of its config while a worker file is imported."""
    started: list[dict[str, Any]] = []
    uvicorn_logger = logging.getLogger("uvicorn")
    uvicorn_level = uvicorn_logger.level  # importing runpod turns uvicorn's logging down to WARNING
    if importlib.util.find_spec("runpod") is None:
        yield started
        return
    serverless = importlib.import_module("runpod.serverless")
    original = getattr(serverless, "start", None)

    def record(config: dict[str, Any]) -> None:
        started.append(dict(config) if isinstance(config, dict) else {})

    setattr(serverless, "start", record)  # noqa: B010 - a module attribute, swapped on purpose
    try:
        yield started
    finally:
        setattr(serverless, "start", original)  # noqa: B010
        uvicorn_logger.setLevel(uvicorn_level)
