"""What a simulated worker runs: the default scripted handler, or a user's real RunPod handler.

Both are adapted to one shape, :data:`Handler`: an async callable taking the job dict ``{"id", "input"}``
and a :class:`JobRuntime` (progress, stream chunks, clock-aware sleep) and returning an :class:`Outcome`.
The mapping from handler return values to job results follows the runpod SDK 1.12 (``rp_job.run_job`` and
``handle_job``): a returned dict's ``error`` fails the job and the rest is the output, ``refresh_worker`` is
stripped, an empty dict output is dropped, and an exception becomes a JSON error string.
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

#: Marks "no output" (distinct from an output of ``None``).
_MISSING: Any = object()


class JobRuntime(Protocol):
    """What a running job may do besides returning: report progress, stream chunks, sleep."""

    worker_id: str

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
        stream: [chunks]      yielded evenly over the sleep; the job's output is then the list of chunks
        fail: "message"       fail with this error after the work
        error_dict: true      with fail: the error is {"message": ...} instead of a string
        output: any           the output (default {"echo": input})
    """
    inp = job["input"]
    if not isinstance(inp, dict):
        return Outcome(output={"echo": inp})
    seconds = float(inp.get("sleep", 0) or 0)
    progress = list(inp.get("progress") or [])
    chunks = inp.get("stream")
    stream = list(chunks) if isinstance(chunks, list) else []
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
        return Outcome(output=stream if isinstance(chunks, list) else _MISSING, error=error)
    if isinstance(chunks, list):
        return Outcome(output=stream)
    return Outcome(output=inp.get("output", {"echo": inp}))


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


def wrap_user_handler(fn: Callable[..., Any]) -> Handler:
    """Adapt a RunPod handler (function, generator, async function or async generator) to :data:`Handler`."""

    async def run(job: dict[str, Any], rt: JobRuntime) -> Outcome:
        payload = dict(job)
        try:
            if inspect.isasyncgenfunction(fn):
                chunks: list[Any] = []
                async for chunk in fn(payload):
                    if (failure := _chunk_error(chunk)) is not None:
                        return Outcome(error=failure)
                    chunks.append(chunk)
                    rt.emit(chunk)
                return Outcome(output=chunks)
            if inspect.isgeneratorfunction(fn):
                chunks = []
                queue = _in_thread(lambda: fn(payload), on_item=lambda _: None)
                while not isinstance(item := await queue.get(), _ThreadDone):
                    if (failure := _chunk_error(item)) is not None:
                        return Outcome(error=failure)
                    chunks.append(item)
                    rt.emit(item)
                if item.exc is not None:
                    raise item.exc
                return Outcome(output=chunks)
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
    ``runpod.serverless.start({"handler": handler})``; that call is made a no-op during the import, so the
    SDK does not start a real worker inside the simulator.
    """
    if spec is None:
        return default_handler
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"handler must look like module:function, got {spec!r}")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    with _runpod_start_disabled():
        module = importlib.import_module(module_name)
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise ValueError(f"{spec!r} is not a callable")
    return wrap_user_handler(fn)


@contextlib.contextmanager
def _runpod_start_disabled() -> Iterator[None]:
    uvicorn_logger = logging.getLogger("uvicorn")
    uvicorn_level = uvicorn_logger.level  # importing runpod turns uvicorn's logging down to WARNING
    if importlib.util.find_spec("runpod") is None:
        yield
        return
    serverless = importlib.import_module("runpod.serverless")
    original = getattr(serverless, "start", None)
    setattr(serverless, "start", lambda config: None)  # noqa: B010 - a module attribute, swapped on purpose
    try:
        yield
    finally:
        setattr(serverless, "start", original)  # noqa: B010
        uvicorn_logger.setLevel(uvicorn_level)
