"""A worker file whose ``runpod.serverless.start()`` asks for aggregated stream output.

Imported only through ``jobs.simulator.handlers.load_handler``, which records the start() call instead
of starting a real worker.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import runpod


def words(job: dict[str, Any]) -> Iterator[str]:
    yield from str(job["input"]["text"]).split()


runpod.serverless.start({"handler": words, "return_aggregate_stream": True})
