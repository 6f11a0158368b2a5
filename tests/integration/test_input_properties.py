"""The input rule, proved with generated inputs on the Python API, the HTTP API and the CLI, on SQLite
and PostgreSQL: every bad input gets a clear error naming exactly what was wrong, quoting none of it,
and no row is written; every valid odd input is read back exactly as it was sent.

The HTTP API runs in-process (Starlette's test client): the real app on a real database, without a
socket per example. The CLI runs in-process too (click's runner); test_cli.py runs it as a process.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from click.testing import CliRunner
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import jobs
from jobs.cli import main as rpq
from jobs.runtime import Runtime, set_runtime
from jobs.web import create_app, new_token
from tests.integration.strategies import (
    BAD_ARGUMENTS,
    CANARY,
    bad_counts,
    bad_endpoints,
    bad_json_in_json,
    bad_keys_in_json,
    bad_limits,
    bad_metadata_in_json,
    bad_policies_in_json,
    bad_priorities,
    bad_since_texts,
    bad_streams,
    bad_submissions,
    bad_webhooks_in_json,
    header_text,
    json_objects,
    json_values,
    key_text,
    valid_policies,
    with_canary,
)
from tests.integration.test_input_rules import rows

pytestmark = pytest.mark.integration

EXAMPLES = 200
ODD_EXAMPLES = 60
TOKEN, TOKEN_ENTRY = new_token()
CONSTRAINTS = {"required", "type", "range", "format", "unknown", "size", "known", "text", "depth", "json", "unique",
               "configured"}
generated = settings(max_examples=EXAMPLES, deadline=None,
                     suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                            HealthCheck.data_too_large, HealthCheck.filter_too_much])
odd = settings(generated, max_examples=ODD_EXAMPLES)


def canonical(value: Any) -> str:
    """JSON with sorted keys: unlike ==, tells True from 1 and 1 from 1.0."""
    return json.dumps(value, sort_keys=True)


def top(field: str) -> str:
    """`policy.ttl` → `policy`, `status[1]` → `status`."""
    return field.partition(".")[0].partition("[")[0]


@pytest.fixture
def http(runtime: Runtime) -> Iterator[TestClient]:
    """The real app on the test's database, in-process; server errors are answered, not raised."""
    with TestClient(create_app(runtime, tokens=[TOKEN_ENTRY]), raise_server_exceptions=False,
                    headers={"Authorization": f"Bearer {TOKEN}"}) as client:
        yield client


@pytest.fixture
def cli(runtime: Runtime) -> Iterator[CliRunner]:
    """click's runner, with the commands' runtime the test's."""
    previous = set_runtime(runtime)
    yield CliRunner()
    set_runtime(previous)


def assert_problems_shape(problems: list[dict[str, Any]]) -> None:
    assert problems, "an error answer names at least one problem"
    for problem in problems:
        assert set(problem) == {"field", "constraint", "message"}
        assert problem["constraint"] in CONSTRAINTS and problem["message"] and problem["field"]


# -- the Python API ------------------------------------------------------------------------------


@generated
@given(case=bad_submissions())
def test_every_bad_submit_is_refused_naming_exactly_the_bad_arguments_and_writes_nothing(
    runtime: Runtime, case: tuple[dict[str, Any], set[str]]
) -> None:
    arguments, bad = case
    before = rows(runtime)

    with pytest.raises(jobs.InvalidJob) as caught:
        jobs.submit(**arguments, runtime=runtime)

    assert {top(p.field) for p in caught.value.problems} == bad
    assert_problems_shape([vars(p) for p in caught.value.problems])
    assert CANARY not in str(caught.value) and str(caught.value).encode()  # printable, and quotes nothing
    assert rows(runtime) == before


@generated
@given(status=st.none() | st.integers() | with_canary(st.text(max_size=5)) | st.lists(st.integers(), min_size=1),
       endpoint=st.none() | st.integers() | with_canary(st.text(max_size=5)),
       since=st.none() | st.just(CANARY) | st.timedeltas(min_value=jobs.api.MAX_SINCE_AGE * 1.01)
       | st.timedeltas(max_value=-jobs.api.MAX_SINCE_AGE / 10**6),
       limit=st.none() | st.integers(max_value=0) | st.integers(min_value=jobs.api.MAX_LIST_LIMIT + 1)
       | st.just(CANARY) | st.floats() | st.booleans(),
       offset=st.none() | st.integers(max_value=-1) | st.integers(min_value=jobs.api.MAX_LIST_OFFSET + 1)
       | st.just(CANARY) | st.floats())
def test_every_bad_listing_is_refused_naming_exactly_the_bad_arguments(
    runtime: Runtime, status: Any, endpoint: Any, since: Any, limit: Any, offset: Any
) -> None:
    arguments = {name: value for name, value in (("status", status), ("endpoint", endpoint), ("since", since),
                                                  ("limit", limit), ("offset", offset)) if value is not None}

    if not arguments:
        assert jobs.list_jobs(runtime=runtime) is not None
        return
    with pytest.raises(jobs.InvalidJob) as caught:
        jobs.list_jobs(**arguments, runtime=runtime)

    assert {p.field for p in caught.value.problems} == set(arguments)
    assert CANARY not in str(caught.value)


@odd
@given(input=json_values.filter(lambda v: v is not None), metadata=st.none() | json_objects,
       correlation_id=st.none() | key_text, idempotency_key=st.none() | key_text, policy=valid_policies)
def test_every_valid_odd_submit_is_read_and_listed_back_exactly_as_sent(
    runtime: Runtime, input: Any, metadata: Any, correlation_id: str | None, idempotency_key: str | None,
    policy: dict[str, Any]
) -> None:
    key = None if idempotency_key is None else f"{idempotency_key}-{uuid.uuid4()}"  # a key reused returns its job
    job = jobs.submit("tts", input, metadata=metadata, correlation_id=correlation_id, idempotency_key=key,
                      policy=policy or None, runtime=runtime)

    read = jobs.get(job.id, runtime=runtime)
    listed = next(j for j in jobs.list_jobs(limit=jobs.api.MAX_LIST_LIMIT, runtime=runtime) if j.id == job.id)
    sent = canonical([input, metadata, correlation_id, key, policy or None])
    for stored in (job, read, listed):
        assert canonical([stored.input, stored.metadata, stored.correlation_id, stored.idempotency_key,
                          stored.policy]) == sent


# -- the HTTP API --------------------------------------------------------------------------------

#: A JSON body's fields → their bad values (what JSON can carry: a \udc80 escape, yes; NaN, no).
BAD_BODY_FIELDS: dict[str, st.SearchStrategy[Any]] = {
    "endpoint": bad_endpoints,
    "input": st.none() | bad_json_in_json,
    "policy": bad_policies_in_json,
    "webhook": bad_webhooks_in_json,
    "correlation_id": bad_keys_in_json(jobs.api.MAX_CORRELATION_ID_LENGTH) | with_canary(st.just("has space ")),
    "metadata": bad_metadata_in_json,
    "stream": bad_streams,
    "priority": bad_priorities.filter(lambda v: v is not None and v == v and v not in (float("inf"), float("-inf"))),
}


@st.composite
def bad_requests(draw: st.DrawFn) -> tuple[bytes, dict[str, str], set[str]]:
    """A POST /v1/jobs with at least one problem: its body, headers, and the fields the answer must name."""
    body: dict[str, Any] = {"endpoint": "tts", "input": draw(json_values.filter(lambda v: v is not None))}
    expected: set[str] = set()
    for name in draw(st.sets(st.sampled_from(sorted(BAD_BODY_FIELDS)), max_size=4)):
        body[name] = draw(BAD_BODY_FIELDS[name])
        expected.add(name)
    if draw(st.booleans()):
        body[draw(with_canary(st.text(max_size=5)))] = CANARY  # an unknown field: reported on the body
        expected.add("body")
    if "input" not in expected and draw(st.booleans()):
        del body["input"]
        expected.add("input")
    headers = {"Content-Type": "application/json"}
    if draw(st.booleans()):
        headers["Idempotency-Key"] = draw(st.sampled_from(["", CANARY + "k" * 255]))
        expected.add("Idempotency-Key")
    content = json.dumps(body).encode()  # ensure_ascii: a lone surrogate travels as a \udc80 escape
    shape = draw(st.sampled_from(["object", "object", "object", "array", "broken", "nan"]))
    if shape == "array":
        content, expected = json.dumps([body]).encode(), {"body"} | (expected & {"Idempotency-Key"})
    elif shape == "broken":
        content, expected = content[: draw(st.integers(0, max(0, len(content) - 1)))], {"body"}
    elif shape == "nan":
        content, expected = b'{"endpoint": "tts", "input": [NaN, "' + CANARY.encode() + b'"]}', {"body"}
    if not expected:
        body["stream"], expected = CANARY, {"stream"}
        content = json.dumps(body).encode()
    return content, headers, expected


@generated
@given(case=bad_requests())
def test_every_bad_http_submit_is_a_4xx_naming_the_bad_fields_and_writes_nothing(
    http: TestClient, runtime: Runtime, case: tuple[bytes, dict[str, str], set[str]]
) -> None:
    content, headers, expected = case
    before = rows(runtime)

    response = http.post("/v1/jobs", content=content, headers=headers)

    assert response.status_code in (400, 422), response.text
    assert_problems_shape(response.json()["errors"])
    named = {top(p["field"]) for p in response.json()["errors"]}
    # A body that is not JSON is refused before its headers are read; otherwise every problem is named.
    assert named == expected if response.status_code == 422 else named == {"body"}
    assert CANARY not in response.text and CANARY not in str(response.headers)
    assert rows(runtime) == before


@generated
@given(since=st.none() | bad_since_texts, limit=st.none() | bad_limits, offset=st.none() | bad_counts,
       status=st.none() | with_canary(st.text(max_size=5)), endpoint=st.none() | with_canary(st.text(max_size=5)),
       unknown=st.none() | with_canary(st.text(min_size=1, max_size=5)))
def test_every_bad_http_listing_is_a_422_naming_the_bad_parameters(
    http: TestClient, since: str | None, limit: str | None, offset: str | None, status: str | None,
    endpoint: str | None, unknown: str | None
) -> None:
    params = {name: value for name, value in (("since", since), ("limit", limit), ("offset", offset),
                                               ("status", status), ("endpoint", endpoint)) if value is not None}
    expected = set(params) | ({"query"} if unknown else set())
    if unknown:
        params[unknown] = CANARY
    if not expected:
        params, expected = {"limit": "0"}, {"limit"}

    response = http.get("/v1/jobs", params=params)

    assert response.status_code == 422, response.text
    assert_problems_shape(response.json()["errors"])
    assert {top(p["field"]) for p in response.json()["errors"]} == expected
    assert CANARY not in response.text


@odd
@given(input=json_values.filter(lambda v: v is not None), metadata=st.none() | json_objects,
       correlation_id=st.none() | header_text, policy=valid_policies)
def test_every_valid_odd_http_submit_is_read_and_listed_back_exactly_as_sent(
    http: TestClient, input: Any, metadata: Any, correlation_id: str | None, policy: dict[str, Any]
) -> None:
    body = {"endpoint": "tts", "input": input, "metadata": metadata, "correlation_id": correlation_id,
            "policy": policy}

    answer = http.post("/v1/jobs", content=json.dumps(body), headers={"Content-Type": "application/json"})

    assert answer.status_code == 202, answer.text
    read = http.get(f"/v1/jobs/{answer.json()['id']}").json()
    listed = next(j for j in http.get("/v1/jobs", params={"limit": 10_000}).json()["jobs"] if j["id"] == read["id"])
    for job in (answer.json(), read, listed):
        # An empty policy is no policy; without a correlation id the job gets the request's.
        assert canonical([job["input"], job["metadata"], job["policy"]]) == canonical([input, metadata, policy or None])
        assert correlation_id is None or job["correlation_id"] == correlation_id


# -- the CLI -------------------------------------------------------------------------------------

#: `rpq submit` options → their bad values as command-line text.
BAD_CLI_OPTIONS: dict[str, st.SearchStrategy[str]] = {
    "--input": st.one_of(bad_json_in_json.map(json.dumps), with_canary(st.just("{oops ")), st.just("null"),
                         st.integers(5_000, 20_000).map(lambda n: "[" * n + "]" * n)),
    "--policy": bad_policies_in_json.map(json.dumps) | with_canary(st.just("[")),
    "--metadata": bad_metadata_in_json.map(json.dumps),
    "--webhook": bad_webhooks_in_json.filter(lambda v: isinstance(v, str)),
    "--idempotency-key": bad_keys_in_json(jobs.api.MAX_KEY_LENGTH).filter(lambda v: isinstance(v, str)),
    "--correlation-id": bad_keys_in_json(jobs.api.MAX_CORRELATION_ID_LENGTH).filter(lambda v: isinstance(v, str)),
}
CLI_FIELDS = {"--input": "input", "--policy": "policy", "--metadata": "metadata", "--webhook": "webhook",
              "--idempotency-key": "idempotency_key", "--correlation-id": "correlation_id"}


def listed_problems(output: str) -> set[str]:
    """The fields of `rpq: job not accepted:` followed by `  - field: message` lines."""
    return {top(line.removeprefix("  - ").split(":")[0]) for line in output.splitlines() if line.startswith("  - ")}


@generated
@given(endpoint=st.sampled_from(["tts"]) | with_canary(st.text(max_size=5)),
       options=st.dictionaries(st.sampled_from(sorted(BAD_CLI_OPTIONS)), st.just(None), min_size=1, max_size=4),
       data=st.data())
def test_every_bad_cli_submit_exits_2_listing_the_bad_arguments_and_writes_nothing(
    cli: CliRunner, runtime: Runtime, endpoint: str, options: dict[str, None], data: st.DataObject
) -> None:
    arguments = ["submit", "--input={}"]
    for option in options:  # --name=value and a `--` before ENDPOINT: any text, a leading "-" too, is a value
        arguments.append(f"{option}={data.draw(BAD_CLI_OPTIONS[option], label=option)}")
    arguments += ["--", endpoint]
    before = rows(runtime)

    result = cli.invoke(rpq, arguments)

    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit) and "Traceback" not in result.output
    expected = {CLI_FIELDS[o] for o in options} | ({"endpoint"} if endpoint != "tts" else set())
    assert listed_problems(result.stderr) == expected
    assert CANARY not in result.output
    assert rows(runtime) == before


@generated
@given(since=st.none() | bad_since_texts, limit=st.none() | bad_limits, offset=st.none() | bad_counts,
       status=st.none() | with_canary(st.text(max_size=5)))
def test_every_bad_cli_listing_exits_2_listing_the_bad_options(
    cli: CliRunner, since: str | None, limit: str | None, offset: str | None, status: str | None
) -> None:
    options = {name: value for name, value in (("since", since), ("limit", limit), ("offset", offset),
                                                ("status", status)) if value is not None} or {"limit": "0"}
    arguments = ["jobs", "list", *(f"--{name}={value}" for name, value in options.items())]

    result = cli.invoke(rpq, arguments)

    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit) and "Traceback" not in result.output
    assert listed_problems(result.stderr) == set(options)
    assert CANARY not in result.output


def test_the_bad_argument_strategies_cover_every_argument_of_submit() -> None:
    import inspect

    assert set(BAD_ARGUMENTS) == set(inspect.signature(jobs.submit).parameters) - {"runtime"}
