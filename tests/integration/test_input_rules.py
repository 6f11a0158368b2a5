"""The input rule on the Python API: bad input gets every problem at once in one `InvalidJob` and
writes nothing; whatever is accepted is stored on SQLite and PostgreSQL and read back unchanged.

The property-based proofs are in test_input_properties.py; these are the cases a review found.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import func, select

import jobs
from jobs.api import MAX_LIST_LIMIT, MAX_LIST_OFFSET, MAX_SINCE_AGE, parse_since
from jobs.jsonsafe import MAX_DEPTH
from jobs.runtime import Runtime
from jobs.storage.db import session_scope
from jobs.storage.models import JobRow
from tests.conftest import ENDPOINT_ID

pytestmark = pytest.mark.integration


def rows(rt: Runtime) -> int:
    """Rows in the job table, read with SQL rather than through the API under test."""
    with session_scope(rt.engine, read_only=True) as session:
        return int(session.execute(select(func.count()).select_from(JobRow)).scalar_one())


def nested(depth: int, leaf: Any = 1) -> Any:
    value = leaf
    for _ in range(depth - 1):
        value = [value]
    return value


def refused(call: Any) -> set[tuple[str, str]]:
    """The (field, constraint) pairs of the InvalidJob that `call` raised."""
    with pytest.raises(jobs.InvalidJob) as caught:
        call()
    return {(p.field, p.constraint) for p in caught.value.problems}


# -- values that could not be stored or served back ----------------------------------------------

UNSTORABLE = {
    "a lone surrogate in metadata": ({"metadata": {"name": "\udc80"}}, {("metadata", "text")}),
    "a lone surrogate as a metadata key": ({"metadata": {"\ud800": 1}}, {("metadata", "text")}),
    "metadata nested too deep": ({"metadata": {"deep": nested(MAX_DEPTH)}}, {("metadata", "depth")}),
    "an infinity in metadata": ({"metadata": {"x": float("inf")}}, {("metadata", "type")}),
    "a lone surrogate in the input": ({"input": {"text": "\udfff"}}, {("input", "text")}),
    "input nested too deep": ({"input": nested(MAX_DEPTH + 1)}, {("input", "depth")}),
    "input nested deeper than json can encode": ({"input": nested(5_000)}, {("input", "depth")}),
    "NaN in the input": ({"input": [float("nan")]}, {("input", "type")}),
    "NUL in the correlation id": ({"correlation_id": "req\x007"}, {("correlation_id", "text")}),
    "a lone surrogate in the idempotency key": ({"idempotency_key": "k\udc80"}, {("idempotency_key", "text")}),
    "NUL in the webhook": ({"webhook": "https://example.com/\x00"}, {("webhook", "text")}),
    "a webhook too long to keep": ({"webhook": "https://example.com/" + "x" * 2048}, {("webhook", "format")}),
}


@pytest.mark.parametrize("arguments, problems", UNSTORABLE.values(), ids=UNSTORABLE.keys())
def test_a_value_that_could_not_be_stored_or_served_is_refused_and_writes_nothing(
    runtime: Runtime, arguments: dict[str, Any], problems: set[tuple[str, str]]
) -> None:
    call = {"input": {"text": "hello"}, **arguments}

    assert refused(lambda: jobs.submit("tts", **call, runtime=runtime)) == problems
    assert rows(runtime) == 0


def test_nul_inside_json_values_is_stored_and_read_back_unchanged(runtime: Runtime) -> None:
    odd = {"text": "a\x00b", "astral": "\U0001f600", "deep": nested(MAX_DEPTH - 1, "\x00")}

    job = jobs.submit("tts", odd, metadata=odd, runtime=runtime)

    stored = jobs.get(job.id, runtime=runtime)
    assert (stored.input, stored.metadata) == (odd, odd)
    assert [j.input for j in jobs.list_jobs(runtime=runtime)] == [odd]


def test_an_endpoint_id_with_a_trailing_newline_is_not_an_endpoint(runtime: Runtime) -> None:
    assert refused(lambda: jobs.submit(ENDPOINT_ID + "\n", {}, runtime=runtime)) == {("endpoint", "known")}
    assert rows(runtime) == 0


# -- input is required ---------------------------------------------------------------------------


def test_a_job_without_input_is_refused_as_runpod_would(runtime: Runtime) -> None:
    assert refused(lambda: jobs.submit("tts", None, runtime=runtime)) == {("input", "required")}
    assert rows(runtime) == 0


# -- wrong types ---------------------------------------------------------------------------------


def test_every_argument_of_the_wrong_type_is_reported_at_once(runtime: Runtime) -> None:
    problems = refused(lambda: jobs.submit(
        123, {"text": "hi"}, policy=[], webhook=5, idempotency_key=7, correlation_id=b"req",  # type: ignore[arg-type]
        metadata="x", stream="yes", runtime=runtime))  # type: ignore[arg-type]

    assert problems == {("endpoint", "type"), ("policy", "type"), ("webhook", "type"), ("idempotency_key", "type"),
                        ("correlation_id", "type"), ("metadata", "type"), ("stream", "type")}
    assert rows(runtime) == 0


def test_list_jobs_reports_every_argument_of_the_wrong_type_at_once(runtime: Runtime) -> None:
    problems = refused(lambda: jobs.list_jobs(status=5, endpoint=[7], since="1h", limit="5",  # type: ignore[arg-type]
                                              offset=1.5, runtime=runtime))  # type: ignore[arg-type]

    assert problems == {("status", "type"), ("endpoint", "type"), ("since", "type"), ("limit", "type"),
                        ("offset", "type")}


# -- an unknown policy field is reported without its name ----------------------------------------


def test_an_unknown_policy_field_is_reported_on_the_policy_without_its_name(runtime: Runtime) -> None:
    with pytest.raises(jobs.InvalidJob) as caught:
        jobs.submit("tts", {}, policy={"speed\udc80": 1, "colour": 2, "ttl": 1}, runtime=runtime)

    assert [(p.field, p.constraint) for p in caught.value.problems] == [("policy", "unknown"), ("policy.ttl", "range")]
    assert "speed" not in str(caught.value) and "colour" not in str(caught.value)
    assert "executionTimeout, ttl, lowPriority" in str(caught.value)


# -- listing: since, limit and offset within bounds ----------------------------------------------


def test_limit_and_offset_past_their_bounds_are_refused(runtime: Runtime) -> None:
    assert refused(lambda: jobs.list_jobs(limit=MAX_LIST_LIMIT + 1, offset=10**30, runtime=runtime)) == {
        ("limit", "range"), ("offset", "range")}
    assert jobs.list_jobs(limit=MAX_LIST_LIMIT, offset=MAX_LIST_OFFSET, runtime=runtime) == []


def test_an_age_too_great_to_count_back_is_a_range_problem_not_a_crash(runtime: Runtime) -> None:
    with pytest.raises(ValueError, match="at most"):
        parse_since("999999999999d")
    assert refused(lambda: jobs.list_jobs(since=MAX_SINCE_AGE + timedelta(days=1), runtime=runtime)) == {
        ("since", "range")}
    assert refused(lambda: jobs.list_jobs(since=timedelta(seconds=-1), runtime=runtime)) == {("since", "range")}
    assert jobs.list_jobs(since=MAX_SINCE_AGE, runtime=runtime) == []


def test_a_time_that_cannot_be_told_in_utc_is_a_range_problem_not_a_crash(runtime: Runtime) -> None:
    earliest = parse_since("0001-01-01T00:00:00+01:00")

    assert refused(lambda: jobs.list_jobs(since=earliest, runtime=runtime)) == {("since", "range")}
    assert jobs.list_jobs(since=datetime(1, 1, 1, tzinfo=UTC), runtime=runtime) == []


@pytest.mark.parametrize("value", [0.0, -0.0, 1e16, 10**20, -(10**40), 12, 1.5], ids=repr)
def test_an_input_that_is_a_bare_number_is_read_back_as_that_number(runtime: Runtime, value: float) -> None:
    job = jobs.submit("tts", value, runtime=runtime)

    stored = jobs.get(job.id, runtime=runtime).input
    assert (type(stored), repr(stored)) == (type(value), repr(value))  # SQLite kept 0.0 as 0 and 10**20 as 1e+20


def test_a_whole_number_of_milliseconds_written_as_a_float_is_that_number(runtime: Runtime) -> None:
    # JSON Schema's integer includes 60000.0, and so does the published schema: clients send it.
    job = jobs.submit("tts", {}, policy={"ttl": 60_000.0, "executionTimeout": 5_000.0}, runtime=runtime)

    assert jobs.get(job.id, runtime=runtime).policy == {"ttl": 60_000, "executionTimeout": 5_000}
    assert refused(lambda: jobs.submit("tts", {}, policy={"ttl": 60_000.5}, runtime=runtime)) == {
        ("policy.ttl", "type")}
