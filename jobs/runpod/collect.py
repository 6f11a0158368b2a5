"""The collectors: what RunPod's management API says about the account, stored as time-stamped rows.

Five collectors, run by beat every `RUNPOD_COLLECTION_INTERVAL_SECONDS` (`collect_on_schedule`):

* endpoints: each configured endpoint's configuration (`GET /serverless/{id}`) and its workers' exact states
  (`/serverless/{id}/workers`) as one `EndpointSnapshot` each;
* account: balance, spend per hour and spend limit (GraphQL `myself`) as an `AccountSnapshot`;
* billing: each configured endpoint's billed amount per hour for the last `BILLING_HOURS` hours, upserted by
  (endpoint, hour): RunPod bills every 5 minutes and may lag about an hour, so an hour keeps growing after it ends;
* catalog: the serverless list price of every GPU type (`GpuPrice`);
* pods: every pod's status and cost per hour (`PodSnapshot`).

Each run of each collector writes one `CollectorRun` (ok, error, rows), in the same transaction as its rows.
RunPod is asked outside any transaction: a slow answer must not hold SQLite's one write lock. A call that
failed is stored as a failure (ok False, its error, NULL figures), never as zeros, which would read as an
endpoint scaled to nothing or an account with no money. Errors are the clients' own messages, which never
quote the API key.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy.dialects import postgresql, sqlite
from sqlmodel import Session, col, select

from jobs.errors import RpqError
from jobs.runpod.management import BillingRecord, EndpointConfig, WorkersView
from jobs.runtime import Runtime
from jobs.settings import Endpoint
from jobs.storage.db import session_scope
from jobs.storage.locks import Lease, release, try_acquire
from jobs.storage.models import (
    AccountSnapshot,
    BillingRecordRow,
    CollectorRun,
    EndpointSnapshot,
    GpuPrice,
    PodSnapshot,
    utcnow,
)

log = logging.getLogger("rpq.collect")

LOCK = "collectors"
#: How far back each billing run reads, in hours: RunPod's billing may lag about an hour, so an hour's amount is
#: read again (and updated in place) for a while after it ends.
BILLING_HOURS = 3
#: The workers' states an endpoint snapshot keeps, in RunPod's summary order.
WORKER_STATES = ("running", "idle", "initializing", "throttled", "unhealthy", "total")


@dataclass(frozen=True)
class Collected:
    """One collector's run as stored in `collector_runs`: whether every call worked, and the rows written."""

    collector: str
    ok: bool
    rows: int
    error: str | None = None


def _error(exc: BaseException) -> str:
    """The error as stored: its public class (a client's private marker class says nothing to an operator) and
    its message."""
    kind = next(c.__name__ for c in type(exc).__mro__ if not c.__name__.startswith("_"))
    return f"{kind}: {exc}"


def _record(session: Session, collector: str, at: datetime, rows: int, errors: Sequence[str]) -> Collected:
    """The run's own row, added to the session that writes its data."""
    error = "; ".join(errors)[:4000] or None
    session.add(CollectorRun(collector=collector, at=at, ok=not errors, error=error, rows=rows))
    if errors:
        log.warning("collector %s: %s", collector, error)
    return Collected(collector, not errors, rows, error)


# -- endpoints ----------------------------------------------------------------------------------------------


def collect_endpoints(rt: Runtime, endpoints: Sequence[Endpoint] | None = None) -> Collected:
    """One snapshot per configured endpoint; an endpoint whose calls failed gets its row with ok False."""
    started = utcnow()
    rows = [observe_endpoint(rt, endpoint) for endpoint in
            (endpoints if endpoints is not None else list(rt.settings.endpoints.values()))]
    with session_scope(rt.engine) as session:
        session.add_all(rows)
        return _record(session, "endpoints", started, len(rows),
                       [f"{row.endpoint_name}: {row.error}" for row in rows if not row.ok])


def observe_endpoint(rt: Runtime, endpoint: Endpoint) -> EndpointSnapshot:
    """One endpoint's configuration and workers as a row (not stored). The configuration is kept when only the
    workers could not be read; whatever was not read stays NULL."""
    row = EndpointSnapshot(endpoint_name=endpoint.name, endpoint_id=endpoint.id, observed_at=utcnow(), ok=False)
    try:
        config = rt.management.get_endpoint(endpoint.id)
    except RpqError as exc:
        row.error = _error(exc)
        return row
    _fill_config(row, config)
    try:
        workers = rt.management.list_workers(endpoint.id)
    except RpqError as exc:
        row.error = _error(exc)
        return row
    _fill_workers(row, workers)
    row.observed_at = utcnow()
    row.ok = True
    return row


def _fill_config(row: EndpointSnapshot, config: EndpointConfig) -> None:
    row.workers_min, row.workers_max, row.idle_timeout = config.workers_min, config.workers_max, config.idle_timeout
    row.scaling_type, row.scaling_value = config.scaling_type, config.scaling_value
    row.gpu_pools = ",".join(config.gpu_pools)[:255] if config.gpu_pools else None
    row.gpu_count, row.timeout_ms, row.flashboot = config.gpu_count, config.timeout_ms, config.flashboot


def _fill_workers(row: EndpointSnapshot, view: WorkersView) -> None:
    for state in WORKER_STATES:
        setattr(row, f"workers_{state}", getattr(view.summary, state))


def latest_endpoint(session: Session, endpoint_name: str, *, ok: bool | None = None) -> EndpointSnapshot | None:
    """The newest snapshot of an endpoint (`ok=True`: the newest that worked)."""
    statement = select(EndpointSnapshot).where(EndpointSnapshot.endpoint_name == endpoint_name)
    if ok is not None:
        statement = statement.where(EndpointSnapshot.ok == ok)
    statement = statement.order_by(col(EndpointSnapshot.observed_at).desc(), col(EndpointSnapshot.id).desc())
    return session.exec(statement.limit(1)).first()


# -- account ------------------------------------------------------------------------------------------------


def collect_account(rt: Runtime) -> Collected:
    """The balance, spend per hour and spend limit; a failed call is a row with ok False and NULL figures."""
    started = utcnow()
    row = AccountSnapshot(observed_at=started, ok=False)
    try:
        account = rt.graphql.account()
    except RpqError as exc:
        row.error = _error(exc)
    else:
        row.ok, row.observed_at = True, utcnow()
        row.balance, row.spend_per_hour, row.spend_limit = account.balance, account.spend_per_hour, account.spend_limit
    with session_scope(rt.engine) as session:
        session.add(row)
        return _record(session, "account", started, 1, [] if row.ok else [row.error or "failed"])


# -- billing ------------------------------------------------------------------------------------------------


def collect_billing(rt: Runtime, *, hours: int = BILLING_HOURS) -> Collected:
    """Each configured endpoint's billed amounts per hour, for the last `hours` hours and the current one,
    upserted by (endpoint, hour start). An endpoint whose billing could not be read keeps its earlier rows."""
    started = utcnow()
    start = started - timedelta(hours=hours)
    records: dict[tuple[str, datetime], BillingRecord] = {}
    errors: list[str] = []
    for endpoint in rt.settings.endpoints.values():
        try:
            found = rt.management.serverless_billing(endpoint.id, start=start, end=started, bucket="hour")
        except RpqError as exc:
            errors.append(f"{endpoint.name}: {_error(exc)}")
            continue
        for record in found:
            # Filtered by endpoint, a record names it; should RunPod leave it out, it is the endpoint asked about.
            records[(record.endpoint_id or endpoint.id, record.start)] = record  # a repeated bucket: the last wins
    observed = utcnow()
    with session_scope(rt.engine) as session:
        upsert_billing(session, [(endpoint_id, record) for (endpoint_id, _), record in records.items()], observed)
        return _record(session, "billing", started, len(records), errors)


def upsert_billing(session: Session, records: Sequence[tuple[str, BillingRecord]], observed_at: datetime) -> None:
    """Insert each (endpoint id, record), or update the row of the same endpoint and hour: the newest reading of an
    hour is the one kept. One statement per row, ON CONFLICT on the unique (endpoint_id, start)."""
    if not records:
        return
    dialect = session.get_bind().dialect.name
    insert_new: Callable[..., Any] = postgresql.insert if dialect == "postgresql" else sqlite.insert
    table = BillingRecordRow.__table__  # type: ignore[attr-defined]
    statement = insert_new(table)
    statement = statement.on_conflict_do_update(
        index_elements=["endpoint_id", "start"],
        set_={name: statement.excluded[name] for name in ("end", "total_amount", "gpu_amount", "observed_at")},
    )
    session.execute(statement, [
        {"endpoint_id": endpoint_id, "start": record.start, "end": record.end, "total_amount": record.total_amount,
         "gpu_amount": record.gpu_amount, "observed_at": observed_at}
        for endpoint_id, record in records
    ])


# -- catalog and pods ---------------------------------------------------------------------------------------


def collect_catalog(rt: Runtime) -> Collected:
    """One `GpuPrice` per GPU type (list prices: negotiated discounts are not in RunPod's catalog)."""
    started = utcnow()
    errors: list[str] = []
    rows: list[GpuPrice] = []
    try:
        gpus = rt.management.gpu_catalog()
    except RpqError as exc:
        errors.append(_error(exc))
    else:
        observed = utcnow()
        rows = [GpuPrice(observed_at=observed, gpu_id=gpu.id[:128], pool=gpu.pool[:64] if gpu.pool else None,
                         serverless_per_hour=gpu.serverless_price) for gpu in gpus]
    with session_scope(rt.engine) as session:
        session.add_all(rows)
        return _record(session, "catalog", started, len(rows), errors)


def collect_pods(rt: Runtime) -> Collected:
    """One `PodSnapshot` per pod. No pods is a run that worked and wrote no rows; a failed list is told apart by
    its `collector_runs` row."""
    started = utcnow()
    errors: list[str] = []
    rows: list[PodSnapshot] = []
    try:
        pods = rt.management.list_pods()
    except RpqError as exc:
        errors.append(_error(exc))
    else:
        observed = utcnow()
        rows = [PodSnapshot(observed_at=observed, pod_id=pod.id[:128], name=pod.name[:255] if pod.name else None,
                            status=pod.status[:32], cost_per_hour=pod.cost_per_hour) for pod in pods]
    with session_scope(rt.engine) as session:
        session.add_all(rows)
        return _record(session, "pods", started, len(rows), errors)


# -- every collector, on schedule ---------------------------------------------------------------------------

COLLECTORS: tuple[tuple[str, Callable[[Runtime], Collected]], ...] = (
    ("endpoints", collect_endpoints),
    ("account", collect_account),
    ("billing", collect_billing),
    ("catalog", collect_catalog),
    ("pods", collect_pods),
)


def collect_all(rt: Runtime, *, lease: Lease | None = None) -> list[Collected]:
    """Every collector once, in turn. With a lease, it is renewed before each and the round stops if it was lost
    (it ran out and another beat's round took it): the rest is that round's work."""
    done = []
    for name, collector in COLLECTORS:
        if lease is not None and not lease.renew():
            log.warning("collectors: the lease ran out before %s; another round goes on", name)
            break
        done.append(collector(rt))
    return done


def collect_on_schedule(rt: Runtime) -> list[Collected] | None:
    """Beat's round. A lease held for most of the interval (and not released) makes a second beat, or a backlog of
    rounds, skip instead of collecting the same thing twice. None: skipped.

    The lease is renewed before each collector, so a slow round is never joined by the next one; when the round
    ends it is set back to what it was taken for, so a round that renewed does not make the next beat skip."""
    engine = rt.engine
    started = utcnow()
    lease = Lease(engine, LOCK, owner=uuid.uuid4().hex,
                  length=timedelta(seconds=rt.settings.runpod_collection_interval_seconds * 0.8), mine=False)
    lease.mine = try_acquire(engine, LOCK, owner=lease.owner, lease=lease.length)
    if not lease:
        return None
    try:
        return collect_all(rt, lease=lease)
    finally:
        if lease:
            left = started + lease.length - utcnow()
            if left > timedelta(0):
                try_acquire(engine, LOCK, owner=lease.owner, lease=left)
            else:
                release(engine, LOCK, owner=lease.owner)
