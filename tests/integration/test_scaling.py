"""Scaling an endpoint against the simulator's management API over HTTP, on SQLite and PostgreSQL: the
simulator's capacity is what changes, and the audit table is what is asserted on."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
from sqlmodel import select

from jobs.runpod.management import RunPodManagement
from jobs.runpod.scaling import Outcome, Workers, scale_endpoint
from jobs.runtime import Runtime
from jobs.storage.db import make_engine, session_scope
from jobs.storage.models import ScaleChange
from tests.conftest import ENDPOINT_ID, ENDPOINT_NAME, Published, SimulatorProcess, fast_client, make_settings

pytestmark = pytest.mark.integration

ACTOR = "operator:tester"


@pytest.fixture
def rt(migrated_db: str, simulator: SimulatorProcess) -> Iterator[Runtime]:
    """A runtime whose management client talks to the simulator's /mgmt/v2."""
    settings = make_settings(migrated_db, simulator, runpod_rest_url=f"{simulator.root_url}/mgmt/v2")
    runtime = Runtime(settings=settings, engine=make_engine(migrated_db), publish=Published(),
                      make_client=lambda: fast_client(simulator))
    yield runtime
    runtime.close()


def live(simulator: SimulatorProcess) -> Workers:
    """The endpoint's bounds as the simulator holds them, read past rpq's client."""
    body = httpx.get(f"{simulator.root_url}/mgmt/v2/serverless/{ENDPOINT_ID}", timeout=10,
                     headers={"Authorization": f"Bearer {simulator.api_key}"}).json()
    workers = body["workers"]
    return Workers(workers["min"], workers["max"], workers.get("idleTimeout"))


def audit_rows(rt: Runtime) -> list[ScaleChange]:
    with session_scope(rt.engine, read_only=True) as session:
        return list(session.exec(select(ScaleChange).order_by(ScaleChange.id)))  # type: ignore[arg-type]


def test_scaling_up_changes_the_simulators_capacity_and_the_audit_row_shows_before_asked_after(
        rt: Runtime, simulator: SimulatorProcess) -> None:
    before = live(simulator)

    result = scale_endpoint(rt, ENDPOINT_NAME, max=before.max + 2, actor=ACTOR, reason="launch day")

    assert result.outcome is Outcome.CHANGED, result.message
    assert live(simulator) == Workers(before.min, before.max + 2, before.idle_timeout)
    [row] = audit_rows(rt)
    assert (row.endpoint_name, row.endpoint_id, row.actor, row.reason, row.ok, row.error) == (
        ENDPOINT_NAME, ENDPOINT_ID, ACTOR, "launch day", True, None)
    assert (row.before_min, row.before_max, row.before_idle_timeout) == (before.min, before.max, before.idle_timeout)
    assert (row.asked_min, row.asked_max, row.asked_idle_timeout) == (None, before.max + 2, None)
    assert (row.after_min, row.after_max, row.after_idle_timeout) == (before.min, before.max + 2, before.idle_timeout)
    assert any("balance" in note for note in result.notes)


def test_min_and_idle_timeout_change_together_and_max_is_sent_as_read(rt: Runtime, simulator: SimulatorProcess) -> None:
    before = live(simulator)

    result = scale_endpoint(rt, ENDPOINT_NAME, min=1, idle_timeout=30, actor=ACTOR)

    assert result.outcome is Outcome.CHANGED, result.message
    assert live(simulator) == Workers(1, before.max, 30)


@pytest.mark.parametrize(("values", "fields"), [
    ({"max": 1, "min": 2}, ["min"]),
    ({"max": -1}, ["max"]),
    ({"idle_timeout": 0}, ["idle_timeout"]),
    ({"max": -1, "min": -1, "idle_timeout": 0}, ["max", "min", "idle_timeout"]),
])
def test_values_rpq_refuses_change_nothing_and_say_why(rt: Runtime, simulator: SimulatorProcess,
                                                       values: dict[str, int], fields: list[str]) -> None:
    before = live(simulator)

    result = scale_endpoint(rt, ENDPOINT_NAME, actor=ACTOR, **values)  # type: ignore[arg-type]

    assert result.outcome is Outcome.REFUSED
    assert result.plan is not None and [p.field for p in result.plan.problems] == fields
    assert all(f"{field}:" in result.message for field in fields)
    assert live(simulator) == before
    [row] = audit_rows(rt)
    assert row.ok is False and row.error == result.message and row.after_max is None
    assert row.before_max == before.max


def test_a_raise_past_the_balance_tier_is_refused_by_runpod_and_audited_as_not_ok(
        rt: Runtime, simulator: SimulatorProcess) -> None:
    before = live(simulator)

    result = scale_endpoint(rt, ENDPOINT_NAME, max=500, actor=ACTOR)

    assert result.outcome is Outcome.FAILED
    assert "RunPod refused" in result.message and "cap of 40" in result.message  # the simulator's tier at $500
    assert live(simulator) == before
    [row] = audit_rows(rt)
    assert (row.ok, row.asked_max, row.before_max, row.after_max) == (False, 500, before.max, None)
    assert row.error == result.message
    assert simulator.api_key not in row.error


def test_a_dry_run_changes_nothing_and_writes_no_audit_row(rt: Runtime, simulator: SimulatorProcess) -> None:
    before = live(simulator)

    result = scale_endpoint(rt, ENDPOINT_NAME, max=before.max + 1, actor=ACTOR, dry_run=True)
    refused = scale_endpoint(rt, ENDPOINT_NAME, max=-1, actor=ACTOR, dry_run=True)

    assert result.outcome is Outcome.DRY_RUN and result.audit_id is None
    assert result.plan is not None and result.plan.after.max == before.max + 1
    assert refused.outcome is Outcome.REFUSED and refused.audit_id is None
    assert live(simulator) == before
    assert audit_rows(rt) == []


def test_asking_for_what_the_endpoint_has_sends_nothing(rt: Runtime, simulator: SimulatorProcess) -> None:
    before = live(simulator)

    result = scale_endpoint(rt, ENDPOINT_NAME, max=before.max, actor=ACTOR)

    assert result.outcome is Outcome.REFUSED and "nothing to change" in result.message
    assert [row.ok for row in audit_rows(rt)] == [False]


def test_an_endpoint_runpod_does_not_know_is_audited_without_a_before(rt: Runtime) -> None:
    result = scale_endpoint(rt, "no-such-endpoint-id", max=2, actor=ACTOR)

    assert result.outcome is Outcome.FAILED and "could not read" in result.message
    [row] = audit_rows(rt)
    assert (row.endpoint_id, row.ok, row.before_max, row.asked_max) == ("no-such-endpoint-id", False, None, 2)


class _AnswerLost(httpx.HTTPTransport):
    """Sends each request for real, then loses the answer to a PATCH: the simulator has changed, rpq never hears."""

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = super().handle_request(request)
        if request.method == "PATCH":
            response.close()
            raise httpx.ReadError("connection reset after the request was sent", request=request)
        return response


def test_a_change_whose_answer_was_lost_is_audited_as_unknown_and_says_to_read_back(
        rt: Runtime, simulator: SimulatorProcess) -> None:
    before = live(simulator)
    # The runtime's management client, swapped for one whose transport loses a PATCH's answer.
    rt._management = RunPodManagement(api_key=simulator.api_key, base_url=f"{simulator.root_url}/mgmt/v2",
                                      transport=_AnswerLost())

    result = scale_endpoint(rt, ENDPOINT_NAME, max=before.max + 1, actor=ACTOR)

    assert result.outcome is Outcome.UNKNOWN and "read the endpoint back" in result.message
    assert live(simulator).max == before.max + 1  # it did take: exactly why rpq must not claim either way
    [row] = audit_rows(rt)
    assert (row.ok, row.asked_max, row.after_max) == (False, before.max + 1, None)
    assert row.error is not None and "outcome unknown" in row.error


def test_the_confirmation_sees_the_plan_that_is_sent_and_a_no_sends_and_records_nothing(
        rt: Runtime, simulator: SimulatorProcess) -> None:
    before = live(simulator)
    shown: list[Workers] = []

    result = scale_endpoint(rt, ENDPOINT_NAME, max=before.max + 1, actor=ACTOR,
                            confirm=lambda plan: shown.append(plan.after) is not None)

    assert result.outcome is Outcome.DECLINED and shown == [Workers(before.min, before.max + 1, before.idle_timeout)]
    assert live(simulator) == before
    assert audit_rows(rt) == []
