"""A RunPod worker file that sets ``return_aggregate_stream``, for ``rpq simulator --handler``.

With the flag, RunPod (and the simulator) also show a generator's items as the job's output in
``/status``; the simulator reads it from the ``runpod.serverless.start(...)`` call below.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import runpod


def tokens(job: dict[str, Any]) -> Iterator[str]:
    """Stream the input's words one at a time."""
    yield from str(job["input"]["text"]).split()


runpod.serverless.start({"handler": tokens, "return_aggregate_stream": True})
