"""Tenants in the Python API and the table, on SQLite and PostgreSQL: idempotency keys unique per tenant (and
among jobs without one, through a partial index), the metadata index, and reads scoped to a tenant."""

from __future__ import annotations

import pytest

import jobs
from jobs.runtime import Runtime
from tests.conftest import ENDPOINT_NAME

pytestmark = pytest.mark.integration


@pytest.fixture
def rt(runtime: Runtime) -> Runtime:
    runtime.settings = runtime.settings.model_copy(update={"metadata_index": ("user", "org")})
    return runtime


def test_an_idempotency_key_is_one_job_per_tenant_and_one_among_jobs_without_a_tenant(rt: Runtime) -> None:
    shop = jobs.submit(ENDPOINT_NAME, {}, idempotency_key="order-1", tenant="shop", runtime=rt)
    app = jobs.submit(ENDPOINT_NAME, {}, idempotency_key="order-1", tenant="app", runtime=rt)
    untenanted = jobs.submit(ENDPOINT_NAME, {}, idempotency_key="order-1", runtime=rt)

    again = [jobs.submit(ENDPOINT_NAME, {"other": 1}, idempotency_key="order-1", tenant=t, runtime=rt)
             for t in ("shop", "app", None)]

    assert len({shop.id, app.id, untenanted.id}) == 3
    assert [j.id for j in again] == [shop.id, app.id, untenanted.id]
    assert len(jobs.list_jobs(runtime=rt)) == 3


def test_reads_and_changes_with_a_tenant_find_only_its_jobs(rt: Runtime) -> None:
    shop = jobs.submit(ENDPOINT_NAME, {}, tenant="shop", runtime=rt)
    app = jobs.submit(ENDPOINT_NAME, {}, tenant="app", runtime=rt)
    untenanted = jobs.submit(ENDPOINT_NAME, {}, runtime=rt)

    for call in (jobs.get, jobs.cancel, jobs.retry, jobs.events, jobs.stream_events):
        with pytest.raises(jobs.JobNotFound):
            call(shop.id, tenant="app", runtime=rt)  # type: ignore[operator]
    assert [j.id for j in jobs.list_jobs(tenant="shop", runtime=rt)] == [shop.id]
    assert {j.id for j in jobs.list_jobs(runtime=rt)} == {shop.id, app.id, untenanted.id}
    assert jobs.get(shop.id, tenant="shop", runtime=rt).tenant == "shop"
    assert jobs.get(shop.id, runtime=rt).status is jobs.JobStatus.PENDING  # nothing above changed it


def test_list_jobs_filters_by_indexed_metadata_values_compared_as_text(rt: Runtime) -> None:
    made = {name: jobs.submit(ENDPOINT_NAME, {}, metadata=metadata, tenant="shop", runtime=rt).id
            for name, metadata in {"int": {"user": 42, "org": "a"}, "text": {"user": "42"},
                                   "other": {"user": 43, "org": "a"}, "nested": {"user": {"id": 42}},
                                   "true": {"user": True}, "none": None}.items()}

    def found(**meta: object) -> set[str]:
        return {j.id for j in jobs.list_jobs(meta=meta, runtime=rt)}  # type: ignore[arg-type]

    assert found(user="42") == found(user=42) == {made["int"], made["text"]}
    assert found(user=42, org="a") == {made["int"]}
    assert found(org="a") == {made["int"], made["other"]}
    assert found(user=True) == found(user="true") == {made["true"]}
    assert found(user="nobody") == set()
    with pytest.raises(jobs.InvalidJob) as caught:
        jobs.list_jobs(meta={"team": "x", "user": 1.5}, tenant="not a tenant", runtime=rt)
    assert {(p.field, p.constraint) for p in caught.value.problems} == {
        ("meta", "known"), ("meta.user", "format"), ("tenant", "format")}
