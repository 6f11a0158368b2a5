"""Fixtures for the integration tests that drive interleavings by holding RunPod's answers, and s3rver."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from jobs.runpod.client import JobState, RunPodClient, StreamBatch
from jobs.runtime import Runtime
from tests.conftest import SimulatorProcess, fast_client
from tests.integration.s3rver import s3rver  # noqa: F401  (a fixture: pytest finds it here)

Hook = Callable[[], object]


class Interposed(RunPodClient):
    """The real client, with a one-shot hook per operation run after RunPod answered (or failed) and
    before the caller gets the answer; `replace` swaps the answer itself for a crafted one."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.hooks: dict[str, Hook] = {}
        self.replace: dict[str, Callable[[Any], Any]] = {}

    def _after(self, operation: str, answer: Any) -> Any:
        hook = self.hooks.pop(operation, None)
        if hook is not None:
            hook()
        swap = self.replace.pop(operation, None)
        return swap(answer) if swap is not None else answer

    def run(self, endpoint_id: str, input: Any, **kwargs: Any) -> JobState:
        answer: JobState = self._after("run", super().run(endpoint_id, input, **kwargs))
        return answer

    def status(self, endpoint_id: str, job_id: str) -> JobState:
        try:
            answer = super().status(endpoint_id, job_id)
        except Exception:
            self._after("status", None)
            raise
        state: JobState = self._after("status", answer)
        return state

    def stream(self, endpoint_id: str, job_id: str, *, wait_ms: int | None = None) -> StreamBatch:
        batch: StreamBatch = self._after("stream", super().stream(endpoint_id, job_id, wait_ms=wait_ms))
        return batch


@pytest.fixture
def interposed(runtime: Runtime, simulator: SimulatorProcess) -> Iterator[Interposed]:
    client = fast_client(simulator, Interposed)
    assert isinstance(client, Interposed)
    runtime.make_client = lambda: client
    runtime._client = client
    yield client


@pytest.fixture
def webhook_runtime(runtime: Runtime) -> Runtime:
    """`runtime` with webhooks on: each job gets a tokened webhook URL (nothing listens at it)."""
    runtime.settings = runtime.settings.model_copy(update={"runpod_webhook_base_url": "http://127.0.0.1:9"})
    return runtime
