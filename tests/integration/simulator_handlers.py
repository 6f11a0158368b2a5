"""A RunPod worker file for ``rpq simulator --handler``, written the way users write them.

It ends with ``runpod.serverless.start(...)`` like real worker files; the simulator turns that call
into a no-op while importing, so only the handler functions are used.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import runpod


def plain(job: dict[str, Any]) -> Any:
    """Echo the input; ``raise`` raises, ``soft_error`` returns an error the SDK way."""
    job_input = job["input"]
    if job_input.get("raise"):
        raise RuntimeError(job_input["raise"])
    if job_input.get("soft_error"):
        return {"error": job_input["soft_error"], "partial": True, "refresh_worker": True}
    return {"handled": job_input, "job_id": job["id"]}


def tokens(job: dict[str, Any]) -> Iterator[str]:
    """Stream the input's words one at a time; ``raise`` raises after them."""
    yield from str(job["input"]["text"]).split()
    if job["input"].get("raise"):
        raise RuntimeError(job["input"]["raise"])


runpod.serverless.start({"handler": plain})
