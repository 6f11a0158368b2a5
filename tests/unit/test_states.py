from __future__ import annotations

import pytest

from jobs.runpod.client import RunPodStatus
from jobs.states import AT_RUNPOD, FROM_RUNPOD, RETRYABLE, TERMINAL, TRANSITIONS, JobStatus, may_move, sources_of


def test_terminal_statuses_are_exactly_those_with_no_way_out() -> None:
    assert {JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.CANCELLED, JobStatus.TIMED_OUT,
            JobStatus.EXPIRED} == TERMINAL


def test_every_status_has_a_row_in_the_table() -> None:
    assert set(TRANSITIONS) == set(JobStatus)


def test_every_runpod_status_maps_to_a_status_of_the_same_name() -> None:
    assert set(FROM_RUNPOD) == set(RunPodStatus)
    assert all(ours.value == theirs.value for theirs, ours in FROM_RUNPOD.items())


def test_an_unknown_submit_outcome_is_never_resubmitted_only_adopted_or_cancelled() -> None:
    assert TRANSITIONS[JobStatus.SUBMIT_UNKNOWN] == {JobStatus.IN_QUEUE, JobStatus.CANCELLED}
    assert not may_move(JobStatus.SUBMIT_UNKNOWN, JobStatus.SUBMITTING)
    assert not may_move(JobStatus.SUBMIT_UNKNOWN, JobStatus.PENDING)
    assert JobStatus.SUBMIT_UNKNOWN not in TERMINAL


def test_only_a_pending_job_can_be_claimed_for_submission() -> None:
    assert sources_of(JobStatus.SUBMITTING) == {JobStatus.PENDING}


@pytest.mark.parametrize("status", sorted(TERMINAL))
def test_nothing_automatic_moves_a_finished_job(status: JobStatus) -> None:
    assert all(not may_move(status, target) for target in JobStatus)


def test_retry_is_offered_for_every_unhappy_ending_but_not_for_success() -> None:
    assert JobStatus.COMPLETED not in RETRYABLE
    assert {JobStatus.FAILED, JobStatus.TIMED_OUT, JobStatus.CANCELLED, JobStatus.EXPIRED,
            JobStatus.SUBMIT_UNKNOWN} == RETRYABLE


def test_jobs_at_runpod_are_the_two_live_runpod_statuses() -> None:
    assert {JobStatus.IN_QUEUE, JobStatus.IN_PROGRESS} == AT_RUNPOD
    assert all(JobStatus.EXPIRED in TRANSITIONS[s] for s in AT_RUNPOD)
