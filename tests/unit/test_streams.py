from __future__ import annotations

import pytest

from jobs.states import JobStatus
from jobs.storage.streams import for_transition

S = JobStatus


@pytest.mark.parametrize(
    ("previous", "to", "streaming", "expected"),
    [
        (S.IN_QUEUE, S.IN_PROGRESS, False, ["started"]),
        (S.IN_PROGRESS, S.COMPLETED, False, ["output", "end"]),
        (S.IN_PROGRESS, S.COMPLETED, True, ["end"]),  # its chunks came from /stream already
        (S.IN_QUEUE, S.COMPLETED, False, ["started", "output", "end"]),  # finished between two polls
        (S.IN_PROGRESS, S.FAILED, False, ["error"]),
        (S.IN_QUEUE, S.FAILED, False, ["started", "error"]),
        (S.SUBMITTING, S.FAILED, False, ["error"]),  # refused by RunPod: it never ran
        (S.IN_PROGRESS, S.CANCELLED, False, ["error"]),
        (S.PENDING, S.CANCELLED, False, ["error"]),
        (S.IN_PROGRESS, S.TIMED_OUT, False, ["error"]),
        (S.IN_QUEUE, S.EXPIRED, False, ["error"]),
        (S.PENDING, S.SUBMITTING, False, []),
        (S.SUBMITTING, S.IN_QUEUE, False, []),
        (S.SUBMITTING, S.SUBMIT_UNKNOWN, False, ["error"]),  # nothing more comes unless an operator acts
        (S.SUBMIT_UNKNOWN, S.IN_QUEUE, False, []),  # adopted: the stream goes on
        (S.FAILED, S.PENDING, False, []),  # a retry: the new attempt's stream starts when it runs
    ],
)
def test_each_status_change_adds_the_stream_events_it_means(previous: JobStatus, to: JobStatus, streaming: bool,
                                                            expected: list[str]) -> None:
    events = for_transition(previous, to, streaming=streaming, output={"ok": 1}, error=None, detail="why")

    assert [kind for kind, _ in events] == expected


def test_every_final_status_ends_the_stream_with_exactly_one_end_or_error() -> None:
    for previous in (S.IN_QUEUE, S.IN_PROGRESS):
        for final in (S.COMPLETED, S.FAILED, S.CANCELLED, S.TIMED_OUT, S.EXPIRED):
            kinds = [k for k, _ in for_transition(previous, final, streaming=False, output=1, error="e", detail="d")]
            assert [k for k in kinds if k in ("end", "error")] == (["end"] if final is S.COMPLETED else ["error"])
            assert kinds[-1] in ("end", "error")


def test_an_error_event_carries_the_error_or_else_the_reason() -> None:
    [(_, failed)] = for_transition(S.IN_PROGRESS, S.FAILED, streaming=False, output=None, error="OOM", detail="d")
    [(_, cancelled)] = for_transition(S.IN_PROGRESS, S.CANCELLED, streaming=False, output=None, error=None,
                                      detail="cancel requested")

    assert failed == {"status": "FAILED", "error": "OOM"}
    assert cancelled == {"status": "CANCELLED", "error": "cancel requested"}


def test_chunks_seen_by_the_same_poll_go_after_started_and_before_the_end() -> None:
    chunks = [("output", "a"), ("progress", "50%"), ("output", "b")]

    events = for_transition(S.IN_QUEUE, S.COMPLETED, streaming=True, output=None, error=None, detail=None,
                            chunks=chunks)

    assert [kind for kind, _ in events] == ["started", "output", "progress", "output", "end"]


def test_a_completion_without_output_ends_with_the_flag_and_no_empty_output_chunk() -> None:
    events = for_transition(S.IN_PROGRESS, S.COMPLETED, streaming=False, output=None, error=None, detail=None,
                            output_missing=True)

    assert events == [("end", {"status": "COMPLETED", "output_missing": True})]
