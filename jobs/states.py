"""A job's status: one enum, one transition table, everything else derived from them.

```mermaid
stateDiagram-v2
    [*] --> PENDING: submit() writes the row
    PENDING --> SUBMITTING: submit task claims it
    SUBMITTING --> PENDING: RunPod provably never saw it (refused, 429); try later
    SUBMITTING --> IN_QUEUE: /run answered with an id
    SUBMITTING --> FAILED: RunPod rejected the request
    SUBMITTING --> SUBMIT_UNKNOWN: /run timed out, or the worker died mid-call
    IN_QUEUE --> IN_PROGRESS
    IN_QUEUE --> COMPLETED
    IN_PROGRESS --> COMPLETED
    IN_QUEUE --> FAILED
    IN_PROGRESS --> FAILED
    IN_PROGRESS --> TIMED_OUT
    IN_PROGRESS --> EXPIRED: /status says 404 (retention or ttl)
    PENDING --> CANCELLED
    IN_PROGRESS --> CANCELLED
    SUBMIT_UNKNOWN --> IN_QUEUE: proof arrives (the late /run answer, or the job's own webhook)
    SUBMIT_UNKNOWN --> CANCELLED: operator gives up on it
    COMPLETED --> [*]
```

(IN_QUEUE may also go straight to TIMED_OUT, EXPIRED or CANCELLED; the table below is the full truth.)

A *retry* is not part of the lifecycle: it starts a new attempt of a finished job and is allowed
from `RETRYABLE` only. `SUBMIT_UNKNOWN` is never resubmitted automatically: it is left on its own
only with proof that RunPod has the job (the /run answer arriving late, or RunPod calling the
webhook whose token only that /run carried, confirmed with /status); otherwise an operator decides
(retry it, or cancel it).
"""

from __future__ import annotations

import enum

from jobs.runpod.client import RunPodStatus


class JobStatus(enum.StrEnum):
    PENDING = "PENDING"  #: the row is written; nothing sent to RunPod yet
    SUBMITTING = "SUBMITTING"  #: a worker is calling /run right now
    SUBMIT_UNKNOWN = "SUBMIT_UNKNOWN"  #: /run's outcome is unknown; never resubmitted blindly
    IN_QUEUE = "IN_QUEUE"  #: RunPod has it, waiting for a GPU worker
    IN_PROGRESS = "IN_PROGRESS"  #: a RunPod worker is running it
    COMPLETED = "COMPLETED"  #: finished; output stored
    FAILED = "FAILED"  #: the handler failed, or RunPod refused the job; error stored
    CANCELLED = "CANCELLED"  #: cancelled by a user or operator (or purged from RunPod's queue)
    TIMED_OUT = "TIMED_OUT"  #: RunPod timed it out
    EXPIRED = "EXPIRED"  #: RunPod no longer knows the job (404 after retention or ttl): not a failure

    @property
    def is_terminal(self) -> bool:
        return self in TERMINAL


_S = JobStatus
_RUNPOD_OUTCOMES = frozenset({_S.COMPLETED, _S.FAILED, _S.CANCELLED, _S.TIMED_OUT, _S.EXPIRED})

#: Every status change the system makes on its own. A status with no way out is terminal.
TRANSITIONS: dict[JobStatus, frozenset[JobStatus]] = {
    _S.PENDING: frozenset({_S.SUBMITTING, _S.CANCELLED}),
    _S.SUBMITTING: frozenset({_S.PENDING, _S.IN_QUEUE, _S.FAILED, _S.SUBMIT_UNKNOWN, _S.CANCELLED}),
    _S.SUBMIT_UNKNOWN: frozenset({_S.IN_QUEUE, _S.CANCELLED}),
    _S.IN_QUEUE: frozenset({_S.IN_PROGRESS}) | _RUNPOD_OUTCOMES,
    _S.IN_PROGRESS: _RUNPOD_OUTCOMES,
    _S.COMPLETED: frozenset(),
    _S.FAILED: frozenset(),
    _S.CANCELLED: frozenset(),
    _S.TIMED_OUT: frozenset(),
    _S.EXPIRED: frozenset(),
}

TERMINAL = frozenset(status for status, targets in TRANSITIONS.items() if not targets)

#: Statuses an operator may start a new attempt from.
RETRYABLE = TERMINAL - {_S.COMPLETED} | {_S.SUBMIT_UNKNOWN}

#: Statuses in which the job exists at RunPod and a poll chain should be alive.
AT_RUNPOD = frozenset({_S.IN_QUEUE, _S.IN_PROGRESS})

#: The one mapping from RunPod's vocabulary to ours.
FROM_RUNPOD: dict[RunPodStatus, JobStatus] = {
    RunPodStatus.IN_QUEUE: _S.IN_QUEUE,
    RunPodStatus.IN_PROGRESS: _S.IN_PROGRESS,
    RunPodStatus.COMPLETED: _S.COMPLETED,
    RunPodStatus.FAILED: _S.FAILED,
    RunPodStatus.CANCELLED: _S.CANCELLED,
    RunPodStatus.TIMED_OUT: _S.TIMED_OUT,
}


def sources_of(target: JobStatus) -> frozenset[JobStatus]:
    """Every status the lifecycle may move to `target` from."""
    return frozenset(source for source, targets in TRANSITIONS.items() if target in targets)


def may_move(source: JobStatus, target: JobStatus) -> bool:
    return target in TRANSITIONS[source]
