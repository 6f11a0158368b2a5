"""The HTTP API against its own `/openapi.json`, with Schemathesis: requests generated from the schema,
valid ones and ones that break it, on every route, with a real token. No
answer may be a 500, and every answer must be one the schema documents, in the shape it documents:
the schema and the server are held to each other.

Each walk runs on one database, and the two walks between them cover both: without a bucket on PostgreSQL (the
stricter about text: it refuses a NUL that SQLite keeps), with a bucket on SQLite. A walk is minutes of the
suite's ten; what the storage does with each value is held to both databases by the storage and input tests.

The app runs in-process (ASGI): the real app on a real database, without a socket per example.
(Schemathesis' own pytest loader needs a subtests API this pytest no longer has, so the operations
are walked here, each with Hypothesis.)
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.config import SchemathesisConfig
from schemathesis.core.failures import FailureGroup

from jobs.runtime import Runtime
from jobs.settings import Secret
from jobs.tenants import SubmitRate
from jobs.web import create_app, new_token
from jobs.web.auth import entry_for
from tests.conftest import IN_CI

pytestmark = pytest.mark.integration

TOKEN, TOKEN_ENTRY = new_token()
API_SECRET = Secret("contract-" + "c" * 32)
EXAMPLES = 40
BUCKET_ROUTES = r"^/v1/(uploads|jobs/\{job_id\}/files/\{name\})$"


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_every_route_answers_as_its_schema_says_and_never_with_a_500(runtime: Runtime) -> None:
    # meta.user is documented once indexed; events URLs are made once the server has its secret.
    runtime.settings = runtime.settings.model_copy(update={"metadata_index": ("user",), "api_secret": API_SECRET})
    # The token as the schema's own security scheme: Schemathesis then knows which requests carry auth, and
    # checks too that the routes behind it refuse a request without it.
    config = SchemathesisConfig.from_dict({
        "auth": {"openapi": {"HTTPBearer": {"bearer": TOKEN}}},
        "checks": {"positive_data_acceptance": {"enabled": True}},
        # This server has no bucket, so the two routes that need one answer 503, as their schema says.
        "operations": [{"include-path-regex": BUCKET_ROUTES,
                        "checks": {"not_a_server_error": {"expected-statuses": ["2xx", "3xx", "4xx", "503"]}}}],
    })
    answered = _walk(schemathesis.openapi.from_asgi("/openapi.json", create_app(runtime, tokens=[TOKEN_ENTRY]),
                                                    config=config))
    # The token was sent: the routes behind it answered more than 401s.
    assert {202, 422} <= answered["POST /v1/jobs"] and 200 in answered["GET /v1/jobs"], answered
    assert 503 in answered["POST /v1/uploads"], answered


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_with_a_bucket_every_route_answers_as_its_schema_says(runtime: Runtime, s3_bucket: str,
                                                                s3_endpoint_url: str) -> None:
    runtime.settings = runtime.settings.model_copy(update={
        "api_secret": API_SECRET, "s3_bucket": s3_bucket, "s3_endpoint_url": s3_endpoint_url,
        "s3_region": "us-east-1"})
    # Every request the schema calls invalid must still be refused. Not every one it calls valid is accepted: a
    # file name must be printable, which a pattern cannot say of every code point Unicode has not assigned, and
    # an upload's size must not exceed its max_bytes. The run without a bucket holds valid requests to acceptance.
    config = SchemathesisConfig.from_dict({"auth": {"openapi": {"HTTPBearer": {"bearer": TOKEN}}},
                                           "checks": {"positive_data_acceptance": {"enabled": False}}})
    answered = _walk(schemathesis.openapi.from_asgi("/openapi.json", create_app(runtime, tokens=[TOKEN_ENTRY]),
                                                    config=config))
    assert {202, 422} <= answered["POST /v1/jobs"] and 201 in answered["POST /v1/uploads"], answered


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)  # the two runs above cover both databases
def test_for_a_tenants_token_every_route_answers_as_its_schema_says(runtime: Runtime, redis_url: str) -> None:
    """A token confined to a tenant, to read and submit, and to one endpoint, with limits low enough to meet:
    the 403s and 429s it draws are documented too."""
    token, line = new_token()
    runtime.settings = runtime.settings.model_copy(update={
        "api_secret": API_SECRET, "metadata_index": ("user",), "tenant_submits_per_minute": {"contract": 20},
        "tenant_max_in_flight": {"*": 2}})
    runtime.submit_rate_counter = SubmitRate(redis_url)
    config = SchemathesisConfig.from_dict({
        "auth": {"openapi": {"HTTPBearer": {"bearer": token}}},
        "checks": {"positive_data_acceptance": {"enabled": False}},  # a valid request may meet a scope or a limit
        "operations": [{"include-path-regex": BUCKET_ROUTES,
                        "checks": {"not_a_server_error": {"expected-statuses": ["2xx", "3xx", "4xx", "503"]}}}],
    })
    # A tenant of its own: Redis's count of a tenant's submits in a minute is shared by the whole test session.
    entry = entry_for(line, tenant="contract", scopes=["submit", "read"], endpoints=["tts"])
    answered = _walk(schemathesis.openapi.from_asgi("/openapi.json", create_app(runtime, tokens=[entry]),
                                                    config=config))
    assert 403 in answered["POST /v1/jobs/{job_id}/cancel"] and 429 in answered["POST /v1/jobs"], answered


def _walk(schema: Any) -> dict[str, set[int]]:
    """Every operation of `schema` in both generation modes; the status codes each answered."""
    failures: list[str] = []
    answered: dict[str, set[int]] = defaultdict(set)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) == 17  # every route, so none goes untested

    for operation in operations:
        for mode in GenerationMode:

            @settings(max_examples=EXAMPLES, deadline=None, derandomize=IN_CI, database=None,
                      suppress_health_check=list(HealthCheck))
            @given(case=operation.as_strategy(generation_mode=mode))
            def answers_as_documented(case: Any) -> None:
                answered[case.operation.label].add(case.call_and_validate().status_code)

            try:
                answers_as_documented()
            except Unsatisfiable:
                assert mode is GenerationMode.NEGATIVE  # a route with nothing to get wrong (healthz, say)
            except (Exception, FailureGroup) as exc:  # every route and mode is tried; all failures are reported
                failures.append(f"{operation.label} ({mode}):\n{exc}")

    assert not failures, "\n\n".join(failures)
    return answered
